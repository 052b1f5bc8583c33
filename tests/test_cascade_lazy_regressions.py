"""A lazy many-to-one load of a parent deleted in the same session, then a flush.

`s.delete(parent)` hides the parent from the session (`get` and lazy loads give None),
so `child.parent` read afterwards is None while the child's foreign key still holds the
parent's key. The flush took that None for a move away from the parent and left the
child out of the delete: with ``cascade="all, delete-orphan"`` the child survived
pointing at a deleted parent, and without a delete cascade its key was not cleared.
As in SQLAlchemy, where the relationship was only loaded (not changed), the flush goes
by the foreign key: the child is deleted with its parent (delete cascade) or released
(key cleared) without one. Each case runs with int (generated), str and UUID keys, and
ends with `redmap.audit` clean.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

from redmap import ForeignKey, PrimaryKey, Session, registry, relationship, select
from redmap.audit import audit
from redmap.engine import Engine

reg = registry(prefix="cz")


# One family per primary-key kind: a kid belongs to a home (delete cascade and
# delete-orphan) and to a club (no delete cascade: the kid is released).


@reg.mapped
@dataclass
class IHome:
    name: str
    kids: list[IKid] = relationship(back_populates="home", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class IClub:
    name: str
    kids: list[IKid] = relationship(back_populates="club")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class IKid:
    name: str
    home_id: Annotated[int | None, ForeignKey("IHome")] = None
    home: IHome | None = relationship(back_populates="kids")
    club_id: Annotated[int | None, ForeignKey("IClub")] = None
    club: IClub | None = relationship(back_populates="kids")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class SHome:
    code: Annotated[str, PrimaryKey()]
    kids: list[SKid] = relationship(back_populates="home", cascade="all, delete-orphan")


@reg.mapped
@dataclass
class SClub:
    code: Annotated[str, PrimaryKey()]
    kids: list[SKid] = relationship(back_populates="club")


@reg.mapped
@dataclass
class SKid:
    name: Annotated[str, PrimaryKey()]
    home_id: Annotated[str | None, ForeignKey("SHome")] = None
    home: SHome | None = relationship(back_populates="kids")
    club_id: Annotated[str | None, ForeignKey("SClub")] = None
    club: SClub | None = relationship(back_populates="kids")


@reg.mapped
@dataclass
class UHome:
    name: str
    kids: list[UKid] = relationship(back_populates="home", cascade="all, delete-orphan")
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class UClub:
    name: str
    kids: list[UKid] = relationship(back_populates="club")
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class UKid:
    name: str
    home_id: Annotated[uuid.UUID | None, ForeignKey("UHome")] = None
    home: UHome | None = relationship(back_populates="kids")
    club_id: Annotated[uuid.UUID | None, ForeignKey("UClub")] = None
    club: UClub | None = relationship(back_populates="kids")
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


FAMILIES: dict[str, tuple[type[Any], type[Any], type[Any]]] = {
    "int": (IHome, IClub, IKid),
    "str": (SHome, SClub, SKid),
    "uuid": (UHome, UClub, UKid),
}


def _pk(obj: Any) -> Any:
    return obj.code if hasattr(obj, "code") else obj.id


def _kid_pk(kid: Any) -> Any:
    return kid.name if isinstance(kid, SKid) else kid.id


def _seed(engine: Engine, kind: str) -> tuple[Any, Any, list[Any]]:
    """One home and one club sharing two kids; their primary keys."""
    home_cls, club_cls, kid_cls = FAMILIES[kind]
    if kind == "str":
        home, club = home_cls(code="h"), club_cls(code="c")
        kids = [kid_cls(name="a"), kid_cls(name="b")]
    else:
        home, club = home_cls(name="h"), club_cls(name="c")
        kids = [kid_cls(name="a"), kid_cls(name="b")]
    with Session(engine) as s:
        for kid in kids:
            kid.home = home
            kid.club = club
        s.add_all([home, club, *kids])
        s.commit()
        return _pk(home), _pk(club), [_kid_pk(k) for k in kids]


def _stored_kids(engine: Engine, kind: str) -> dict[str, tuple[Any, Any]]:
    """Every stored kid by name: (home key, club key), as a fresh session reads them."""
    kid_cls = FAMILIES[kind][2]
    with Session(engine) as s:
        return {k.name: (k.home_id, k.club_id) for k in s.scalars(select(kid_cls)).all()}


def _clean(client: redis.Redis) -> None:
    report = audit(client, reg)
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


KINDS = pytest.mark.parametrize("kind", sorted(FAMILIES))
AUTOFLUSH = pytest.mark.parametrize("autoflush", [True, False], ids=["autoflush", "no-autoflush"])


@KINDS
@AUTOFLUSH
def test_cascade_deletes_kid_whose_parent_was_lazy_loaded_after_delete(
    engine: Engine, redis_client: redis.Redis, kind: str, autoflush: bool
) -> None:
    """Delete cascade: a kid whose `home` was read (None) after `delete(home)` is
    deleted with the home, like its sibling never loaded."""
    home_cls, _, kid_cls = FAMILIES[kind]
    home_pk, club_pk, kid_pks = _seed(engine, kind)
    with Session(engine, autoflush=autoflush) as s:
        kid = s.get_one(kid_cls, kid_pks[0])
        home = s.get_one(home_cls, home_pk)
        s.delete(home)
        assert kid.home is None  # hidden, as s.get(home) is
        assert kid.home_id == home_pk  # the key still names it until the flush
        s.commit()
    assert _stored_kids(engine, kind) == {}
    with Session(engine) as s:
        assert s.get(home_cls, home_pk) is None
    _clean(redis_client)


@KINDS
@AUTOFLUSH
def test_no_cascade_releases_kid_whose_parent_was_lazy_loaded_after_delete(
    engine: Engine, redis_client: redis.Redis, kind: str, autoflush: bool
) -> None:
    """No delete cascade: a kid whose `club` was read (None) after `delete(club)` keeps
    living with its club key cleared, like its sibling never loaded."""
    _, club_cls, kid_cls = FAMILIES[kind]
    home_pk, club_pk, kid_pks = _seed(engine, kind)
    with Session(engine, autoflush=autoflush, expire_on_commit=False) as s:
        kid = s.get_one(kid_cls, kid_pks[0])
        club = s.get_one(club_cls, club_pk)
        s.delete(club)
        assert kid.club is None
        s.commit()
        assert kid.club_id is None and kid.club is None
    assert _stored_kids(engine, kind) == {"a": (home_pk, None), "b": (home_pk, None)}
    _clean(redis_client)


@KINDS
def test_cascade_after_expiring_commit_and_lazy_load(
    engine: Engine, redis_client: redis.Redis, kind: str
) -> None:
    """Delete cascade when home and kid were expired by a commit: `delete(home)`, then
    `kid.home` reloads the kid's key, finds the home deleted (None); the flush still
    deletes the kid."""
    home_cls, _, kid_cls = FAMILIES[kind]
    home_pk, _, kid_pks = _seed(engine, kind)
    with Session(engine, autoflush=False) as s:
        kid = s.get_one(kid_cls, kid_pks[0])
        home = s.get_one(home_cls, home_pk)
        s.commit()  # expires both
        s.delete(home)
        assert kid.home is None
        s.commit()
    assert _stored_kids(engine, kind) == {}
    _clean(redis_client)


@KINDS
def test_no_cascade_after_expiring_commit_and_lazy_load(
    engine: Engine, redis_client: redis.Redis, kind: str
) -> None:
    """No delete cascade when club and kid were expired by a commit: the kid read
    through `kid.club` (None) after `delete(club)` has its club key cleared."""
    _, club_cls, kid_cls = FAMILIES[kind]
    home_pk, club_pk, kid_pks = _seed(engine, kind)
    with Session(engine, autoflush=False) as s:
        kid = s.get_one(kid_cls, kid_pks[0])
        club = s.get_one(club_cls, club_pk)
        s.commit()
        s.delete(club)
        assert kid.club is None
        s.commit()
    assert _stored_kids(engine, kind) == {"a": (home_pk, None), "b": (home_pk, None)}
    _clean(redis_client)


@KINDS
def test_parent_list_loaded_before_delete(
    engine: Engine, redis_client: redis.Redis, kind: str
) -> None:
    """Both sides loaded before the delete (home.kids and club.kids), each kid's many-to-one
    read afterwards: the home's kids are deleted and the club's dropped club's key cleared."""
    home_cls, club_cls, kid_cls = FAMILIES[kind]
    home_pk, club_pk, kid_pks = _seed(engine, kind)
    with Session(engine, autoflush=False) as s:
        home = s.get_one(home_cls, home_pk)
        club = s.get_one(club_cls, club_pk)
        assert len(home.kids) == 2 and len(club.kids) == 2
        s.delete(club)
        assert [k.club for k in club.kids] == [None, None]
        s.commit()
    assert _stored_kids(engine, kind) == {"a": (home_pk, None), "b": (home_pk, None)}
    with Session(engine, autoflush=False) as s:
        home = s.get_one(home_cls, home_pk)
        kids = list(home.kids)
        s.delete(home)
        assert [k.home for k in kids] == [None, None]
        s.commit()
    assert _stored_kids(engine, kind) == {}
    _clean(redis_client)


@KINDS
def test_kid_moved_after_lazy_load_follows_its_new_parent(
    engine: Engine, redis_client: redis.Redis, kind: str
) -> None:
    """Both kids read home-less after `delete(home)`; the one then given a new home is
    really moved and survives under it, the other is deleted with the old home."""
    home_cls, _, kid_cls = FAMILIES[kind]
    home_pk, _, kid_pks = _seed(engine, kind)
    with Session(engine, autoflush=False) as s:
        moved, stays = s.get_one(kid_cls, kid_pks[0]), s.get_one(kid_cls, kid_pks[1])
        home = s.get_one(home_cls, home_pk)
        s.delete(home)
        assert moved.home is None and stays.home is None
        new_home = home_cls(code="h2") if kind == "str" else home_cls(name="h2")
        moved.home = new_home
        s.commit()
        new_pk = _pk(new_home)
    stored = _stored_kids(engine, kind)
    assert set(stored) == {"a"} and stored["a"][0] == new_pk
    _clean(redis_client)
