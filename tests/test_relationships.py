"""Tests for relationships: many-to-one, one-to-many, many-to-many, loading and cascades."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Any

import pytest

from redmap import ForeignKey, PrimaryKey, Session, Sorted, registry, relationship, select
from redmap.engine import Engine
from redmap.exc import DetachedInstanceError, InvalidRequestError, StaleDataError
from redmap.testing.assertions import assert_round_trips, count_round_trips, dump_keys

reg = registry(prefix="r")


@reg.mapped
@dataclass
class Room:
    name: str
    messages: list[Message] = relationship(
        back_populates="room", order_by="Message.sent_at", cascade="all, delete-orphan"
    )
    members: list[User] = relationship(secondary="room_members", back_populates="rooms")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Message:
    text: str
    sent_at: Annotated[dt.datetime, Sorted()]
    room_id: Annotated[int | None, ForeignKey("Room")] = None
    room: Room | None = relationship(back_populates="messages")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class User:
    name: str
    rooms: list[Room] = relationship(secondary="room_members", back_populates="members")
    following: list[User] = relationship(secondary="follows", back_populates="followers")
    followers: list[User] = relationship(secondary="follows", back_populates="following")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Comment:
    text: str
    parent_id: Annotated[int | None, ForeignKey("Comment")] = None
    parent: Comment | None = relationship(back_populates="replies")
    replies: list[Comment] = relationship(back_populates="parent")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Author:
    name: str
    books: list[Book] = relationship(back_populates="author", lazy="selectin")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Book:
    title: str
    author_id: Annotated[int | None, ForeignKey("Author")] = None
    author: Author | None = relationship(back_populates="books")
    tags: list[Tag] = relationship(secondary="book_tags", lazy="raise")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    label: str
    id: Annotated[int | None, PrimaryKey()] = None


T0 = dt.datetime(2026, 1, 1, 12, 0)


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def _room_with_messages(engine: Engine, n: int = 3) -> None:
    with Session(engine) as s:
        room = Room(name="general")
        for i in range(n):
            room.messages.append(Message(text=f"m{i}", sent_at=at(n - i)))
        s.add(room)
        s.commit()


class TestInMemory:
    def test_append_sets_back_reference_at_once(self) -> None:
        """Appending to a one-to-many sets the child's many-to-one before any flush."""
        room = Room(name="g")
        m = Message(text="hi", sent_at=T0)
        room.messages.append(m)
        assert m.room is room

    def test_assign_many_to_one_appends_to_loaded_list(self) -> None:
        """Setting the many-to-one side adds the child to the parent's list and moves it."""
        a, b = Room(name="a"), Room(name="b")
        m = Message(text="x", sent_at=T0, room=a)
        assert a.messages == [m]
        m.room = b
        assert a.messages == [] and b.messages == [m]

    def test_many_to_many_both_sides(self) -> None:
        """Adding to one side of a many-to-many adds to the other side's loaded list."""
        r, u = Room(name="r"), User(name="u")
        r.members.append(u)
        assert u.rooms == [r]
        r.members.remove(u)
        assert u.rooms == []

    def test_constructor_arguments_fire_events(self) -> None:
        """Passing related objects to the constructor links both sides."""
        m = Message(text="x", sent_at=T0)
        r = Room(name="r", messages=[m])
        assert m.room is r


