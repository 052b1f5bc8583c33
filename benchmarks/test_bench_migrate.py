"""Migration benchmarks: rename_field and add_field over 100,000 objects, vs raw redis-py.

redmap's side is the operation as `redmap migrate` runs it (`RedisOperations` with
batches of 500): SCAN, then one pipelined EVALSHA per batch whose script checks,
rewrites and bumps the version of each object atomically. The raw side is the
physical floor for the same rewrite with no atomicity or version: SCAN, then

* rename: one pipeline of HGET per 500 keys, then one of HSET new + HDEL old;
* add: one pipeline of HSET per 500 keys.

Each side runs `ROUNDS` times on the same 100,000 objects (the rename alternates
direction, the add is undone between rounds, untimed); the figures are objects per
second from the mean, and the ratio redmap/raw of the mean times (target: under 3).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import PrimaryKey, registry
from redmap.migrate import MigrationRun, RedisOperations

N = 100_000
BATCH = 500
ROUNDS = 3
TARGET_RATIO = 3.0
PREFIX = "bench"
MATCH = "{" + PREFIX + "}:item:[0-9]*"

reg = registry(prefix=PREFIX)


@reg.mapped
@dataclass
class Item:
    """What the seeded hashes hold, read back through redmap."""

    name: str
    n: int
    bio: str | None = None
    id: Annotated[int | None, PrimaryKey()] = None


def seed(client: redis.Redis) -> None:
    """N objects in redmap's layout (hash with `#v`, and the `#all` zset), pipelined."""
    for start in range(0, N, 10_000):
        pipe = client.pipeline(transaction=False)
        for i in range(start + 1, min(N, start + 10_000) + 1):
            pipe.hset(f"{{{PREFIX}}}:item:{i}", mapping={"name": f"item{i}", "n": i, "#v": 1})
        pipe.zadd(f"{{{PREFIX}}}:item:#all", {str(i): i for i in range(start + 1, start + 10_001)})
        pipe.execute()


def batches(client: redis.Redis) -> Iterator[list[bytes]]:
    """Object keys in batches of BATCH, as both sides find them (SCAN MATCH)."""
    batch: list[bytes] = []
    for key in client.scan_iter(match=MATCH, count=1000):
        batch.append(key)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def raw_rename(client: redis.Redis, old: str, new: str) -> None:
    for batch in batches(client):
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hget(key, old)
        values = pipe.execute()
        pipe = client.pipeline(transaction=False)
        for key, value in zip(batch, values, strict=True):
            if value is not None:
                pipe.hset(key, new, value)
                pipe.hdel(key, old)
        pipe.execute()


def raw_add(client: redis.Redis, name: str, value: str) -> None:
    for batch in batches(client):
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.hset(key, name, value)
        pipe.execute()


def operations(client: redis.Redis, url: str) -> RedisOperations:
    """The `op` a revision gets, on a registry-less run (models named by keyspace)."""
    return RedisOperations(MigrationRun(client, url=url, prefix=PREFIX, batch_size=BATCH))


def paired(
    benchmark: Any,
    name: str,
    ours: Callable[[], object],
    raw: Callable[[], object],
    setup: Callable[[], object] = lambda: None,
) -> float:
    """Time `ours` with pytest-benchmark and `raw` by hand, ROUNDS each; returns the ratio."""

    def prepared() -> tuple[tuple[()], dict[str, Any]]:
        setup()
        gc.collect()
        return (), {}

    benchmark.pedantic(ours, setup=prepared, rounds=ROUNDS, iterations=1)
    mean = float(benchmark.stats.stats.mean)
    times = []
    for _ in range(ROUNDS):
        prepared()
        t0 = time.perf_counter()
        raw()
        times.append(time.perf_counter() - t0)
    raw_mean = statistics.fmean(times)
    ratio = mean / raw_mean
    benchmark.extra_info.update(
        {
            "n": N,
            "objects_per_s": round(N / mean),
            "raw_objects_per_s": round(N / raw_mean),
            "raw_mean_ms": round(raw_mean * 1e3, 1),
            "ratio": round(ratio, 3),
        }
    )
    print(
        f"{name}: N={N}, redmap {N / mean:,.0f} obj/s ({mean:.2f} s), "
        f"raw {N / raw_mean:,.0f} obj/s ({raw_mean:.2f} s), ratio={ratio:.2f}"
    )
    return ratio


@pytest.fixture
def seeded(raw: redis.Redis) -> redis.Redis:
    """N objects on the (flushed) benchmark server."""
    seed(raw)
    return raw


def direction(client: redis.Redis) -> tuple[str, str]:
    """(old, new): the rename alternates, so every round moves all N values."""
    if client.hexists(f"{{{PREFIX}}}:item:1", "name"):
        return "name", "title"
    return "title", "name"


def test_rename_field(benchmark: Any, seeded: redis.Redis, engine: redmap.Engine) -> None:
    """rename_field over 100,000 objects is within 3x of raw pipelined HGET/HSET/HDEL."""
    with redmap.Session(engine) as s:  # the seeded hashes are what redmap reads
        item = s.get(Item, 7)
        assert item is not None and (item.name, item.n) == ("item7", 7)
    url = engine.dialect.url
    ratio = paired(
        benchmark,
        "rename_field",
        lambda: operations(seeded, url).rename_field("item", *direction(seeded)),
        lambda: raw_rename(seeded, *direction(seeded)),
    )
    last = f"{{{PREFIX}}}:item:{N}"
    assert seeded.hget(last, "name") == f"item{N}".encode()  # 2 x ROUNDS renames
    assert int(seeded.hget(last, "#v")) == 1 + ROUNDS  # redmap's rounds bumped the version
    assert ratio < TARGET_RATIO


def test_add_field(benchmark: Any, seeded: redis.Redis, engine: redmap.Engine) -> None:
    """add_field over 100,000 objects is within 3x of raw pipelined HSET."""
    url = engine.dialect.url

    def undo() -> None:
        for batch in batches(seeded):
            pipe = seeded.pipeline(transaction=False)
            for key in batch:
                pipe.hdel(key, "bio")
            pipe.execute()

    ratio = paired(
        benchmark,
        "add_field",
        lambda: operations(seeded, url).add_field("item", "bio", default="-"),
        lambda: raw_add(seeded, "bio", "-"),
        undo,
    )
    with redmap.Session(engine) as s:
        item = s.get(Item, N)
        assert item is not None and item.bio == "-"
    assert ratio < TARGET_RATIO
