"""The counter lane (`redmap.orm.counterlane`): a commit made only of increments of one
object, sent without the general flush machinery, with the general path's outcome.

Three things are checked against a real server. The lane sends the invocation the
general path would send, argument for argument, for every field kind and key kind it
takes. It takes only what `IncrementFlush` takes, and narrower. And every reply other
than the plain success (a refusal, NOSCRIPT, a lost reply, an interrupted round trip,
a refused write) ends as it ends on the general path, because the flush protocol reads
that reply as its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

import redmap
from redmap import (
    ExpiresAt,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    UpdatedAt,
    inspect,
    registry,
)
from redmap.exc import FlushError, StaleDataError
from redmap.orm import flushscript
from redmap.orm.attributes import state_of
from redmap.orm.counterlane import CounterLane
from redmap.orm.unitofwork import IncrementFlush, UOWTransaction
from redmap.testing.assertions import count_round_trips, dump_keys
from redmap.testing.servers import ClusterProcesses
from tests._fixtures import Counter
from tests.proxy import LoopbackProxy

lreg = registry(prefix="cl")


@lreg.mapped
@dataclass
class Meter:
    name: Annotated[str, Indexed()] = "m"
    hits: Annotated[int, Sorted()] = 0
    plain: int = 0
    ratio: Annotated[float, Sorted()] = 0.0
    total: float = 0.0
    money: Decimal = Decimal("0")
    id: Annotated[int | None, PrimaryKey()] = None


@lreg.mapped
@dataclass
class Named:
    id: Annotated[str, PrimaryKey()]
    hits: Annotated[int, Sorted()] = 0


@lreg.mapped
@dataclass
class ByUuid:
    hits: Annotated[int, Sorted()] = 0
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


@lreg.mapped
@dataclass
class Leased:
    hits: int = 0
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@lreg.mapped
@dataclass
class Stamped:
    hits: int = 0
    updated: Annotated[datetime | None, UpdatedAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


sreg = registry(prefix="cs", shards=4)


@sreg.mapped
@dataclass
class ShardedMeter:
    __shard_key__ = "id"
    hits: Annotated[int, Sorted()] = 0
    id: Annotated[int | None, PrimaryKey()] = None


@pytest.fixture
def sync_engine(clean_redis: None, redis_url: str) -> Iterator[redmap.Engine]:
    """A sync engine whatever REDMAP_TEST_DRIVER says (the lane is the sync driver's),
    that has run the flush script once (the lane waits for that)."""
    engine = redmap.create_engine(redis_url)
    try:
        with Session(engine) as s:
            m = Meter(id=1000)
            s.add(m)
            s.commit()
            m.hits = Meter.hits + 1
            s.commit()  # the general path, which loads the script
            assert type(s._last_flush) is IncrementFlush
        assert engine.dialect.script_cache.loaded
        yield engine
    finally:
        engine.dispose()


def _stored(engine: redmap.Engine, obj: Any) -> Any:
    with Session(engine) as s:
        s.add(obj)
        s.commit()
        return obj.id


def _general_command(s: Session, lane: CounterLane) -> tuple[Any, ...]:
    """What the general path sends for the same flush with the lane's token."""
    job = lane.job(s._context, (None, 0.0))
    invocations = flushscript.encode(job.plan())
    assert len(invocations) == 1
    return ("EVALSHA", flushscript.SCRIPT_SHA, 1, lane.route, *invocations[0].args)


# -- the invocation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"hits": 1},
        {"plain": -3},
        {"ratio": 0.1},
        {"total": 1e-17},
        {"money": Decimal("2.50")},
        {"hits": 2, "plain": 5, "ratio": -1.5, "total": 3.25, "money": Decimal("-0.01")},
        {"ratio": 2.0, "hits": 7},
    ],
)
def test_the_lane_sends_what_the_general_path_sends(
    sync_engine: redmap.Engine, fields: dict[str, Any]
) -> None:
    mid = _stored(sync_engine, Meter())
    with Session(sync_engine) as s:
        m = s.get(Meter, mid)
        assert m is not None
        for name, delta in fields.items():
            setattr(m, name, getattr(Meter, name) + delta)
        lane = CounterLane.collect(s._context)
        assert lane is not None
        assert IncrementFlush.collect_increments(s._context) is not None
        assert lane.command == _general_command(s, lane)
        s.commit()
        assert type(s._last_flush) is CounterLane and not s.dirty
        for name, delta in fields.items():
            assert getattr(m, name) == getattr(Meter(), name) + delta
        assert inspect(m).version == 2
    with Session(sync_engine) as s:  # what Redis holds is what the session recorded
        again = s.get(Meter, mid)
        assert again is not None
        for name, delta in fields.items():
            assert getattr(again, name) == getattr(Meter(), name) + delta


