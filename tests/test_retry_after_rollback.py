"""A retry after a refused commit and a rollback applies, even when it reads nothing.

The retry users write: catch `StaleDataError`, `rollback()`, make the change again,
commit. A rollback expires every object, but the session used to keep the version and
incarnation it had loaded them at; a retry that assigned (or incremented, or deleted)
without reading the object first was checked against that same stale version and
refused again, for ever: a retry loop that could never succeed. The same after a lost
reply left objects in doubt.

Now a rollback marks the objects a flush refused as stale, and those in doubt
(`InstanceState.reload`): their next load replaces the snapshot whole, and the next
flush loads the ones still marked first (one round trip for all of them), so the retry
is written against what Redis holds. Everything else is unchanged: without a rollback
the same pending changes are refused again (they may have been computed from what was
stale), and a rollback that followed no refusal keeps the version the session loaded
(tests/test_blind_assignment.py). Found by trying the retry loop from outside; the
counter state machine now retries both ways (tests/reliability/test_counter_machine.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import pytest
import redis

import redmap
from redmap import Indexed, PrimaryKey, Session, Sorted, Unique, inspect, registry
from redmap.audit import audit
from redmap.exc import OutcomeUnknownError, StaleDataError
from redmap.orm.attributes import state_of
from redmap.orm.state import InstanceState
from redmap.testing.assertions import count_round_trips, dump_keys
from tests.proxy import LoopbackProxy

rreg = registry(prefix="rr")


@rreg.mapped
@dataclass
class Seat:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    rank: Annotated[int, Sorted()] = 0
    id: Annotated[int | None, PrimaryKey()] = None


def _state(obj: object) -> InstanceState:
    st = state_of(obj)
    assert st is not None
    return st


def _marked(obj: object) -> bool:
    """Whether the session marked `obj` to reload before its next flush."""
    return _state(obj).reload


def _store(engine: redmap.Engine, n: int = 1) -> list[int]:
    with Session(engine) as s:
        seats = [Seat(name="old", email=f"old{i}@x", rank=1) for i in range(n)]
        s.add_all(seats)
        s.commit()
        return [c.id for c in seats if c.id is not None]


def _other_updates(engine: redmap.Engine, sid: int) -> None:
    with Session(engine) as other:
        c = other.get_one(Seat, sid)
        c.name, c.email, c.rank = "theirs", f"theirs{sid}@x", 7
        other.commit()


def _other_reinserts(engine: redmap.Engine, sid: int) -> None:
    """Deleted and inserted again under the same key: another incarnation."""
    with Session(engine) as other:
        c = other.get_one(Seat, sid)
        other.delete(c)
        other.commit()
        other.add(Seat(id=sid, name="theirs", email=f"theirs{sid}@x", rank=7))
        other.commit()


def _assign(c: Seat) -> None:
    c.name, c.email = "mine", f"mine{c.id}@x"


def _increment(c: Seat) -> None:
    c.rank = Seat.rank + 1


OTHERS = {"update": _other_updates, "reinsert": _other_reinserts}
CHANGES = {"assign": _assign, "increment": _increment}


def _refused_then_rolled_back(s: Session, c: Seat, change: Callable[[Seat], None]) -> None:
    change(c)
    with pytest.raises(StaleDataError):
        s.commit()
    s.rollback()


@pytest.mark.parametrize("other", list(OTHERS))
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.usefixtures("driver")
def test_the_same_change_again_after_a_rollback_applies(
    engine: redmap.Engine, redis_client: redis.Redis, other: str, change: str
) -> None:
    """Assign or increment again, reading nothing: applied once, on what the other
    writer left; indexes and unique claims follow (the old entries removed are the
    other writer's, which only a reload can know)."""
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        OTHERS[other](engine, sid)
        plain = change == "assign"
        if plain:  # (increments alone commute with an update: not refused)
            _refused_then_rolled_back(s, c, CHANGES[change])
        else:
            # An increment is refused only by another incarnation; an update first
            # refuses a plain assignment, then the increment is the retried change.
            _refused_then_rolled_back(s, c, _assign if other == "update" else _increment)
        assert _marked(c)
        CHANGES[change](c)
        s.commit()
        assert not _marked(c)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        if plain:
            assert (c.name, c.email, c.rank) == ("mine", f"mine{sid}@x", 7)
        else:
            assert (c.name, c.email, c.rank) == ("theirs", f"theirs{sid}@x", 8)
    assert audit(redis_client, rreg).ok


@pytest.mark.usefixtures("driver")
def test_a_delete_again_after_a_rollback_applies(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        _other_updates(engine, sid)
        s.delete(c)
        with pytest.raises(StaleDataError):
            s.commit()
        s.rollback()
        s.delete(c)
        s.commit()
    assert redis_client.exists(f"{{rr}}:seat:{sid}") == 0
    assert audit(redis_client, rreg).ok


def test_reading_after_the_assignment_takes_the_current_version(
    engine: redmap.Engine,
) -> None:
    """Assigned after the rollback, then another attribute read: the load takes what
    Redis holds for everything (nothing was read at the old version since the rollback)
    and the commit applies."""
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        _other_updates(engine, sid)
        _refused_then_rolled_back(s, c, _assign)
        c.name = "mine"
        assert c.rank == 7 and inspect(c).version == 2 and not _marked(c)
        s.commit()
        assert s.get_one(Seat, sid).name == "mine"


def test_without_a_rollback_the_same_changes_are_refused_again(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """A failed flush leaves the session as it was: its pending changes may come from
    what was stale, so they are not written against the new version."""
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        _other_updates(engine, sid)
        _assign(c)
        before = dump_keys(redis_client)
        for _ in range(3):
            with pytest.raises(StaleDataError):
                s.commit()
        assert dump_keys(redis_client) == before
        assert not _marked(c) and inspect(c).version == 1


def test_a_rollback_without_a_refusal_keeps_the_loaded_version(
    engine: redmap.Engine,
) -> None:
    """Only what a refusal named (or left in doubt) is marked: an assignment made after
    any other rollback is still checked against the version the session loaded."""
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        _other_updates(engine, sid)
        s.rollback()
        assert not _marked(c)
        _assign(c)
        with pytest.raises(StaleDataError):
            s.commit()


def test_only_the_objects_the_refusal_named_are_marked(engine: redmap.Engine) -> None:
    a, b = _store(engine, 2)
    with Session(engine) as s:
        ca, cb = s.get_one(Seat, a), s.get_one(Seat, b)
        _other_updates(engine, a)
        _assign(ca)
        cb.name = "also"
        with pytest.raises(StaleDataError) as refused:
            s.commit()
        assert refused.value.objects == [ca]
        s.rollback()
        assert _marked(ca) and not _marked(cb)


def test_an_object_deleted_meanwhile_is_refused_each_time_and_not_brought_back(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        with Session(engine) as other:
            other.delete(other.get_one(Seat, sid))
            other.commit()
        before = dump_keys(redis_client)
        for _ in range(3):
            _refused_then_rolled_back(s, c, _assign)
            assert _marked(c)
        assert dump_keys(redis_client) == before


@pytest.mark.parametrize("n", [1, 40])
def test_the_reload_is_one_round_trip_whatever_the_number_of_objects(
    engine: redmap.Engine, n: int
) -> None:
    sids = _store(engine, n)
    with Session(engine) as s:
        seats = [s.get_one(Seat, sid) for sid in sids]
        for sid in sids:
            _other_updates(engine, sid)
        for c in seats:
            _assign(c)
        with pytest.raises(StaleDataError):
            s.commit()
        s.rollback()
        for c in seats:
            _assign(c)
        with count_round_trips(engine) as marked:
            s.flush()
        assert [b[0][0] for b in marked.batches][0] == "HGETALL"
        for c in seats:
            c.name = "again"
        with count_round_trips(engine) as plain:
            s.flush()
        assert marked.round_trips == plain.round_trips + 1
        assert len(marked.batches[0]) == n


def test_an_object_in_doubt_is_written_against_what_redis_holds_after_the_rollback(
    engine: redmap.Engine, proxy: LoopbackProxy, redis_client: redis.Redis
) -> None:
    """A lost reply not settled: the first write may or may not have applied. After the
    rollback, the change made again is written on whichever Redis holds, once."""
    (sid,) = _store(engine)
    eng = redmap.create_engine(proxy.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        with Session(eng) as s:
            c = s.get_one(Seat, sid)
            c.name = "first"
            proxy.set_mode("drop_exec_reply", once=True, then="reset")
            with pytest.raises(OutcomeUnknownError):
                s.commit()
            proxy.set_mode("pass")
            s.rollback()
            assert _marked(c)
            c.name = "second"
            s.commit()
    finally:
        eng.dispose()
    assert redis_client.hget(f"{{rr}}:seat:{sid}", "name") == b"second"
    assert audit(redis_client, rreg).ok


def test_a_flush_that_fails_after_the_reload_leaves_the_session_as_it_was(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """The reload is part of the flush: refused for another object, the flush puts back
    the snapshot, version and mark it replaced (the attributes it filled unload again)."""
    a, b = _store(engine, 2)
    with Session(engine) as s:
        ca = s.get_one(Seat, a)
        _other_updates(engine, a)
        _refused_then_rolled_back(s, ca, _assign)
        cb = s.get_one(Seat, b)
        _other_updates(engine, b)  # cb is stale now, and not marked
        ca.name = "mine"
        cb.name = "mine too"
        before = (inspect(ca).version, dict(_state(ca).loaded), sorted(ca.__dict__))
        with pytest.raises(StaleDataError) as refused:
            s.commit()
        assert refused.value.objects == [cb]
        assert (inspect(ca).version, dict(_state(ca).loaded), sorted(ca.__dict__)) == before
        assert _marked(ca)
        s.rollback()
        ca.name, cb.name = "mine", "mine too"
        s.commit()
    with Session(engine) as s:
        assert [s.get_one(Seat, k).name for k in (a, b)] == ["mine", "mine too"]
    assert audit(redis_client, rreg).ok


def test_the_retry_applies_on_a_cluster_too(sengine: redmap.Engine) -> None:
    """Standalone, then a 3-node cluster (the reload is one pipelined read there too)."""
    (sid,) = _store(sengine)
    with Session(sengine) as s:
        c = s.get_one(Seat, sid)
        _other_reinserts(sengine, sid)
        _refused_then_rolled_back(s, c, _assign)
        _assign(c)
        s.commit()
    with Session(sengine) as s:
        c = s.get_one(Seat, sid)
        assert (c.name, c.rank) == ("mine", 7)


def test_an_expunged_object_leaves_the_marks_and_takes_its_own_along(
    engine: redmap.Engine,
) -> None:
    """The session forgets a state that leaves it (nothing held for ever); the state
    keeps its mark, and another session it joins reloads it before its flush."""
    (sid,) = _store(engine)
    with Session(engine) as s:
        c = s.get_one(Seat, sid)
        _other_updates(engine, sid)
        _assign(c)
        with pytest.raises(StaleDataError):
            s.commit()
        s.rollback()
        s.expunge(c)
        assert not s._context.reload and not s._context.refused
    assert _marked(c)
    with Session(engine) as t:
        t.add(c)
        c.name = "moved"
        t.commit()
        assert not _marked(c)
    with Session(engine) as s:
        assert s.get_one(Seat, sid).name == "moved"
