"""Expiry benchmarks (issue 15): what an `ExpiresAt` field costs a query, a flush that
sweeps on the side, and the sweep of 100,000 expired objects.

* Queries: the same statements over two models with the same fields and values, whose
  `expires` field is marked `ExpiresAt()` in one (`Timed`) and plain in the other
  (`Plain`), 100,000 objects each, every one with a random moment in the future; with
  no backlog, and with 1,000 more `Timed` objects already expired and not yet swept
  (the queries must leave them out themselves). The "raw" side of each
  measurement is the same query on `Plain`: the ratio is the cost of the deadlines
  (docs/expiry.md asks for 1.2x at most).
* A flush of one object carrying the bounded sweep of 16 expired ids, against the same
  flush with nothing to sweep: round trips must be equal.
* 100,000 objects with random lifetimes, all expired, then `Engine.sweep`: no key of
  them is left and `redmap audit` is clean.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import ExpiresAt, Indexed, PrimaryKey, Sorted, registry, select
from redmap.audit import audit
from redmap.orm import expiry
from redmap.query import deadlines
from redmap.testing.assertions import count_round_trips

reg = registry(prefix="bx")


@reg.mapped
@dataclass
class Plain:
    """The same fields, the same values: `expires` is a plain stored field here."""

    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()]
    expires: datetime | None = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Timed:
    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()]
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


N = 100_000
EXPIRED = 1_000
BATCH = 10_000
TEAMS = 100
ROUNDS = 30
T0 = 1_900_000_000.0


class Clock:
    now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Iterator[Clock]:
    c = Clock()
    deadlines.forget_hints()  # a new data set: what the last one taught does not apply
    with expiry.use_clock(c):
        yield c


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


def _load(engine: redmap.Engine, model: Any, n: int, lifetime: Callable[[int], Any]) -> None:
    rnd = random.Random(15)
    for start in range(0, n, BATCH):
        with redmap.Session(engine) as s:
            for i in range(start, min(n, start + BATCH)):
                moment = lifetime(rnd.randrange(1, 10**6))
                s.add(model(name=f"team{i % TEAMS}", score=(i * 7919) % n, expires=moment))
            s.commit()


STATEMENTS: dict[str, Callable[[Any], Any]] = {
    "equality": lambda m: select(m).where(m.name == "team7"),
    "range narrow, order_by, limit 10": lambda m: (
        select(m).where(m.score.between(N // 4, N // 4 + 99)).order_by(m.score).limit(10)
    ),
    "range wide, order_by, limit 10": lambda m: (
        select(m).where(m.score.between(N // 4, 3 * N // 4)).order_by(m.score).limit(10)
    ),
    "equality, order_by, limit 10": lambda m: (
        select(m).where(m.name == "team7").order_by(m.score.desc()).limit(10)
    ),
}


@pytest.mark.parametrize("backlog", [0, EXPIRED])
@pytest.mark.parametrize("what", list(STATEMENTS))
def test_query_cost_of_expires_at(
    measure: Callable[..., Any], engine: redmap.Engine, clock: Clock, what: str, backlog: int
) -> None:
    """The same query on a model with ExpiresAt and on one without (ratio = with /
    without); `backlog` more Timed objects have expired and were not swept yet."""
    _load(engine, Plain, N, lambda s: _at(10 + s))
    _load(engine, Timed, N, lambda s: _at(10 + s))
    if backlog:
        # Expired objects, unswept, matching the statements too (same names and scores).
        with redmap.Session(engine) as s:
            for i in range(backlog):
                s.add(Timed(name=f"team{i % TEAMS}", score=(i * 7919) % N, expires=_at(1)))
            s.commit()
    clock.now = T0 + 5
    plain, timed = STATEMENTS[what](Plain), STATEMENTS[what](Timed)
    with redmap.Session(engine) as s:
        want = [(o.name, o.score) for o in s.scalars(plain)]
        got = [(o.name, o.score) for o in s.scalars(timed)]
        assert got == want

    def op(s: redmap.Session) -> None:
        assert len(s.scalars(timed).all()) == len(want)

    with redmap.Session(engine) as s, count_round_trips(engine) as rt:
        s.scalars(plain).all()
    plain_cost = (rt.round_trips, len(rt.commands))

    def raw_op(s: redmap.Session) -> tuple[int, int]:
        assert len(s.scalars(plain).all()) == len(want)
        return plain_cost

    result = measure(
        name=f"expiry query[{what}, {backlog} unswept] (raw = the same, no ExpiresAt)",
        n=N,
        op=op,
        setup=lambda: (redmap.Session(engine),),
        raw_op=raw_op,
        raw_setup=lambda: (redmap.Session(engine),),
        rounds=ROUNDS,
    )
    assert result.round_trips == result.raw_round_trips == 2


def test_flush_piggybacking_a_sweep(
    measure: Callable[..., Any], engine: redmap.Engine, clock: Clock, raw: redis.Redis
) -> None:
    """One insert whose flush also sweeps 16 expired objects, against the same insert
    with nothing to sweep (raw = after a full sweep)."""
    _load(engine, Timed, 20_000, lambda s: _at(1))
    clock.now = T0 + 5
    counter = iter(range(10**9))

    def op(s: redmap.Session) -> None:
        s.add(Timed(name="new", score=next(counter), expires=_at(10**6)))
        s.commit()

    before = raw.zcard("{bx}:timed:#dl")
    with count_round_trips(engine) as swept:
        with redmap.Session(engine) as s:
            op(s)
    assert raw.zcard("{bx}:timed:#dl") == before - expiry.PIGGYBACK_LIMIT + 1

    other = redmap.create_engine(engine.url)
    # The comparison: the same flush once a full sweep left nothing to sweep.
    other.sweep(reg)
    with redmap.Session(other) as s2, count_round_trips(other) as rt:
        s2.add(Timed(name="new", score=next(counter), expires=None))
        s2.commit()
    plain_cost = (rt.round_trips, len(rt.commands))

    def raw_op(s: redmap.Session) -> tuple[int, int]:
        s.add(Timed(name="new", score=next(counter), expires=None))
        s.commit()
        return plain_cost

    try:
        result = measure(
            name="flush of 1 insert + piggy-backed sweep of 16 (raw = nothing to sweep)",
            n=1,
            op=op,
            setup=lambda: (redmap.Session(engine),),
            raw_op=raw_op,
            raw_setup=lambda: (other.sweep(reg), redmap.Session(other))[1:],
            rounds=ROUNDS,
        )
    finally:
        other.dispose()
    assert swept.round_trips == result.round_trips == result.raw_round_trips


def test_sweep_of_100000_expired(
    engine: redmap.Engine, clock: Clock, raw: redis.Redis, note: Callable[[str], None]
) -> None:
    """100,000 objects with random lifetimes, all past: the sweep leaves no key of them
    and the audit is clean."""
    import time

    _load(engine, Timed, N, lambda s: _at(s / 1000))
    clock.now = T0 + 10**4
    keys_before = raw.dbsize()
    with redmap.Session(engine) as s:
        assert s.count(select(Timed)) == 0
    t0 = time.perf_counter()
    purged = engine.sweep(reg)
    elapsed = time.perf_counter() - t0
    left = [k for k in raw.keys("*") if b"#flush:" not in k and not k.endswith(b"#seq")]
    report = audit(raw, reg)
    note(
        f"sweep: {purged} objects purged in {elapsed:.2f} s ({keys_before} keys before), "
        f"{len(left)} keys left, audit ok={report.ok}"
    )
    assert purged == N
    assert left == []
    assert report.ok
