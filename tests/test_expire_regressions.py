"""Expiry discards pending relationship changes, as it discards pending attribute values.

The session records relationship changes apart from the attributes (its context's
`orphans`, `links`, `rel_dirty`, consumed by `redmap.orm.dependency.prepare`). A change stays
pending only while a loaded attribute the flush reads it from still holds it:

- a child released from a delete-orphan list is deleted by the flush as long as its own
  many-to-one or foreign key (which the flush decides by) still says "no parent";
  once both are expired (or refreshed, or everything is expired) it reloads on its
  parent and stays there. Expiring the parent does not undo the child's own pending
  release: the child is still deleted (SQLAlchemy 2.1 deletes it too).
- a many-to-many link change is written as long as either side's list is loaded and
  shows it; expiring both (or the only loaded one) forgets it.

Each case checks what Redis holds afterwards (hash, foreign-key zset, link zsets) and
ends with `redmap.audit` clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pytest
import redis

from redmap import ForeignKey, PrimaryKey, Session, registry, relationship
from redmap.audit import audit
from redmap.engine import Engine

reg = registry(prefix="exr")


@reg.mapped
@dataclass
class Team:
    name: str
    players: list[Player] = relationship(back_populates="team", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Player:
    name: str
    score: int = 0
    team_id: Annotated[int | None, ForeignKey("Team")] = None
    team: Team | None = relationship(back_populates="players")
    tags: list[Tag] = relationship(secondary="player_tags", back_populates="players")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    label: str
    players: list[Player] = relationship(secondary="player_tags", back_populates="tags")
    id: Annotated[int | None, PrimaryKey()] = None


reg.configure()

PLAYER = "{exr}:player:1"
TEAM_FK = "{exr}:player:#fk:team_id:1"
PLAYER_TAGS = "{exr}:player:#rel:tags:1"
TAG_PLAYERS = "{exr}:tag:#rel:players:1"


@pytest.fixture
def seeded(engine: Engine, redis_client: redis.Redis) -> Engine:
    """Team 1 with player 1 (on it, score 0), and tag 1 (not linked)."""
    with Session(engine) as s:
        s.add_all([Player(name="ann", team=Team(name="red")), Tag(label="x")])
        s.commit()
    assert redis_client.exists(PLAYER)
    assert redis_client.zrange(TEAM_FK, 0, -1) == [b"1"]
    return engine


def _on_team(r: redis.Redis) -> None:
    """Player 1 exists in Redis, on team 1 both ways, and the keyspace is clean."""
    assert r.hget(PLAYER, "team_id") == b"1", "the player lost its team"
    assert r.zrange(TEAM_FK, 0, -1) == [b"1"]
    assert audit(r, reg).ok


def _deleted(r: redis.Redis) -> None:
    """Player 1 is gone from Redis, its team no longer lists it, the keyspace is clean."""
    assert not r.exists(PLAYER), "the released player should have been deleted"
    assert r.zrange(TEAM_FK, 0, -1) == []
    assert audit(r, reg).ok


def _linked(r: redis.Redis) -> bool:
    """Whether player 1 and tag 1 are linked; both sides must agree."""
    a = r.zrange(PLAYER_TAGS, 0, -1) == [b"1"]
    b = r.zrange(TAG_PLAYERS, 0, -1) == [b"1"]
    assert a == b, "one side of the link only"
    return a


# -- delete-orphan: the child's release --------------------------------------------------


@pytest.mark.parametrize("names", [None, ["team", "team_id"]], ids=["all", "team+team_id"])
def test_expiring_the_childs_many_to_one_and_key_discards_its_release(
    seeded: Engine, redis_client: redis.Redis, names: list[str] | None
) -> None:
    """A child released (`p.team = None`, team list loaded) whose many-to-one and key are
    expired reloads on its team and is not deleted as an orphan."""
    s = Session(seeded)
    p = s.get(Player, 1)
    assert p is not None and p.team is not None
    team = p.team
    assert team.players == [p]
    p.team = None
    s.expire(p, names)
    s.commit()  # (reading p.team first would reload it and hide the release)
    s.close()
    _on_team(redis_client)


def test_expiring_only_the_relationship_attribute_keeps_the_release(
    seeded: Engine, redis_client: redis.Redis
) -> None:
    """`expire(p, ["team"])` leaves the cleared foreign key pending: the child is still
    released, so it is deleted (never written back parentless)."""
    s = Session(seeded)
    p = s.get(Player, 1)
    assert p is not None and p.team is not None
    p.team = None
    s.expire(p, ["team"])
    assert p.team_id is None
    s.commit()
    s.close()
    _deleted(redis_client)


def test_expiring_an_unrelated_attribute_keeps_the_release(
    seeded: Engine, redis_client: redis.Redis
) -> None:
    """`expire(p, ["score"])` discards nothing of the release: the orphan is deleted."""
    s = Session(seeded)
    p = s.get(Player, 1)
    assert p is not None and p.team is not None
    p.team = None
    s.expire(p, ["score"])
    s.commit()
    s.close()
    _deleted(redis_client)


@pytest.mark.parametrize("names", [None, ["players"]], ids=["all", "players"])
def test_expiring_the_parent_keeps_the_childs_own_release(
    seeded: Engine, redis_client: redis.Redis, names: list[str] | None
) -> None:
    """After `team.players.remove(p)`, expiring the team does not undo what the removal did
    to the child (its many-to-one and key read None): the child is deleted, and the
    team's list, reloaded, no longer holds it."""
    s = Session(seeded)
    team = s.get(Team, 1)
    assert team is not None
    (p,) = team.players
    team.players.remove(p)
    s.expire(team, names)
    assert p.team is None and p.team_id is None
    assert team.players == []  # the lazy load flushes first (autoflush): p is gone
    s.commit()
    s.close()
    _deleted(redis_client)


