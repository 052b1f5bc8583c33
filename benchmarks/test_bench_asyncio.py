"""asyncio benchmarks: `AsyncSession` bulk insert and get_many of N objects, vs raw
pipelined `redis.asyncio` doing the same work in the same run (issue 13: within 1.3x).

Both sides run on one event loop of the benchmark's own (`loop.run_until_complete` per
round), so the loop's overhead is on both sides. The raw side is the sync benchmarks'
floor, awaited: one MULTI/EXEC pipeline of HSETs for an insert, one non-transactional
pipeline of HGETALLs for get_many. Round trips are asserted: the sync API's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis.asyncio as aredis

from redmap.asyncio import AsyncEngine, AsyncSession, create_async_engine
from redmap.orm.flushprotocol import SCRIPT_THRESHOLD

from .test_bench_session import RAW_PREFIX, Player, rows

T = TypeVar("T")
SIZES = [100, 10_000]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    try:
        yield lp
    finally:
        lp.close()


@pytest.fixture(scope="module")
def aengine(bench_server: Any, loop: asyncio.AbstractEventLoop) -> Iterator[AsyncEngine]:
    eng = create_async_engine(bench_server.url)
    try:
        yield eng
    finally:
        loop.run_until_complete(eng.dispose())


@pytest.fixture(scope="module")
def araw(bench_server: Any, loop: asyncio.AbstractEventLoop) -> Iterator[aredis.Redis]:
    client = aredis.Redis.from_url(bench_server.url)
    try:
        yield client
    finally:
        loop.run_until_complete(client.aclose())


def _on(loop: asyncio.AbstractEventLoop, make: Callable[..., Coroutine[Any, Any, T]]) -> Any:
    """A sync callable running `make(*args)` to completion on `loop` (what `measure` times)."""

    def call(*args: Any) -> T:
        return loop.run_until_complete(make(*args))

    return call


async def raw_write(client: aredis.Redis, data: list[tuple[int, str, int]]) -> tuple[int, int]:
    pipe = client.pipeline(transaction=True)
    for i, name, score in data:
        pipe.hset(f"{RAW_PREFIX}:{i}", mapping={"name": name, "score": score})
    sent = len(pipe) + 2
    await pipe.execute()
    return 1, sent


async def raw_read(client: aredis.Redis, ids: list[int]) -> tuple[int, int]:
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(f"{RAW_PREFIX}:{i}")
    sent = len(pipe)
    await pipe.execute()
    return 1, sent


@pytest.mark.parametrize("n", SIZES)
def test_async_insert(
    benchmark: Any,
    aengine: AsyncEngine,
    araw: aredis.Redis,
    raw: Any,
    loop: asyncio.AbstractEventLoop,
    n: int,
) -> None:
    """N new objects (generated int keys) in one `await s.commit()`."""
    from .conftest import _measure

    data = rows(n)

    def setup() -> tuple[Any, ...]:
        raw.flushall()
        return AsyncSession(aengine), [Player(name=a, score=b) for a, b in data]

    async def op(s: AsyncSession, objs: list[Any]) -> None:
        s.add_all(objs)
        await s.commit()

    def raw_setup() -> tuple[Any, ...]:
        raw.flushall()
        return ([(i + 1, a, b) for i, (a, b) in enumerate(data)],)

    result = _measure(
        benchmark,
        aengine,
        name="async insert[plain]",
        n=n,
        op=_on(loop, op),
        setup=setup,
        raw_op=_on(loop, lambda d: raw_write(araw, d)),
        raw_setup=raw_setup,
    )
    # Past 64 objects the flush is one script inside MULTI: INCRBY, then the script.
    assert result.round_trips == (3 if n <= SCRIPT_THRESHOLD else 2)


@pytest.mark.parametrize("n", SIZES)
def test_async_get_many(
    benchmark: Any,
    aengine: AsyncEngine,
    araw: aredis.Redis,
    loop: asyncio.AbstractEventLoop,
    n: int,
) -> None:
    """N objects by primary key in a fresh AsyncSession."""
    from .conftest import _measure

    async def load() -> list[int]:
        async with AsyncSession(aengine) as s:
            objs = [Player(name=a, score=b) for a, b in rows(n)]
            s.add_all(objs)
            await s.commit()
            return [o.id for o in objs if o.id is not None]

    ids = loop.run_until_complete(load())
    loop.run_until_complete(
        raw_write(araw, [(i, a, b) for i, (a, b) in zip(ids, rows(n), strict=True)])
    )

    async def op(s: AsyncSession, pks: list[int]) -> None:
        objs = await s.get_many(Player, pks)
        assert objs[-1] is not None

    result = _measure(
        benchmark,
        aengine,
        name="async get_many[plain]",
        n=n,
        op=_on(loop, op),
        setup=lambda: (AsyncSession(aengine), ids),
        raw_op=_on(loop, lambda: raw_read(araw, ids)),
    )
    assert result.round_trips == 1
