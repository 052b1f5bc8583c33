"""`Engine`, `create_engine()`, `configure()` and the default engine; used by sessions.

An engine owns one dialect (chosen by URL scheme) and counts every round trip it
makes, which is what `echo=True` logs and what `redmap.testing` asserts on.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, TypeVar

from . import dialects
from .commands import (
    Command,
    FetchHashes,
    LoneReply,
    LoneScript,
    Read,
    Request,
    Steps,
    Transactions,
)
from .exc import InvalidRequestError
from .orm.expiry import SWEEP_BATCH
from .orm.flushprotocol import SCRIPT_THRESHOLD
from .orm.sweep import registry_mappers, sweep_all_steps
from .urls import safe_url

if TYPE_CHECKING:
    from .dialects.base import Dialect
    from .orm.flushprotocol import FlushJob

__all__ = ["Engine", "EngineBase", "configure", "create_engine", "default_engine"]

T = TypeVar("T")

log = logging.getLogger("redmap.engine")

Listener = Callable[[Sequence[Command]], None]
#: `echo=True` prints commands, `echo="debug"` their replies too, `False` nothing.
Echo: TypeAlias = bool | Literal["debug"]


class _EchoHandler(logging.Handler):
    """Prints `redmap.engine` records on the current `sys.stdout`, as SQLAlchemy's `echo=True`
    does, but only while logging has no other handler for them: once the application sets
    up logging, its handlers show each line and this one stays silent (never twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if _other_handlers(logging.getLogger(record.name)):
            return
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:  # a closed stdout must not break a flush
            self.handleError(record)


_echo_handler = _EchoHandler()


def _other_handlers(logger: logging.Logger) -> bool:
    """Whether a record of `logger` reaches a handler other than the echo one."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(h is not _echo_handler for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


def _enable_echo(echo: Echo) -> None:
    """Make the engine logger show what `echo` asks for (INFO commands, DEBUG replies)."""
    if not echo:
        return
    if _echo_handler not in log.handlers:
        log.addHandler(_echo_handler)
    level = logging.DEBUG if echo == "debug" else logging.INFO
    if log.level == logging.NOTSET or log.level > level:
        log.setLevel(level)


class EngineBase:
    """What the sync `Engine` and `redmap.asyncio.AsyncEngine` share: the URL shown
    (without a password), `echo`, and the listeners called before every round trip."""

    def __init__(
        self, url: str, *, echo: Echo = False, flush_script_threshold: int | None = SCRIPT_THRESHOLD
    ):
        self.url = safe_url(url)
        self.echo = echo
        self._listeners: list[Listener] = []
        # Flushes of more objects run as one script inside MULTI, in linear time
        # (docs/design/flush-concurrency.md); None keeps every flush on WATCH + checks.
        self.flush_script_threshold = flush_script_threshold

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url})"

    @property
    def echo(self) -> Echo:
        """True: print each command sent; "debug": each reply too; False: nothing."""
        return self._echo

    @echo.setter
    def echo(self, value: Echo) -> None:
        if value not in (True, False, "debug"):
            raise InvalidRequestError(f"echo must be True, False or 'debug', not {value!r}")
        _enable_echo(value)
        self._echo = value

    # -- observation ----------------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(commands)` before every round trip (used by `redmap.testing`)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def _on_round_trip(self, commands: Sequence[Command]) -> None:
        if self.echo:
            for cmd in commands:
                log.info("%s", _render(cmd))
        for fn in list(self._listeners):
            fn(commands)

    def _echo_replies(self, replies: Sequence[Any]) -> None:
        if self.echo == "debug":
            for reply in replies:
                log.debug("-> %s", _render_reply(reply))


class Engine(EngineBase):
    """A configured way to reach Redis, shared by many sessions (thread-safe)."""

    def __init__(
        self,
        url: str,
        *,
        echo: Echo = False,
        flush_script_threshold: int | None = SCRIPT_THRESHOLD,
        **client_options: Any,
    ):
        super().__init__(url, echo=echo, flush_script_threshold=flush_script_threshold)
        dialect_cls = dialects.load(url)
        self.dialect: Dialect = dialect_cls(url, hook=self._on_round_trip, **client_options)

    # -- driving the core ----------------------------------------------------------------

    def run(self, steps: Steps[T]) -> T:
        """Drive a core generator to its end, blocking: perform each request it yields
        and send the reply back; what the I/O raised is thrown into it, so its own
        `try`/`finally` blocks run as in plain code. Returns what the generator returns.
        """
        try:
            request = next(steps)
            while True:
                try:
                    reply = self._perform(request)
                except BaseException as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(reply)
        except StopIteration as stop:
            result: T = stop.value
            return result

    def _perform(self, request: Request) -> Any:
        if isinstance(request, Read):
            return self.execute(request.commands)
        if isinstance(request, FetchHashes):
            return self.fetch_hashes(request.keys)
        if isinstance(request, Transactions):
            return self.execute_transactions(request.groups)
        self.flush(request.job)
        return None

    # -- I/O --------------------------------------------------------------------------

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """One pipelined round trip of read commands."""
        replies = self.dialect.execute(commands)
        self._echo_replies(replies)
        return replies

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """Every key's hash (a dict, empty when absent) in one round trip."""
        replies = self.dialect.fetch_hashes(keys)
        self._echo_replies(replies)
        return replies

    def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """One MULTI/EXEC round trip of commands (queries)."""
        replies = self.dialect.execute_transaction(commands)
        self._echo_replies(replies)
        return replies

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Several MULTI/EXEC groups (a query fanned out over shards)."""
        replies = self.dialect.execute_transactions(groups)
        for group in replies:
            self._echo_replies(group)
        return replies

    def lone_script(self, request: LoneScript) -> LoneReply | None:
        """Send the counter lane's script invocation alone (`redmap.orm.counterlane`):
        its `LoneReply`, or None when the dialect did not send it."""
        return self.dialect.lone_script(request)

    def flush(self, job: FlushJob) -> None:
        """Run one flush atomically: the flush protocol (`redmap.orm.flushprotocol`) driven by
        the dialect; its INCRBYs go through `execute` (echoed like reads)."""
        self.dialect.execute_flush(
            job, execute=self.execute, script_threshold=self.flush_script_threshold
        )

    def sweep(self, registry: Any, *, batch: int = SWEEP_BATCH) -> int:
        """Purge every object of `registry` whose deadline passed (ExpiresAt, or a soft
        delete's grace period): its hash and every index, unique and link entry, found
        through the per-model deadline zsets, never by SCAN. Returns how many objects were
        purged. Safe to run at any time, from any number of processes (docs/expiry.md)."""
        return self.run(sweep_all_steps(self, registry_mappers(registry), batch=batch))

    def dispose(self) -> None:
        """Close pooled connections; the engine reconnects if used again."""
        self.dialect.dispose()


def _render_reply(reply: Any) -> str:
    """A reply as one short line (long values cut, like commands)."""
    text = repr(reply)
    return text if len(text) <= 200 else text[:200] + "..."


def _render(cmd: Command) -> str:
    parts = []
    for part in cmd:
        if isinstance(part, bytes):
            text = part[:60].decode("utf-8", "backslashreplace")
            parts.append(repr(text) + ("..." if len(part) > 60 else ""))
        else:
            text = str(part)
            # The flush script's body (SCRIPT LOAD) is not worth a screenful per flush.
            parts.append(text if len(text) <= 200 else text[:60] + "...")
    return " ".join(parts)


def create_engine(
    url: str,
    *,
    echo: Echo = False,
    flush_script_threshold: int | None = SCRIPT_THRESHOLD,
    **client_options: Any,
) -> Engine:
    """An engine for `url` (`redis://`, `rediss://`, `unix://`, `redis+cluster://`,
    `redis+embedded://`); extra keyword arguments go to the redis-py client.

    `echo=True` prints every command sent on stdout (through the `redmap.engine`
    logger, at INFO), `echo="debug"` each reply too (DEBUG); no logging setup needed.

    Nothing connects until the first command, except `redis+embedded://`, which starts
    (or joins) its server at once.
    """
    return Engine(
        url, echo=echo, flush_script_threshold=flush_script_threshold, **client_options
    )


_default: Engine | None = None
_default_lock = threading.Lock()


def configure(url_or_engine: str | Engine, **options: Any) -> Engine:
    """Set the engine `Session()` uses when given none."""
    global _default
    engine = (
        url_or_engine
        if isinstance(url_or_engine, Engine)
        else create_engine(url_or_engine, **options)
    )
    with _default_lock:
        _default = engine
    return engine


def default_engine() -> Engine:
    """The `configure()` engine, else one for `REDMAP_URL`, else an embedded server (./.redmap/)."""
    global _default
    with _default_lock:
        if _default is None:
            url = os.environ.get("REDMAP_URL") or "redis+embedded://"
            _default = create_engine(url)
        return _default


def _reset_default() -> None:
    """Forget the default engine (tests)."""
    global _default
    with _default_lock:
        _default = None
