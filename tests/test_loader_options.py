"""Tests for `redmap.orm.strategy_options`: loader options per statement.

`select(A).options(selectinload(A.b))`, `lazyload`, `raiseload` and `defaultload`,
chained, override a relationship's mapped `lazy=` for the objects one statement
returns, with SQLAlchemy's semantics: an already loaded relationship is kept, an
unloaded one of an object already in the session is loaded by `selectinload`, and a
later statement without options brings the mapped default back. Round trips are
counted on real servers (standalone and cluster), on the sync and the async API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import pytest
import redis

import redmap
from redmap import (
    ForeignKey,
    PrimaryKey,
    Session,
    Sorted,
    defaultload,
    lazyload,
    raiseload,
    registry,
    relationship,
    select,
    selectinload,
)
from redmap.asyncio import AsyncEngine, AsyncSession, create_async_engine
from redmap.engine import Engine
from redmap.exc import InvalidRequestError
from redmap.testing.assertions import assert_round_trips, count_round_trips
from redmap.testing.servers import ClusterProcesses

reg = registry(prefix="lo")


@reg.mapped
@dataclass
class Author:
    name: str
    books: list[Book] = relationship(back_populates="author")
    fans: list[Fan] = relationship(back_populates="author", lazy="selectin")
    letters: list[Letter] = relationship(back_populates="author", lazy="raise")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Book:
    title: str
    rank: Annotated[int, Sorted()] = 0
    author_id: Annotated[int | None, ForeignKey("Author")] = None
    author: Author | None = relationship(back_populates="books")
    tags: list[Tag] = relationship(secondary="lo_book_tags", back_populates="books")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    label: str
    books: list[Book] = relationship(secondary="lo_book_tags", back_populates="tags")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Fan:
    name: str
    author_id: Annotated[int | None, ForeignKey("Author")] = None
    author: Author | None = relationship(back_populates="fans")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Letter:
    text: str
    author_id: Annotated[int | None, ForeignKey("Author")] = None
    author: Author | None = relationship(back_populates="letters")
    id: Annotated[int | None, PrimaryKey()] = None


def _seed(engine: Engine, authors: int, books: int = 3, tags: int = 2) -> None:
    """`authors` authors with `books` books each, each book with `tags` tags of its own,
    one fan and one letter per author."""
    with Session(engine) as s:
        for i in range(authors):
            a = Author(name=f"a{i}")
            for j in range(books):
                b = Book(title=f"a{i}-b{j}", rank=j)
                b.tags.extend(Tag(label=f"a{i}-b{j}-t{k}") for k in range(tags))
                a.books.append(b)
            a.fans.append(Fan(name=f"f{i}"))
            a.letters.append(Letter(text=f"l{i}"))
            s.add(a)
        s.commit()


@pytest.fixture(params=["standalone", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """An emptied standalone server, then an emptied 3-node cluster."""
    if request.param == "standalone":
        request.getfixturevalue("clean_redis")
        standalone: str = request.getfixturevalue("redis_url")
        return standalone
    request.getfixturevalue("cluster_client")
    cluster: ClusterProcesses = request.getfixturevalue("cluster")
    return cluster.url


@pytest.fixture
def both(url: str) -> Iterator[Engine]:
    """A sync engine on a standalone server, then on a cluster."""
    engine = redmap.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


class TestSelectinload:
    @pytest.mark.parametrize("n", [2, 25])
    def test_children_of_n_parents_cost_constant_round_trips(self, both: Engine, n: int) -> None:
        """selectinload(Author.books) loads every author's books in 2 more round trips,
        for 2 authors as for 25; reading them afterwards sends nothing."""
        _seed(both, n)
        with Session(both) as s, count_round_trips(both) as rt:
            authors = s.scalars(select(Author).options(selectinload(Author.books))).all()
            # ids, objects, books (link zsets, objects), fans (mapped selectin: 2)
            assert rt.round_trips == 6
            assert sum(len(a.books) for a in authors) == 3 * n
            assert rt.round_trips == 6

    def test_without_the_option_each_parent_costs_two_round_trips(self, both: Engine) -> None:
        """The N+1 the option avoids: the mapped lazy="select" loads each list on access."""
        _seed(both, 5)
        with Session(both) as s, count_round_trips(both) as rt:
            authors = s.scalars(select(Author)).all()
            assert rt.round_trips == 4
            assert sum(len(a.books) for a in authors) == 15
            assert rt.round_trips == 4 + 2 * 5

    def test_chained_loads_two_levels_in_constant_round_trips(self, both: Engine) -> None:
        """selectinload(Author.books).selectinload(Book.tags): 2 round trips per level."""
        _seed(both, 6)
        stmt = select(Author).options(selectinload(Author.books).selectinload(Book.tags))
        with Session(both) as s, count_round_trips(both) as rt:
            authors = s.scalars(stmt).all()
            assert rt.round_trips == 8
            labels = sorted(t.label for a in authors for b in a.books for t in b.tags)
            assert rt.round_trips == 8
        assert len(labels) == 6 * 3 * 2 and labels[0] == "a0-b0-t0"

    def test_many_to_one(self, engine: Engine) -> None:
        """selectinload of a many-to-one fetches the targets not in the session at once."""
        _seed(engine, 4)
        with Session(engine) as s, count_round_trips(engine) as rt:
            books = s.scalars(select(Book).options(selectinload(Book.author))).all()
            # ids, books, their 4 authors, and the authors' mapped selectin (fans): 2
            assert rt.round_trips == 5
            assert sorted({b.author.name for b in books if b.author}) == ["a0", "a1", "a2", "a3"]
            assert {f.name for b in books if b.author for f in b.author.fans} == {
                "f0",
                "f1",
                "f2",
                "f3",
            }
            assert rt.round_trips == 5

    def test_only_the_statement_with_the_option_loads(self, engine: Engine) -> None:
        """Objects another statement returns later use the mapped default again."""
        _seed(engine, 4)
        with Session(engine) as s, count_round_trips(engine) as rt:
            first = s.scalars(
                select(Author).where(redmap.col(Author.id) <= 2).options(selectinload(Author.books))
            ).all()
            later = s.scalars(select(Author).where(redmap.col(Author.id) > 2)).all()
            before = rt.round_trips
            assert [len(a.books) for a in first] == [3, 3]
            assert rt.round_trips == before
            assert [len(a.books) for a in later] == [3, 3]
            assert rt.round_trips == before + 4  # 2 lazy loads of 2 round trips

    def test_an_object_already_in_the_session_gets_its_unloaded_relationship(
        self, engine: Engine
    ) -> None:
        """As in SQLAlchemy, selectinload fills the unloaded relationships of objects the
        identity map already held: the objects are not fetched again, their books are."""
        _seed(engine, 3)
        with Session(engine) as s, count_round_trips(engine) as rt:
            authors = s.scalars(select(Author)).all()
            start = rt.round_trips
            again = s.scalars(select(Author).options(selectinload(Author.books))).all()
            assert again == authors and again[0] is authors[0]
            assert rt.round_trips == start + 3  # ids, books link zsets, book objects
            assert [len(a.books) for a in authors] == [3, 3, 3]
            assert rt.round_trips == start + 3

    def test_an_already_loaded_relationship_is_kept(
        self, engine: Engine, redis_client: redis.Redis
    ) -> None:
        """A loaded list is neither reloaded nor replaced: it may hold pending changes."""
        _seed(engine, 1)
        with Session(engine) as s:
            a = s.get_one(Author, 1)
            books = a.books
            with Session(engine) as other:  # another writer adds a book
                other.add(Book(title="new", author_id=1))
                other.commit()
            with count_round_trips(engine) as rt:
                got = s.scalars(select(Author).options(selectinload(Author.books))).one()
            assert got is a and a.books is books and len(a.books) == 3
            assert rt.round_trips == 1  # the ids; the author and his books are loaded
        assert redis_client.zcard("{lo}:book:#fk:author_id:1") == 4


class TestRaiseload:
    def test_access_raises_naming_the_relationship_and_the_way_to_load_it(
        self, engine: Engine
    ) -> None:
        """raiseload(Author.books): access raises InvalidRequestError, and sends nothing."""
        _seed(engine, 2)
        with Session(engine) as s:
            authors = s.scalars(select(Author).options(raiseload(Author.books))).all()
            with assert_round_trips(engine, 0):
                with pytest.raises(InvalidRequestError) as err:
                    _ = authors[0].books
            message = str(err.value)
            assert "Author.books" in message
            assert "raiseload(Author.books)" in message
            assert ".options(selectinload(Author.books))" in message
            assert "refresh(obj, ['books'])" in message
            # Fields still read; refresh is the explicit way to load the relationship.
            assert authors[0].name == "a0"
            s.refresh(authors[0], ["books"])
            assert len(authors[0].books) == 3

    def test_overrides_a_mapped_selectin(self, engine: Engine) -> None:
        """raiseload of a lazy="selectin" relationship skips its load and raises on access."""
        _seed(engine, 3)
        with Session(engine) as s, count_round_trips(engine) as rt:
            authors = s.scalars(select(Author).options(raiseload(Author.fans))).all()
            assert rt.round_trips == 2  # no fans loaded
            with pytest.raises(InvalidRequestError, match="raiseload"):
                _ = authors[0].fans

    def test_a_later_plain_statement_brings_the_default_back(self, engine: Engine) -> None:
        """The same object returned by a statement without options lazy-loads again, as
        SQLAlchemy resets the loaders of the unloaded attributes of the objects it returns."""
        _seed(engine, 1)
        with Session(engine) as s:
            a = s.scalars(select(Author).options(raiseload(Author.books))).one()
            with pytest.raises(InvalidRequestError):
                _ = a.books
            assert s.scalars(select(Author)).one() is a
            assert len(a.books) == 3

    def test_a_loaded_relationship_does_not_raise(self, engine: Engine) -> None:
        """raiseload concerns loading: a relationship loaded before is read as it is."""
        _seed(engine, 1)
        with Session(engine) as s:
            a = s.get_one(Author, 1)
            assert len(a.books) == 3
            s.scalars(select(Author).options(raiseload(Author.books))).all()
            assert len(a.books) == 3

    def test_sql_only_fills_a_many_to_one_from_the_session(self, engine: Engine) -> None:
        """raiseload(..., sql_only=True) raises only where Redis would be needed."""
        _seed(engine, 2)
        with Session(engine) as s:
            s.get_one(Author, 1)  # in the identity map; author 2 is not
            books = s.scalars(select(Book).options(raiseload(Book.author, sql_only=True))).all()
            by_author = {b.author_id: b for b in books}
            with assert_round_trips(engine, 0):
                assert by_author[1].author is not None and by_author[1].author.name == "a0"
                with pytest.raises(InvalidRequestError, match="Book.author"):
                    _ = by_author[2].author
            strict = s.scalars(select(Book).options(raiseload(Book.tags))).all()
            with pytest.raises(InvalidRequestError, match="Book.tags"):
                _ = strict[0].tags

    def test_mapped_lazy_raise_still_raises_without_options(self, engine: Engine) -> None:
        """The mapped lazy="raise" keeps its own message, which now names selectinload."""
        _seed(engine, 1)
        with Session(engine) as s:
            a = s.scalars(select(Author)).one()
            with pytest.raises(InvalidRequestError, match=r"lazy='raise'.*selectinload"):
                _ = a.letters


class TestLazyload:
    def test_overrides_a_mapped_selectin(self, engine: Engine) -> None:
        """lazyload(Author.fans): no load with the statement, one on access."""
        _seed(engine, 3)
        with Session(engine) as s, count_round_trips(engine) as rt:
            authors = s.scalars(select(Author).options(lazyload(Author.fans))).all()
            assert rt.round_trips == 2
            assert [f.name for f in authors[1].fans] == ["f1"]
            assert rt.round_trips == 4

    def test_overrides_a_mapped_raise(self, engine: Engine) -> None:
        """lazyload of a lazy="raise" relationship loads it on access instead of raising."""
        _seed(engine, 2)
        with Session(engine) as s:
            authors = s.scalars(select(Author).options(lazyload(Author.letters))).all()
            assert [x.text for x in authors[1].letters] == ["l1"]
            assert authors[0].letters[0].author is authors[0]

    def test_sub_options_apply_to_what_the_lazy_load_loads(self, engine: Engine) -> None:
        """lazyload(Author.books).selectinload(Book.tags): on access, the books come with
        all their tags (2 + 2 round trips), and reading the tags sends nothing."""
        _seed(engine, 2)
        stmt = select(Author).options(lazyload(Author.books).selectinload(Book.tags))
        with Session(engine) as s:
            authors = s.scalars(stmt).all()
            with assert_round_trips(engine, 4):
                books = authors[0].books
            with assert_round_trips(engine, 0):
                assert sorted(t.label for b in books for t in b.tags)[:2] == [
                    "a0-b0-t0",
                    "a0-b0-t1",
                ]

    def test_defaultload_reaches_further_down(self, engine: Engine) -> None:
        """defaultload(Author.books).raiseload(Book.tags): books load as mapped (lazily),
        and the tags of those books raise."""
        _seed(engine, 1)
        stmt = select(Author).options(defaultload(Author.books).raiseload(Book.tags))
        with Session(engine) as s, count_round_trips(engine) as rt:
            a = s.scalars(stmt).one()
            assert rt.round_trips == 4  # ids, author, fans (2)
            assert len(a.books) == 3
            assert rt.round_trips == 6
            with pytest.raises(InvalidRequestError, match="Book.tags"):
                _ = a.books[0].tags


class TestGetOptions:
    def test_get_with_selectinload(self, engine: Engine) -> None:
        """Session.get(..., options=) loads the named relationships with the object."""
        _seed(engine, 1)
        with Session(engine) as s, count_round_trips(engine) as rt:
            a = s.get(Author, 1, options=[selectinload(Author.books).selectinload(Book.tags)])
            assert a is not None and rt.round_trips == 1 + 2 + 2 + 2  # author, fans, books, tags
            assert len([t for b in a.books for t in b.tags]) == 6
            assert rt.round_trips == 7

    def test_get_of_an_object_in_the_identity_map_applies_the_options(self, engine: Engine) -> None:
        """Unlike SQLAlchemy, which returns an identity-map hit untouched, the options
        still load what the object has not loaded (no round trip for the object)."""
        _seed(engine, 1)
        with Session(engine) as s:
            a = s.get_one(Author, 1)
            with assert_round_trips(engine, 2):
                assert s.get_one(Author, 1, options=[selectinload(Author.books)]) is a
            with assert_round_trips(engine, 0):
                assert len(a.books) == 3
            with assert_round_trips(engine, 0):
                assert s.get(Author, 1) is a

    def test_get_with_raiseload(self, engine: Engine) -> None:
        """raiseload through get marks the object's relationship."""
        _seed(engine, 1)
        with Session(engine) as s:
            a = s.get_one(Author, 1, options=[raiseload(Author.books)])
            with pytest.raises(InvalidRequestError, match="raiseload"):
                _ = a.books


