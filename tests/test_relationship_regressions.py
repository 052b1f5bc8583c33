"""Regressions found by `tests/reliability/test_properties.py`, as small deterministic cases.

The models are those of the state machine: a one-to-many with
``cascade="all, delete-orphan"`` (`Parent.kids`), a plain one-to-many (`Team.members`)
and a many-to-many (`Kid.tags` / `Tag.kids`). Each test replays the shortest history
found for one defect, and checks the outcome with a fresh session and `redmap.audit`.
"""

from __future__ import annotations

import pytest
import redis

from redmap import Session, select
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import StaleDataError
from tests.reliability._family import Kid, Parent, Tag, Team, reg


def _kids(engine: Engine) -> dict[int, tuple[str, int | None, int | None]]:
    """Every stored kid: name, parent id, team id (as a fresh session reads them)."""
    with Session(engine) as s:
        return {k.id: (k.name, k.parent_id, k.team_id) for k in s.scalars(select(Kid)).all()}


def _ids(engine: Engine, model: type[object]) -> list[int]:
    with Session(engine) as s:
        return sorted(o.id for o in s.scalars(select(model)).all())  # type: ignore[attr-defined]


def _clean(client: redis.Redis) -> None:
    report = audit(client, reg)
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


def test_new_orphan_moved_to_new_team_is_dropped(engine: Engine, redis_client: redis.Redis) -> None:
    """A new kid that left its parent (delete-orphan) is expunged at flush, even when it
    also joined a new team: the team's list no longer makes the flush write a foreign
    key for a kid that has no insert (it raised KeyError)."""
    with Session(engine) as s:
        s.add(Parent(name="p"))
        s.commit()
    with Session(engine, autoflush=False) as s:
        p = s.get(Parent, 1)
        assert p is not None
        kid = Kid(name="k")
        p.kids.append(kid)
        team = Team(name="t")
        kid.team = team
        kid.parent = None
        s.commit()
        assert kid.id is None
    assert _kids(engine) == {}
    assert _ids(engine, Team) == [1]
    _clean(redis_client)


