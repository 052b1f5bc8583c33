"""`Engine`, `create_engine()`, `configure()` and the default engine; used by sessions.

An engine owns one dialect (chosen by URL scheme) and counts every round trip it
makes, which is what `echo=True` logs and what `redmap.testing` asserts on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import dialects
from .dialects.base import Command, Dialect, safe_url

if TYPE_CHECKING:
    from .persistence import FlushPlan

__all__ = ["Engine", "configure", "create_engine", "default_engine"]

log = logging.getLogger("redmap.engine")

Listener = Callable[[Sequence[Command]], None]


class Engine:
    """A configured way to reach Redis, shared by many sessions (thread-safe)."""

    def __init__(self, url: str, *, echo: bool = False, **client_options: Any):
        self.url = safe_url(url)
        self.echo = echo
        self._listeners: list[Listener] = []
        dialect_cls = dialects.load(url)
        self.dialect: Dialect = dialect_cls(url, hook=self._on_round_trip, **client_options)

    def __repr__(self) -> str:
        return f"Engine({self.url})"

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

    # -- I/O --------------------------------------------------------------------------

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """One pipelined round trip of read commands."""
        return self.dialect.execute(commands)

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """Every key's hash (a dict, empty when absent) in one round trip."""
        return self.dialect.fetch_hashes(keys)

    def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """One MULTI/EXEC round trip of commands (queries)."""
        return self.dialect.execute_transaction(commands)

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Several MULTI/EXEC groups (a query fanned out over shards)."""
        return self.dialect.execute_transactions(groups)

    def flush(self, plan: FlushPlan) -> None:
        """Apply a flush plan atomically (see `Dialect.execute_flush`)."""
        self.dialect.execute_flush(plan)

    def dispose(self) -> None:
        """Close pooled connections; the engine reconnects if used again."""
        self.dialect.dispose()


def _render(cmd: Command) -> str:
    parts = []
    for part in cmd:
        if isinstance(part, bytes):
            text = part[:60].decode("utf-8", "backslashreplace")
            parts.append(repr(text) + ("..." if len(part) > 60 else ""))
        else:
            parts.append(str(part))
    return " ".join(parts)


def create_engine(url: str, *, echo: bool = False, **client_options: Any) -> Engine:
    """An engine for `url` (`redis://`, `rediss://`, `unix://`, `redis+cluster://`,
    `redis+embedded://`); extra keyword arguments go to the redis-py client.

    Nothing connects until the first command, except `redis+embedded://`, which starts
    (or joins) its server at once.
    """
    return Engine(url, echo=echo, **client_options)


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
