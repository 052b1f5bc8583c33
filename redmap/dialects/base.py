"""`Dialect`: how one kind of Redis deployment is reached; used by `Engine`.

This module is the one place where redis-py errors become `redmap.exc` errors
(`translate_errors`), and the sync driver of the flush protocol (`execute_flush`):
the protocol (`redmap.orm.flushprotocol`, I/O-free) decides, this module moves bytes.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import redis
import redis.exceptions as rex

from ..commands import Command, LoneReply, LoneScript, RoundTripHook
from ..exc import RedmapConnectionError, RedmapError
from ..orm.flushprotocol import (
    APPLIED_ATTR,
    SCRIPT_THRESHOLD,
    ClientExecute,
    FlushProtocol,
    Lost,
    Reply,
    Request,
    RoundTrip,
    ScriptCache,
    Settle,
    interrupted_outcome,
    raise_interrupted,
)
from ..urls import password_of as _password_of
from ..urls import safe_url
from ._retry import ReadRetry


def _find_hiredis_pack() -> Callable[[Any], bytes] | None:
    """hiredis's command packer; hiredis is an optional speed-up (and may lack stubs)."""
    try:
        module = importlib.import_module("hiredis")
    except ImportError:
        return None
    pack: Callable[[Any], bytes] | None = getattr(module, "pack_command", None)
    return pack


_hiredis_pack = _find_hiredis_pack()

if TYPE_CHECKING:
    from redis.connection import ConnectionPool

    from ..orm.flushplan import FlushPlan
    from ..orm.flushprotocol import FlushJob

