"""Foreign keys across hash tags on Redis Cluster with `allow_cross_slot=True`.

A flush split by hash tag runs one transaction per tag; a transaction cannot WATCH a
key of another slot. So the check that a foreign key's target exists runs in the
target's tag, in a part of its own when that tag has no other work, before the part
writing the child (docs/session.md, "Cross-slot flushes"). Without allow_cross_slot
the flush is refused, and the refusal advises the option only when it is not set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from redmap import Session, create_engine
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import CrossSlotError, IntegrityError, StaleDataError
from redmap.orm.flushplan import FlushPlan
from redmap.orm.mapper import mapper_of
from redmap.orm.unitofwork import UOWTransaction
from tests.reliability._models import config_models

# Both models sharded by their own int key over 4 shards: an object with id n lives in
# shard n % 4, so team 1 and player 2 live under different hash tags (slots).
xreg, XTeam, XPlayer = config_models("xslot", pk="int", unique=False, sharded=True, orphans=False)


@pytest.fixture
def cengine(cluster_client: Any, cluster: Any) -> Iterator[Engine]:
    """A redmap engine on the emptied 3-node cluster."""
    eng = create_engine(cluster.url)
    assert eng.dialect.supports_cluster
    try:
        yield eng
    finally:
        eng.dispose()


def _teams(cengine: Engine, *ids: int) -> None:
    with Session(cengine, allow_cross_slot=True) as s:
        s.add_all([XTeam(name=f"t{i}", id=i) for i in ids])
        s.commit()


def _roster(cengine: Engine, team_id: int) -> list[int]:
    with Session(cengine) as s:
        team = s.get(XTeam, team_id)
        assert team is not None
        return sorted(p.id for p in team.players)


def _tag(model: Any, pk: int) -> str:
    return str(mapper_of(model).keys_for_pk(pk).tag)


def test_models_put_team_and_player_under_different_tags() -> None:
    """The premise: team 1 and player 2 are under two hash tags."""
    assert _tag(XTeam, 1) != _tag(XPlayer, 2)


@pytest.mark.cluster
class TestCrossSlotTargets:
    def test_child_inserted_pointing_at_parent_in_another_shard(
        self, cengine: Engine, cluster_client: Any
    ) -> None:
        """A new player whose team lives in another shard is written and listed by it."""
        _teams(cengine, 1)
        with Session(cengine, allow_cross_slot=True) as s:
            s.add(XPlayer(name="ann", id=2, team_id=1))
            s.commit()
        assert _roster(cengine, 1) == [2]
        report = audit(cluster_client, xreg)
        assert report.ok, report.mismatches + report.unexplained

    def test_child_pointing_at_missing_parent_in_another_shard_writes_nothing(
        self, cengine: Engine
    ) -> None:
        """The target's check part runs before the child's: a missing team is stale and
        no player is written."""
        _teams(cengine, 7)  # another team exists, not the one pointed at
        assert _tag(XPlayer, 2) < _tag(XTeam, 3)  # tag order would run the player first
        with Session(cengine, allow_cross_slot=True) as s:
            s.add(XPlayer(name="ann", id=2, team_id=3))
            with pytest.raises(StaleDataError, match=r"Team\(3\)"):
                s.commit()
        with Session(cengine) as s:
            assert s.get(XPlayer, 2) is None

    def test_child_reparented_to_parent_in_another_shard(
        self, cengine: Engine, cluster_client: Any
    ) -> None:
        """A player moved from a team of its own shard to one in another shard is
        listed by the new team only."""
        _teams(cengine, 1, 2)
        with Session(cengine) as s:
            s.add(XPlayer(name="ann", id=6, team_id=2))  # shard 2, like team 2
            s.commit()
        with Session(cengine, allow_cross_slot=True) as s:
            p = s.get(XPlayer, 6)
            assert p is not None
            p.team_id = 1
            s.commit()
        assert _roster(cengine, 1) == [6] and _roster(cengine, 2) == []
        report = audit(cluster_client, xreg)
        assert report.ok, report.mismatches + report.unexplained

    def test_reparent_to_missing_parent_in_another_shard_is_stale(self, cengine: Engine) -> None:
        """Moving a player to a team that does not exist in another shard is stale and
        leaves the player where it was."""
        _teams(cengine, 2)
        with Session(cengine) as s:
            s.add(XPlayer(name="ann", id=6, team_id=2))
            s.commit()
        with Session(cengine, allow_cross_slot=True) as s:
            p = s.get(XPlayer, 6)
            assert p is not None
            p.team_id = 1
            with pytest.raises(StaleDataError):
                s.commit()
        assert _roster(cengine, 2) == [6]

    def test_new_parent_and_child_in_two_shards_in_one_flush(
        self, cengine: Engine, cluster_client: Any
    ) -> None:
        """A new team and a new player of another shard pointing at it, in one flush:
        the team's part runs first (tag order would put the player's first)."""
        assert _tag(XPlayer, 2) < _tag(XTeam, 3)  # the part order is not the tag order
        with Session(cengine, allow_cross_slot=True) as s:
            s.add_all([XTeam(name="t3", id=3), XPlayer(name="ann", id=2, team_id=3)])
            s.commit()
        assert _roster(cengine, 3) == [2]
        report = audit(cluster_client, xreg)
        assert report.ok, report.mismatches + report.unexplained

    def test_new_parent_refused_first_leaves_child_unwritten(self, cengine: Engine) -> None:
        """A new team whose id is taken and a new player of another shard pointing at it:
        the team's part fails first, so nothing is written (IntegrityError, not a
        partial commit with the player written)."""
        _teams(cengine, 3)
        with Session(cengine, allow_cross_slot=True) as s:
            s.add_all([XTeam(name="dup", id=3), XPlayer(name="ann", id=2, team_id=3)])
            with pytest.raises(IntegrityError):
                s.commit()
        with Session(cengine) as s:
            assert s.get(XPlayer, 2) is None
        assert _roster(cengine, 3) == []

    def test_parent_deleted_between_parts_is_reported_by_the_audit(
        self, cengine: Engine, cluster_client: Any
    ) -> None:
        """The window allow_cross_slot accepts: the team deleted by another writer after
        its check part and before the player's part leaves a dangling foreign key, which
        the audit reports (the parts are run by hand to open the window)."""
        _teams(cengine, 1)
        with Session(cengine, allow_cross_slot=True) as s:
            s.add(XPlayer(name="ann", id=2, team_id=1))
            uow = UOWTransaction(s._context)
            s.bind.run(uow.collect())
            check, child = uow._split_by_registry()
            assert check.targets and not check._states()  # a check-only part, run first
            s.bind.run(check._run())
            with Session(cengine, allow_cross_slot=True) as other:
                team = other.get(XTeam, 1)
                assert team is not None
                other.delete(team)
                other.commit()
            s.bind.run(child._run())
        report = audit(cluster_client, xreg)
        assert [r.problem for r in report.broken_references] == [
            "Player.team_id is 1, but that Team does not exist "
            f"({mapper_of(XTeam).object_key(1)} is missing)"
        ]

    def test_parent_deleted_with_children_in_other_shards(
        self, cengine: Engine, cluster_client: Any
    ) -> None:
        """Deleting a team whose players live in other shards: the checks of their
        per-shard lists run in those shards' parts, and the players lose their team."""
        _teams(cengine, 1)
        with Session(cengine, allow_cross_slot=True) as s:
            s.add_all([XPlayer(name="a", id=2, team_id=1), XPlayer(name="b", id=7, team_id=1)])
            s.commit()
        with Session(cengine, allow_cross_slot=True) as s:
            team = s.get(XTeam, 1)
            assert team is not None
            s.delete(team)
            s.commit()
        with Session(cengine) as s:
            assert s.get(XTeam, 1) is None
            players = [s.get(XPlayer, 2), s.get(XPlayer, 7)]
            assert [p.team_id for p in players if p is not None] == [None, None]
        report = audit(cluster_client, xreg)
        assert report.ok, report.mismatches + report.unexplained

    def test_without_allow_cross_slot_refusal_advises_it(self, cengine: Engine) -> None:
        """Without allow_cross_slot the flush is refused, nothing written, and the message
        advises the option."""
        _teams(cengine, 1)
        with Session(cengine) as s:
            s.add(XPlayer(name="ann", id=2, team_id=1))
            with pytest.raises(CrossSlotError, match="allow_cross_slot=True") as err:
                s.commit()
            assert "nothing was written" in str(err.value)
        with Session(cengine) as s:
            assert s.get(XPlayer, 2) is None

    def test_foreign_keys_both_ways_refused_without_advising_the_option_set(
        self, cengine: Engine
    ) -> None:
        """Players of two shards each pointing at the other shard's team cannot be
        ordered: CrossSlotError before any write, not advising allow_cross_slot (set)."""
        _teams(cengine, 1, 2)
        with Session(cengine, allow_cross_slot=True) as s:
            s.add_all([XPlayer(name="a", id=5, team_id=2), XPlayer(name="b", id=6, team_id=1)])
            with pytest.raises(CrossSlotError) as err:
                s.commit()
            assert "allow_cross_slot" not in str(err.value)
            assert "nothing was written" in str(err.value)
        assert _roster(cengine, 1) == [] and _roster(cengine, 2) == []

    def test_plan_spanning_slots_advises_the_option_only_when_unset(self, cengine: Engine) -> None:
        """The cluster dialect's refusal of a plan spanning slots advises
        allow_cross_slot=True only for a plan of a session without it."""
        one, two = mapper_of(XTeam).object_key(1), mapper_of(XTeam).object_key(2)
        for allowed in (False, True):
            plan = FlushPlan(
                token_key="",
                token_ttl_ms=1,
                watch=[one, two],
                checks=[],
                writes=[],
                states=[],
                cross_slot_allowed=allowed,
            )
            with pytest.raises(CrossSlotError) as err:
                cengine.dialect.check_plan(plan)
            advised = "open the session with allow_cross_slot=True" in str(err.value)
            assert advised is not allowed