class TestErrors:
    def test_a_field_is_not_a_relationship(self) -> None:
        """An option names a relationship; a field or a value raises at once."""
        with pytest.raises(InvalidRequestError, match=r"selectinload\(\) takes a relationship"):
            selectinload(Book.title)
        with pytest.raises(InvalidRequestError, match=r"raiseload\(\) takes a relationship"):
            raiseload("books")

    def test_a_path_that_does_not_continue_raises_before_any_round_trip(
        self, engine: Engine
    ) -> None:
        """Each link must start where the previous one leads, and the first at the model."""
        with Session(engine) as s, assert_round_trips(engine, 0):
            with pytest.raises(
                InvalidRequestError, match="Fan.author is not a relationship of Book"
            ):
                s.scalars(
                    select(Author).options(selectinload(Author.books).selectinload(Fan.author))
                )
            with pytest.raises(
                InvalidRequestError, match="Book.tags is not a relationship of Author"
            ):
                s.scalars(select(Author).options(selectinload(Book.tags)))
            with pytest.raises(InvalidRequestError, match="takes loader options"):
                s.scalars(select(Author).options("books"))  # type: ignore[arg-type]

    def test_statements_stay_immutable(self) -> None:
        """options() returns a new statement, as every Select method does."""
        base = select(Author)
        with_options = base.options(selectinload(Author.books))
        assert base._options == () and len(with_options._options) == 1
        assert len(with_options.limit(3)._options) == 1