def test_new_orphan_tagged_from_the_tag_is_inserted(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """As in SQLAlchemy: a new kid removed from its parent leaves the session, and
    appending it to a tag's list brings it back (save-update cascade): it is inserted,
    with no parent, and linked."""
    with Session(engine) as s:
        s.add(Parent(name="p"))
        s.commit()
    with Session(engine, autoflush=False) as s:
        p = s.get(Parent, 1)
        assert p is not None
        kid = Kid(name="k")
        p.kids.append(kid)
        kid.parent = None
        tag = Tag(name="g")
        s.add(tag)
        tag.kids.append(kid)
        s.commit()
    assert _kids(engine) == {1: ("k", None, None)}
    with Session(engine) as s:
        got = s.get(Tag, 1)
        assert got is not None and [k.id for k in got.kids] == [1]
    _clean(redis_client)


def test_persistent_orphan_tagged_is_still_deleted(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A persistent kid removed from its parent is deleted at flush unless it gets a
    parent again; joining a tag or a team is not getting one (as in SQLAlchemy)."""
    with Session(engine) as s:
        p = Parent(name="p")
        s.add_all([p, Tag(name="g"), Team(name="t")])
        p.kids.extend([Kid(name="a"), Kid(name="b")])
        s.commit()
    with Session(engine, autoflush=False) as s:
        p = s.get(Parent, 1)
        tag, team = s.get(Tag, 1), s.get(Team, 1)
        assert p is not None and tag is not None and team is not None
        a, b = sorted(p.kids, key=lambda k: k.name)
        p.kids.remove(a)
        p.kids.remove(b)
        tag.kids.append(a)
        team.members.append(b)
        s.commit()
    assert _kids(engine) == {}
    with Session(engine) as s:
        got = s.get(Tag, 1)
        assert got is not None and got.kids == []
    _clean(redis_client)


def test_reparent_survives_a_stale_load_of_the_old_list(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A kid moved to another parent, then listed again by loading its old parent's
    list (from Redis, autoflush off): the flush sets the foreign keys of the kids the
    session put in a list, as SQLAlchemy syncs only a collection's added members, so
    the many-to-one assignment is not overwritten by the stale list."""
    with Session(engine) as s:
        p1, p2 = Parent(name="p1"), Parent(name="p2")
        s.add_all([p1, p2])
        p1.kids.append(Kid(name="k"))
        s.commit()
    with Session(engine, autoflush=False) as s:
        kid, p1, p2 = s.get(Kid, 1), s.get(Parent, 1), s.get(Parent, 2)
        assert kid is not None and p1 is not None and p2 is not None
        kid.parent = p2
        assert kid in p1.kids  # loaded now, from Redis: the move is not flushed yet
        s.add(Kid(name="new", parent=p1))
        s.commit()
    assert _kids(engine) == {1: ("k", 2, None), 2: ("new", 1, None)}
    _clean(redis_client)


def test_deleting_a_team_someone_joined_since_is_stale(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """B puts a kid in a team and deletes the team; meanwhile A puts the same kid in the
    team and commits. B's commit must release the kid (Redis lists it under the team),
    but B loaded it without a team, so the release compared equal and wrote nothing,
    leaving the kid pointing at a deleted team. It is a conflict: nothing is written."""
    with Session(engine) as s:
        s.add(Team(name="t"))
        s.commit()
        s.add_all([Kid(name="a", team_id=1), Kid(name="b")])
        s.commit()
    a, b = Session(engine, autoflush=False), Session(engine, autoflush=False)
    with a, b:
        team_b, kid_b = b.get(Team, 1), b.get(Kid, 2)
        assert team_b is not None and kid_b is not None
        team_b.members.append(kid_b)
        b.delete(team_b)
        team_a, kid_a = a.get(Team, 1), a.get(Kid, 2)
        assert team_a is not None and kid_a is not None
        team_a.members.append(kid_a)
        a.commit()
        with pytest.raises(StaleDataError):
            b.commit()
    assert _kids(engine) == {1: ("a", None, 1), 2: ("b", None, 1)}
    assert _ids(engine, Team) == [1]
    _clean(redis_client)


def test_leaving_a_new_team_clears_the_old_key(engine: Engine, redis_client: redis.Redis) -> None:
    """`kid.team = new_team` cannot set the key yet (the team has no id), so it still
    holds the old team; removing the kid from the new team must clear it anyway (the
    many-to-one said new_team), not leave the kid in its old team."""
    with Session(engine) as s:
        s.add(Team(name="old"))
        s.commit()
        s.add(Kid(name="k", team_id=1))
        s.commit()
    with Session(engine, autoflush=False) as s:
        kid = s.get(Kid, 1)
        assert kid is not None
        new = Team(name="new")
        s.add(new)
        kid.team = new
        new.members.remove(kid)
        assert kid.team is None
        s.commit()
    assert _kids(engine) == {1: ("k", None, None)}
    assert _ids(engine, Team) == [1, 2]
    _clean(redis_client)


def test_a_list_loaded_after_someone_moved_a_kid_writes_no_kid(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """B holds a kid under p2; A moves it to p1; B loads p1's list (which now holds it)
    and adds a new kid there. B changed nothing on the old kid, so its commit must not
    write it: syncing the whole list rewrote its key and failed B's commit with
    "Kid(1) changed or was deleted since it was loaded"."""
    with Session(engine) as s:
        p1, p2 = Parent(name="p1"), Parent(name="p2")
        s.add_all([p1, p2])
        p2.kids.append(Kid(name="k"))
        s.commit()
    a, b = Session(engine, autoflush=False), Session(engine, autoflush=False)
    with a, b:
        kid_b = b.get(Kid, 1)
        assert kid_b is not None and kid_b.parent_id == 2
        kid_a, p1_a = a.get(Kid, 1), a.get(Parent, 1)
        assert kid_a is not None and p1_a is not None
        kid_a.parent = p1_a
        a.commit()
        p1_b = b.get(Parent, 1)
        assert p1_b is not None and kid_b in p1_b.kids
        b.add(Kid(name="new", parent=p1_b))
        b.commit()
    assert _kids(engine) == {1: ("k", 1, None), 2: ("new", 1, None)}
    _clean(redis_client)
