"""`AsyncEngine` and `create_async_engine()`: the asyncio driver of the core.

The ORM's reads and flushes are written once, as generators of requests
(`redmap.commands.Steps`); `Engine.run` performs them blocking, `AsyncEngine.run`
awaits them on `redis.asyncio` through an async dialect. Nothing here decides anything
about objects: it moves bytes and sends the replies back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .. import dialects
from ..commands import Command, FetchHashes, Read, Request, Steps, Transactions
from ..engine import Echo, EngineBase
from ..orm.expiry import SWEEP_BATCH
from ..orm.flushprotocol import SCRIPT_THRESHOLD
from ..orm.sweep import registry_mappers, sweep_all_steps

if TYPE_CHECKING:
    from ..dialects.asyncio_base import AsyncDialect

__all__ = ["AsyncEngine", "create_async_engine"]

T = TypeVar("T")


class AsyncEngine(EngineBase):
    """A configured way to reach Redis from asyncio code, shared by many `AsyncSession`s
    of one event loop. Creating it does no I/O (an embedded server starts on first use).
    """

    def __init__(
        self,
        url: str,
        *,
        echo: Echo = False,
        flush_script_threshold: int | None = SCRIPT_THRESHOLD,
        **client_options: Any,
    ):
        super().__init__(url, echo=echo, flush_script_threshold=flush_script_threshold)
        dialect_cls = dialects.load_async(url)
        self.dialect: AsyncDialect = dialect_cls(url, hook=self._on_round_trip, **client_options)

    async def run(self, steps: Steps[T]) -> T:
        """Drive a core generator to its end, awaiting each request it yields (the async
        twin of `Engine.run`). What the I/O raised, `asyncio.CancelledError` included,
        is thrown into the generator, so a cancelled read or flush unwinds the core
        exactly like any other failure (a flush puts the session back as it was)."""
        try:
            request = next(steps)
            while True:
                try:
                    reply = await self._perform(request)
                except BaseException as exc:
                    request = steps.throw(exc)
                else:
                    request = steps.send(reply)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _perform(self, request: Request) -> Any:
        if isinstance(request, Read):
            return await self.execute(request.commands)
        if isinstance(request, FetchHashes):
            return await self.fetch_hashes(request.keys)
        if isinstance(request, Transactions):
            return await self.execute_transactions(request.groups)
        await self.flush(request.job)
        return None

    # -- I/O ------------------------------------------------------------------------------

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """One pipelined round trip of read commands."""
        replies = await self.dialect.execute(commands)
        self._echo_replies(replies)
        return replies

    async def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """Every key's hash (a dict, empty when absent) in one round trip."""
        replies = await self.dialect.fetch_hashes(keys)
        self._echo_replies(replies)
        return replies

    async def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """One MULTI/EXEC round trip of commands."""
        replies = await self.dialect.execute_transaction(commands)
        self._echo_replies(replies)
        return replies

    async def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Several MULTI/EXEC groups (a query fanned out over shards)."""
        replies = await self.dialect.execute_transactions(groups)
        for group in replies:
            self._echo_replies(group)
        return replies

    async def flush(self, job: Any) -> None:
        """Run one flush: the same `FlushProtocol` as the sync engine, awaited. A
        cancellation after the EXEC may have been sent is settled like a lost reply
        before `asyncio.CancelledError` goes on (see `AsyncDialect.execute_flush`)."""
        await self.dialect.execute_flush(
            job, execute=self.execute, script_threshold=self.flush_script_threshold
        )

    async def wait_until_loaded(self) -> None:
        """Return once the server has loaded its data set (see `Dialect.wait_until_loaded`)."""
        await self.dialect.wait_until_loaded()

    async def sweep(self, registry: Any, *, batch: int = SWEEP_BATCH) -> int:
        """`Engine.sweep`, awaited: purge every object of `registry` whose deadline
        passed; returns how many."""
        return await self.run(sweep_all_steps(self, registry_mappers(registry), batch=batch))

    async def dispose(self) -> None:
        """Close pooled connections; the engine reconnects if used again."""
        await self.dialect.dispose()


def create_async_engine(
    url: str,
    *,
    echo: Echo = False,
    flush_script_threshold: int | None = SCRIPT_THRESHOLD,
    **client_options: Any,
) -> AsyncEngine:
    """An asyncio engine for `url`: every scheme of `create_engine` (`redis://`,
    `rediss://`, `unix://`, `redis+cluster://`, `redis+embedded://`); extra keyword
    arguments go to the `redis.asyncio` client. Nothing connects (and no embedded
    server starts) until the first command."""
    return AsyncEngine(
        url, echo=echo, flush_script_threshold=flush_script_threshold, **client_options
    )


_default: AsyncEngine | None = None


def default_async_engine() -> AsyncEngine:
    """The engine of an `AsyncSession()` given none: `REDMAP_URL`, else an embedded
    server (./.redmap/), like the sync default."""
    global _default
    if _default is None:
        _default = create_async_engine(os.environ.get("REDMAP_URL") or "redis+embedded://")
    return _default
