"""Tests for `redmap.inspect`: instance lifecycle, identity and history; mapper views."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
import redis

from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    inspect,
    registry,
    relationship,
)
from redmap.asyncio import AsyncSession, create_async_engine
from redmap.engine import Engine
from redmap.event import NO_VALUE
from redmap.exc import InvalidRequestError, NoInspectionAvailable
from redmap.inspection import History, IndexInfo
from redmap.orm.relationships import Direction

reg = registry(prefix="in")


@reg.mapped
@dataclass
class Shelf:
    label: Annotated[str, Unique()]
    books: list[Volume] = relationship(back_populates="shelf", order_by="Volume.pages")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Volume:
    title: Annotated[str, Indexed()]
    pages: Annotated[int, Sorted()] = 0
    notes: list[str] = field(default_factory=list)
    shelf_id: Annotated[int | None, ForeignKey("Shelf")] = None
    shelf: Shelf | None = relationship(back_populates="books")
    tags: list[Label] = relationship(secondary="volume_labels", back_populates="volumes")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Label:
    name: Annotated[str, PrimaryKey()]
    volumes: list[Volume] = relationship(secondary="volume_labels", back_populates="tags")


@reg.mapped
@dataclass
class Reading:
    __shard_key__ = "reader"

    reader: Annotated[int, Indexed()]
    id: Annotated[int | None, PrimaryKey()] = None


def _states(obj: Any) -> dict[str, bool]:
    view = inspect(obj)
    return {
        name: getattr(view, name)
        for name in ("transient", "pending", "persistent", "deleted", "detached")
    }


def _only(name: str) -> dict[str, bool]:
    return {n: n == name for n in ("transient", "pending", "persistent", "deleted", "detached")}


class TestLifecycle:
    @pytest.mark.usefixtures("driver")
    def test_states_through_a_life(self, engine: Engine) -> None:
        """transient, pending, persistent, deleted, detached: exactly one at a time,
        with identity and session following."""
        v = Volume(title="t")
        assert _states(v) == _only("transient")
        assert inspect(v).identity is None and inspect(v).session is None
        with Session(engine) as s:
            s.add(v)
            assert _states(v) == _only("pending")
            assert inspect(v).session is s and inspect(v).key is None
            s.commit()
            assert _states(v) == _only("persistent")
            assert inspect(v).identity == (1,)
            assert inspect(v).identity_key == (Volume, (1,), None)
            assert inspect(v).key == (Volume, (1,), None)
            assert inspect(v).redis_key == "{in}:volume:1"
            assert inspect(v).version == 1
            s.delete(v)
            assert _states(v) == _only("deleted")
            s.commit()
            assert _states(v) == _only("detached")
            assert inspect(v).session is None
        w = Volume(title="w")
        with Session(engine) as s:
            s.add(w)
            s.commit()
        assert _states(w) == _only("detached")
        assert inspect(w).identity == (2,)

    def test_asyncsession_states(self, redis_url: str, clean_redis: None) -> None:
        """Under an AsyncSession the view reports the same states; `session` is the
        wrapped sync_session."""

        async def main() -> None:
            engine = create_async_engine(redis_url)
            try:
                async with AsyncSession(engine) as s:
                    v = Volume(title="t")
                    s.add(v)
                    assert inspect(v).pending and inspect(v).session is s.sync_session
                    await s.commit()
                    assert inspect(v).persistent and inspect(v).identity == (1,)
                    v.pages = 9
                    assert inspect(v).attrs["pages"].history == History([9], (), [0])
                    await s.delete(v)
                    assert inspect(v).deleted
                    await s.commit()
                    assert inspect(v).detached
            finally:
                await engine.dispose()

        asyncio.run(main())


class TestHistory:
    @pytest.mark.usefixtures("driver")
    def test_scalar_history(self, engine: Engine) -> None:
        """Loaded and unchanged: unchanged=[v]; assigned: added=[new], deleted=[old];
        set back to the loaded value: unchanged again; expired: empty."""
        with Session(engine) as s:
            s.add(Volume(title="a", pages=10))
            s.commit()
        with Session(engine) as s:
            v = s.get(Volume, 1)
            assert v is not None
            hist = inspect(v).attrs["pages"].history
            assert hist == History((), [10], ())
            assert not hist.has_changes() and not inspect(v).modified
            v.pages = 11
            hist = inspect(v).attrs["pages"].history
            assert (hist.added, hist.unchanged, hist.deleted) == ([11], (), [10])
            assert hist.has_changes() and hist.sum() == [11, 10]
            assert inspect(v).modified
            v.pages = 10
            assert inspect(v).attrs["pages"].history.unchanged == [10]
            s.expire(v)
            assert inspect(v).attrs["pages"].history.empty()
            assert inspect(v).attrs["pages"].loaded_value is NO_VALUE
            assert "pages" in inspect(v).unloaded
            assert inspect(v).attrs["pages"].value == 10  # loads
            assert "pages" not in inspect(v).unloaded

    def test_new_object_history(self) -> None:
        """A transient or pending object's values are all `added`."""
        v = Volume(title="a")
        assert inspect(v).attrs["title"].history == History(["a"], (), ())
        assert inspect(v).modified

    def test_none_and_in_place_changes(self, engine: Engine) -> None:
        """A None old value is reported (deleted=[None]); a JSON field changed in place
        has history and makes the object modified."""
        with Session(engine) as s:
            v = Volume(title="a")
            s.add(v)
            s.commit()
            assert v.shelf_id is None
            v.shelf_id = 5
            assert inspect(v).attrs["shelf_id"].history == History([5], (), [None])
            v.shelf_id = None
            assert not inspect(v).attrs["shelf_id"].history.has_changes()
            v.notes.append("x")
            assert inspect(v).attrs["notes"].history == History([["x"]], (), [[]])
            assert inspect(v).modified

    def test_relationship_history(self, engine: Engine) -> None:
        """A relationship's loaded members: added on a new object, unchanged on a
        stored one."""
        with Session(engine) as s:
            shelf = Shelf(label="s")
            v = Volume(title="v", shelf=shelf)
            assert inspect(shelf).attrs["books"].history.added == [v]
            s.add(shelf)
            s.commit()
            assert inspect(shelf).attrs["books"].history.empty()  # expired by the commit
            assert inspect(shelf).attrs["books"].value == [v]
            assert inspect(shelf).attrs["books"].history.unchanged == [v]