@pytest.mark.parametrize("kind", ["int", "str", "uuid"])
def test_every_key_kind_takes_the_lane(
    sync_engine: redmap.Engine, redis_client: redis.Redis, kind: str
) -> None:
    obj: Any = {"int": Meter(), "str": Named(id="a:b{c}"), "uuid": ByUuid()}[kind]
    pk = _stored(sync_engine, obj)
    model = type(obj)
    with Session(sync_engine) as s:
        o = s.get(model, pk)
        assert o is not None
        o.hits = model.hits + 5
        lane = CounterLane.collect(s._context)
        assert lane is not None and lane.command == _general_command(s, lane)
        with count_round_trips(sync_engine) as trips:
            s.commit()
        assert trips.round_trips == 1 and type(s._last_flush) is CounterLane
        assert o.hits == 5
        # The Sorted score is the value Redis computed, under the object's member.
        st = state_of(o)
        assert st is not None
        zset = st.mapper.keys.sorted("hits")
        assert redis_client.zscore(zset, st.mapper.pk_segment(pk)) == 5.0


def test_what_the_lane_leaves_to_the_general_path(sync_engine: redmap.Engine) -> None:
    """Two objects, a plain value beside an increment, shards, deadlines, UpdatedAt:
    the lane declines (the general path, already tested, runs them)."""
    ids = [_stored(sync_engine, Meter()) for _ in range(2)]
    lid = _stored(sync_engine, Leased())
    tid = _stored(sync_engine, Stamped())
    shid = _stored(sync_engine, ShardedMeter())
    with Session(sync_engine) as s:
        a, b = (s.get(Meter, i) for i in ids)
        assert a is not None and b is not None
        a.hits = Meter.hits + 1
        b.hits = Meter.hits + 1
        assert CounterLane.collect(s._context) is None
        s.commit()
        assert type(s._last_flush) is IncrementFlush
        a.hits = Meter.hits + 1
        a.plain = 4
        assert CounterLane.collect(s._context) is None
        s.commit()
        assert type(s._last_flush) is UOWTransaction
        for model, pk in ((Leased, lid), (Stamped, tid), (ShardedMeter, shid)):
            o: Any = s.get(model, pk)
            assert o is not None
            o.hits = model.hits + 1  # type: ignore[attr-defined]
            assert CounterLane.collect(s._context) is None
            s.commit()
            assert type(s._last_flush) in (IncrementFlush, UOWTransaction)
            assert o.hits == 1


def test_the_lane_waits_until_the_script_is_known(clean_redis: None, redis_url: str) -> None:
    """A fresh engine has not run the script: the general path sends its body (one
    round trip); the next commit takes the lane."""
    engine = redmap.create_engine(redis_url)
    try:
        mid = _stored(engine, Meter())
        with Session(engine) as s:
            m = s.get(Meter, mid)
            assert m is not None
            for expected in (IncrementFlush, CounterLane):
                m.hits = Meter.hits + 1
                with count_round_trips(engine) as trips:
                    s.commit()
                assert trips.round_trips == 1 and type(s._last_flush) is expected
            assert m.hits == 2
    finally:
        engine.dispose()


# -- replies other than the plain success ----------------------------------------------------


