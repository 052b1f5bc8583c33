"""`LoopEngine`: the sync `Session` API driven by the *async* driver, for the suite.

Every read and flush of the ORM is one generator of requests (`redmap.commands.Steps`);
`Engine.run` performs them blocking, `AsyncEngine.run` awaits them. A `LoopEngine` is
an `Engine` whose `run` hands the steps to an `AsyncEngine` on a private event loop, so
a test written against `Session` exercises the asyncio driver end to end (async
dialects, the async flush driver, redis.asyncio connections), lazy loads included.
The `AsyncSession` wrapper itself is tested in tests/test_asyncio.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any, TypeVar

from redmap import Engine
from redmap.asyncio import AsyncEngine, create_async_engine
from redmap.commands import Command, Steps

__all__ = ["DRIVER_ENV", "LoopEngine", "make_engine"]

#: `sync` (default) or `async`: the driver of the engines the suite's fixtures and
#: workers create (`make_engine`); the `driver` fixture sets it per test.
DRIVER_ENV = "REDMAP_TEST_DRIVER"
# Flushes of more objects than this run as one script ("none": never; unset: the default).
SCRIPT_ENV = "REDMAP_TEST_SCRIPT_THRESHOLD"


def make_engine(url: str, **options: Any) -> Engine:
    """An engine on the driver `REDMAP_TEST_DRIVER` names: the sync `Engine`, or a
    `LoopEngine` (the same Session API on the asyncio driver). Worker processes inherit
    the variable, so a race test's writers use the driver of the test."""
    options = {**script_option(), **options}
    if os.environ.get(DRIVER_ENV, "sync") == "async":
        return LoopEngine(url, **options)
    return Engine(url, **options)

def script_option() -> dict[str, Any]:
    """`flush_script_threshold` as `REDMAP_TEST_SCRIPT_THRESHOLD` says ({} when unset)."""
    threshold = os.environ.get(SCRIPT_ENV)
    if threshold is None:
        return {}
    return {"flush_script_threshold": None if threshold == "none" else int(threshold)}


T = TypeVar("T")


class _DialectView:
    """The async dialect, except `client`: tests read and write Redis directly through
    `engine.dialect.client`, which must stay a sync redis-py client (a sync engine on
    the same URL provides it)."""

    def __init__(self, owner: LoopEngine) -> None:
        self._owner = owner

    @property
    def client(self) -> Any:
        return self._owner.raw_engine().dialect.client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.async_engine.dialect, name)


class LoopEngine(Engine):
    """An `Engine` look-alike running everything through `redmap.asyncio`."""

    def __init__(self, url: str, **options: Any) -> None:  # no sync dialect is created
        self._args = (url, options)
        self._loop = asyncio.new_event_loop()
        self.async_engine: AsyncEngine = create_async_engine(url, **options)
        self.url = self.async_engine.url
        self.dialect = _DialectView(self)  # type: ignore[assignment]
        self._raw: Engine | None = None

    def raw_engine(self) -> Engine:
        """A sync engine on the same URL, for direct access in tests (`dialect.client`)."""
        if self._raw is None:
            self._raw = Engine(self._args[0])
        return self._raw

    @property  # type: ignore[override]
    def flush_script_threshold(self) -> int | None:
        return self.async_engine.flush_script_threshold

    @flush_script_threshold.setter
    def flush_script_threshold(self, value: int | None) -> None:
        self.async_engine.flush_script_threshold = value

    # Listeners and echo live on the async engine (it calls them for every round trip).
    def add_listener(self, fn: Any) -> None:
        self.async_engine.add_listener(fn)

    def remove_listener(self, fn: Any) -> None:
        self.async_engine.remove_listener(fn)

    @property
    def echo(self) -> Any:
        return self.async_engine.echo

    @echo.setter
    def echo(self, value: Any) -> None:
        self.async_engine.echo = value

    def _wait(self, make: Any) -> Any:
        """Run the coroutine `make(async_engine)` on the loop."""
        if self._loop.is_closed():
            # Used again after dispose(): a new loop, and a new client bound to it (the
            # listeners and echo setting carry over).
            url, options = self._args
            old = self.async_engine
            self._loop = asyncio.new_event_loop()
            self.async_engine = create_async_engine(url, echo=old.echo, **options)
            for fn in old._listeners:
                self.async_engine.add_listener(fn)
        return self._loop.run_until_complete(make(self.async_engine))

    def run(self, steps: Steps[T]) -> T:
        if self._loop.is_running():
            # Re-entered from a round-trip listener (a test of re-entrance): what fails
            # before its first request fails here too; I/O cannot nest in one loop.
            try:
                next(steps)
            except StopIteration as stop:
                done: T = stop.value
                return done
            steps.close()
            raise RuntimeError("LoopEngine: I/O from inside a round trip cannot nest")
        result: T = self._wait(lambda e: e.run(steps))
        return result

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        replies: list[Any] = self._wait(lambda e: e.execute(commands))
        return replies

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        replies: list[Any] = self._wait(lambda e: e.fetch_hashes(keys))
        return replies

    def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        replies: list[Any] = self._wait(lambda e: e.execute_transaction(commands))
        return replies

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        replies: list[list[Any]] = self._wait(lambda e: e.execute_transactions(groups))
        return replies

    def flush(self, job: Any) -> None:
        self._wait(lambda e: e.flush(job))

    def dispose(self) -> None:
        if not self._loop.is_closed():
            self._wait(lambda e: e.dispose())
            self._loop.close()
        if self._raw is not None:
            self._raw.dispose()
