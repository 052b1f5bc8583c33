"""An attribute assigned while expired is written, even when it equals what the session
loaded before (`InstanceState.blind`).

The session compared such an assignment with its old snapshot: assigning back the value
it had loaded looked like no change, the commit wrote nothing and succeeded, and Redis
kept what another writer had put there meanwhile: the assignment was lost. (Found by the
counter state machine, tests/reliability/test_counter_machine.py.) Now it is written
with the version the session loaded, so the commit applies it, or is refused as stale
when another writer changed the object: the outcome reported is the outcome Redis holds.
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
from redmap.exc import StaleDataError
from redmap.testing.assertions import count_round_trips, dump_keys

breg = registry(prefix="ba")


@breg.mapped
@dataclass
class Card:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    rank: Annotated[int, Sorted()] = 0
    id: Annotated[int | None, PrimaryKey()] = None


def _stored(engine: redmap.Engine) -> int:
    with Session(engine) as s:
        c = Card(name="old", email="old@x", rank=1)
        s.add(c)
        s.commit()
        assert c.id is not None
        return c.id


def _change(engine: redmap.Engine, cid: int, **values: object) -> None:
    with Session(engine) as other:
        c = other.get(Card, cid)
        assert c is not None
        for k, v in values.items():
            setattr(c, k, v)
        other.commit()


def _expire_all(s: Session) -> None:
    s.expire_all()


def _rollback(s: Session) -> None:
    s.rollback()


@pytest.mark.parametrize("forget", [_expire_all, _rollback], ids=["expire_all", "rollback"])
def test_the_old_value_assigned_after_another_writer_is_stale_not_lost(
    engine: redmap.Engine, redis_client: redis.Redis, forget: Callable[[Session], None]
) -> None:
    cid = _stored(engine)
    with Session(engine) as s:
        c = s.get(Card, cid)
        assert c is not None and c.name == "old"
        _change(engine, cid, name="new", email="new@x", rank=5)
        forget(s)
        c.name = "old"  # what this session loaded, before the other writer
        c.email = "old@x"
        c.rank = 1
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError):
            s.commit()
        assert dump_keys(redis_client) == before
        # The retry users write: roll back, reload, assign again.
        s.rollback()
        assert c.name == "new"
        c.name, c.email, c.rank = "old", "old@x", 1
        s.commit()
    with Session(engine) as s:
        c = s.get(Card, cid)
        assert c is not None and (c.name, c.email, c.rank) == ("old", "old@x", 1)
    assert audit(redis_client, breg).ok


def test_the_old_value_assigned_after_an_expiry_is_written_when_nobody_changed_it(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """Nothing changed meanwhile: written (the same bytes, a new version), indexes and
    unique claims as they were."""
    cid = _stored(engine)
    with Session(engine) as s:
        c = s.get(Card, cid)
        assert c is not None
        s.expire_all()
        c.name, c.email, c.rank = "old", "old@x", 1
        s.flush()
        assert inspect(c).version == 2  # written
        # Once written (and not expired by a commit), the same value again is no
        # change: nothing is sent.
        c.name = "old"
        with count_round_trips(engine) as trips:
            s.flush()
        assert trips.round_trips == 0
    assert redis_client.hget(f"{{ba}}:card:{cid}", "name") == b"old"
    assert audit(redis_client, breg).ok


def test_an_assignment_made_while_loaded_is_still_compared(
    engine: redmap.Engine,
) -> None:
    """Only assignments to expired attributes are blind: assigning a loaded attribute its
    own value writes nothing, as before."""
    cid = _stored(engine)
    with Session(engine) as s:
        c = s.get(Card, cid)
        assert c is not None
        c.name = "old"
        with count_round_trips(engine) as trips:
            s.commit()
        assert trips.round_trips == 0
        assert inspect(c).version == 1


def test_expiring_again_forgets_the_blind_assignment(engine: redmap.Engine) -> None:
    """An expiry drops pending assignments, blind ones included."""
    cid = _stored(engine)
    with Session(engine) as s:
        c = s.get(Card, cid)
        assert c is not None
        s.expire_all()
        c.name = "old"
        s.expire_all()
        with count_round_trips(engine) as trips:
            s.commit()
        assert trips.round_trips == 0
        assert c.name == "old" and inspect(c).version == 1
