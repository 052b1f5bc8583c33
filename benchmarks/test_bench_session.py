"""Session benchmarks: bulk insert, get_many and bulk update of N objects, vs raw redis-py.

Each redmap operation is paired with raw pipelined redis-py doing the same writes or
reads (the physical floor):

* insert: HSET per object (plus SADD/ZADD per object for the indexed model) in one
  MULTI/EXEC pipeline, ids assigned client-side;
* get_many: HGETALL per key in one non-transactional pipeline (replies left as bytes);
* update: HSET of the changed field per object (plus ZADD for the Sorted score) in
  one MULTI/EXEC pipeline.

Round trips are asserted: they must not grow with N.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import Indexed, PrimaryKey, Sorted, registry
from redmap.orm.flushprotocol import SCRIPT_THRESHOLD

reg = registry()


@reg.mapped
@dataclass
class Player:
    name: str
    score: int
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class IndexedPlayer:
    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()]
    id: Annotated[int | None, PrimaryKey()] = None


SIZES = [100, 10_000]
MODELS = {"plain": Player, "indexed": IndexedPlayer}
RAW_PREFIX = "raw:player"


def rows(n: int) -> list[tuple[str, int]]:
    """(name, score) of n players; names are distinct (one index set per object)."""
    return [(f"player{i}", (i * 7919) % n) for i in range(n)]


def raw_write(
    client: redis.Redis, data: list[tuple[int, str, int]], *, indexed: bool, fields: bool = True
) -> tuple[int, int]:
    """HSET (and index writes) per object in one MULTI/EXEC pipeline."""
    pipe = client.pipeline(transaction=True)
    for i, name, score in data:
        if fields:
            pipe.hset(f"{RAW_PREFIX}:{i}", mapping={"name": name, "score": score})
        else:
            pipe.hset(f"{RAW_PREFIX}:{i}", "score", score)
        if indexed:
            if fields:
                pipe.sadd(f"{RAW_PREFIX}:#ix:name:{name}", i)
            pipe.zadd(f"{RAW_PREFIX}:#zs:score", {str(i): score})
    sent = len(pipe) + 2  # MULTI and EXEC
    pipe.execute()
    return 1, sent


def raw_read(client: redis.Redis, ids: list[int]) -> tuple[int, int]:
    """HGETALL per key in one non-transactional pipeline."""
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(f"{RAW_PREFIX}:{i}")
    sent = len(pipe)
    pipe.execute()
    return 1, sent


def load(engine: redmap.Engine, model: type[Any], n: int) -> list[Any]:
    """Insert n objects through redmap; their primary keys."""
    with redmap.Session(engine) as s:
        objs = [model(name=name, score=score) for name, score in rows(n)]
        s.add_all(objs)
        s.commit()
        return [o.id for o in objs]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", ["plain", "indexed", "plain-explicit-pk"])
def test_insert(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis, variant: str, n: int
) -> None:
    """N new objects in one commit (generated int keys, or keys set by the caller)."""
    model = IndexedPlayer if variant == "indexed" else Player
    explicit = variant.endswith("explicit-pk")
    data = rows(n)

    def setup() -> tuple[Any, ...]:
        raw.flushall()
        if explicit:
            objs = [model(name=a, score=b, id=i + 1) for i, (a, b) in enumerate(data)]
        else:
            objs = [model(name=a, score=b) for a, b in data]
        return redmap.Session(engine), objs

    def op(s: redmap.Session, objs: list[Any]) -> None:
        s.add_all(objs)
        s.commit()

    def raw_setup() -> tuple[Any, ...]:
        raw.flushall()
        return ([(i + 1, a, b) for i, (a, b) in enumerate(data)],)

    result = measure(
        name=f"insert[{variant}]",
        n=n,
        op=op,
        setup=setup,
        raw_op=lambda d: raw_write(raw, d, indexed=model is IndexedPlayer),
        raw_setup=raw_setup,
    )
    # Past 64 objects the flush is one script inside MULTI (no WATCH + checks trip).
    scripted = n > SCRIPT_THRESHOLD
    assert result.round_trips == (2 if explicit else 3) - scripted


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", ["plain", "indexed"])
def test_get_many(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis, variant: str, n: int
) -> None:
    """N objects by primary key in a fresh session."""
    model = MODELS[variant]
    ids = load(engine, model, n)
    raw_write(raw, [(i, a, b) for i, (a, b) in zip(ids, rows(n), strict=True)], indexed=False)

    def op(s: redmap.Session, pks: list[int]) -> None:
        objs = s.get_many(model, pks)
        assert objs[-1] is not None

    result = measure(
        name=f"get_many[{variant}]",
        n=n,
        op=op,
        setup=lambda: (redmap.Session(engine), ids),
        raw_op=lambda: raw_read(raw, ids),
    )
    assert result.round_trips == 1


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("variant", ["plain", "indexed"])
def test_update(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis, variant: str, n: int
) -> None:
    """One field (score; Sorted in the indexed model) changed on N loaded objects, one commit."""
    model = MODELS[variant]
    ids = load(engine, model, n)
    data = [(i, a, b) for i, (a, b) in zip(ids, rows(n), strict=True)]
    indexed = model is IndexedPlayer
    raw_write(raw, data, indexed=indexed)

    def setup() -> tuple[Any, ...]:
        s = redmap.Session(engine)
        objs = s.get_many(model, ids)
        return s, objs

    def op(s: redmap.Session, objs: list[Any]) -> None:
        for o in objs:
            o.score += 1
        s.commit()

    bumps = iter(range(1, 1_000))

    def raw_setup() -> tuple[Any, ...]:
        k = next(bumps)
        return ([(i, a, b + k) for i, a, b in data],)

    result = measure(
        name=f"update[{variant}]",
        n=n,
        op=op,
        setup=setup,
        raw_op=lambda d: raw_write(raw, d, indexed=indexed, fields=False),
        raw_setup=raw_setup,
    )
    assert result.round_trips == (1 if n > SCRIPT_THRESHOLD else 2)


def test_get_loaded(measure: Callable[..., Any], engine: redmap.Engine) -> None:
    """`get` of objects already loaded in the session: answered by the identity map."""
    n = 100
    ids = load(engine, Player, n)

    def setup() -> tuple[Any, ...]:
        s = redmap.Session(engine)
        s.get_many(Player, ids)
        return (s,)

    def op(s: redmap.Session) -> None:
        for pk in ids:
            s.get(Player, pk)

    result = measure(name="get[loaded] x N", n=n, op=op, setup=setup, rounds=20)
    assert result.round_trips == 0


@pytest.mark.parametrize("n", [1_000, 10_000])
def test_server_watch_cost(
    benchmark: Any, raw: redis.Redis, note: Callable[[str], None], n: int
) -> None:
    """Raw `WATCH k1 .. kN` + `UNWATCH`: what watching every object of a flush costs the server.

    Redis (6.2 and 7.0 at least) checks each new key against the keys the client already
    watches, so one WATCH of N keys is quadratic in N.
    """
    names = [f"{RAW_PREFIX}:{i}" for i in range(n)]

    def op() -> None:
        with raw.pipeline(transaction=False) as pipe:
            pipe.watch(*names)
            pipe.unwatch()

    benchmark.pedantic(op, rounds=3, iterations=1, warmup_rounds=1)
    mean = float(benchmark.stats.stats.mean) if benchmark.stats is not None else float("nan")
    benchmark.extra_info.update({"n": n, "round_trips": 2, "commands": 2})
    note(f"raw WATCH of N keys + UNWATCH: N={n}, round trips=2, mean={mean * 1e3:.2f} ms")


# -- one change in a session holding N objects ------------------------------------------

HELD = [1_000, 10_000, 100_000]
COMMITS = 200
_held_means: dict[int, float] = {}


@pytest.mark.parametrize("n", HELD)
def test_one_change_in_a_large_session(
    n: int, engine: redmap.Engine, raw: redis.Redis, measure: Callable[..., Any]
) -> None:
    """200 commits of one changed field (and 200 of one increment) in a session holding
    `n` loaded objects: a flush visits what changed, not everything the session holds,
    so the time per commit is flat from 1,000 to 100,000 objects held (it grew 25x, to
    12 ms per commit at 100,000, while the flush scanned the identity map)."""
    with redmap.Session(engine) as s:
        s.add_all([IndexedPlayer(name=f"p{i}", score=i) for i in range(n)])
        s.commit()
    held = redmap.Session(engine, expire_on_commit=False)
    objs = held.scalars(redmap.select(IndexedPlayer)).all()
    assert len(objs) == n
    p = objs[0]
    assert p.id is not None
    target = redmap.inspect(p).redis_key
    assert target is not None

    def commits() -> None:
        for i in range(COMMITS):
            p.name = f"x{i}"
            held.commit()
            p.score = IndexedPlayer.score + 1
            held.commit()

    def raw_commits() -> tuple[int, int]:
        # The same writes, one MULTI/EXEC each: the field with its index, the score.
        for i in range(COMMITS):
            pipe = raw.pipeline(transaction=True)
            pipe.hset(target, "name", f"x{i}")
            pipe.srem(f"{RAW_PREFIX}:#ix:name:p", p.id)
            pipe.sadd(f"{RAW_PREFIX}:#ix:name:x{i}", p.id)
            pipe.execute()
            pipe = raw.pipeline(transaction=True)
            pipe.hincrby(target, "score", 1)
            pipe.zincrby(f"{RAW_PREFIX}:#zs:score", 1, str(p.id))
            pipe.execute()
        return 2 * COMMITS, 2 * COMMITS * 4

    try:
        result = measure(
            name=f"{COMMITS} x (update, increment) of one object in a session holding",
            n=n,
            op=commits,
            setup=tuple,
            raw_op=raw_commits,
            rounds=3,
        )
    finally:
        held.close()
    _held_means[n] = result.mean
    if len(_held_means) == len(HELD):
        low, high = _held_means[HELD[0]], _held_means[HELD[-1]]
        assert high <= 1.5 * low, f"per-commit time grew with the session: {_held_means}"