__all__ = [
    "APPLIED_ATTR",
    "Command",
    "Dialect",
    "RoundTripHook",
    "exec_blocks",
    "interrupted_outcome",
    "raise_interrupted",
    "safe_url",
    "send_and_read",
    "split_exec_blocks",
    "translate_errors",
]


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn redis-py errors into `redmap.exc` errors that name the URL without a password."""
    # The URL without its password is worked out only when an error is translated:
    # every round trip enters this block, and parsing the URL cost microseconds each.
    try:
        yield
    except RedmapError:
        raise
    except (rex.RedisError, OSError) as exc:
        _translate(url, exc)


def _translate(url: str, error: BaseException) -> NoReturn:
    """Raise the `redmap.exc` error for a redis-py error of a round trip to `url`."""
    shown = safe_url(url)
    secret = _password_of(url)

    def clean(exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(secret, "***") if secret else text

    try:
        raise error
    except rex.AuthenticationError as exc:
        if secret is None:  # Redis answers HELLO or AUTH text that does not say this
            raise RedmapConnectionError(
                "the server requires a password: put it in the URL "
                "(redis://:PASSWORD@host:port/0, or redis://USER:PASSWORD@... for an ACL user)",
                url=shown,
            ) from None
        raise RedmapConnectionError(f"authentication failed ({clean(exc)})", url=shown) from None
    except rex.BusyLoadingError:
        raise RedmapConnectionError(
            "Redis is loading its data set into memory (after a restart, until its AOF or "
            "RDB file is read); try again once INFO persistence shows loading:0",
            url=shown,
        ) from None
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise RedmapConnectionError(f"cannot talk to Redis ({clean(exc)})", url=shown) from None
    except rex.RedisError as exc:
        if "DB index is out of range" in str(exc):
            raise RedmapConnectionError(
                "the database number at the end of the URL does not exist on this server "
                "(it has `databases` of them, 16 unless configured: /0 to /15)",
                url=shown,
            ) from None
        raise RedmapError(f"Redis refused a command ({clean(exc)}) (url: {shown})") from None


_REDIRECTS = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)


def _pack(conn: Any, commands: Sequence[Command]) -> list[bytes]:
    """The commands in the Redis protocol, by hiredis's packer when it is installed.

    redis-py's own packing runs an encoder call per argument in Python, a third of a
    10,000-object flush. hiredis encodes str as UTF-8 and numbers by their repr, as
    redis-py's encoder does; anything else hiredis refuses (TypeError) goes to redis-py.
    """
    if _hiredis_pack is None or conn.encoder.encoding != "utf-8":
        packed: list[bytes] = conn.pack_commands(commands)
        return packed
    try:
        return [b"".join([_hiredis_pack(cmd) for cmd in commands])]
    except TypeError:
        packed = conn.pack_commands(commands)
        return packed


def send_and_read(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """Send `commands` on `conn` in one write and read every reply; an error reply comes
    back as its exception, in its place, so one refused command does not hide the rest."""
    conn.send_packed_command(_pack(conn, commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


_WANTS_COMMAND_NAME: dict[type, bool] = {}


def _wants_command_name(pool_class: type) -> bool:
    """Whether `get_connection` of this pool class needs a command name (redis-py < 5.3;
    later versions deprecate passing one). Cached per class: `inspect.signature` cost a
    tenth of a one-object flush."""
    known = _WANTS_COMMAND_NAME.get(pool_class)
    if known is not None:
        return known
    try:
        get_connection: Any = getattr(pool_class, "get_connection", None)
        param = inspect.signature(get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        param = None
    wants = param is not None and param.default is inspect.Parameter.empty
    _WANTS_COMMAND_NAME[pool_class] = wants
    return wants


def _checkout(pool: Any) -> Any:
    """A connection of `pool` for a flush, whichever redis-py the user installed."""
    if _wants_command_name(type(pool)):
        return pool.get_connection("MULTI")
    return pool.get_connection()


def _redirected(replies: Sequence[Any]) -> bool:
    return any(isinstance(r, _REDIRECTS) for r in replies)


def _is_redirect(reply: Any) -> bool:
    """Whether an error reply says the slot lives elsewhere (the protocol's question)."""
    return isinstance(reply, _REDIRECTS)


def exec_blocks(groups: Sequence[Sequence[Command]]) -> list[Command]:
    """The groups as MULTI/EXEC blocks, one after another, to send in one pipeline."""
    flat: list[Command] = []
    for g in groups:
        flat.extend([("MULTI",), *g, ("EXEC",)])
    return flat


def split_exec_blocks(
    groups: Sequence[Sequence[Command]], replies: Sequence[Any]
) -> list[list[Any] | None]:
    """Each group's EXEC replies out of the replies of `exec_blocks(groups)`; None for a
    block the cluster redirected (it ran nothing). A refused block or command raises."""
    out: list[list[Any] | None] = []
    at = 0
    for g in groups:
        block = replies[at : at + len(g) + 2]
        at += len(g) + 2
        if _redirected(block):
            out.append(None)
            continue
        exec_reply = block[-1]
        if isinstance(exec_reply, Exception) or exec_reply is None:
            errors = [r for r in block if isinstance(r, Exception)]
            raise RedmapError(f"Redis refused a transaction: {errors[0] if errors else exec_reply}")
        for r in exec_reply:
            if isinstance(r, Exception):
                raise RedmapError(f"Redis refused a command: {r}")
        out.append(list(exec_reply))
    return out


# What a driver reports to the protocol as `Lost`: the connection, not Redis, failed.
_CONNECTION_ERRORS = (rex.ConnectionError, rex.TimeoutError, OSError)


class Dialect:
    """A way to reach Redis: client construction, pipelined reads, and the flush transaction.

    Subclasses advertise what they can do with `supports_*` flags; tests skip by
    capability, never by dialect name.
    """

    name = "base"
    # One WATCH/MULTI/EXEC can span every key of a flush.
    supports_multi_key_transactions = True
    # Keys live in several hash slots on several nodes.
    supports_cluster = False
    # The server is started and stopped by redmap itself.
    supports_embedded_server = False
    # When reads are sent again (cut connection, server loading); never the flush.
    read_retry = ReadRetry()

    def __init__(self, url: str, *, hook: RoundTripHook, **client_options: Any):
        self.url = url
        self.safe_url = safe_url(url)
        self._hook = hook
        # Whether the server is known to hold the flush script (`FlushProtocol`).
        self.script_cache = ScriptCache()
        self.client: Any = self.create_client(url, **client_options)

    def create_client(self, url: str, **options: Any) -> Any:
        raise NotImplementedError

    def dispose(self) -> None:
        """Close every pooled connection."""
        with contextlib.suppress(Exception):
            self.client.close()

    # -- reads ----------------------------------------------------------------------

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one pipelined round trip; error replies come back as exceptions.

        The round trip is sent again when its connection is cut or the server is loading
        its data set (`read_retry`): for reads, and for commands whose repetition is
        harmless (the flush's counter INCRBYs: a repeated one only skips ids).
        """
        if not commands:
            return []

        def attempt() -> list[Any]:
            self._hook(commands)
            pipe = self.client.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

        with translate_errors(self.url):
            return self.read_retry.call(attempt, url=self.safe_url)

    def wait_until_loaded(self) -> None:
        """Return once the server (every primary, on a cluster) has loaded its data set.

        For callers of the raw redis-py client (migrations, the audit): their commands are
        not re-sent, and a restarted server answers LOADING until its AOF or RDB file is
        read. DBSIZE is refused while loading, so asking it under `read_retry` waits (up
        to its `loading_timeout`, then RedmapConnectionError); loading happens only at
        start-up, so once it answers, the raw client's commands are served.
        """
        self._hook([("DBSIZE",)])
        with translate_errors(self.url):
            self.read_retry.call(self.client.dbsize, url=self.safe_url)

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """HGETALL of each key in one round trip: a dict per key (empty when absent), or
        the error Redis answered for it. The loading path of get_many, selectin and
        query results."""
        return self.execute([("HGETALL", k) for k in keys])

    def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """Run `commands` in one MULTI/EXEC (one round trip) and return their results.

        For reads that need a consistent snapshot or temporary keys (queries); a
        command error raises. Sent again like `execute`'s reads: a second run of a
        query's transaction rebuilds and deletes the same temporary keys.
        """

        def attempt() -> list[Any]:
            self._hook([("MULTI",), *commands, ("EXEC",)])
            pipe = self.client.pipeline(transaction=True)
            for cmd in commands:
                pipe.execute_command(*cmd)
            results: list[Any] = pipe.execute()
            return results

        with translate_errors(self.url):
            return self.read_retry.call(attempt, url=self.safe_url)

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Run several MULTI/EXEC groups; one round trip each unless a dialect can do better."""
        return [self.execute_transaction(g) for g in groups]

    def _pipelined_transactions(
        self, client: Any, groups: Sequence[Sequence[Command]]
    ) -> list[list[Any] | None]:
        """Each group's EXEC replies, the groups sent as MULTI/EXEC blocks in one pipeline
        on `client` (one server); None for a block the cluster redirected (it ran nothing).
        """
        flat = exec_blocks(groups)

        def attempt() -> list[Any]:
            self._hook(flat)
            pipe = client.pipeline(transaction=False)
            for cmd in flat:
                pipe.execute_command(*cmd)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

        with translate_errors(self.url):
            replies = self.read_retry.call(attempt, url=self.safe_url)
        return split_exec_blocks(groups, replies)

    # -- the flush: a driver of `FlushProtocol` ----------------------------------------

    def _flush_pool(self, route: str) -> ConnectionPool:
        """The pool of the server holding `route` (a key of the flush)."""
        pool: ConnectionPool = self.client.connection_pool
        return pool

    def check_plan(self, plan: FlushPlan) -> None:
        """Refuse, before any I/O, a plan this deployment cannot run (none here)."""

    def refresh_topology(self) -> None:
        """Learn where keys live again after a redirect (nothing to learn here)."""

    def execute_flush(
        self,
        job: FlushJob,
        *,
        execute: Callable[[Sequence[Command]], list[Any]] | None = None,
        script_threshold: int | None = SCRIPT_THRESHOLD,
    ) -> None:
        """Drive the flush protocol (`redmap.orm.flushprotocol`) on redis-py connections.

        This loop only moves bytes: it checks out the flush connection, sends each
        request's commands, feeds replies back (a failed connection as `Lost`, what
        `execute` raised by throwing it in), and releases the connection, disconnecting
        it when the protocol says it is `broken`. Every decision is the protocol's.
        `execute` sends `ClientExecute` requests (default: `self.execute`).

        A `KeyboardInterrupt` during a round trip is a lost reply: the EXEC may have
        left already, so stopping at once would leave the outcome unknown. It is fed to
        the protocol as `Lost("KeyboardInterrupt")` and the protocol runs to its end
        (after a lost EXEC reply, its settle round trip); then the KeyboardInterrupt is
        raised, carrying `redmap_applied` (see `interrupted_outcome`). A second one
        during the settle makes the settle `Lost` (outcome unknown).
        """
        protocol = FlushProtocol(
            job,
            url=self.safe_url,
            is_redirect=_is_redirect,
            check_plan=self.check_plan,
            script_threshold=script_threshold,
            script_cache=self.script_cache,
        )
        run_client = execute or self.execute
        steps = protocol.run()
        pool: Any = None
        conn: Any = None
        # The KeyboardInterrupt fed to the protocol as a lost reply, raised at the end.
        interrupt: KeyboardInterrupt | None = None
        error: BaseException | None = None
        try:
            request: Request = next(steps)
            while True:
                reply: Reply
                if isinstance(request, RoundTrip):
                    if interrupt is not None:
                        # The connection went with the interrupted round trip.
                        reply = Lost("KeyboardInterrupt")
                    else:
                        try:
                            if conn is None:
                                pool = self._flush_pool(request.route)
                                with translate_errors(self.url):
                                    conn = _checkout(pool)
                            reply = self._round_trip(conn, request.commands)
                        except _CONNECTION_ERRORS as exc:
                            reply = Lost(type(exc).__name__)
                        except KeyboardInterrupt as exc:
                            interrupt = exc
                            reply = Lost("KeyboardInterrupt")
                    request = steps.send(reply)
                elif isinstance(request, ClientExecute):
                    if interrupt is not None:
                        request = steps.throw(interrupt)
                        continue
                    try:
                        replies = run_client(request.commands)
                    except BaseException as exc:
                        if isinstance(exc, KeyboardInterrupt):
                            interrupt = exc
                        request = steps.throw(exc)
                    else:
                        request = steps.send(replies)
                elif isinstance(request, Settle):
                    try:
                        reply = self._settle(request)
                    except KeyboardInterrupt as exc:
                        interrupt = interrupt or exc
                        reply = Lost("KeyboardInterrupt")
                    request = steps.send(reply)
                else:
                    self._release(pool, conn, broken=protocol.broken)
                    pool = conn = None
                    if interrupt is not None:
                        request = steps.throw(interrupt)  # nothing was written: stop here
                        continue
                    try:
                        time.sleep(min(0.5, 0.01 * request.attempt) * random.uniform(0.5, 1.0))
                        with translate_errors(self.url):
                            self.refresh_topology()
                    except KeyboardInterrupt as exc:
                        interrupt = exc
                        request = steps.throw(exc)
                    else:
                        request = steps.send(None)
        except StopIteration:
            pass
        except BaseException as exc:
            if interrupt is None:
                raise
            error = exc
        finally:
            self._release(pool, conn, broken=protocol.broken)
        if interrupt is not None:
            raise_interrupted(interrupt, error)

    def lone_script(self, request: LoneScript) -> LoneReply | None:
        """Send the counter lane's script invocation alone (`redmap.orm.counterlane`):
        its reply, a connection failure as `Lost`, a KeyboardInterrupt as `Lost` with
        the interruption. None, with nothing sent, until this engine saw the flush
        script run (the general path then sends its body) or when no connection can be
        checked out (the general path then reports it)."""
        if not self.script_cache.loaded:
            return None
        try:
            pool = self._flush_pool(request.route)
            conn = _checkout(pool)
        except (rex.RedisError, OSError):
            return None
        broken = True
        sent_at = time.monotonic()
        try:
            reply: Any = self._round_trip(conn, [request.command])[0]
            broken = False
        except _CONNECTION_ERRORS as exc:
            reply = Lost(type(exc).__name__)
        except KeyboardInterrupt as exc:
            return LoneReply(Lost("KeyboardInterrupt"), sent_at, exc)
        finally:
            self._release(pool, conn, broken=broken)
        return LoneReply(reply, sent_at)

    @staticmethod
    def _release(pool: Any, conn: Any, *, broken: bool) -> None:
        if conn is None:
            return
        if broken:
            with contextlib.suppress(Exception):
                conn.disconnect()
        pool.release(conn)

    def _round_trip(self, conn: Any, commands: Sequence[Command]) -> list[Any]:
        self._hook(commands)
        return send_and_read(conn, commands)

    def _settle(self, request: Settle) -> Reply:
        """A `Settle` round trip on a fresh connection outside the pool (the pooled ones
        may share the fault); any failure, refusals included, is `Lost`."""
        pool = self._flush_pool(request.route)
        conn = None
        try:
            conn = pool.connection_class(**pool.connection_kwargs)
            return self._round_trip(conn, request.commands)
        except (rex.RedisError, OSError) as exc:
            return Lost(type(exc).__name__)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.disconnect()


def default_client_options() -> dict[str, Any]:
    """Options redmap passes to redis-py unless the user overrides them."""
    return {"socket_connect_timeout": 10.0, "socket_timeout": 30.0}


def build_standalone_client(url: str, **options: Any) -> redis.Redis:
    opts = default_client_options()
    opts.update(options)
    return redis.Redis.from_url(url, **opts)
