"""Atomic counters (issue 14 item 2): `p.score = Player.score + 5` is applied by Redis.

At flush the increment becomes HINCRBY (int) or HINCRBYFLOAT (float, Decimal) inside
the flush script, the field's Sorted score follows the value Redis computed, and the
attribute holds that value afterwards. An update made only of increments checks the
object's incarnation, not its version: increments from many sessions commute, none is
lost and none is refused as stale.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated

import pytest
import redis

import redmap
from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    col,
    inspect,
    registry,
    select,
)
from redmap.asyncio import AsyncSession, create_async_engine
from redmap.exc import FlushError, InvalidRequestError, StaleDataError, ValidationError
from redmap.orm.state import InstanceState
from redmap.testing.assertions import count_round_trips, dump_keys
from tests._async_driver import DRIVER_ENV
from tests.proxy import LoopbackProxy

creg = registry(prefix="ct")


@creg.mapped
@dataclass
class Team:
    name: str
    id: Annotated[int | None, PrimaryKey()] = None


@creg.mapped
@dataclass
class Player:
    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()] = 0
    coins: int = 0
    ratio: float = 0.0
    balance: Decimal = Decimal("0")
    email: Annotated[str | None, Unique()] = None
    team_id: Annotated[int | None, ForeignKey("Team")] = None
    id: Annotated[int | None, PrimaryKey()] = None


@pytest.fixture
def player(engine: redmap.Engine) -> int:
    with Session(engine) as s:
        p = Player(name="p")
        s.add(p)
        s.commit()
        assert p.id is not None
        return p.id


def test_increments_are_applied_by_redis_and_the_attribute_takes_its_value(
    engine: redmap.Engine, redis_client: redis.Redis, player: int
) -> None:
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 5
        p.coins = Player.coins - 3
        p.ratio = Player.ratio + 0.25
        p.balance = Player.balance + Decimal("1.10")
        with count_round_trips(engine) as rt:
            s.commit()
        # One round trip, one command: the script (its body the first time this engine
        # runs it) is the whole transaction (docs/design/flush-concurrency.md, "A flush
        # made only of increments").
        assert rt.round_trips == 1
        assert rt.command_names in (["EVALSHA"], ["EVAL"])
        assert "HGETALL" not in rt.command_names  # nothing read back
        assert (p.score, p.coins, p.ratio, p.balance) == (5, -3, 0.25, Decimal("1.1"))
        assert inspect(p).version == 2 and not s.dirty
    key = f"{{ct}}:player:{player}"
    assert redis_client.hmget(key, ["score", "coins", "ratio", "balance", "#v"]) == [
        b"5",
        b"-3",
        b"0.25",
        b"1.1",
        b"2",
    ]
    assert redis_client.zscore("{ct}:player:#zs:score", str(player)) == 5
    with Session(engine) as s:
        fresh = s.get(Player, player)
        assert fresh is not None and (fresh.score, fresh.balance) == (5, Decimal("1.1"))


def test_the_sorted_index_follows_increments(engine: redmap.Engine) -> None:
    with Session(engine) as s:
        ps = [Player(name=f"p{i}", score=i * 10) for i in range(5)]
        s.add_all(ps)
        s.commit()
        ps[0].score = Player.score + 100  # 0 -> 100: now first
        ps[4].score = Player.score - 45  # 40 -> -5: now last
        s.commit()
        top = s.scalars(select(Player).order_by(col(Player.score).desc())).all()
        assert [p.name for p in top] == ["p0", "p3", "p2", "p1", "p4"]
        assert [p.name for p in s.scalars(select(Player).where(Player.score < 0))] == ["p4"]


def test_increments_with_other_changes_of_the_same_object(
    engine: redmap.Engine, player: int
) -> None:
    """An update with increments and plain changes checks the version as usual."""
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        p.name = "renamed"
        s.commit()
        assert (p.score, p.name, inspect(p).version) == (1, "renamed", 2)
        assert [x.id for x in s.scalars(select(Player).where(Player.name == "renamed"))] == [player]


def test_increments_commute_but_a_stale_plain_update_is_refused(
    engine: redmap.Engine, player: int
) -> None:
    with Session(engine) as a, Session(engine) as b:
        pa, pb = a.get(Player, player), b.get(Player, player)
        assert pa is not None and pb is not None
        pa.score = Player.score + 1
        a.commit()
        pb.score = Player.score + 2  # loaded before a's commit: still applies
        b.commit()
        assert pb.score == 3
        pa.name = "late"  # a plain change of an object that changed since: stale
        with pytest.raises(StaleDataError):
            a.commit()
        a.rollback()
        pa = a.get(Player, player)
        assert pa is not None and pa.score == 3


def test_an_increment_never_resurrects_a_deleted_object(
    engine: redmap.Engine, redis_client: redis.Redis, player: int
) -> None:
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        with Session(engine) as other:
            victim = other.get(Player, player)
            other.delete(victim)
            other.commit()
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError):
            s.commit()
        assert dump_keys(redis_client) == before


def test_a_refused_increment_undoes_the_ones_before_it(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """Increments are the flush's first writes; one Redis refuses (a corrupt value)
    makes the script restore the ones it applied: nothing written."""
    with Session(engine) as s:
        ps = [Player(name=f"p{i}", coins=i) for i in range(3)]
        s.add_all(ps)
        s.commit()
        for p in ps:
            p.coins = Player.coins + 10
        redis_client.hset(f"{{ct}}:player:{ps[2].id}", "coins", "not a number")
        before = dump_keys(redis_client)
        with pytest.raises(FlushError, match="nothing was written") as info:
            s.commit()
        assert "not an integer" in str(info.value)
        assert dump_keys(redis_client) == before


def test_increments_are_refused_where_they_cannot_apply(engine: redmap.Engine) -> None:
    with Session(engine) as s:
        p = Player(name="p")
        with pytest.raises(InvalidRequestError, match="not stored yet"):
            p.score = Player.score + 1
        s.add(p)
        s.commit()
        with pytest.raises(InvalidRequestError, match="int, float and Decimal"):
            p.name = Player.name + "x"
        with pytest.raises(InvalidRequestError, match="Indexed/Unique"):
            p.team_id = Player.team_id + 1  # type: ignore[operator]
        with pytest.raises(InvalidRequestError, match="adds to the field it is assigned"):
            p.score = Player.coins + 1
        with pytest.raises(ValidationError):
            p.score = Player.score + True
        with pytest.raises(ValidationError):
            p.score = Player.score + 0.5  # type: ignore[operator]
        with pytest.raises(ValidationError):
            p.ratio = Player.ratio + float("nan")
        assert not s.dirty  # nothing was assigned


def test_a_later_assignment_replaces_a_pending_increment(
    engine: redmap.Engine, player: int
) -> None:
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 5
        p.score = 42
        s.commit()
        assert p.score == 42


WORKER = textwrap.dedent(
    """
    import sys
    import redmap
    from redmap import Session, run_in_transaction
    from tests.test_counters import Player
    engine = redmap.create_engine(sys.argv[1])
    pk, n = int(sys.argv[2]), int(sys.argv[3])
    calls = 0
    def bump(s):
        global calls
        calls += 1
        p = s.get(Player, pk)
        p.score = Player.score + 1
    for _ in range(n):
        run_in_transaction(bump, lambda: Session(engine))
    print(calls)
    """
)


def test_increments_from_eight_processes_are_exact_with_no_retry(
    engine: redmap.Engine, redis_url: str, player: int
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, redis_url, str(player), "150"],
            stdout=subprocess.PIPE,
        )
        for _ in range(8)
    ]
    calls = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert calls == [150] * 8  # no attempt was retried
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None and p.score == 8 * 150 and inspect(p).version == 1 + 8 * 150


def test_async_session_increments(redis_url: str, player: int) -> None:
    async def main() -> tuple[int, int]:
        engine = create_async_engine(redis_url)
        try:
            async with AsyncSession(engine) as s:
                p = await s.get(Player, player)
                assert p is not None
                p.score = Player.score + 7
                await s.commit()
                return p.score, (await s.count(select(Player).where(Player.score >= 7)))
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == (7, 1)


def test_a_lost_reply_leaves_the_incremented_field_to_reload(
    engine: redmap.Engine, proxy: LoopbackProxy, player: int
) -> None:
    """Settled as applied after its reply was lost, a flush cannot say what Redis
    computed: the object reloads on access, with the value applied once."""
    eng = redmap.create_engine(proxy.url, socket_timeout=0.5)
    try:
        with Session(eng) as s:
            p = s.get(Player, player)
            assert p is not None
            p.score = Player.score + 4
            proxy.set_mode("drop_exec_reply", once=True)
            s.commit()
            assert proxy.exec_replies_dropped == 1
            assert "score" not in p.__dict__  # unknown until reloaded
            assert p.score == 4 and inspect(p).version == 2
            p.score = Player.score + 1
            s.commit()
            assert p.score == 5
    finally:
        eng.dispose()


# -- the increments-only path (`IncrementFlush`) ------------------------------------------


def state_of(obj: object) -> InstanceState:
    from redmap.orm.attributes import state_of as of

    st = of(obj)
    assert st is not None
    return st


def _last_flush(s: Session) -> type:
    flush = s._last_flush
    assert flush is not None
    return type(flush)


def _one_object_path() -> type:
    """The path of a commit made only of increments of one object, once the engine has
    run the flush script: the counter lane on the sync driver; the asyncio driver
    declines the lane, so `IncrementFlush` runs it (tests/test_counter_lane.py)."""
    from redmap.orm.counterlane import CounterLane
    from redmap.orm.unitofwork import IncrementFlush

    return IncrementFlush if os.environ.get(DRIVER_ENV) == "async" else CounterLane


def test_increments_only_take_the_increment_path_with_the_general_plan(
    engine: redmap.Engine, player: int
) -> None:
    """A flush of increments only skips the general collection, not its plan: the plan
    is the one `plan_flush` builds for the same updates."""
    from redmap.orm.persistence import plan_flush
    from redmap.orm.unitofwork import IncrementFlush, UOWTransaction

    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 2
        p.coins = Player.coins + 7
        fast = IncrementFlush.collect_increments(s._context)
        assert fast is not None
        fast.token_key = "{ct}:#flush:x"
        general = UOWTransaction(s._context)
        general._collect_tasks()
        ours = fast.plan()
        theirs = plan_flush([], general.updates, [], token_key="{ct}:#flush:x", incarnation=b"i")
        assert ours.writes == theirs.writes
        assert ours.watch == theirs.watch
        assert [(c.kind, c.command, c.expected) for c in ours.checks] == [
            (c.kind, c.command, c.expected) for c in theirs.checks
        ]
        assert ours.incremented == theirs.incremented
        s.commit()
        # The engine's first scripted flush: the lane waits until the server is known
        # to hold the script, so this one runs as `IncrementFlush`.
        assert _last_flush(s) is IncrementFlush
        assert (p.score, p.coins, inspect(p).version) == (2, 7, 2) and not s.dirty
        p.score = Player.score + 2
        p.coins = Player.coins + 7
        s.commit()
        assert _last_flush(s) is _one_object_path()
        assert (p.score, p.coins, inspect(p).version) == (4, 14, 3) and not s.dirty


def test_a_refused_increment_on_the_increment_path_leaves_the_session_as_it_was(
    engine: redmap.Engine, redis_client: redis.Redis, player: int
) -> None:
    from redmap.query.expression import Increment

    key = f"{{ct}}:player:{player}"
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        p.coins = Player.coins + 1
        redis_client.hset(key, "coins", "not a number")
        before = dump_keys(redis_client)
        with pytest.raises(FlushError, match="nothing was written"):
            s.commit()
        assert dump_keys(redis_client) == before
        st = state_of(p)
        assert st.modified == {"score", "coins"} and p in s.dirty
        assert type(p.__dict__["score"]) is Increment and st.version == 1
        assert not st.in_doubt
        redis_client.hset(key, "coins", "0")
        s.commit()  # the same pending increments, applied once
        assert (p.score, p.coins, st.version) == (1, 1, 2)
    assert redis_client.hmget(key, ["score", "coins"]) == [b"1", b"1"]


def test_a_stale_incarnation_is_refused_on_the_increment_path(
    engine: redmap.Engine, redis_client: redis.Redis, player: int
) -> None:
    """Deleted and inserted again under the same id: not the object loaded."""
    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        with Session(engine) as other:
            other.delete(other.get(Player, player))
            other.commit()
            other.add(Player(name="again", id=player))
            other.commit()
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError):
            s.commit()
        assert dump_keys(redis_client) == before
        assert state_of(p).modified == {"score"}


def test_increments_mixed_with_other_changes_take_the_general_path(
    engine: redmap.Engine, player: int
) -> None:
    from redmap.orm.unitofwork import UOWTransaction

    with Session(engine) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        p.coins = 5  # a plain value beside the increment
        s.commit()
        assert _last_flush(s) is UOWTransaction
        p.score = Player.score + 1
        s.add(Player(name="new"))  # a new object in the same flush
        s.commit()
        assert _last_flush(s) is UOWTransaction
        p.score = Player.score + 1
        s.commit()
        assert _last_flush(s) is _one_object_path()
        assert (p.score, p.coins) == (3, 5)


def test_listeners_make_increments_take_the_general_path(
    engine: redmap.Engine, player: int
) -> None:
    from redmap.orm.unitofwork import UOWTransaction

    seen: list[str] = []

    def before_update(obj: Player) -> None:
        seen.append("mapper")

    def before_flush(session: Session) -> None:
        seen.append("session")

    for target, name, fn in (
        (Player, "before_update", before_update),
        (Session, "before_flush", before_flush),
    ):
        redmap.event.listen(target, name, fn)
        try:
            with Session(engine) as s:
                p = s.get(Player, player)
                assert p is not None
                p.score = Player.score + 1
                s.commit()
                assert _last_flush(s) is UOWTransaction
        finally:
            redmap.event.remove(target, name, fn)
    assert seen == ["mapper", "session"]


def test_a_lost_reply_on_the_increment_path_is_settled(
    engine: redmap.Engine, proxy: LoopbackProxy, player: int
) -> None:
    """The increment path's reply lost: settled as applied (once), then the object is
    in doubt only if the settle fails too (here the read-back succeeds)."""
    from redmap.orm.unitofwork import IncrementFlush

    eng = redmap.create_engine(proxy.url, socket_timeout=0.5)
    try:
        with Session(eng, expire_on_commit=False) as s:
            p = s.get(Player, player)
            assert p is not None
            for _ in range(3):
                p.score = Player.score + 1
                s.commit()
            proxy.set_mode("drop_exec_reply", once=True)
            p.score = Player.score + 10
            s.commit()
            assert proxy.exec_replies_dropped == 1
            assert _last_flush(s) is IncrementFlush
            assert "score" not in p.__dict__ and not inspect(p).in_doubt
            assert p.score == 13 and inspect(p).version == 5
    finally:
        eng.dispose()


def test_an_unsettled_lost_reply_on_the_increment_path_marks_the_object_in_doubt(
    engine: redmap.Engine, proxy: LoopbackProxy, player: int
) -> None:
    from redmap.exc import OutcomeUnknownError

    eng = redmap.create_engine(proxy.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        with Session(eng) as s:
            p = s.get(Player, player)
            assert p is not None
            p.score = Player.score + 1
            proxy.set_mode("drop_exec_reply", once=True, then="reset")
            with pytest.raises(OutcomeUnknownError):
                s.commit()
            assert inspect(p).in_doubt
            proxy.set_mode("pass")
            with pytest.raises(InvalidRequestError, match="rollback"):
                s.commit()
            s.rollback()
            assert s.get(Player, player).score == 1  # type: ignore[union-attr]
    finally:
        eng.dispose()


def test_an_increment_only_flush_sent_alone_loads_the_script_after_noscript(
    engine: redmap.Engine, redis_client: redis.Redis, player: int
) -> None:
    """The script sent without MULTI: a NOSCRIPT reply (cache emptied by a restart or a
    failover) means nothing ran; the flush goes again with the script's body."""
    with Session(engine, expire_on_commit=False) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        s.commit()  # the engine has now seen the script run
        redis_client.script_flush()
        p.score = Player.score + 2
        with count_round_trips(engine) as rt:
            s.commit()
        assert [[c[0] for c in b] for b in rt.batches] == [["EVALSHA"], ["EVAL"]]
        assert p.score == 3 and inspect(p).version == 3
    assert redis_client.hget(f"{{ct}}:player:{player}", "score") == b"3"
    assert redis_client.zscore("{ct}:player:#zs:score", str(player)) == 3