def test_a_stale_incarnation_is_refused_as_on_the_general_path(
    sync_engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    mid = _stored(sync_engine, Meter())
    with Session(sync_engine) as s:
        m = s.get(Meter, mid)
        assert m is not None
        m.hits = Meter.hits + 1
        with Session(sync_engine) as other:
            other.delete(other.get(Meter, mid))
            other.commit()
            other.add(Meter(id=mid, name="again"))
            other.commit()
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError):
            s.commit()
        assert dump_keys(redis_client) == before
        st = state_of(m)
        assert st is not None
        assert st.modified == {"hits"} and not st.in_doubt and st.version == 1
        assert type(s._last_flush) is not CounterLane
        s.rollback()
        assert m.name == "again"  # reloaded: the object now stored under that id
        m.hits = Meter.hits + 1
        s.commit()
        assert m.hits == 1 and type(s._last_flush) is CounterLane


def test_a_refused_write_is_undone_and_leaves_the_session_as_it_was(
    sync_engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    mid = _stored(sync_engine, Meter())
    key = f"{{cl}}:meter:{mid}"
    with Session(sync_engine) as s:
        m = s.get(Meter, mid)
        assert m is not None
        m.hits = Meter.hits + 1
        m.plain = Meter.plain + 1
        redis_client.hset(key, "plain", "not a number")
        before = dump_keys(redis_client)
        with pytest.raises(FlushError, match="nothing was written"):
            s.commit()
        assert dump_keys(redis_client) == before
        st = state_of(m)
        assert st is not None and st.modified == {"hits", "plain"} and st.version == 1
        redis_client.hset(key, "plain", "0")
        s.commit()
        assert (m.hits, m.plain, inspect(m).version) == (1, 1, 2)
        assert type(s._last_flush) is CounterLane


def test_noscript_after_a_restart_falls_back_to_the_script_body(
    sync_engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """The server forgot the script (SCRIPT FLUSH, as after a restart): the lane's
    EVALSHA is answered NOSCRIPT, the protocol sends EVAL; applied once."""
    mid = _stored(sync_engine, Meter())
    with Session(sync_engine) as s:
        m = s.get(Meter, mid)
        assert m is not None
        redis_client.script_flush()
        m.hits = Meter.hits + 3
        with count_round_trips(sync_engine) as trips:
            s.commit()
        assert trips.round_trips == 2 and type(s._last_flush) is IncrementFlush
        assert m.hits == 3 and inspect(m).version == 2
    assert redis_client.hget(f"{{cl}}:meter:{mid}", "hits") == b"3"


def test_a_lost_reply_is_settled_by_the_protocol(
    clean_redis: None, proxy: LoopbackProxy, redis_client: redis.Redis
) -> None:
    engine = redmap.create_engine(proxy.url, socket_timeout=0.5)
    try:
        mid = _stored(engine, Meter())
        with Session(engine, expire_on_commit=False) as s:
            m = s.get(Meter, mid)
            assert m is not None
            m.hits = Meter.hits + 1
            s.commit()  # loads the script
            m.hits = Meter.hits + 1
            s.commit()
            assert type(s._last_flush) is CounterLane
            proxy.set_mode("drop_exec_reply", once=True)
            m.hits = Meter.hits + 10
            s.commit()
            assert proxy.exec_replies_dropped == 1
            # Settled as applied; the value Redis computed was lost with the reply.
            assert type(s._last_flush) is IncrementFlush
            assert "hits" not in m.__dict__ and not inspect(m).in_doubt
            assert m.hits == 12 and inspect(m).version == 4
    finally:
        engine.dispose()
    assert redis_client.hget(f"{{cl}}:meter:{mid}", "hits") == b"12"


def _is_lone(commands: Sequence[Sequence[Any]]) -> bool:
    return len(commands) == 1 and str(commands[0][0]) == "EVALSHA"


class TestKeyboardInterrupt:
    def _bump(self, engine: redmap.Engine, mid: int) -> BaseException:
        with Session(engine) as s:
            m = s.get(Meter, mid)
            assert m is not None
            m.hits = Meter.hits + 1
            with pytest.raises(KeyboardInterrupt) as info:
                s.commit()
        return info.value

    def test_before_the_invocation_is_sent(
        self, sync_engine: redmap.Engine, redis_client: redis.Redis
    ) -> None:
        mid = _stored(sync_engine, Meter())
        fired: list[Any] = []

        def hook(commands: Sequence[Sequence[Any]]) -> None:
            if _is_lone(commands) and not fired:
                fired.append(commands)
                raise KeyboardInterrupt

        sync_engine.add_listener(hook)
        try:
            exc = self._bump(sync_engine, mid)
        finally:
            sync_engine.remove_listener(hook)
        assert exc.redmap_applied is False  # type: ignore[attr-defined]
        assert redis_client.hget(f"{{cl}}:meter:{mid}", "hits") == b"0"
        with Session(sync_engine) as s:  # the pool was left clean; the lane works
            m = s.get(Meter, mid)
            assert m is not None
            m.hits = Meter.hits + 1
            s.commit()
            assert m.hits == 1 and type(s._last_flush) is CounterLane

    def test_after_the_invocation_was_sent(
        self,
        sync_engine: redmap.Engine,
        redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        from redmap.dialects import base

        mid = _stored(sync_engine, Meter())
        real = base.send_and_read

        def send_then_interrupt(conn: Any, commands: Sequence[Any]) -> list[Any]:
            if _is_lone(commands):
                conn.send_packed_command(base._pack(conn, commands))
                raise KeyboardInterrupt
            return real(conn, commands)

        monkeypatch.setattr(base, "send_and_read", send_then_interrupt)
        exc = self._bump(sync_engine, mid)
        assert exc.redmap_applied is True  # type: ignore[attr-defined]
        assert redis_client.hget(f"{{cl}}:meter:{mid}", "hits") == b"1"  # once


def test_the_asyncio_driver_declines_the_lane(clean_redis: None, redis_url: str) -> None:
    """Its cancellation is settled in `execute_flush`: every flush goes there."""
    import asyncio

    from redmap.asyncio import AsyncSession, create_async_engine

    async def main() -> None:
        engine = create_async_engine(redis_url)
        try:
            async with AsyncSession(engine) as s:
                m = Meter()
                s.add(m)
                await s.commit()
                for _ in range(2):
                    m.hits = Meter.hits + 1
                    await s.commit()
                    assert type(s.sync_session._last_flush) is IncrementFlush
                assert m.hits == 2
        finally:
            await engine.dispose()

    asyncio.run(main())


# -- on a cluster ------------------------------------------------------------------------


@pytest.mark.cluster
def test_on_a_cluster_the_lane_follows_a_moved_slot(
    cluster_client: RedisCluster, cluster: ClusterProcesses
) -> None:
    """The lane's invocation goes to the node of the object's slot; once that slot has
    moved, the reply (MOVED) is the protocol's: it learns the new owner and sends the
    flush there (the script body: that node never ran it). Applied once each time."""
    from tests.test_cluster import _migrate_slot, _node_of

    engine = redmap.create_engine(cluster.url)
    try:
        with Session(engine, expire_on_commit=False) as s:
            c = Counter(value=0)
            s.add(c)
            s.commit()
            paths = []
            for _ in range(3):
                c.value = Counter.value + 1
                s.commit()
                paths.append(type(s._last_flush))
            assert paths == [IncrementFlush, CounterLane, CounterLane]
            source = _node_of(cluster_client, "{t}")
            target = next(n for n in cluster_client.get_primaries() if n.name != source.name)
            _migrate_slot(cluster_client, key_slot(b"{t}"), source, target)
            c.value = Counter.value + 10
            s.commit()
            assert type(s._last_flush) is IncrementFlush  # the lane's reply was MOVED
            assert c.value == 13
            c.value = Counter.value + 1
            s.commit()
            assert type(s._last_flush) is CounterLane and c.value == 14
        assert cluster_client.hget("{t}:counter:1", "value") == b"14"
    finally:
        engine.dispose()
