"""Issue 15: soft delete (`__soft_delete__`), `get(..., include_deleted=True)`, `restore`.

Real server; sync, asyncio and scripted flush drivers; a clock the tests move.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

import pytest
import redis

from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    registry,
    relationship,
    select,
)
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import (
    IntegrityError,
    InvalidRequestError,
    MappingError,
    NoResultFound,
    StaleDataError,
)
from redmap.testing.assertions import dump_keys
from tests._clock import T0, Clock

reg = registry(prefix="sd")


@reg.mapped
@dataclass
class Folder:
    __soft_delete__ = timedelta(seconds=60)
    name: Annotated[str, Unique()]
    docs: list[Doc] = relationship(back_populates="folder", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Doc:
    __soft_delete__ = timedelta(seconds=30)
    title: Annotated[str, Indexed()]
    slug: Annotated[str, Unique()]
    rank: Annotated[int, Sorted()] = 0
    folder_id: Annotated[int | None, ForeignKey("Folder")] = None
    folder: Folder | None = relationship(back_populates="docs")
    tags: list[Tag] = relationship(secondary="doc_tags", back_populates="docs")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    label: str
    docs: list[Doc] = relationship(secondary="doc_tags", back_populates="tags")
    id: Annotated[int | None, PrimaryKey()] = None


def raw(engine: Engine) -> redis.Redis:
    client: redis.Redis = engine.dialect.client
    return client


def _setup(engine: Engine) -> None:
    with Session(engine) as s:
        tag = Tag(label="t")
        f = Folder(name="f")
        f.docs = [Doc(title="a", slug="a", rank=1), Doc(title="b", slug="b", rank=2)]
        f.docs[0].tags.append(tag)
        s.add_all([f, Doc(title="c", slug="c", rank=3)])
        s.commit()


def _ok(engine: Engine) -> None:
    report = audit(raw(engine), reg)
    assert report.ok, report.mismatches + report.unexplained


@pytest.mark.usefixtures("driver")
class TestSoftDelete:
    def test_hidden_everywhere_then_restored(self, engine: Engine, clock: Clock) -> None:
        _setup(engine)
        with Session(engine) as s:
            d = s.get(Doc, 1)
            assert d is not None
            s.delete(d)
            s.commit()
        _ok(engine)
        with Session(engine) as s:
            assert s.get(Doc, 1) is None
            assert s.get_many(Doc, [1, 2]) == [None, s.get(Doc, 2)]
            assert s.count(select(Doc)) == 2
            assert s.scalars(select(Doc).where(Doc.title == "a")).all() == []
            assert [x.rank for x in s.scalars(select(Doc).order_by(Doc.rank))] == [2, 3]
            f = s.get(Folder, 1)
            assert f is not None and [x.title for x in f.docs] == ["b"]
            tag = s.get(Tag, 1)
            assert tag is not None and tag.docs == []
            gone = s.get(Doc, 1, include_deleted=True)
            assert gone is not None and gone.title == "a"
        with Session(engine) as s:
            s.add(Doc(title="x", slug="a"))  # the unique value is still held
            with pytest.raises(IntegrityError, match="already taken"):
                s.commit()
        clock.now = T0 + 20
        with Session(engine) as s:
            back = s.restore(Doc, 1)
            assert back.title == "a"
        _ok(engine)
        with Session(engine) as s:
            assert s.count(select(Doc).where(Doc.title == "a")) == 1
            assert [x.rank for x in s.scalars(select(Doc).order_by(Doc.rank))] == [1, 2, 3]
            tag = s.get(Tag, 1)
            assert tag is not None and [x.slug for x in tag.docs] == ["a"]
            with pytest.raises(NoResultFound, match="not deleted"):
                s.restore(Doc, 1)
        r = raw(engine)
        assert r.zscore("{sd}:doc:#dl", "1") is None
        assert r.ttl("{sd}:doc:1") == -1

    def test_a_soft_deleted_object_read_is_refused_writes(
        self, engine: Engine, clock: Clock
    ) -> None:
        """Read with include_deleted=True, a soft-deleted object is there to be read or
        restored. A change to it was written with its index entries: a range count saw it
        while `get` did not, and the audit found the entries (an outside-in probe, stop
        17). A second delete restarted its grace period under a new `#d`, and its restore
        no longer brought back the children its cascade had taken."""
        _setup(engine)
        with Session(engine) as s:
            f = s.get(Folder, 1)
            assert f is not None
            s.delete(f)  # soft-deletes docs 1 and 2 with it
            s.commit()
        r = raw(engine)
        before = dump_keys(r)
        clock.now = T0 + 5
        with Session(engine) as s:
            d = s.get(Doc, 1, include_deleted=True)
            assert d is not None
            d.rank = 9
            d.title = "z"
            with pytest.raises(InvalidRequestError, match=r"cannot change Doc\(1\): it is "
                               r"soft-deleted .* session.restore\(Doc, 1\)"):
                s.commit()
            # The autoflush of a restore refuses it too: the change goes first.
            with pytest.raises(InvalidRequestError, match="cannot change Doc"):
                s.restore(Folder, 1)
            assert (d.rank, d.title) == (9, "z")  # the session as it was
            # Once read, it stays hidden in this session as it does in Redis.
            assert s.get(Doc, 1) is None
            s.expire(d)
            assert s.get_many(Doc, [1, 3])[0] is None
            assert s.count(select(Doc).where(Doc.rank >= 5)) == 0
            f = s.get(Folder, 1, include_deleted=True)
            assert f is not None
            with pytest.raises(InvalidRequestError, match=r"cannot delete Folder\(1\): "
                               r"it is already soft-deleted"):
                s.delete(f)
            assert f not in s.deleted
            s.commit()  # nothing left to write
        assert dump_keys(r) == before
        _ok(engine)
        with Session(engine) as s:
            with pytest.raises(InvalidRequestError, match="already soft-deleted"):
                s.delete(f)  # detached: refused before it joins the session
            assert f not in s
            with pytest.raises(StaleDataError, match=r"was soft-deleted then .* restore it "
                               r"first \(session.restore\(Folder, 1\)\); nothing was merged"):
                s.merge(f)
        with Session(engine) as s:
            d = s.get(Doc, 1, include_deleted=True)
            assert d is not None and s.get(Doc, 1) is None
            s.restore(Folder, 1)  # both docs back: the cascade's `#d` was kept
            assert s.get(Doc, 1) is d and d.rank == 1
            d.rank = 9  # restored: an ordinary object again
            s.commit()
        _ok(engine)
        with Session(engine) as s:
            assert sorted(x.id for x in s.scalars(select(Doc).where(Doc.rank >= 2))) == [1, 2, 3]
            f = s.get(Folder, 1)
            assert f is not None and sorted(x.id for x in f.docs) == [1, 2]

    def test_grace_period_ends_then_purged(self, engine: Engine, clock: Clock) -> None:
        _setup(engine)
        with Session(engine) as s:
            d = s.get(Doc, 3)
            assert d is not None
            s.delete(d)
            s.commit()
        clock.now = T0 + 31
        with Session(engine) as s:
            assert s.get(Doc, 3, include_deleted=True) is None
            with pytest.raises(NoResultFound, match="grace period"):
                s.restore(Doc, 3)
            s.add(Doc(title="c2", slug="c"))  # the value is free again
            s.commit()
        # That flush swept it already (a bounded sweep rides along with every flush of
        # the model); a sweep finds nothing left.
        assert engine.sweep(reg) == 0
        _ok(engine)
        assert not raw(engine).exists("{sd}:doc:3")
        assert not raw(engine).exists("{sd}:doc:#dl")

    def test_cascade_soft_deletes_children_and_restore_brings_them_back(
        self, engine: Engine, clock: Clock
    ) -> None:
        _setup(engine)
        with Session(engine) as s:
            d2 = s.get(Doc, 2)
            assert d2 is not None
            s.delete(d2)  # deleted on its own, before the folder
            s.commit()
        clock.now = T0 + 1
        with Session(engine) as s:
            f = s.get(Folder, 1)
            assert f is not None
            s.delete(f)
            s.commit()
        _ok(engine)
        with Session(engine) as s:
            assert s.count(select(Doc)) == 1  # only "c"
            assert s.count(select(Folder)) == 0
        clock.now = T0 + 5
        with Session(engine) as s:
            f2 = s.restore(Folder, 1)
            assert [d.slug for d in f2.docs] == ["a"]  # "b" was deleted apart
            assert s.get(Doc, 2) is None
        _ok(engine)
        clock.now = T0 + 100
        assert engine.sweep(reg) == 1  # "b"
        _ok(engine)

    def test_restore_refusals(self, engine: Engine, clock: Clock) -> None:
        _setup(engine)
        with Session(engine) as s:
            with pytest.raises(InvalidRequestError, match="no __soft_delete__"):
                s.restore(Tag, 1)
            with pytest.raises(NoResultFound, match="there is none"):
                s.restore(Doc, 99)


def test_cascade_to_a_model_without_soft_delete_is_refused() -> None:
    bad = registry(prefix="sdbad")

    @bad.mapped
    @dataclass
    class Parent:
        __soft_delete__ = timedelta(seconds=5)
        kids: list[Kid] = relationship(back_populates="parent", cascade="all, delete")
        id: Annotated[int | None, PrimaryKey()] = None

    @bad.mapped
    @dataclass
    class Kid:
        parent_id: Annotated[int | None, ForeignKey("Parent")] = None
        parent: Parent | None = relationship(back_populates="kids")
        id: Annotated[int | None, PrimaryKey()] = None

    with pytest.raises(MappingError, match="give Kid a __soft_delete__"):
        bad.configure()


@pytest.mark.usefixtures("clean_redis")
def test_asyncio_restore(redis_url: str, clock: Clock) -> None:
    """`AsyncSession.get(..., include_deleted=True)` and `AsyncSession.restore`."""
    import asyncio

    from redmap.asyncio import AsyncSession, create_async_engine

    async def main() -> None:
        engine = create_async_engine(redis_url)
        try:
            async with AsyncSession(engine) as s:
                d = Doc(title="t", slug="s")
                s.add(d)
                await s.commit()
                await s.delete(d)
                await s.commit()
            async with AsyncSession(engine) as s:
                assert await s.get(Doc, 1) is None
                assert await s.get(Doc, 1, include_deleted=True) is not None
            async with AsyncSession(engine) as s:
                back = await s.restore(Doc, 1)
                assert back.slug == "s"
                assert await s.count(select(Doc)) == 1
        finally:
            await engine.dispose()

    asyncio.run(main())
    client = redis.Redis.from_url(redis_url)
    try:
        assert audit(client, reg).ok
    finally:
        client.close()