def test_an_increment_only_flush_refused_by_maxmemory_writes_nothing(
    engine: redmap.Engine, redis_client: redis.Redis, player: int
) -> None:
    """Under maxmemory, Redis refuses the lone script at its first write: a FlushError
    saying nothing was written, Redis and the session as they were; a retry once
    memory is back applies the increment once."""
    key = f"{{ct}}:player:{player}"
    with Session(engine, expire_on_commit=False) as s:
        p = s.get(Player, player)
        assert p is not None
        p.score = Player.score + 1
        s.commit()
        before = dump_keys(redis_client)
        p.score = Player.score + 5
        redis_client.config_set("maxmemory", 1)
        try:
            with pytest.raises(FlushError, match="nothing was written"):
                s.commit()
        finally:
            redis_client.config_set("maxmemory", 0)
        assert dump_keys(redis_client) == before
        assert s.dirty and inspect(p).version == 2 and not inspect(p).in_doubt
        s.commit()  # the same pending increment, applied once
        assert p.score == 6
    assert redis_client.hget(key, "score") == b"6"


def test_an_object_in_doubt_is_refused_in_whichever_session_holds_it(
    engine: redmap.Engine, proxy: LoopbackProxy, player: int
) -> None:
    """The session finds its objects in doubt without visiting every object it holds
    (`SessionContext.doubt`): one expunged while in doubt and added to another session
    still stops that session's flush until a rollback there reloads it."""
    from redmap.exc import OutcomeUnknownError

    eng = redmap.create_engine(proxy.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        with Session(eng) as s:
            s.add_all([Player(name=f"other{i}") for i in range(50)])
            s.commit()
            p = s.get(Player, player)
            assert p is not None
            p.score = Player.score + 1
            proxy.set_mode("drop_exec_reply", once=True, then="reset")
            with pytest.raises(OutcomeUnknownError):
                s.commit()
            proxy.set_mode("pass")
            assert inspect(p).in_doubt
            s.expunge(p)
            s.add(Player(name="fine"))
            s.commit()  # nothing in doubt is left in this session
        with Session(eng) as other:
            other.add(p)
            other.add(Player(name="blocked"))
            with pytest.raises(InvalidRequestError, match="rollback"):
                other.commit()
            other.rollback()
            assert not inspect(p).in_doubt
            assert other.get(Player, player).score == 1  # type: ignore[union-attr]
    finally:
        eng.dispose()
