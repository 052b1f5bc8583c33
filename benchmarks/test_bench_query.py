"""Query benchmarks: equality, range + order_by + limit, and count, vs raw redis-py.

The data is inserted through redmap (batches of 10,000 objects per commit), so it is in
redmap's own key layout; the raw side reads that same layout the way a hand-written
application would (the physical floor):

* equality: SMEMBERS of the index set, then HGETALL per id in one pipeline;
* range: ZRANGE ... BYSCORE LIMIT 0 10 on the sorted index, then HGETALL per id;
* count: SCARD of the index set / ZCOUNT of the sorted index.

Players have `name = "team{i % 100}"` (100 objects per name) and distinct scores
0..N-1 in shuffled order. Round trips are asserted: they must not grow with N.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import Indexed, PrimaryKey, Sorted, registry, select
from redmap.orm.keys import escape
from redmap.orm.mapper import mapper_of

reg = registry()


@reg.mapped
@dataclass
class Player:
    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()]
    id: Annotated[int | None, PrimaryKey()] = None


BATCH = 10_000
TEAMS = 100
QUERY_ROUNDS = 30

KEYS = mapper_of(Player).keys


def load(engine: redmap.Engine, n: int) -> None:
    """n players through redmap, BATCH per commit."""
    for start in range(0, n, BATCH):
        with redmap.Session(engine) as s:
            s.add_all(
                Player(name=f"team{i % TEAMS}", score=(i * 7919) % n)
                for i in range(start, min(n, start + BATCH))
            )
            s.commit()


def object_key(member: bytes) -> str:
    return mapper_of(Player).object_key(int(member))


def raw_fetch(client: redis.Redis, members: list[bytes]) -> int:
    """HGETALL per id in one pipeline; the number of commands."""
    pipe = client.pipeline(transaction=False)
    for m in members:
        pipe.hgetall(object_key(m))
    sent = len(pipe)
    pipe.execute()
    return sent


def test_equality_query(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis
) -> None:
    """`where(name == ...)` matching 100 of 10,000 objects, in a fresh session."""
    n = 10_000
    load(engine, n)
    stmt = select(Player).where(Player.name == "team7")
    index = KEYS.index("name", escape(b"team7"))

    def op(s: redmap.Session) -> None:
        assert len(s.scalars(stmt).all()) == n // TEAMS

    def raw_op() -> tuple[int, int]:
        members = list(raw.smembers(index))
        return 2, 1 + raw_fetch(raw, members)

    result = measure(
        name="query[name == v] -> 100 objects",
        n=n,
        op=op,
        setup=lambda: (redmap.Session(engine),),
        raw_op=raw_op,
        rounds=QUERY_ROUNDS,
    )
    assert result.round_trips == 2


# Width of the score range: "narrow" matches 100 objects whatever N, "wide" half of them.
WIDTHS = {"narrow": lambda n: 100, "wide": lambda n: n // 2}


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("n", [10_000, 100_000])
def test_range_query(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis, n: int, width: str
) -> None:
    """`where(score.between(a, b)).order_by(score).limit(10)` over n stored objects."""
    load(engine, n)
    low = n // 4
    high = low + WIDTHS[width](n) - 1
    stmt = select(Player).where(Player.score.between(low, high)).order_by(Player.score).limit(10)
    zset = KEYS.sorted("score")

    def op(s: redmap.Session) -> None:
        got = s.scalars(stmt).all()
        assert [p.score for p in got] == list(range(low, low + 10))

    def raw_op() -> tuple[int, int]:
        members = raw.zrange(zset, low, high, byscore=True, offset=0, num=10)
        return 2, 1 + raw_fetch(raw, members)

    result = measure(
        name=f"query[score between, {width}, order_by, limit 10]",
        n=n,
        op=op,
        setup=lambda: (redmap.Session(engine),),
        raw_op=raw_op,
        rounds=QUERY_ROUNDS,
    )
    assert result.round_trips == 2


@pytest.mark.parametrize("kind", ["equality", "range"])
def test_count(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis, kind: str
) -> None:
    """`count()` of an equality (100 matches) or a range (half of 10,000) condition."""
    n = 10_000
    load(engine, n)
    if kind == "equality":
        stmt = select(Player).where(Player.name == "team7")
        expected = n // TEAMS
        index = KEYS.index("name", escape(b"team7"))

        def raw_op() -> tuple[int, int]:
            assert raw.scard(index) == expected
            return 1, 1
    else:
        low, high = n // 4, n // 4 + n // 2 - 1
        stmt = select(Player).where(Player.score.between(low, high))
        expected = n // 2
        zset = KEYS.sorted("score")

        def raw_op() -> tuple[int, int]:
            assert raw.zcount(zset, low, high) == expected
            return 1, 1

    def op(s: redmap.Session) -> None:
        assert s.count(stmt) == expected

    result = measure(
        name=f"count[{kind}]",
        n=n,
        op=op,
        setup=lambda: (redmap.Session(engine),),
        raw_op=raw_op,
        rounds=QUERY_ROUNDS,
    )
    assert result.round_trips == 1
