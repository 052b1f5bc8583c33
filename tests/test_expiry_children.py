"""The children of objects that expire: the sweep detaches or deletes them first.

When a parent's deadline passes, its children must not keep a foreign key to an object
the sweep purges: as a flush does for a deleted parent, the sweep sets their foreign key
to None, or deletes them when the relationship cascades delete (with their own indexes,
unique values and cascades), through the unit of work; then it purges the parent, and
`redmap audit` is clean. Sync, asyncio and scripted flushes (`driver` fixture).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

import pytest
import redis

import redmap
from redmap import (
    ExpiresAt,
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Unique,
    registry,
    relationship,
    select,
)
from redmap.asyncio import create_async_engine
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import InvalidRequestError, NoResultFound, RedmapError
from tests._clock import T0, Clock

reg = registry(prefix="exc")


@reg.mapped
@dataclass
class Cart:
    owner: str
    items: list[Item] = relationship(back_populates="cart")
    lines: list[Line] = relationship(back_populates="cart", cascade="all, delete")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Item:
    name: Annotated[str, Indexed()]
    cart_id: Annotated[int | None, ForeignKey("Cart")] = None
    cart: Cart | None = relationship(back_populates="items")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Line:
    code: Annotated[str, Unique()]
    cart_id: Annotated[int | None, ForeignKey("Cart")] = None
    cart: Cart | None = relationship(back_populates="lines")
    id: Annotated[int | None, PrimaryKey()] = None


def raw(engine: Engine) -> redis.Redis:
    client: redis.Redis = engine.dialect.client
    return client


def _fill(engine: Engine, clock: Clock) -> None:
    with Session(engine) as s:
        for n in range(3):
            # Cart 3 never expires; carts 1 and 2 do at T0 + 10.
            cart = Cart(owner=f"o{n}", expires=clock.at(10) if n < 2 else None)
            cart.items = [Item(name=f"i{n}{k}") for k in range(2)]
            cart.lines = [Line(code=f"c{n}{k}") for k in range(2)]
            s.add(cart)
        s.commit()


@pytest.mark.usefixtures("driver")
def test_sweep_detaches_or_deletes_the_children_of_expired_parents(
    engine: Engine, clock: Clock
) -> None:
    _fill(engine, clock)
    clock.now = T0 + 11
    with Session(engine) as s:
        item = s.get(Item, 1)
        assert item is not None and item.cart_id == 1 and item.cart is None  # not swept yet
    assert engine.sweep(reg) == 2
    r = raw(engine)
    with Session(engine) as s:
        items = s.scalars(select(Item)).all()
        assert sorted((i.name, i.cart_id) for i in items) == [
            ("i00", None), ("i01", None), ("i10", None), ("i11", None), ("i20", 3), ("i21", 3),
        ]  # fmt: skip
        # The delete cascade took the lines of carts 1 and 2, unique values included.
        assert sorted(li.code for li in s.scalars(select(Line))) == ["c20", "c21"]
        assert s.count(select(Item).where(Item.cart_id == 3)) == 2
        s.add(Line(code="c00"))  # its value is free again
        s.commit()
        cart = s.get(Cart, 3)
        assert cart is not None and len(cart.items) == 2 and len(cart.lines) == 2
    assert not r.exists("{exc}:cart:1") and not r.exists("{exc}:cart:2")
    report = audit(r, reg)
    assert report.ok, report.mismatches + report.unexplained
    assert engine.sweep(reg) == 0  # nothing left


def test_a_flush_does_not_purge_a_parent_with_children(
    engine: Engine, clock: Clock
) -> None:
    """The sweep a flush carries skips models with children (the sweep proper detaches
    them first), so no child is left pointing at a purged parent."""
    _fill(engine, clock)
    clock.now = T0 + 11
    with Session(engine) as s:
        s.add(Cart(owner="new"))  # a flush of Cart: nothing of carts 1 and 2 is purged
        s.commit()
    r = raw(engine)
    assert r.zcard("{exc}:cart:#dl") == 2
    assert r.zcard("{exc}:line:#fk:cart_id:1") == 2
    assert engine.sweep(reg) == 2
    assert audit(r, reg).ok


def test_required_foreign_key_without_cascade_is_a_clear_error(
    redis_url: str, clean_redis: None, clock: Clock
) -> None:
    bad = registry(prefix="exc2")

    @bad.mapped
    @dataclass
    class Team:
        name: str
        members: list[Member] = relationship(back_populates="team")
        expires: Annotated[datetime | None, ExpiresAt()] = None
        id: Annotated[int | None, PrimaryKey()] = None

    @bad.mapped
    @dataclass
    class Member:
        team_id: Annotated[int, ForeignKey("Team")]
        team: Team | None = relationship(back_populates="members")
        id: Annotated[int | None, PrimaryKey()] = None

    engine = redmap.create_engine(redis_url)
    try:
        with Session(engine) as s:
            team = Team(name="t", expires=clock.at(1))
            team.members = [Member(team_id=0)]
            s.add(team)
            s.commit()
        clock.now = T0 + 2
        with pytest.raises(RedmapError, match="Member.team_id Optional"):
            engine.sweep(bad)
        assert raw(engine).exists("{exc2}:team:1")  # nothing purged
    finally:
        engine.dispose()


def test_async_sweep_detaches_children(redis_url: str, clean_redis: None, clock: Clock) -> None:
    sync = redmap.create_engine(redis_url)
    try:
        _fill(sync, clock)
        clock.now = T0 + 11

        async def main() -> int:
            engine = create_async_engine(redis_url)
            try:
                return await engine.sweep(reg)
            finally:
                await engine.dispose()

        assert asyncio.run(main()) == 2
        with Session(sync) as s:
            items = s.scalars(select(Item)).all()
            assert sorted(i.cart_id or 0 for i in items) == [0, 0, 0, 0, 3, 3]
            assert s.count(select(Line)) == 2
        assert audit(raw(sync), reg).ok
    finally:
        sync.dispose()


# -- soft-deleted children of parents gone for good (issue 15) -----------------------------

soft = registry(prefix="exc3")


@soft.mapped
@dataclass
class Folder:
    __soft_delete__ = timedelta(seconds=20)
    name: str
    # A soft-delete model's delete cascade must reach a soft-delete model (configure).
    memos: list[Memo] = relationship(back_populates="folder", cascade="all, delete")
    drafts: list[Draft] = relationship(back_populates="folder")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Memo:
    __soft_delete__ = timedelta(seconds=20)
    text: str
    folder_id: Annotated[int | None, ForeignKey("Folder")] = None
    folder: Folder | None = relationship(back_populates="memos")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Draft:
    __soft_delete__ = timedelta(seconds=20)
    text: str
    folder_id: Annotated[int | None, ForeignKey("Folder")] = None
    folder: Folder | None = relationship(back_populates="drafts")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Box:
    """Deleted for good (no __soft_delete__); its cards are restorable."""

    name: str
    cards: list[Card] = relationship(back_populates="box")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Crate:
    """Deleted for good, with a delete cascade to a soft-delete model."""

    name: str
    labels: list[Label] = relationship(back_populates="crate", cascade="all, delete")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Label:
    __soft_delete__ = timedelta(seconds=20)
    text: Annotated[str, Unique()]
    crate_id: Annotated[int | None, ForeignKey("Crate")] = None
    crate: Crate | None = relationship(back_populates="labels")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Desk:
    name: str
    lamps: list[Lamp] = relationship(back_populates="desk")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Lamp:
    """At most one lamp per desk: a `Unique` foreign key."""

    __soft_delete__ = timedelta(seconds=20)
    text: str
    desk_id: Annotated[int | None, ForeignKey("Desk"), Unique()] = None
    desk: Desk | None = relationship(back_populates="lamps")
    id: Annotated[int | None, PrimaryKey()] = None


@soft.mapped
@dataclass
class Card:
    __soft_delete__ = timedelta(seconds=20)
    text: str
    box_id: Annotated[int | None, ForeignKey("Box")] = None
    box: Box | None = relationship(back_populates="cards")
    id: Annotated[int | None, PrimaryKey()] = None


def _folder(engine: Engine, clock: Clock, *, memos: bool) -> None:
    with Session(engine) as s:
        folder = Folder(name="f", expires=clock.at(10))
        folder.memos = [Memo(text="m")] if memos else []
        folder.drafts = [] if memos else [Draft(text="d")]
        s.add(folder)
        s.commit()


@pytest.mark.usefixtures("driver")
def test_sweep_cascade_purges_soft_delete_children(engine: Engine, clock: Clock) -> None:
    """The parent is purged for good, so the children its delete cascade reaches must go
    for good too (not be soft-deleted, restorable with a foreign key to nothing)."""
    _folder(engine, clock, memos=True)
    clock.now = T0 + 11
    # The folder and its memo: the cascade ends the memo's grace period at the sweep's
    # moment, so the purge that follows removes it too (and counts it).
    assert engine.sweep(soft) == 2
    with Session(engine) as s:
        assert s.get(Memo, 1, include_deleted=True) is None
    report = audit(raw(engine), soft)
    assert report.ok, report.mismatches + report.unexplained


@pytest.mark.usefixtures("driver")
def test_sweep_detaches_soft_deleted_children(engine: Engine, clock: Clock) -> None:
    """A child soft-deleted on its own before its parent expired is detached by the sweep
    too: restored later, it has no parent, not the id of a purged one."""
    _folder(engine, clock, memos=False)
    with Session(engine) as s:
        draft = s.get(Draft, 1)
        assert draft is not None
        s.delete(draft)
        s.commit()
    clock.now = T0 + 11
    assert engine.sweep(soft) == 1
    report = audit(raw(engine), soft)
    assert report.ok, report.mismatches + report.unexplained
    with Session(engine) as s:
        back = s.restore(Draft, 1)
        assert back.folder_id is None


@pytest.mark.usefixtures("driver")
def test_final_delete_detaches_soft_deleted_children(engine: Engine, clock: Clock) -> None:
    with Session(engine) as s:
        box = Box(name="b", cards=[Card(text="c")])
        s.add(box)
        s.commit()
        card = s.get(Card, 1)
        assert card is not None
        s.delete(card)
        s.commit()
        s.delete(box)
        s.commit()
    report = audit(raw(engine), soft)
    assert report.ok, report.mismatches + report.unexplained
    with Session(engine) as s:
        assert s.restore(Card, 1).box_id is None


@pytest.mark.usefixtures("driver")
def test_sweep_cascade_ends_soft_deleted_children_too(engine: Engine, clock: Clock) -> None:
    """A memo soft-deleted on its own before its folder expired goes for good with the
    folder (delete cascade), in the same sweep run, as the live memo does; the drafts
    (no cascade), live or soft-deleted, are detached and the soft-deleted one restorable
    with no parent."""
    with Session(engine) as s:
        folder = Folder(name="f", expires=clock.at(10))
        folder.memos = [Memo(text="m1"), Memo(text="m2")]
        folder.drafts = [Draft(text="d1"), Draft(text="d2")]
        s.add(folder)
        s.commit()
        for obj in (s.get(Memo, 1), s.get(Draft, 1)):
            assert obj is not None
            s.delete(obj)
        s.commit()
    r = raw(engine)
    assert r.zcard("{exc3}:memo:#fk:folder_id:1") == 2
    clock.now = T0 + 11
    assert engine.sweep(soft) == 3  # the folder and both memos
    report = audit(r, soft)
    assert report.ok, report.mismatches + report.unexplained
    assert not r.exists("{exc3}:memo:1") and not r.exists("{exc3}:memo:2")
    assert not r.exists("{exc3}:memo:#fk:folder_id:1")
    assert not r.exists("{exc3}:draft:#fk:folder_id:1")
    with Session(engine) as s:
        for pk in (1, 2):
            assert s.get(Memo, pk, include_deleted=True) is None
            with pytest.raises(NoResultFound):
                s.restore(Memo, pk)
        live = s.get(Draft, 2)
        assert live is not None and live.folder_id is None
        back = s.restore(Draft, 1)
        assert back.folder_id is None
    assert audit(r, soft).ok
    assert engine.sweep(soft) == 0


def test_async_engine_sweep_releases_soft_deleted_children(
    redis_url: str, clean_redis: None, clock: Clock
) -> None:
    """`AsyncEngine.sweep` (not the LoopEngine of the `driver` fixture) runs the same
    steps: the soft-deleted draft is detached, the memo of the cascade purged."""
    sync = redmap.create_engine(redis_url)
    try:
        with Session(sync) as s:
            folder = Folder(name="f", expires=clock.at(10))
            folder.memos = [Memo(text="m")]
            folder.drafts = [Draft(text="d")]
            s.add(folder)
            s.commit()
            draft = s.get(Draft, 1)
            assert draft is not None
            s.delete(draft)
            s.commit()
        clock.now = T0 + 11

        async def main() -> int:
            engine = create_async_engine(redis_url)
            try:
                return await engine.sweep(soft)
            finally:
                await engine.dispose()

        assert asyncio.run(main()) == 2
        report = audit(raw(sync), soft)
        assert report.ok, report.mismatches + report.unexplained
        with Session(sync) as s:
            assert s.get(Memo, 1, include_deleted=True) is None
            assert s.restore(Draft, 1).folder_id is None
    finally:
        sync.dispose()


def test_required_foreign_key_of_a_soft_deleted_child_is_a_clear_error(
    redis_url: str, clean_redis: None, clock: Clock
) -> None:
    """The sweep refuses, before purging anything, to detach a soft-deleted child whose
    foreign key is required; so does a flush deleting the parent for good."""
    bad = registry(prefix="exc4")

    @bad.mapped
    @dataclass
    class Team:
        name: str
        members: list[Member] = relationship(back_populates="team")
        expires: Annotated[datetime | None, ExpiresAt()] = None
        id: Annotated[int | None, PrimaryKey()] = None

    @bad.mapped
    @dataclass
    class Member:
        __soft_delete__ = timedelta(seconds=20)
        team_id: Annotated[int, ForeignKey("Team")]
        team: Team | None = relationship(back_populates="members")
        id: Annotated[int | None, PrimaryKey()] = None

    engine = redmap.create_engine(redis_url)
    try:
        with Session(engine) as s:
            for pk in (1, 2):
                team = Team(name="t", expires=clock.at(1), id=pk)
                team.members = [Member(team_id=pk, id=pk)]
                s.add(team)
            s.commit()
            for pk in (1, 2):
                member = s.get(Member, pk)
                assert member is not None
                s.delete(member)
            s.commit()
            team2 = s.get(Team, 2)
            assert team2 is not None
            s.delete(team2)
            with pytest.raises(InvalidRequestError, match="team_id is required"):
                s.commit()
        assert raw(engine).exists("{exc4}:team:2")
        clock.now = T0 + 2
        with pytest.raises(RedmapError, match="Member.team_id Optional"):
            engine.sweep(bad)
        assert raw(engine).exists("{exc4}:team:1")  # nothing purged
    finally:
        engine.dispose()


@pytest.mark.usefixtures("driver")
def test_final_delete_purges_the_children_of_a_delete_cascade(
    engine: Engine, clock: Clock
) -> None:
    """A crate deleted for good takes its labels along (delete cascade), although Label
    has `__soft_delete__`: the live one is deleted for good (not soft-deleted), the one
    soft-deleted before has its grace period ended at the flush's moment, so the bounded
    sweep the flush carries purges it at once; neither is restorable, and their unique
    values are free."""
    with Session(engine) as s:
        crate = Crate(name="c", labels=[Label(text="a"), Label(text="b")])
        s.add(crate)
        s.commit()
        label = s.get(Label, 1)
        assert label is not None
        s.delete(label)
        s.commit()
        crate = s.get(Crate, 1)
        assert crate is not None
        s.delete(crate)
        s.commit()
    r = raw(engine)
    assert not r.exists("{exc3}:label:#fk:crate_id:1")
    assert not r.exists("{exc3}:label:1") and not r.exists("{exc3}:label:2")
    report = audit(r, soft)
    assert report.ok, report.mismatches + report.unexplained
    with Session(engine) as s:
        for pk in (1, 2):
            assert s.get(Label, pk, include_deleted=True) is None
            with pytest.raises(NoResultFound):
                s.restore(Label, pk)
    assert engine.sweep(soft) == 0
    with Session(engine) as s:
        s.add_all([Label(text="a"), Label(text="b")])
        s.commit()
    assert audit(r, soft).ok


@pytest.mark.usefixtures("driver")
def test_sweep_release_raced_by_a_restore(
    engine: Engine, clock: Clock, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A soft-deleted draft restored by another client between the sweep's read of it
    and its release: the release fails its version check (nothing written), and the
    sweep's next pass finds the draft live and detaches it through the unit of work."""
    from redmap.orm import session as session_module

    _folder(engine, clock, memos=False)
    with Session(engine) as s:
        draft = s.get(Draft, 1)
        assert draft is not None
        s.delete(draft)
        s.commit()
    other = redmap.create_engine(redis_url)
    real = session_module.soft_release_plan
    raced: list[int] = []

    def racing(*args: object, **kw: object) -> object:
        if not raced:
            with Session(other) as s2:
                raced.append(s2.restore(Draft, 1).id or 0)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module, "soft_release_plan", racing)
    try:
        clock.now = T0 + 11
        assert engine.sweep(soft) == 1
    finally:
        other.dispose()
    assert raced == [1]
    report = audit(raw(engine), soft)
    assert report.ok, report.mismatches + report.unexplained
    with Session(engine) as s:
        back = s.get(Draft, 1)
        assert back is not None and back.folder_id is None


