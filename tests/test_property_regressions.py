"""Regressions found by the configuration state machine (`tests/reliability/
test_config_machine.py`), as small deterministic cases on its models.

Each test replays the shortest history found for one defect that is not among the
items of issue 11, and checks the outcome with a fresh session and `redmap.audit`.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from redmap import Session, create_engine
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import IntegrityError, StaleDataError
from tests.reliability._models import config_models

# delete-orphan on Team.players, generated int keys, no unique, not sharded.
oreg, OTeam, OPlayer = config_models(
    "propreg", pk="gen_int", unique=False, sharded=False, orphans=True
)


def _player_on_a_team(engine: Engine) -> int:
    with Session(engine) as s:
        p = OPlayer(name="ann", team=OTeam(name="red"))
        s.add(p)
        s.commit()
        assert p.id is not None
        return p.id


@pytest.mark.parametrize("expire", ["expire_all", "expire"])
def test_expire_discards_a_pending_orphan(
    engine: Engine, redis_client: redis.Redis, expire: str
) -> None:
    """A child released from a delete-orphan list, then expired, survives the next commit."""
    pid = _player_on_a_team(engine)
    s = Session(engine)
    p = s.get(OPlayer, pid)
    assert p is not None and p.team is not None
    p.team = None  # an orphan: it would be deleted at the next commit ...
    # ... but expiry discards the assignment: the player is on its team again.
    if expire == "expire_all":
        s.expire_all()
    else:
        s.expire(p)
    s.commit()
    s.close()
    with Session(engine) as check:
        kept = check.get(OPlayer, pid)
        assert kept is not None, f"the player was deleted as an orphan after {expire}()"
        assert kept.team is not None and kept.team.name == "red"
    assert audit(redis_client, oreg).ok


def test_update_after_missing_version_never_moves_the_version_back(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A session that loaded version 1 cannot delete an object changed since, even after
    its `#v` went missing and another session wrote it again."""
    with Session(engine) as s:
        s.add_all([OTeam(name="red"), OTeam(name="blue")])
        s.commit()
    with Session(engine) as s:
        p = OPlayer(name="ann")
        s.add(p)
        s.commit()
        pid = p.id
    old = Session(engine)
    held = old.get(OPlayer, pid)  # version 1, no team
    assert held is not None
    with Session(engine) as s:  # version 2: on team 1
        p2 = s.get(OPlayer, pid)
        assert p2 is not None
        p2.team_id = 1
        s.commit()
    key = f"{{propreg}}:player:{pid}"
    assert redis_client.hget(key, "#v") == b"2"
    redis_client.hdel(key, "#v")  # corruption from outside
    with Session(engine) as s:  # loaded without #v, updated
        p3 = s.get(OPlayer, pid)
        assert p3 is not None
        p3.score = 5
        s.commit()
    stored = redis_client.hget(key, "#v")
    old.delete(held)
    try:
        old.commit()
        deleted = True
    except Exception:
        deleted = False
    old.close()
    assert not deleted, (
        f"a delete loaded at version 1 passed after #v went missing and was rewritten as "
        f"{stored!r}; audit: {audit(redis_client, oreg).unexplained}"
    )


# Explicit int keys, no unique, not sharded, no delete-orphan.
xreg, XTeam, XPlayer = config_models(
    "propreg2", pk="int", unique=False, sharded=False, orphans=False
)


@pytest.mark.parametrize("change", ["delete", "update"])
def test_object_deleted_and_inserted_again_is_stale_for_old_holders(
    engine: Engine, redis_client: redis.Redis, change: str
) -> None:
    """A session that loaded an object before it was deleted and inserted again under the
    same key gets StaleDataError, and the indexes stay consistent."""
    with Session(engine) as s:
        s.add(XPlayer(name="a", score=1, id=1))
        s.commit()
    old = Session(engine)
    held = old.get(XPlayer, 1)  # version 1 of the first object
    assert held is not None and held.name == "a"
    with Session(engine) as s:
        first = s.get(XPlayer, 1)
        assert first is not None
        s.delete(first)
        s.commit()
    with Session(engine) as s:
        s.add(XPlayer(name="b", score=2, id=1))  # another object, version 1 again
        s.commit()
    if change == "delete":
        old.delete(held)
    else:
        held.score = 5
    outcome = "applied"
    try:
        old.commit()
    except StaleDataError:
        outcome = "stale"
    old.close()
    report = audit(redis_client, xreg)
    assert outcome == "stale", (
        f"the {change} of the deleted object was applied to the new one; audit: "
        f"{report.mismatches + report.unexplained}"
    )
    assert report.ok


# Both models sharded by their own explicit int key (4 shards): team 1 and player 2 live
# in different shards, so on a cluster in different slots.
sreg, STeam, SPlayer = config_models(
    "propreg3", pk="int", unique=False, sharded=True, orphans=False
)


@pytest.mark.cluster
def test_cross_slot_session_writes_a_foreign_key_to_another_shard(
    cluster: Any, cluster_client: Any
) -> None:
    """With allow_cross_slot=True, a player whose team lives in another shard is written."""
    engine = create_engine(cluster.url)
    try:
        with Session(engine) as s:
            s.add(STeam(name="red", id=1))
            s.commit()
        with Session(engine, allow_cross_slot=True) as s:
            s.add(SPlayer(name="ann", id=2, team_id=1))
            s.commit()
        with Session(engine) as s:
            p = s.get(SPlayer, 2)
            assert p is not None and p.team_id == 1
    finally:
        engine.dispose()


@pytest.mark.cluster
def test_refused_cross_slot_insert_after_a_check_only_part_is_not_partial(
    cluster: Any, cluster_client: Any
) -> None:
    """A cross-slot insert of a taken key, pointing at a team in another shard, raises
    IntegrityError: the part that only checked the team wrote nothing."""
    engine = create_engine(cluster.url)
    try:
        with Session(engine) as s:
            s.add(STeam(name="red", id=1))
            s.commit()
        with Session(engine) as s:
            s.add(SPlayer(name="ann", id=2))
            s.commit()
        with Session(engine, allow_cross_slot=True) as s:
            s.add(SPlayer(name="bob", id=2, team_id=1))
            with pytest.raises(IntegrityError):
                s.commit()
        with Session(engine) as s:
            p = s.get(SPlayer, 2)
            assert p is not None and p.name == "ann" and p.team_id is None
    finally:
        engine.dispose()