def test_expiring_the_parent_and_the_child_discards_the_release(
    seeded: Engine, redis_client: redis.Redis
) -> None:
    """After `team.players.remove(p)`, expiring both the team and the child forgets the
    removal: the child stays on its team."""
    s = Session(seeded)
    team = s.get(Team, 1)
    assert team is not None
    (p,) = team.players
    team.players.remove(p)
    s.expire(team)
    s.expire(p)
    s.commit()
    s.close()
    _on_team(redis_client)


@pytest.mark.parametrize("how", ["list", "many_to_one"])
def test_expire_all_discards_a_release_from_either_side(
    seeded: Engine, redis_client: redis.Redis, how: str
) -> None:
    """`expire_all()` forgets a release made through the list or the many-to-one."""
    s = Session(seeded)
    team = s.get(Team, 1)
    assert team is not None
    (p,) = team.players
    if how == "list":
        team.players.remove(p)
    else:
        p.team = None
    s.expire_all()
    s.commit()
    s.close()
    _on_team(redis_client)


@pytest.mark.parametrize("how", ["list", "many_to_one"])
def test_refresh_of_the_child_discards_its_release(
    seeded: Engine, redis_client: redis.Redis, how: str
) -> None:
    """`refresh(p)` reloads the child as Redis holds it, relationships included: the
    release is forgotten and the child is not deleted."""
    s = Session(seeded)
    team = s.get(Team, 1)
    assert team is not None
    (p,) = team.players
    if how == "list":
        team.players.remove(p)
    else:
        p.team = None
    s.refresh(p)
    assert p.team_id == 1 and p.team is team
    s.commit()
    s.close()
    _on_team(redis_client)


def test_rollback_discards_a_release(seeded: Engine, redis_client: redis.Redis) -> None:
    """`rollback()` forgets a release: the child stays on its team."""
    s = Session(seeded)
    p = s.get(Player, 1)
    assert p is not None and p.team is not None
    p.team = None
    s.rollback()
    s.commit()
    s.close()
    _on_team(redis_client)


def test_released_child_reattached_after_expiring_the_parent_stays(
    seeded: Engine, redis_client: redis.Redis
) -> None:
    """A child whose release outlived the parent's expiry is kept when it gets its
    parent back before the commit."""
    s = Session(seeded)
    team = s.get(Team, 1)
    assert team is not None
    (p,) = team.players
    team.players.remove(p)
    s.expire(team, ["name"])
    p.team = team
    s.commit()
    s.close()
    _on_team(redis_client)


# -- many-to-many link changes ---------------------------------------------------------------


def _player_and_tag(s: Session, load_reverse: bool) -> tuple[Player, Tag]:
    p, g = s.get(Player, 1), s.get(Tag, 1)
    assert p is not None and g is not None
    if load_reverse:
        assert g.players == []
    return p, g


@pytest.mark.parametrize("expire", ["owner", "owner_list", "expire_all", "both"])
def test_expiry_of_every_list_holding_a_new_link_discards_it(
    seeded: Engine, redis_client: redis.Redis, expire: str
) -> None:
    """`p.tags.append(g)` then the expiry of every loaded list showing it: the link is
    not written (p.tags reloads without g)."""
    s = Session(seeded)
    p, g = _player_and_tag(s, load_reverse=expire == "both")
    p.tags.append(g)
    if expire == "owner":
        s.expire(p)
    elif expire == "owner_list":
        s.expire(p, ["tags"])
    elif expire == "expire_all":
        s.expire_all()
    else:
        s.expire(p)
        s.expire(g, ["players"])
    s.commit()
    s.close()
    assert not _linked(redis_client)
    assert audit(redis_client, reg).ok


@pytest.mark.parametrize("expire", ["owner", "item", "unrelated"])
def test_a_new_link_still_held_by_a_loaded_list_is_written(
    seeded: Engine, redis_client: redis.Redis, expire: str
) -> None:
    """`p.tags.append(g)` with `g.players` loaded: expiring one side (or an unrelated
    attribute) leaves the other list showing the link, so it is written on both sides."""
    s = Session(seeded)
    p, g = _player_and_tag(s, load_reverse=True)
    p.tags.append(g)
    assert g.players == [p]
    if expire == "owner":
        s.expire(p)
    elif expire == "item":
        s.expire(g)
    else:
        s.expire(p, ["score"])
    s.commit()
    s.close()
    assert _linked(redis_client)
    assert audit(redis_client, reg).ok


@pytest.mark.parametrize("expire", ["owner", "expire_all"])
def test_expiry_discards_a_link_removal(
    seeded: Engine, redis_client: redis.Redis, expire: str
) -> None:
    """`p.tags.remove(g)` of a stored link, then the expiry of the only list showing it:
    the link stays in Redis."""
    with Session(seeded) as s:
        p, g = _player_and_tag(s, load_reverse=False)
        p.tags.append(g)
        s.commit()
    assert _linked(redis_client)
    s = Session(seeded)
    p, g = _player_and_tag(s, load_reverse=False)
    p.tags.remove(g)
    if expire == "owner":
        s.expire(p)
    else:
        s.expire_all()
    assert p.tags == [g]
    s.commit()
    s.close()
    assert _linked(redis_client)
    assert audit(redis_client, reg).ok