class TestMapperView:
    def test_fields_indexes_and_keys(self) -> None:
        """Fields with their types and indexes, the primary key, and key patterns."""
        m = inspect(Volume)
        assert m.class_ is Volume
        assert m.keyspace == "volume" and m.prefix == "in"
        assert list(m.columns) == ["title", "pages", "notes", "shelf_id", "id"]
        pk = m.primary_key[0]
        assert pk.key == "id" and pk.primary_key and pk.generated
        assert m.columns["pages"].type == "int"
        assert m.columns["shelf_id"].foreign_key is Shelf
        assert m.indexes == (
            IndexInfo("title", "indexed", ("{in}:volume:#ix:title:<value>",)),
            IndexInfo("pages", "sorted", ("{in}:volume:#zs:pages",)),
            IndexInfo("shelf_id", "foreign_key", ("{in}:volume:#fk:shelf_id:<id>",)),
        )
        assert dict(m.key_layout) == {
            "object": "{in}:volume:<id>",
            "all": "{in}:volume:#all",
            "seq": "{in}:volume:#seq",
        }
        assert inspect(Shelf).columns["label"].indexes == (
            IndexInfo(
                "label", "unique", ("{in}:shelf:#uq:label:<value>", "{in}:shelf:#ix:label:<value>")
            ),
        )
        assert "seq" not in inspect(Label).key_layout

    def test_relationships(self) -> None:
        """Direction, target, foreign key and where the links live."""
        rels = inspect(Volume).relationships
        assert set(rels) == {"shelf", "tags"}
        assert rels["shelf"].direction is Direction.MANYTOONE
        assert rels["shelf"].target is Shelf and rels["shelf"].foreign_key == "shelf_id"
        assert rels["tags"].direction is Direction.MANYTOMANY
        assert rels["tags"].keys == ("{in}:volume:#rel:tags:<id>",)
        books = inspect(Shelf).relationships["books"]
        assert books.direction is Direction.ONETOMANY and books.uselist
        assert books.order_by == "pages"
        assert books.keys == ("{in}:volume:#fk:shelf_id:<id>",)

    def test_sharded_model(self) -> None:
        """A sharded model's patterns show the shard in the hash tag."""
        m = inspect(Reading)
        assert m.shard_key == "reader"
        assert m.key_layout["object"] == "{in|<shard>}:reading:<id>"

    def test_patterns_match_written_keys(self, engine: Engine, redis_client: redis.Redis) -> None:
        """Every key a flush writes matches one of the patterns the view lists."""
        with Session(engine) as s:
            v = Volume(title="v", pages=3, shelf=Shelf(label="s"))
            v.tags.append(Label(name="x"))
            s.add(v)
            s.commit()
        patterns = []
        for model in (Shelf, Volume, Label):
            m = inspect(model)
            patterns += list(m.key_layout.values())
            patterns += [k for ix in m.indexes for k in ix.keys]
            patterns += [k for r in m.relationships.values() for k in r.keys]
        written = sorted(k.decode() for k in redis_client.keys("*") if b"#flush" not in k)
        for key in written:
            assert any(_matches(p, key) for p in patterns), key

    def test_views_are_read_only(self) -> None:
        """The mappings cannot be changed through the view."""
        with pytest.raises(TypeError):
            inspect(Volume).columns["x"] = inspect(Volume).columns["title"]  # type: ignore[index]


def _matches(pattern: str, key: str) -> bool:
    """Whether `key` fits `pattern`, each `<...>` standing for one segment."""
    import re

    regex = re.escape(pattern)
    regex = re.sub(r"<[a-z_]+>", "[^:]+", regex.replace(r"\<", "<").replace(r"\>", ">"))
    return re.fullmatch(regex, key) is not None


class TestErrors:
    def test_not_mapped(self) -> None:
        """Anything but a mapped class or an instance of one: NoInspectionAvailable
        (an InvalidRequestError), or None with raiseerr=False."""

        @dataclass
        class Plain:
            x: int = 0

        for subject in (Plain, Plain(), 3, "x", Session):
            with pytest.raises(NoInspectionAvailable) as info:
                inspect(subject)
            assert isinstance(info.value, InvalidRequestError)
            assert info.value.subject is subject
            assert inspect(subject, raiseerr=False) is None
