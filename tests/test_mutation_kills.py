"""Behaviour that mutation testing found unchecked (docs/reliability.md#mutation-testing).

Each test here failed against one or more hand-checked mutants of the core modules
(a statement removed, a condition flipped) that the rest of the deterministic suite let
through, and passes on the real code. The mutant each one kills is named in its comment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
from redis.cluster import RedisCluster

from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    create_engine,
    or_,
    registry,
    relationship,
    select,
    sessionmaker,
)
from redmap.engine import Engine
from redmap.exc import (
    CrossSlotError,
    FlushError,
    IntegrityError,
    InvalidRequestError,
    MultipleResultsFound,
    ObjectDeletedError,
    QueryError,
    StaleDataError,
    ValidationError,
)
from redmap.orm.mapper import mapper_of
from redmap.testing.assertions import assert_round_trips, count_round_trips, dump_keys
from redmap.testing.servers import ClusterProcesses

reg = registry(prefix="mk")


@reg.mapped
@dataclass
class Shelf:
    name: str
    books: list[Book] = relationship(back_populates="shelf", cascade="all, delete-orphan")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Book:
    """Two many-to-ones (the first one stays unloaded in some tests) and a one-sided
    many-to-many (labels know nothing of books)."""

    title: Annotated[str, Indexed()]
    shelf_id: Annotated[Optional[int], ForeignKey("Shelf")] = None
    shelf: Optional[Shelf] = relationship(back_populates="books")
    reader_id: Annotated[Optional[int], ForeignKey("Reader")] = None
    reader: Optional[Reader] = relationship()
    labels: list[Label] = relationship(secondary="mk_book_labels")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Reader:
    name: str
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Label:
    text: str
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Club:
    """A one-to-many without a delete cascade: members are released, not deleted."""

    name: str
    members: list[Member] = relationship(back_populates="club", order_by="Member.rank")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Member:
    name: str
    nickname: Annotated[Optional[str], Indexed()] = None
    rank: Annotated[Optional[int], Sorted()] = None
    club_id: Annotated[Optional[int], ForeignKey("Club")] = None
    club: Optional[Club] = relationship(back_populates="members")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Drawer:
    """A one-to-many with no reverse side: the list alone says where notes belong."""

    name: str
    notes: list[Note] = relationship()
    stickers: list[Sticker] = relationship(secondary="mk_drawer_stickers", cascade="all")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Sticker:
    text: str
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Note:
    text: str
    drawer_id: Annotated[Optional[int], ForeignKey("Drawer")] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Playlist:
    name: str
    tracks: list[Track] = relationship(
        back_populates="playlist", order_by="Track.pos", lazy="selectin"
    )
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Track:
    pos: Annotated[int, Sorted()]
    length: Annotated[Optional[int], Sorted()] = None
    playlist_id: Annotated[Optional[int], ForeignKey("Playlist")] = None
    playlist: Optional[Playlist] = relationship(back_populates="tracks")
    id: Annotated[Optional[int], PrimaryKey()] = None


def _shelf(engine: Engine, *titles: str) -> tuple[int, list[int]]:
    """A stored shelf holding books with `titles`: (shelf id, book ids)."""
    with Session(engine) as s:
        shelf = Shelf(name="s")
        shelf.books.extend(Book(title=t) for t in titles)
        s.add(shelf)
        s.commit()
        return shelf.id, [b.id for b in shelf.books]  # type: ignore[return-value]


class TestSessionBookkeeping:
    def test_iterating_a_session_yields_its_objects(self, engine: Engine) -> None:
        """`iter(session)` yields every persistent and every pending object once."""
        # Kills: Session.__iter__ yielding nothing.
        _shelf(engine, "a")
        with Session(engine) as s:
            shelf = s.get(Shelf, 1)
            new = Book(title="n")
            s.add(new)
            got = list(s)
            assert any(o is shelf for o in got) and any(o is new for o in got)
            assert len(got) == len({id(o) for o in got})

    def test_add_cascades_to_new_related_objects_at_once(self, engine: Engine) -> None:
        """Adding a detached parent brings the new children of its loaded collection into
        the session right away (save-update cascade), not only at flush."""
        # Kills: Session.add without `self._cascade_add(st)` for a persistent object.
        shelf_id, _ = _shelf(engine, "a")
        with Session(engine, expire_on_commit=False) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None and len(shelf.books) == 1
        extra = Book(title="b")
        shelf.books.append(extra)  # while detached
        with Session(engine) as s2:
            s2.add(shelf)
            assert extra in s2 and extra in s2.new
            s2.commit()
        with Session(engine) as s3:
            again = s3.get(Shelf, shelf_id)
            assert again is not None and sorted(b.title for b in again.books) == ["a", "b"]

    def test_add_cascades_to_a_detached_target(self, engine: Engine) -> None:
        """A new child pointing at a detached parent brings the parent into the session."""
        # Kills: `other.session is None` flipped in Session._cascade_add.
        shelf_id, _ = _shelf(engine)
        with Session(engine, expire_on_commit=False) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None
            assert shelf.books == []
        with Session(engine) as s2:
            book = Book(title="n", shelf=shelf)
            s2.add(book)
            assert shelf in s2
            s2.commit()
            assert book.shelf_id == shelf_id

    def test_setting_an_unloaded_many_to_one_updates_the_old_parents_list(
        self, engine: Engine
    ) -> None:
        """Moving a child whose many-to-one was never loaded: the old parent's loaded list
        drops it and the new parent's gains it at once, before any flush."""
        # Kills: SessionContext.peek_many_to_one always answering None.
        old_id, (book_id,) = _shelf(engine, "a")
        new_id, _ = _shelf(engine)
        with Session(engine) as s:
            book = s.get(Book, book_id)
            old, new = s.get(Shelf, old_id), s.get(Shelf, new_id)
            assert book is not None and old is not None and new is not None
            assert old.books == [book] and new.books == []
            book.shelf = new
            assert old.books == [] and new.books == [book]
            s.commit()
        with Session(engine) as s:
            assert [b.id for b in s.get(Shelf, new_id).books] == [book_id]  # type: ignore[union-attr]
            assert s.get(Shelf, old_id).books == []  # type: ignore[union-attr]

    def test_changes_made_while_detached_are_written_after_add(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A detached object changed outside any session and added to a new one: the
        change is pending there and the commit writes it."""
        # Kills: Session.add not marking a re-attached object with changes as modified.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine, expire_on_commit=False) as s:
            book = s.get(Book, book_id)
            assert book is not None
        book.title = "while detached"
        with Session(engine) as s2:
            s2.add(book)
            assert book in s2.dirty
            s2.commit()
        assert redis_client.hget(f"{{mk}}:book:{book_id}", "title") == b"while detached"

    def test_merge_of_an_unknown_id_inserts_under_that_id(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """merge() of an object whose explicit id Redis does not hold adds a new object
        with that id (not a generated one)."""
        # Kills: the pk copy negated in Session.merge's "new target" branch.
        with Session(engine) as s:
            merged = s.merge(Book(title="m", id=77))
            s.commit()
            assert merged.id == 77
        assert redis_client.hget("{mk}:book:77", "title") == b"m"
        assert redis_client.zrange("{mk}:book:#all", 0, -1) == [b"77"]

    def test_object_added_then_rolled_back_can_be_added_again(self, engine: Engine) -> None:
        """A new object expunged by rollback is clean (not in doubt): another session can
        add and commit it."""
        # Kills: Session.rollback marking expunged new objects as in doubt.
        with Session(engine) as s:
            book = Book(title="again")
            s.add(book)
            s.rollback()
            assert book not in s
        with Session(engine) as s2:
            s2.add(book)
            s2.commit()
            assert book.id is not None
        with Session(engine) as s3:
            assert s3.get(Book, book.id) is not None

    def test_adding_a_second_object_with_a_loaded_identity_is_refused(self, engine: Engine) -> None:
        """add() of a detached copy of an object the session already holds raises
        InvalidRequestError pointing at merge(); the session keeps its own object."""
        # Kills: the identity clash test of Session.add inverted.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine, expire_on_commit=False) as s:
            copy = s.get(Book, book_id)
        with Session(engine) as s2:
            mine = s2.get(Book, book_id)
            with pytest.raises(InvalidRequestError, match="use merge"):
                s2.add(copy)
            assert copy not in s2 and s2.get(Book, book_id) is mine

    def test_get_many_sees_a_pending_object_with_an_explicit_id(self, engine: Engine) -> None:
        """get_many() autoflushes first: a pending object with an explicit id is found
        (the same instance), as get() finds it."""
        # Kills: Session.get_many without its autoflush.
        with Session(engine) as s:
            book = Book(title="pending", id=42)
            s.add(book)
            assert s.get_many(Book, [42, 43]) == [book, None]
            assert book not in s.new

    def test_a_new_object_counts_as_modified(self, engine: Engine) -> None:
        """is_modified() of a pending new object is True (all of it is to be written)."""
        # Kills: Session.is_modified answering False for objects without identity.
        with Session(engine) as s:
            book = Book(title="n")
            s.add(book)
            assert s.is_modified(book)

    def test_flush_inside_a_flush_is_refused(self, engine: Engine) -> None:
        """A flush started while one runs (here from a command listener) raises
        InvalidRequestError; the outer flush still commits."""
        # Kills: Session.flush not setting its `_flushing` guard.
        _, (book_id,) = _shelf(engine, "a")
        errors: list[Exception] = []
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.title = "b"

            def reenter(commands: Any) -> None:
                if not errors:
                    try:
                        s.flush()
                    except InvalidRequestError as exc:
                        errors.append(exc)

            engine.add_listener(reenter)
            try:
                s.commit()
            finally:
                engine.remove_listener(reenter)
        assert len(errors) == 1 and "already flushing" in str(errors[0])
        with Session(engine) as s:
            assert s.get(Book, book_id).title == "b"  # type: ignore[union-attr]

    def test_expunged_deleted_object_is_no_longer_deleted(self, engine: Engine) -> None:
        """An object marked for deletion and then expunged is a plain detached object:
        added to another session it is kept, not deleted."""
        # Kills: SessionContext.detach not clearing the state's deleted mark.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            s.delete(book)
            s.expunge(book)
        with Session(engine) as s2:
            s2.add(book)
            assert book not in s2.deleted and s2.get(Book, book_id) is book
            s2.commit()
        with Session(engine) as s3:
            assert s3.get(Book, book_id) is not None

    def test_expired_object_deleted_elsewhere_raises_on_access(self, engine: Engine) -> None:
        """Reading an expired object that another session deleted meanwhile raises
        ObjectDeletedError naming it (not stale values, not None)."""
        # Kills: loading.load_unloaded_steps without its raise.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            s.expire(book)
            with Session(engine) as other:
                other.delete(other.get(Book, book_id))
                other.commit()
            with pytest.raises(ObjectDeletedError, match=f"Book with primary key {book_id}"):
                _ = book.title

    def test_session_repr_counts_its_objects(self, engine: Engine) -> None:
        """repr(session) says how many objects are persistent and pending."""
        # Kills: Session.__repr__ returning None.
        _shelf(engine, "a")
        with Session(engine) as s:
            s.get(Book, 1)
            s.add(Book(title="n"))
            assert repr(s) == "<Session 1 persistent, 1 pending>"

    def test_session_defaults(self, cluster: ClusterProcesses, cluster_client: Any) -> None:
        """By default a session (here from a bare sessionmaker) expires objects on commit
        (they reload what others wrote) and refuses a flush spanning two hash tags."""
        # Kills: the defaults of sessionmaker(expire_on_commit=True, allow_cross_slot=False).
        engine = create_engine(cluster.url)
        factory = sessionmaker(engine)
        try:
            ids = []
            for i in range(8):
                with Session(engine) as s:
                    p = Peer(name=f"p{i}")
                    s.add(p)
                    s.commit()
                    ids.append(p.id)
            tags = {mapper_of(Peer).keys_for_pk(i).tag: i for i in ids}
            assert len(tags) >= 2
            a_id, b_id = list(tags.values())[:2]
            with factory() as s:
                a = s.get(Peer, a_id)
                assert a is not None
                a.name = "mine"
                s.commit()
                with Session(engine) as other:
                    other.get(Peer, a_id).name = "theirs"  # type: ignore[union-attr]
                    other.commit()
                assert a.name == "theirs"  # expired on commit: reloaded
                b = s.get(Peer, b_id)
                assert b is not None
                a.name, b.name = "x", "y"
                with pytest.raises(CrossSlotError):
                    s.commit()
        finally:
            engine.dispose()

    def test_begin_rolls_back_on_error(self, engine: Engine) -> None:
        """`with session.begin():` that raises rolls the pending changes back."""
        # Kills: Session.begin without its rollback.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            with pytest.raises(RuntimeError), s.begin():
                book.title = "doomed"
                s.add(Book(title="new"))
                raise RuntimeError("boom")
            assert list(s.new) == [] and list(s.dirty) == []
            assert book.title == "a"

    def test_get_many_accepts_a_generator(self, engine: Engine) -> None:
        """get_many() takes any iterable of ids, a one-shot generator included."""
        # Kills: Session.get_many reading its argument twice.
        _, ids = _shelf(engine, "a", "b")
        with Session(engine) as s:
            got = s.get_many(Book, (i for i in ids))
            assert [b.id for b in got if b is not None] == ids

    def test_links_written_once_are_not_written_again(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A link change is sent by the flush that carries it only: unlinked meanwhile by
        someone else, a later flush of this session does not bring it back."""
        # Kills: SessionContext.forget_relationship_changes without `self.links.clear()`.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            label = Label(text="l")
            s.add(label)
            book = s.get(Book, book_id)
            assert book is not None
            book.labels.append(label)
            s.commit()
            with Session(engine) as other:
                other.get(Book, book_id).labels.clear()  # type: ignore[union-attr]
                other.commit()
            book.title = "b"
            s.commit()
        with Session(engine) as s:
            assert s.get(Book, book_id).labels == []  # type: ignore[union-attr]

    def test_new_objects_in_doubt_block_the_next_flush(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """An insert whose EXEC failed leaves the new object in doubt: the next flush is
        refused until rollback."""

        # Kills: Session.flush not counting new objects among those in doubt.
        def sabotage(commands: Any) -> None:
            if commands and commands[0] == ("MULTI",):
                redis_client.set("{mk}:book:#ix:title:n", "not a set")

        with Session(engine) as s:
            s.add(Book(title="n", id=7))
            engine.add_listener(sabotage)
            try:
                with pytest.raises(FlushError):
                    s.commit()
            finally:
                engine.remove_listener(sabotage)
            with pytest.raises(InvalidRequestError, match="unknown"):
                s.flush()

    def test_rollback_forgets_pending_deletes(self, engine: Engine) -> None:
        """After rollback a deleted object is no longer marked, and the next commit keeps it."""
        # Kills: Session.rollback without `ctx.deleted.clear()`, or without resetting
        # each state's deleted mark.
        shelf_id, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            s.delete(book)
            assert book in s.deleted
            s.rollback()
            assert book not in s.deleted and list(s.deleted) == []
            assert s.get(Book, book_id) is book  # no longer marked deleted
            s.commit()
        with Session(engine) as s:
            assert s.get(Book, book_id) is not None

    def test_expire_refresh_expunge_refuse_foreign_objects(self, engine: Engine) -> None:
        """expire, refresh and expunge of an object of another session (or none) raise
        InvalidRequestError naming the action."""
        # Kills: Session._own_state without its raise.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s1, Session(engine) as s2:
            book = s1.get(Book, book_id)
            for action in ("expire", "refresh", "expunge"):
                with pytest.raises(InvalidRequestError, match=f"cannot {action}"):
                    getattr(s2, action)(book)
                with pytest.raises(InvalidRequestError, match=f"cannot {action}"):
                    getattr(s2, action)(Book(title="t"))
            assert book in s1

    def test_delete_refuses_an_object_of_another_session(self, engine: Engine) -> None:
        """delete() of an object attached to another session raises, and marks nothing."""
        # Kills: Session.delete without its "belongs to another session" raise.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s1, Session(engine) as s2:
            book = s1.get(Book, book_id)
            with pytest.raises(InvalidRequestError, match="another session"):
                s2.delete(book)
            assert list(s2.deleted) == [] and list(s1.deleted) == []


class TestForeignKeyTargets:
    def test_insert_pointing_at_a_deleted_parent_is_stale(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A new child whose foreign key names a parent deleted by someone else since it was
        loaded: the flush is stale and writes nothing."""
        # Kills: persistence._expect_target as a no-op.
        shelf_id, _ = _shelf(engine)
        with Session(engine) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None
            with Session(engine) as other:
                gone = other.get(Shelf, shelf_id)
                other.delete(gone)
                other.commit()
            before = dump_keys(redis_client)
            s.add(Book(title="orphan", shelf_id=shelf_id))
            with pytest.raises(StaleDataError, match=f"Shelf\\({shelf_id}\\) that Book.shelf_id"):
                s.commit()
            assert dump_keys(redis_client) == before

    def test_update_moving_to_a_deleted_parent_is_stale(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Moving a child to a parent that no longer exists: stale, nothing written."""
        # Kills: persistence._expect_target as a no-op (the update path).
        _, (book_id,) = _shelf(engine, "a")
        target_id, _ = _shelf(engine)
        with Session(engine) as other:
            other.delete(other.get(Shelf, target_id))
            other.commit()
        before = dump_keys(redis_client)
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.shelf_id = target_id
            with pytest.raises(StaleDataError):
                s.commit()
        assert dump_keys(redis_client) == before


class TestRelationshipsAtFlush:
    def test_new_target_of_a_later_many_to_one_gets_its_key(self, engine: Engine) -> None:
        """A loaded object whose first many-to-one is unloaded and whose second is set to
        a new object: the flush writes the second foreign key."""
        # Kills: `continue` -> `break` in dependency._sync_foreign_keys.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.reader = Reader(name="r")
            s.commit()
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None and book.reader_id is not None
            assert book.reader is not None and book.reader.name == "r"

    def test_delete_cascades_to_a_child_added_by_someone_else(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Deleting a parent whose list was loaded before another session added a child:
        the delete-orphan cascade deletes that child too (it would point at nothing)."""
        # Kills: dependency._members_at_flush without `out.setdefault(...)` for members
        # only Redis lists.
        shelf_id, (a_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None and [b.id for b in shelf.books] == [a_id]
            with Session(engine) as other:
                late = Book(title="late", shelf_id=shelf_id)
                other.add(late)
                other.commit()
                late_id = late.id
            s.delete(shelf)
            s.commit()
        with Session(engine) as s:
            assert s.get_many(Book, [a_id, late_id]) == [None, None]
        assert redis_client.keys("{mk}:book:#fk:*") == []

    def test_child_moved_away_survives_its_old_parents_delete(self, engine: Engine) -> None:
        """A child moved to another parent in the flush that deletes its old parent is not
        taken by the old parent's delete-orphan cascade."""
        # Kills: `and` -> `or` in dependency._members_at_flush's "points here" test.
        old_id, (book_id,) = _shelf(engine, "a")
        new_id, _ = _shelf(engine)
        with Session(engine) as s:
            old, new = s.get(Shelf, old_id), s.get(Shelf, new_id)
            book = s.get(Book, book_id)
            assert old is not None and new is not None and book is not None
            book.shelf = new
            s.delete(old)
            s.commit()
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None and book.shelf_id == new_id
            shelf = s.get(Shelf, new_id)
            assert shelf is not None and [b.id for b in shelf.books] == [book_id]

    def test_child_moved_by_key_into_a_deleted_parent_goes_with_it(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A child moved by setting its key column (relationship not loaded) to a parent
        deleted in the same flush is that parent's child at flush: the delete-orphan
        cascade deletes it too, leaving no key behind."""
        # Kills: dependency._pointing dropping children that point by primary key, and
        # the key-column test of dependency._pointer negated.
        doomed_id, (x_id,) = _shelf(engine, "x")
        other_id, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            doomed = s.get(Shelf, doomed_id)
            book = s.get(Book, book_id)
            assert doomed is not None and book is not None
            book.shelf_id = doomed_id
            s.delete(doomed)
            s.commit()
        with Session(engine) as s:
            assert s.get_many(Book, [x_id, book_id]) == [None, None]
            assert s.get(Shelf, other_id) is not None
        assert sorted(k for k in redis_client.keys("{mk}:book:*") if b"#seq" not in k) == []

    def test_delete_cascade_goes_past_a_child_deleted_in_the_same_flush(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Deleting a parent and, in the same flush, its first child: the cascade still
        deletes the children after it."""
        # Kills: `continue` -> `break` in dependency._members_at_flush.
        shelf_id, ids = _shelf(engine, "a", "b", "c")
        with Session(engine) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None and [b.id for b in shelf.books] == ids
            s.delete(shelf.books[0])
            s.delete(shelf)
            s.commit()
        with Session(engine) as s:
            assert s.get_many(Book, ids) == [None, None, None]
        assert sorted(k for k in redis_client.keys("{mk}:book:*") if b"#seq" not in k) == []

    def test_every_removed_child_is_an_orphan(self, engine: Engine) -> None:
        """Removing two children from a delete-orphan list, the first of which is also
        deleted outright: both are gone after the commit."""
        # Kills: `continue` -> `break` in the orphan pass of dependency.
        shelf_id, (a_id, b_id, c_id) = _shelf(engine, "a", "b", "c")
        with Session(engine) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None
            first, second = shelf.books[0], shelf.books[1]
            s.delete(first)
            shelf.books.remove(first)
            shelf.books.remove(second)
            s.commit()
        with Session(engine) as s:
            assert s.get_many(Book, [a_id, b_id]) == [None, None]
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None and [b.id for b in shelf.books] == [c_id]

    def test_released_children_forget_the_deleted_parent_in_memory(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Deleting a parent without a delete cascade: its children stay, and after the
        flush they point at nothing, in memory as in Redis."""
        # Kills: dependency._detach_children not clearing the child's many-to-one.
        with Session(engine) as s:
            club = Club(name="c", members=[Member(name="m")])
            s.add(club)
            s.commit()
            club_id, member_id = club.id, club.members[0].id
        with Session(engine, expire_on_commit=False) as s:
            member = s.get(Member, member_id)
            assert member is not None and member.club is not None
            s.delete(member.club)
            s.commit()
            assert member.club is None and member.club_id is None
        assert redis_client.hget(f"{{mk}}:member:{member_id}", "club_id") is None
        assert redis_client.exists(f"{{mk}}:club:{club_id}") == 0

    def test_child_moved_to_a_new_parent_survives_its_old_parents_delete(
        self, engine: Engine
    ) -> None:
        """A child moved to a parent created in the same flush that deletes its old parent
        follows the new parent (its many-to-one says so, its key column not yet)."""
        # Kills: the reverse-side test of dependency._pointer inverted (the key column,
        # still naming the old parent, would be believed).
        old_id, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            old, book = s.get(Shelf, old_id), s.get(Book, book_id)
            assert old is not None and book is not None
            new = Shelf(name="new")
            book.shelf = new
            s.delete(old)
            s.commit()
            new_id = new.id
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None and book.shelf_id == new_id

    def test_one_sided_one_to_many_sets_the_childrens_key(self, engine: Engine) -> None:
        """A one-to-many with no reverse side: children appended to the list get the
        parent's key at flush."""
        # Kills: dependency._follows_list answering None (falsy) for a one-sided list.
        with Session(engine) as s:
            drawer = Drawer(name="d", notes=[Note(text="n1"), Note(text="n2")])
            s.add(drawer)
            s.commit()
            drawer_id, note_ids = drawer.id, [n.id for n in drawer.notes]
        with Session(engine) as s:
            notes = s.get_many(Note, note_ids)
            assert [n.drawer_id for n in notes if n is not None] == [drawer_id, drawer_id]
            drawer = s.get(Drawer, drawer_id)
            assert drawer is not None and sorted(n.id for n in drawer.notes) == note_ids

    def test_stale_child_listed_under_a_deleted_parent(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Deleting a parent that Redis lists a child under, while this session holds the
        child as loaded before someone moved it there: StaleDataError, nothing written."""
        # Kills: dependency._members_at_flush without its StaleDataError.
        _, (book_id,) = _shelf(engine, "a")
        target_id, _ = _shelf(engine)
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None and book.shelf is not None  # loaded on its old shelf
            with Session(engine) as other:
                other.get(Book, book_id).shelf_id = target_id  # type: ignore[union-attr]
                other.commit()
            before = dump_keys(redis_client)
            s.delete(s.get(Shelf, target_id))
            with pytest.raises(StaleDataError):
                s.commit()
        assert dump_keys(redis_client) == before

    def test_re_parented_child_is_not_an_orphan(self, engine: Engine) -> None:
        """Children removed from a delete-orphan list: one moved to another parent in the
        same flush stays (there), one only removed is deleted."""
        # Kills: the "re-parented since removed" test of the orphan pass inverted, or its
        # `continue` made a `break`.
        old_id, (a_id, b_id) = _shelf(engine, "a", "b")
        new_id, _ = _shelf(engine)
        with Session(engine) as s:
            old, new = s.get(Shelf, old_id), s.get(Shelf, new_id)
            assert old is not None and new is not None
            moved, dropped = old.books[0], old.books[1]
            old.books.remove(moved)
            moved.shelf = new  # (new.books.append(moved) instead: a StaleDataError, reported)
            old.books.remove(dropped)
            s.commit()
        with Session(engine) as s:
            assert s.get(Book, b_id) is None
            kept = s.get(Book, a_id)
            assert kept is not None and kept.shelf_id == new_id

    def test_new_child_of_a_deleted_parent_is_not_written(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A new child appended to a parent deleted in the same flush goes with it."""
        # Kills: dependency._members_at_flush not counting children the session points
        # at the deleted parent.
        shelf_id, (a_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None
            shelf.books.append(Book(title="late"))
            s.delete(shelf)
            s.commit()
        assert redis_client.keys("{mk}:book:[0-9]*") == []
        assert redis_client.keys("{mk}:book:#ix:title:late") == []

    def test_child_moved_by_key_away_from_a_deleted_parent(self, engine: Engine) -> None:
        """A child moved away by its key column (relationship unloaded) from a parent
        deleted in the same flush survives on its new parent."""
        # Kills: the "moved" flag of dependency._pointer for key columns (`or` -> `and`).
        old_id, (book_id,) = _shelf(engine, "a")
        new_id, _ = _shelf(engine)
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.shelf_id = new_id
            s.delete(s.get(Shelf, old_id))
            s.commit()
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None and book.shelf_id == new_id

    def test_many_to_many_delete_cascade(self, engine: Engine) -> None:
        """Deleting an owner deletes the members of a many-to-many with cascade "all",
        and only unlinks those of one without it."""
        # Kills: the `"delete" in prop.cascade` test for many-to-many inverted, or its
        # session.delete(other) removed.
        with Session(engine) as s:
            drawer = Drawer(name="d", stickers=[Sticker(text="s")])
            book = Book(title="b", labels=[Label(text="l")])
            s.add_all([drawer, book])
            s.commit()
            sticker_id, label_id = drawer.stickers[0].id, book.labels[0].id
            s.delete(drawer)
            s.delete(book)
            s.commit()
        with Session(engine) as s:
            assert s.get(Sticker, sticker_id) is None
            assert s.get(Label, label_id) is not None

    def test_unreadable_list_of_a_deleted_parent_is_named(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Deleting a parent whose children's list key holds the wrong type: an error
        naming the key, nothing written."""
        # Kills: dependency._read_members without its "cannot read" raise.
        shelf_id, _ = _shelf(engine)
        fk_key = f"{{mk}}:book:#fk:shelf_id:{shelf_id}"
        with Session(engine) as s:
            shelf = s.get(Shelf, shelf_id)
            assert shelf is not None and shelf.books == []  # the list is loaded: not re-read
            redis_client.set(fk_key, "not a zset")
            before = dump_keys(redis_client)
            s.delete(shelf)
            with pytest.raises(InvalidRequestError, match=f"cannot read '{re.escape(fk_key)}'"):
                s.commit()
        assert dump_keys(redis_client) == before

    def test_link_to_an_object_deleted_meanwhile_is_stale(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Linking to an object someone else deletes before the commit: StaleDataError,
        and no link points at nothing."""
        # Kills: persistence not watching an existing end of a new link.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            label = Label(text="l")
            s.add(label)
            s.commit()
            label_id = label.id
        with Session(engine) as s:
            book, label = s.get(Book, book_id), s.get(Label, label_id)
            assert book is not None and label is not None
            book.labels.append(label)
            with Session(engine) as other:
                other.delete(other.get(Label, label_id))
                other.commit()
            before = dump_keys(redis_client)
            with pytest.raises(StaleDataError):
                s.commit()
        assert dump_keys(redis_client) == before

    def test_child_without_an_order_value_sorts_first(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """In a list ordered by a field that may be None, a child without a value is held
        at -inf in its parent's zset and comes first."""
        # Kills: persistence._fk_score answering None for a None order value.
        with Session(engine) as s:
            club = Club(name="c", members=[Member(name="r5", rank=5), Member(name="none")])
            s.add(club)
            s.commit()
            club_id = club.id
        scores = redis_client.zrange(f"{{mk}}:member:#fk:club_id:{club_id}", 0, -1, withscores=True)
        assert [sc for _, sc in scores] == [float("-inf"), 5.0]
        with Session(engine) as s:
            club = s.get(Club, club_id)
            assert club is not None and [m.name for m in club.members] == ["none", "r5"]

    def test_delete_unlinks_a_one_sided_many_to_many(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Deleting the far end of a many-to-many that has no reverse side removes it from
        every owner's set (the owners are found through the hidden reverse set)."""
        # Kills: dependency._unlink_hidden returning at once.
        with Session(engine) as s:
            label, keep = Label(text="x"), Label(text="y")
            book = Book(title="b", labels=[label, keep])
            s.add(book)
            s.commit()
            book_id, label_id, keep_id = book.id, label.id, keep.id
        with Session(engine) as s:
            s.delete(s.get(Label, label_id))
            s.commit()
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None and [lb.id for lb in book.labels] == [keep_id]
        members = [
            m for k in redis_client.keys("{mk}:book:#rel:*") for m in redis_client.zrange(k, 0, -1)
        ]
        assert members == [str(keep_id).encode()]

    def test_move_with_an_expired_order_field_keeps_the_order_score(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Moving a child whose order_by field was expired: its score in the new parent's
        list is still that field (read from what was loaded), not lost."""
        # Kills: persistence._current_value without its codec (the expired-field path).
        with Session(engine) as s:
            p1, p2 = Playlist(name="p1"), Playlist(name="p2")
            p1.tracks.append(Track(pos=5))
            p2.tracks.extend([Track(pos=1), Track(pos=9)])
            s.add_all([p1, p2])
            s.commit()
            ids = (p1.id, p2.id, p1.tracks[0].id)
        p1_id, p2_id, track_id = ids
        with Session(engine) as s:
            track = s.get(Track, track_id)
            assert track is not None
            s.expire(track, ["pos"])
            track.playlist_id = p2_id
            s.commit()
        with Session(engine) as s:
            p2 = s.get(Playlist, p2_id)
            assert p2 is not None and [t.pos for t in p2.tracks] == [1, 5, 9]
        scores = redis_client.zrange(
            f"{{mk}}:track:#fk:playlist_id:{p2_id}", 0, -1, withscores=True
        )
        assert [sc for _, sc in scores] == [1.0, 5.0, 9.0]


class TestFlushPlan:
    def test_existing_child_moved_to_a_new_parent(self, engine: Engine, redis_client: Any) -> None:
        """A stored child moved to a parent created in the same flush gets the new id in
        its hash and in the new parent's list, and leaves the old list."""
        # Kills: unitofwork.changed_fields without the placeholder for a deferred key.
        old_id, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            new = Shelf(name="new")
            book.shelf = new
            s.commit()
            new_id = new.id
        assert redis_client.hget(f"{{mk}}:book:{book_id}", "shelf_id") == str(new_id).encode()
        assert redis_client.zrange(f"{{mk}}:book:#fk:shelf_id:{new_id}", 0, -1) == [
            str(book_id).encode()
        ]
        assert redis_client.exists(f"{{mk}}:book:#fk:shelf_id:{old_id}") == 0
        with Session(engine) as s:
            shelf = s.get(Shelf, new_id)
            assert shelf is not None and [b.id for b in shelf.books] == [book_id]

    def test_index_additions_to_one_key_ride_on_one_command(self, engine: Engine) -> None:
        """Three new objects with one indexed value: one SADD carrying the three ids."""
        # Kills: the variadic test negated in persistence._merge (a command per member).
        with Session(engine) as s:
            s.add_all([Book(title="same", id=i) for i in (1, 2, 3)])
            with count_round_trips(engine) as rt:
                s.commit()
        sadds = [c for c in rt.commands if c[0] == "SADD" and c[1] == "{mk}:book:#ix:title:same"]
        assert len(sadds) == 1 and sorted(sadds[0][2:]) == ["1", "2", "3"]

    def test_two_new_objects_with_one_id_are_refused(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Two new objects with one explicit id, or a new one with the id of an object the
        session holds: IntegrityError, nothing written. Deleting the held one first in the
        same flush makes room."""
        # Kills: the duplicate-identity raise of unitofwork removed, or its "not deleted"
        # test inverted.
        _, (book_id,) = _shelf(engine, "a")
        before = dump_keys(redis_client)
        with Session(engine) as s:
            s.add_all([Book(title="x", id=500), Book(title="y", id=500)])
            with pytest.raises(IntegrityError, match="primary key 500; nothing was written"):
                s.commit()
        with Session(engine) as s:
            assert s.get(Book, book_id) is not None
            s.add(Book(title="clash", id=book_id))
            with pytest.raises(IntegrityError, match="nothing was written"):
                s.commit()
        assert dump_keys(redis_client) == before
        with Session(engine) as s:
            s.delete(s.get(Book, book_id))
            s.add(Book(title="replacement", id=book_id))
            s.commit()
        assert redis_client.hget(f"{{mk}}:book:{book_id}", "title") == b"replacement"

    def test_changing_a_stored_primary_key_is_refused(self, engine: Engine) -> None:
        """Assigning a new primary key to a stored object: InvalidRequestError saying to
        delete it and add a new one (not a silent no-op)."""
        # Kills: the primary-key test of unitofwork.changed_fields inverted.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.id = 999
            with pytest.raises(InvalidRequestError, match="cannot be changed"):
                s.flush()

    def test_explicit_id_moves_the_counter_past_it(self, engine: Engine) -> None:
        """After an object is stored under an explicit id, generated ids start after it."""
        # Kills: persistence not sending the SET that moves the id counter up.
        with Session(engine) as s:
            s.add(Book(title="e", id=10))
            s.commit()
            generated = Book(title="g")
            s.add(generated)
            s.commit()
            assert generated.id == 11

    def test_error_inside_exec_leaves_objects_in_doubt(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A key turned to the wrong type after the checks: EXEC reports it, the flushed
        objects are marked in doubt, and the session refuses to flush until rollback."""
        # Kills: persistence not marking the flush's objects in doubt on EXEC errors.
        _, (book_id,) = _shelf(engine, "a")
        index_key = "{mk}:book:#ix:title:b"

        def sabotage(commands: Any) -> None:
            if commands and commands[0] == ("MULTI",):
                redis_client.set(index_key, "not a set")

        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.title = "b"
            engine.add_listener(sabotage)
            try:
                with pytest.raises(FlushError) as info:
                    s.commit()
            finally:
                engine.remove_listener(sabotage)
            assert info.value.key == index_key
            with pytest.raises(InvalidRequestError, match="unknown"):
                s.flush()
            s.rollback()
            assert s.get(Book, book_id) is book

    def test_many_to_one_to_an_object_of_another_session_is_refused(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A many-to-one set to an object attached to another session: the flush raises
        InvalidRequestError naming the field, and writes nothing."""
        # Kills: dependency._set_fk without its "not in this session" raise.
        _, (book_id,) = _shelf(engine, "a")
        other_id, _ = _shelf(engine)
        before = dump_keys(redis_client)
        with Session(engine) as s1, Session(engine) as s2:
            book = s1.get(Book, book_id)
            foreign = s2.get(Shelf, other_id)
            assert book is not None and foreign is not None
            book.shelf = foreign
            with pytest.raises(InvalidRequestError, match="Book.shelf_id"):
                s1.flush()
        assert dump_keys(redis_client) == before

    def test_explicit_primary_key_of_the_wrong_type_sends_nothing(self, engine: Engine) -> None:
        """An explicit primary key of the wrong type is a ValidationError naming it, before
        any command is sent."""
        # Kills: unitofwork without `mapper.validate_pk(pk)` for new objects.
        with Session(engine) as s:
            s.add(Book(title="t", id="seven"))  # type: ignore[arg-type]
            with count_round_trips(engine) as rt, pytest.raises(ValidationError) as info:
                s.flush()
            assert rt.command_names == []
        assert (info.value.model, info.value.field) == ("Book", "id")

    def test_two_flushes_of_one_object_in_one_session(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Flushing the same object twice without reloading: the second flush is checked
        against the version the first one wrote, not reported stale."""
        # Kills: `st.version or 0` -> `st.version and 0` after a flush.
        _, (book_id,) = _shelf(engine, "a")
        with Session(engine) as s:
            book = s.get(Book, book_id)
            assert book is not None
            book.title = "b"
            s.flush()
            book.title = "c"
            s.flush()
            book.title = "d"
            s.commit()
        assert redis_client.hmget(f"{{mk}}:book:{book_id}", ["title", "#v"]) == [b"d", b"4"]

    def test_insert_meeting_a_wrong_typed_foreign_key_zset(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A new child whose parent's list key holds the wrong type: FlushError naming the
        key, before MULTI, nothing written, and the insert still pending."""
        # Kills: persistence without `b.expect_type(fk_key, "zset")` for inserts.
        shelf_id, _ = _shelf(engine)
        fk_key = f"{{mk}}:book:#fk:shelf_id:{shelf_id}"
        redis_client.set(fk_key, "not a zset")
        before = dump_keys(redis_client)
        with Session(engine) as s:
            book = Book(title="t", shelf_id=shelf_id)
            s.add(book)
            with count_round_trips(engine) as rt, pytest.raises(FlushError) as info:
                s.commit()
            assert info.value.key == fk_key
            assert "MULTI" not in rt.command_names
            assert book in s.new
        assert dump_keys(redis_client) == before


class TestQueries:
    def test_equality_with_none_on_an_indexed_field(self, engine: Engine) -> None:
        """`== None` on an indexed field reads the None index entry: the objects without a
        value, and only them."""
        # Kills: query._Compiler._value_segment answering None for a None value.
        with Session(engine) as s:
            members = [Member(name="a"), Member(name="b", nickname="bee"), Member(name="c")]
            s.add_all(members)
            s.commit()
            ids = [m.id for m in members]
        with Session(engine) as s:
            q = select(Member).where(Member.nickname == None)  # noqa: E711
            assert sorted(m.id for m in s.scalars(q)) == [ids[0], ids[2]]
            q = select(Member).where(Member.nickname == "bee")
            assert [m.id for m in s.scalars(q)] == [ids[1]]

    def test_query_skips_dangling_ids_and_pending_deletes(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Ids an index lists without an object, and objects deleted in the session (not
        yet flushed), are left out of a query's result."""
        # Kills: `and` -> `or` in query._objects_for.
        _, (a_id, b_id) = _shelf(engine, "a", "b")
        redis_client.zadd("{mk}:book:#all", {"999": 999})
        with Session(engine) as s, s.no_autoflush:
            assert [b.id for b in s.scalars(select(Book))] == [a_id, b_id]
            s.delete(s.get(Book, a_id))
            assert [b.id for b in s.scalars(select(Book))] == [b_id]

    def test_count_of_an_equality_is_one_scard(self, engine: Engine) -> None:
        """count() of a lone equality on an indexed field is one SCARD."""
        # Kills: the indexed/unique and primary-key tests of _direct_count_command.
        _shelf(engine, "a", "a", "b")
        with Session(engine) as s:
            with count_round_trips(engine) as rt:
                assert s.count(select(Book).where(Book.title == "a")) == 2
            assert rt.command_names == ["SCARD"]

    def test_one_and_one_or_none_refuse_two(self, engine: Engine) -> None:
        """one() and one_or_none() of two objects raise MultipleResultsFound."""
        # Kills: `> 1` -> `> 2` in ScalarResult.one (and one_or_none).
        _shelf(engine, "a", "a")
        with Session(engine) as s:
            with pytest.raises(MultipleResultsFound):
                s.scalars(select(Book).where(Book.title == "a")).one()
            with pytest.raises(MultipleResultsFound):
                s.scalars(select(Book).where(Book.title == "a")).one_or_none()

    def test_query_meeting_a_wrong_typed_index_is_a_query_error(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """An index key of the wrong type: QueryError saying Redis refused the query."""
        # Kills: query without its "Redis refused the query" raises.
        _shelf(engine, "a", "b")
        redis_client.delete("{mk}:book:#ix:title:a")
        redis_client.set("{mk}:book:#ix:title:a", "not a set")
        with Session(engine) as s:
            with pytest.raises(QueryError, match="Redis refused the query"):
                s.scalars(select(Book).where(or_(Book.title == "a", Book.title == "b")))
            with pytest.raises(QueryError, match="Redis refused the query"):
                s.count(select(Book).where(or_(Book.title == "a", Book.title == "b")))
            # The one-command paths: a lone count (SCARD), a lone range (ZRANGE BYSCORE).
            with pytest.raises(QueryError, match="Redis refused the query"):
                s.count(select(Book).where(Book.title == "a"))
        with Session(engine) as s:
            s.add(Track(pos=1))
            s.commit()
        redis_client.delete("{mk}:track:#zs:pos")
        redis_client.set("{mk}:track:#zs:pos", "not a zset")
        with Session(engine) as s:
            with pytest.raises(QueryError, match="Redis refused the query"):
                s.scalars(select(Track).where(Track.pos >= 0))

    def test_count_of_a_range_is_one_zcount(self, engine: Engine) -> None:
        """count() of a lone range condition is one ZCOUNT (no temporary keys)."""
        # Kills: query._direct_count_command not answering for ranges.
        with Session(engine) as s:
            s.add_all(Track(pos=i) for i in range(5))
            s.commit()
        with Session(engine) as s:
            with count_round_trips(engine) as rt:
                assert s.count(select(Track).where(Track.pos >= 2)) == 3
            assert rt.command_names == ["ZCOUNT"]

    def test_order_comparison_with_a_wrong_type_names_the_field(self, engine: Engine) -> None:
        """Comparing a sorted int field with a str: ValidationError naming the field."""
        # Kills: the codec validation removed from query._Compiler._score.
        with Session(engine) as s:
            with pytest.raises(ValidationError) as info:
                s.scalars(select(Track).where(Track.pos < "x"))  # type: ignore[operator]
        assert (info.value.model, info.value.field) == ("Track", "pos")

    def test_in_with_none_on_a_sorted_field(self, engine: Engine) -> None:
        """in_([None, v]) on a sorted field matches the None objects and those equal to v."""
        # Kills: `v is None` negated in the sorted in_() of the query compiler.
        with Session(engine) as s:
            tracks = [Track(pos=i, length=n) for i, n in enumerate([None, 5, 7, None])]
            s.add_all(tracks)
            s.commit()
            ids = [t.id for t in tracks]
        with Session(engine) as s:
            q = select(Track).where(Track.length.in_([None, 5]))
            assert sorted(t.id for t in s.scalars(q)) == [ids[0], ids[1], ids[3]]
            q = select(Track).where(Track.length.in_([7]))
            assert [t.id for t in s.scalars(q)] == [ids[2]]

    def test_plain_bool_condition_is_named(self) -> None:
        """A condition that Python evaluated to a bool (not a mapped comparison) is a
        QueryError that says so."""
        # Kills: the plain-bool branch of the query compiler removed (a vaguer error).
        with Session(create_engine("redis://127.0.0.1:1/0")) as s:
            with pytest.raises(QueryError, match="(?i)compare (mapped )?fields"):
                s.scalars(select(Book).where(True))  # type: ignore[arg-type]

    def test_negative_offset_is_refused(self) -> None:
        """offset(-1) is a QueryError saying what is allowed; offset(None) means 0."""
        # Kills: `n is not None` -> `n is None` in Select.offset.
        with pytest.raises(QueryError, match="offset must be >= 0"):
            select(Book).offset(-1)
        assert select(Book).offset(None)._offset == 0

    def test_get_many_loads_selectin_relationships_with_the_objects(self, engine: Engine) -> None:
        """get_many() of a model with a selectin relationship loads it in the same call:
        reading the lists afterwards costs no round trip."""
        # Kills: the `mapper.relationships` test negated in Session.get_many.
        with Session(engine) as s:
            lists = [Playlist(name=f"p{i}", tracks=[Track(pos=i)]) for i in range(3)]
            s.add_all(lists)
            s.commit()
            ids = [p.id for p in lists]
        with Session(engine) as s:
            got = s.get_many(Playlist, ids)
            with assert_round_trips(engine, 0):
                assert [[t.pos for t in p.tracks] for p in got if p is not None] == [[0], [1], [2]]

    def test_not_equal_inside_or(self, engine: Engine) -> None:
        """`!=` inside an or_ is the id set minus the matches (ZDIFFSTORE of 2 keys)."""
        # Kills: a wrong key count in query._Compiler._negate.
        _, ids = _shelf(engine, "a", "b", "c")
        with Session(engine) as s:
            q = select(Book).where(or_(Book.title != "a", Book.title == "c"))
            assert sorted(b.id for b in s.scalars(q)) == ids[1:]
            q = select(Book).where(or_(Book.title != "b", Book.title != "c"))
            assert sorted(b.id for b in s.scalars(q)) == ids


creg = registry(prefix="mkc", shards=8)


@creg.mapped
@dataclass
class Peer:
    """Sharded by id: two peers usually live under two hash tags."""

    __shard_key__ = "id"
    name: str
    friends: list[Peer] = relationship(secondary="mkc_friends", back_populates="friend_of")
    friend_of: list[Peer] = relationship(secondary="mkc_friends", back_populates="friends")
    id: Annotated[Optional[int], PrimaryKey()] = None


def _cluster_keys(client: Any) -> dict[bytes, Any]:
    """Every key of the cluster but flush tokens (they expire), with its value."""
    names = client.keys(target_nodes=RedisCluster.ALL_NODES)
    return {k: client.dump(k) for k in names if b"#flush:" not in k}


xreg = registry(prefix="mkx", shards=4)


@xreg.mapped
@dataclass
class Hen:
    """Sharded by its egg, whose shard follows its hen: new pairs cannot be placed."""

    __shard_key__ = "egg_id"
    egg_id: Annotated[Optional[int], ForeignKey("Egg")] = None
    egg: Optional[Egg] = relationship()
    id: Annotated[Optional[int], PrimaryKey()] = None


@xreg.mapped
@dataclass
class Egg:
    __shard_key__ = "hen_id"
    hen_id: Annotated[Optional[int], ForeignKey("Hen")] = None
    hen: Optional[Hen] = relationship()
    id: Annotated[Optional[int], PrimaryKey()] = None


@xreg.mapped
@dataclass
class Owner:
    __shard_key__ = "id"
    name: str
    id: Annotated[Optional[int], PrimaryKey()] = None


@xreg.mapped
@dataclass
class Pet:
    __shard_key__ = "owner_id"
    owner_id: Annotated[Optional[int], ForeignKey("Owner")] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


@xreg.mapped
@dataclass
class Post:
    """Sharded by a plain field (not a key of another model)."""

    __shard_key__ = "room"
    room: Annotated[str, Indexed()]
    id: Annotated[Optional[int], PrimaryKey()] = None


class TestShards:
    def test_explicit_id_outside_the_parents_shard_is_refused(self, engine: Engine) -> None:
        """An explicit id that is not in the shard its shard key picks: ValidationError
        naming the id and the shard."""
        # Kills: unitofwork's shard placement without its ValidationError.
        with Session(engine) as s:
            owner = Owner(name="o", id=4)  # shard 0 of 4
            s.add(owner)
            s.commit()
        with Session(engine) as s:
            s.add(Pet(owner_id=4, id=5))  # 5 is in shard 1
            with pytest.raises(ValidationError) as info:
                s.commit()
        assert (info.value.model, info.value.field) == ("Pet", "id")
        assert "shard 0" in info.value.expected

    def test_objects_sharded_by_a_plain_field(self, engine: Engine) -> None:
        """A model sharded by a plain field stores each object in that value's shard; a
        query on the field finds them."""
        # Kills: unitofwork._shard_of answering None for a plain shard-key value.
        with Session(engine) as s:
            posts = [Post(room="a"), Post(room="a"), Post(room="b")]
            s.add_all(posts)
            s.commit()
            tags = [mapper_of(Post).keys_for_pk(p.id).tag for p in posts]  # type: ignore[arg-type]
            assert tags[0] == tags[1]
        with Session(engine) as s:
            got = s.scalars(select(Post).where(Post.room == "a")).all()
            assert sorted(p.id for p in got) == sorted(p.id for p in posts[:2])  # type: ignore[type-var]

    def test_circular_shard_keys_are_refused(self, engine: Engine, redis_client: Any) -> None:
        """Two new objects each sharded by the other: InvalidRequestError naming the
        cycle, before anything is written."""
        # Kills: unitofwork's shard placement returning instead of raising on a cycle.
        with Session(engine) as s:
            hen, egg = Hen(), Egg()
            hen.egg, egg.hen = egg, hen
            s.add_all([hen, egg])
            with pytest.raises(InvalidRequestError, match="circular shard keys"):
                s.commit()
        assert redis_client.keys("{mkx*") == []

    def test_query_over_two_shards_returns_both(self, engine: Engine) -> None:
        """A query whose shard-key condition names two shards reads and merges both."""
        # Kills: `len(spaces) > 1` -> `> 2` in query._ids_in (two shards read as one).
        by_tag: dict[str, int] = {}
        for i in range(8):
            with Session(engine) as s:
                p = Peer(name=f"p{i}")
                s.add(p)
                s.commit()
                by_tag.setdefault(mapper_of(Peer).keys_for_pk(p.id).tag, p.id)  # type: ignore[arg-type]
        assert len(by_tag) >= 3
        a_id, b_id, c_id = sorted(by_tag.values())[:3]
        with Session(engine) as s:
            q = select(Peer).where(Peer.id.in_([a_id, b_id])).order_by(Peer.id)
            assert [p.id for p in s.scalars(q)] == [a_id, b_id]
            q = select(Peer).where(Peer.id.in_([a_id, b_id, c_id])).order_by(Peer.id)
            assert [p.id for p in s.scalars(q)] == [a_id, b_id, c_id]


class TestCrossSlot:
    def test_link_across_hash_tags_is_refused_even_when_cross_slot_is_allowed(
        self, cluster: ClusterProcesses, cluster_client: Any
    ) -> None:
        """allow_cross_slot splits a flush per hash tag, but a many-to-many link between
        two tags cannot be split: CrossSlotError saying nothing was written, and nothing is."""
        # Kills: unitofwork._split_by_registry without its raise for cross-tag links.
        engine = create_engine(cluster.url)
        try:
            by_tag: dict[str, int] = {}
            for i in range(8):  # one flush each: a flush's new objects share a shard
                with Session(engine) as s:
                    p = Peer(name=f"p{i}")
                    s.add(p)
                    s.commit()
                    by_tag.setdefault(mapper_of(Peer).keys_for_pk(p.id).tag, p.id)  # type: ignore[arg-type]
            assert len(by_tag) >= 2
            a_id, b_id = list(by_tag.values())[:2]
            before = _cluster_keys(cluster_client)
            with Session(engine, allow_cross_slot=True) as s:
                b, a = s.get(Peer, b_id), s.get(Peer, a_id)
                assert a is not None and b is not None
                a.friends.append(b)  # (loads the list first: an autoflush before changes)
                b.name = "changed"  # b's tag gets a transaction of its own, run first
                with pytest.raises(CrossSlotError, match="nothing was written"):
                    s.commit()
            assert _cluster_keys(cluster_client) == before
            with Session(engine) as s:
                for peer in s.get_many(Peer, [a_id, b_id]):
                    assert peer is not None and peer.name != "changed" and peer.friends == []
        finally:
            engine.dispose()