class TestPersistence:
    def test_fresh_session_sees_both_sides(self, engine: Engine) -> None:
        """A committed one-to-many and its many-to-one read back the same in a new session."""
        _room_with_messages(engine)
        with Session(engine) as s:
            room = s.get(Room, 1)
            assert room is not None
            assert [m.text for m in room.messages] == ["m2", "m1", "m0"]  # by sent_at
            assert all(m.room is room and m.room_id == 1 for m in room.messages)

    def test_cascade_adds_children_and_fills_foreign_keys(self, engine: Engine) -> None:
        """Adding a parent adds its new children; their foreign keys get its new id."""
        with Session(engine) as s:
            room = Room(name="g")
            room.messages.append(Message(text="hi", sent_at=T0))
            s.add(room)
            assert len(s.new) == 2
            with assert_round_trips(engine, 3):
                s.commit()
            assert room.messages[0].room_id == room.id == 1

    def test_order_by_is_kept_in_redis(self, engine: Engine, redis_client: Any) -> None:
        """The children zset is scored by the order_by field and follows its changes."""
        _room_with_messages(engine)
        with Session(engine) as s:
            room = s.get(Room, 1)
            assert room is not None
            room.messages[0].sent_at = at(100)
            s.commit()
            assert [m.text for m in room.messages] == ["m1", "m0", "m2"]
        assert redis_client.zrange("{r}:message:#fk:room_id:1", 0, -1) == [b"2", b"1", b"3"]

    def test_list_load_is_two_round_trips_whatever_its_size(self, engine: Engine) -> None:
        """A lazy one-to-many loads in 2 round trips for 3 or 300 children."""
        for n in (3, 300):
            _room_with_messages(engine, n)
            with Session(engine) as s:
                room = s.scalars(select(Room).order_by(Room.id.desc())).first()
                assert room is not None
                with assert_round_trips(engine, 2):
                    assert len(room.messages) == n

    def test_reparent_moves_child(self, engine: Engine, redis_client: Any) -> None:
        """Moving a child to another parent updates both parents' zsets."""
        _room_with_messages(engine, 2)
        with Session(engine) as s:
            other = Room(name="other")
            s.add(other)
            room = s.get(Room, 1)
            assert room is not None
            m = room.messages[0]
            m.room = other
            s.commit()
        with Session(engine) as s:
            r1, r2 = s.get(Room, 1), s.get(Room, 2)
            assert r1 is not None and r2 is not None
            assert len(r1.messages) == 1 and [x.text for x in r2.messages] == ["m1"]

    def test_delete_orphan_deletes_removed_child(self, engine: Engine) -> None:
        """Removing a child from a delete-orphan collection deletes it."""
        _room_with_messages(engine, 2)
        with Session(engine) as s:
            room = s.get(Room, 1)
            assert room is not None
            victim = room.messages[0]
            room.messages.remove(victim)
            s.commit()
        with Session(engine) as s:
            assert s.get(Message, victim.id) is None
            assert len(s.get(Room, 1).messages) == 1  # type: ignore[union-attr]

    def test_cascade_delete_removes_children(self, engine: Engine, redis_client: Any) -> None:
        """Deleting a parent with cascade delete deletes its children and their entries."""
        _room_with_messages(engine, 3)
        with Session(engine) as s:
            s.delete(s.get(Room, 1))
            s.commit()
        assert sorted(redis_client.keys("{r}:message:[0-9]*")) == []
        assert redis_client.exists("{r}:message:#fk:room_id:1") == 0

    def test_delete_parent_without_cascade_nulls_children(self, engine: Engine) -> None:
        """Without a delete cascade the children stay, their foreign key set to None."""
        with Session(engine) as s:
            a = Author(name="ann")
            a.books.append(Book(title="b1"))
            s.add(a)
            s.commit()
        with Session(engine) as s:
            s.delete(s.get(Author, 1))
            s.commit()
        with Session(engine) as s:
            b = s.get(Book, 1)
            assert b is not None and b.author_id is None and b.author is None

    def test_self_referential_tree(self, engine: Engine) -> None:
        """A comment tree: replies and parent refer to the same model."""
        with Session(engine) as s:
            root = Comment(text="root")
            root.replies.extend([Comment(text="a"), Comment(text="b")])
            root.replies[0].replies.append(Comment(text="a1"))
            s.add(root)
            s.commit()
        with Session(engine) as s:
            root = s.get(Comment, 1)
            assert root is not None
            assert [c.text for c in root.replies] == ["a", "b"]
            assert root.replies[0].replies[0].parent is root.replies[0]