class TestAsync:
    def test_selectinload_is_the_way_past_the_io_error(self, url: str) -> None:
        """Under an AsyncSession, a lazy relationship raises on access; selectinload in the
        statement (or get's options) loads it, in the round trips the sync API uses."""
        sync_engine = redmap.create_engine(url)
        try:
            _seed(sync_engine, 4)
            with Session(sync_engine) as s, count_round_trips(sync_engine) as rt:
                s.scalars(
                    select(Author).options(selectinload(Author.books).selectinload(Book.tags))
                ).all()
            sync_round_trips = rt.round_trips
        finally:
            sync_engine.dispose()

        async def main() -> None:
            engine: AsyncEngine = create_async_engine(url)
            try:
                async with AsyncSession(engine) as s:
                    plain = (await s.scalars(select(Author))).all()
                    with pytest.raises(InvalidRequestError) as err:
                        _ = plain[0].books
                    assert "selectinload(Author.books)" in str(err.value)
                    assert [f.name for f in plain[0].fans] == ["f0"]  # mapped selectin
                async with AsyncSession(engine) as s:
                    stmt = select(Author).options(
                        selectinload(Author.books).selectinload(Book.tags)
                    )
                    with count_round_trips(engine) as art:
                        authors = (await s.scalars(stmt)).all()
                    assert art.round_trips == sync_round_trips == 8
                    labels = [t.label for a in authors for b in a.books for t in b.tags]
                    assert len(labels) == 4 * 3 * 2
                async with AsyncSession(engine) as s:
                    a = await s.get(Author, 2, options=[selectinload(Author.books)])
                    assert a is not None and [b.title for b in a.books][0] == "a1-b0"
                    one = await s.get_one(Author, 3, options=[raiseload(Author.fans)])
                    with pytest.raises(InvalidRequestError, match="raiseload"):
                        _ = one.fans
                async with AsyncSession(engine) as s:
                    books = (await s.scalars(select(Book).options(selectinload(Book.author)))).all()
                    assert {b.author.name for b in books if b.author} == {"a0", "a1", "a2", "a3"}
            finally:
                await engine.dispose()

        asyncio.run(main())