@pytest.mark.usefixtures("driver")
def test_detached_soft_deleted_child_releases_its_unique_foreign_key(
    engine: Engine, clock: Clock
) -> None:
    """A soft-deleted lamp keeps its claim on its desk's id (`Unique` foreign key) until
    its desk is deleted for good: detached, it releases the claim, so a new desk given
    the same explicit id can take a new lamp, and the old lamp restores with no desk."""
    with Session(engine) as s:
        s.add(Desk(name="d", id=1, lamps=[Lamp(text="l")]))
        s.commit()
        lamp = s.get(Lamp, 1)
        assert lamp is not None
        s.delete(lamp)
        s.commit()
    r = raw(engine)
    assert r.get("{exc3}:lamp:#uq:desk_id:1") == b"1"
    with Session(engine) as s:
        desk = s.get(Desk, 1)
        assert desk is not None
        s.delete(desk)
        s.commit()
    assert not r.exists("{exc3}:lamp:#uq:desk_id:1")
    report = audit(r, soft)
    assert report.ok, report.mismatches + report.unexplained
    with Session(engine) as s:
        s.add(Desk(name="again", id=1, lamps=[Lamp(text="new")]))
        s.commit()
        back = s.restore(Lamp, 1)
        assert back.desk_id is None
    assert audit(r, soft).ok