class TestManyToMany:
    def test_links_written_on_both_sides(self, engine: Engine, redis_client: Any) -> None:
        """A many-to-many link is a member of a zset on each side."""
        with Session(engine) as s:
            r, u = Room(name="r"), User(name="u")
            r.members.append(u)
            s.add(r)
            s.commit()
        assert redis_client.zrange("{r}:room:#rel:members:1", 0, -1) == [b"1"]
        assert redis_client.zrange("{r}:user:#rel:rooms:1", 0, -1) == [b"1"]
        with Session(engine) as s:
            u2 = s.get(User, 1)
            assert u2 is not None and [x.name for x in u2.rooms] == ["r"]

    def test_self_referential_followers(self, engine: Engine) -> None:
        """Following is a self-referential many-to-many with two named sides."""
        with Session(engine) as s:
            a, b, c = User(name="a"), User(name="b"), User(name="c")
            a.following.extend([b, c])
            s.add_all([a, b, c])
            s.commit()
        with Session(engine) as s:
            b2 = s.get(User, 2)
            assert b2 is not None and [u.name for u in b2.followers] == ["a"]
            assert [u.name for u in b2.following] == []

    def test_delete_removes_object_from_every_set(self, engine: Engine, redis_client: Any) -> None:
        """Deleting an object unlinks it from every many-to-many set it is in."""
        with Session(engine) as s:
            u = User(name="u")
            for i in range(3):
                Room(name=f"r{i}").members.append(u)
            s.add(u)
            s.commit()
        with Session(engine) as s:
            s.delete(s.get(User, 1))
            s.commit()
        for i in (1, 2, 3):
            assert redis_client.zcard(f"{{r}}:room:#rel:members:{i}") == 0
        assert redis_client.exists("{r}:user:#rel:rooms:1") == 0

    def test_concurrent_link_changes_are_not_lost(self, engine: Engine) -> None:
        """Two sessions adding different members to one room keep both."""
        with Session(engine) as s:
            s.add_all([Room(name="r"), User(name="a"), User(name="b")])
            s.commit()
        with Session(engine) as s1, Session(engine) as s2:
            r1, r2 = s1.get(Room, 1), s2.get(Room, 1)
            assert r1 is not None and r2 is not None
            r1.members.append(s1.get(User, 1))
            r2.members.append(s2.get(User, 2))
            s1.commit()
            s2.commit()
        with Session(engine) as s:
            assert sorted(u.name for u in s.get(Room, 1).members) == ["a", "b"]  # type: ignore[union-attr]

    def test_lazy_raise(self, engine: Engine) -> None:
        """lazy='raise' refuses to load on access."""
        with Session(engine) as s:
            s.add(Book(title="t"))
            s.commit()
            b = s.get(Book, 1)
            assert b is not None
            with pytest.raises(InvalidRequestError, match="raise"):
                _ = b.tags


class TestLoading:
    def test_selectin_is_constant_round_trips(self, engine: Engine) -> None:
        """selectin loads the children of N parents in the same round trips for any N."""
        counts = []
        for parents in (2, 20):
            with Session(engine) as s:
                for i in range(parents):
                    a = Author(name=f"p{parents}-{i}")
                    a.books.extend([Book(title=f"b{j}") for j in range(3)])
                    s.add(a)
                s.commit()
            with Session(engine) as s, count_round_trips(engine) as rt:
                authors = s.scalars(select(Author)).all()
                total = sum(len(a.books) for a in authors)
            counts.append(rt.round_trips)
            assert total == 3 * len(authors)
        assert counts[0] == counts[1] == 4

    def test_detached_unloaded_relationship_raises(self, engine: Engine) -> None:
        """After close, an unloaded relationship raises; a loaded one stays readable."""
        _room_with_messages(engine, 1)
        s = Session(engine)
        room = s.get(Room, 1)
        assert room is not None
        loaded = list(room.messages)
        s.close()
        assert room.messages == loaded
        s2 = Session(engine)
        m = s2.get(Message, 1)
        s2.close()
        assert m is not None
        with pytest.raises(DetachedInstanceError):
            _ = m.room

    def test_stale_flush_leaves_relationship_keys_unchanged(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A StaleDataError in a flush that also changed relationships writes nothing."""
        _room_with_messages(engine, 2)
        with Session(engine) as s:
            s.add(User(name="u"))
            s.commit()
        with Session(engine) as s:
            room = s.get(Room, 1)
            user = s.get(User, 1)
            assert room is not None and user is not None
            room.members.append(user)
            room.messages.append(Message(text="new", sent_at=at(50)))
            room.name = "renamed"
            with Session(engine) as other:
                o = other.get(Room, 1)
                assert o is not None
                o.name = "theirs"
                other.commit()
            before = dump_keys(redis_client)
            with pytest.raises(StaleDataError):
                s.commit()
            assert dump_keys(redis_client) == before


def test_concurrent_children_of_one_parent_are_all_kept(engine: Engine) -> None:
    """Two sessions adding children to the same parent both keep theirs."""
    _room_with_messages(engine, 1)
    with Session(engine) as s1, Session(engine) as s2:
        r1, r2 = s1.get(Room, 1), s2.get(Room, 1)
        assert r1 is not None and r2 is not None
        r1.messages.append(Message(text="from s1", sent_at=at(10)))
        r2.messages.append(Message(text="from s2", sent_at=at(20)))
        s1.commit()
        s2.commit()
    with Session(engine) as s:
        room = s.get(Room, 1)
        assert room is not None
        assert [m.text for m in room.messages] == ["m0", "from s1", "from s2"]
