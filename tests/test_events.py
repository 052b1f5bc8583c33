"""Tests for `redmap.event`: mapper, session and attribute events against a real server.

Tests marked with the `driver` fixture run twice, the `Session` driven by the sync
driver and then by the asyncio one; the `AsyncSession` wrapper has tests of its own
(`TestAsyncSession`), run with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    event,
    inspect,
    registry,
    relationship,
    sessionmaker,
)
from redmap.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from redmap.engine import Engine
from redmap.exc import InvalidRequestError, StaleDataError
from redmap.orm import events as orm_events
from redmap.testing.assertions import assert_round_trips, count_round_trips


def _flush_round_trips(engine: Engine, classic: int) -> int:
    """Round trips of a flush that checks before MULTI (`classic`), or one fewer when
    the engine scripts every flush (the driver fixture's "script": checks and writes in
    one round trip, issue 14)."""
    return classic - 1 if engine.flush_script_threshold == 0 else classic

reg = registry(prefix="ev")


class Stamped:
    """An unmapped mixin: listeners on it with propagate=True reach the models below."""

    stamp: str | None


@reg.mapped
@dataclass
class Team(Stamped):
    name: Annotated[str, Indexed()]
    stamp: str | None = None
    players: list[Player] = relationship(back_populates="team", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Player(Stamped):
    name: str
    score: int = 0
    stamp: str | None = None
    team_id: Annotated[int | None, ForeignKey("Team")] = None
    team: Team | None = relationship(back_populates="players")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Note:
    text: str
    id: Annotated[int | None, PrimaryKey()] = None


Listen = Callable[..., None]


@pytest.fixture
def listen() -> Iterator[Listen]:
    """`listen(target, name, fn, **kw)`: register a listener, removed after the test."""
    added: list[tuple[Any, str, Callable[..., Any]]] = []

    def add(target: Any, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        event.listen(target, name, fn, **kw)
        added.append((target, name, fn))

    yield add
    for target, name, fn in added:
        if event.contains(target, name, fn):
            event.remove(target, name, fn)
    assert not orm_events.mapper_events_enabled()


def _label(obj: Any) -> str:
    return f"{type(obj).__name__}:{obj.name}"


def _record_all(listen: Listen, log: list[tuple[str, str]]) -> None:
    """Record every mapper event of Team and Player and every session event in `log`."""
    for cls in (Team, Player):
        for name in sorted(orm_events.MAPPER_EVENTS):

            def on(obj: Any, name: str = name) -> None:
                log.append((name, _label(obj)))

            listen(cls, name, on)
    for name in sorted(orm_events.SESSION_EVENTS):

        def on_session(session: Any, name: str = name) -> None:
            log.append((name, "session"))

        listen(Session, name, on_session)


def _setup_teams(s: Session) -> None:
    a = Team(name="A")
    a.players.extend([Player(name="a1"), Player(name="a2")])
    b = Team(name="B")
    b.players.append(Player(name="b1"))
    s.add_all([a, b])
    s.commit()


# The order of a flush with inserts (a new child added before its new parent),
# updates (a child changed before its parent) and deletes (a parent whose children
# the cascade deletes): parents first for saves, children first for deletes.
EXPECTED_ORDER = [
    ("before_commit", "session"),
    ("before_flush", "session"),
    ("before_insert", "Team:C"),
    ("before_insert", "Player:c1"),
    ("before_update", "Team:B"),
    ("before_update", "Player:b1"),
    ("before_delete", "Player:a1"),
    ("before_delete", "Player:a2"),
    ("before_delete", "Team:A"),
    ("after_insert", "Team:C"),
    ("after_insert", "Player:c1"),
    ("after_update", "Team:B"),
    ("after_update", "Player:b1"),
    ("after_delete", "Player:a1"),
    ("after_delete", "Player:a2"),
    ("after_delete", "Team:A"),
    ("after_flush", "session"),
    ("after_commit", "session"),
]


@pytest.mark.usefixtures("driver")
class TestMapperEvents:
    def test_order_of_events_in_a_flush(self, engine: Engine, listen: Listen) -> None:
        """Inserts, updates and deletes of related objects: each event once per object,
        in flush order, between the session's before and after events."""
        with Session(engine) as s:
            _setup_teams(s)
            log: list[tuple[str, str]] = []
            _record_all(listen, log)
            a = _team(s, "A")
            b = _team(s, "B")
            b1 = b.players[0]
            c1 = Player(name="c1")
            s.add(c1)
            c1.team = Team(name="C")  # the new parent joins the session after its child
            b1.score = 5
            b.name = "B"  # same value: not an update
            b.stamp = "changed"
            s.delete(a)
            s.commit()
            assert log == EXPECTED_ORDER

    def test_after_insert_sees_the_stored_object(self, engine: Engine, listen: Listen) -> None:
        """after_insert runs once the flush was applied: the object is persistent, with
        its generated id and its parent's id in its foreign key."""
        seen: list[tuple[bool, int | None, int | None]] = []

        def after(p: Player) -> None:
            seen.append((inspect(p).persistent, p.id, p.team_id))

        listen(Player, "after_insert", after)
        with Session(engine) as s:
            t = Team(name="T")
            t.players.append(Player(name="p"))
            s.add(t)
            s.commit()
            assert seen == [(True, t.players[0].id, t.id)]
            assert t.id is not None

    def test_before_listener_changes_go_into_the_same_flush(
        self, engine: Engine, listen: Listen, redis_client: redis.Redis
    ) -> None:
        """A field set by before_insert or before_update is written by the flush that
        called it, in the same round trips, and leaves nothing pending."""

        def stamp(obj: Any) -> None:
            obj.stamp = f"stamped {obj.name}"

        listen(Player, "before_insert", stamp)
        listen(Player, "before_update", stamp)
        with Session(engine, expire_on_commit=False) as s:
            p = Player(name="p")
            s.add(p)
            with assert_round_trips(engine, _flush_round_trips(engine, 3)):
                s.commit()
            key = inspect(p).redis_key
            assert key is not None
            assert redis_client.hget(key, "stamp") == b"stamped p"
            p.name = "q"
            with assert_round_trips(engine, _flush_round_trips(engine, 2)):
                s.commit()
            assert redis_client.hget(key, "stamp") == b"stamped q"
            assert redis_client.hget(key, "#v") == b"2"
            assert not s.dirty and not inspect(p).modified

    def test_raising_before_insert_writes_nothing(
        self, engine: Engine, listen: Listen, redis_client: redis.Redis
    ) -> None:
        """An exception in before_insert ends the flush before anything is sent: Redis
        holds nothing, the objects stay pending, and once the listener is removed the
        same session commits them."""

        class Refused(Exception):
            pass

        def refuse(p: Player) -> None:
            raise Refused(p.name)

        event.listen(Player, "before_insert", refuse)
        try:
            with Session(engine) as s:
                t = Team(name="T")
                t.players.extend([Player(name="p1"), Player(name="p2")])
                s.add(t)
                with count_round_trips(engine) as rt, pytest.raises(Refused):
                    s.commit()
                assert rt.round_trips == 0
                assert redis_client.keys("*") == []
                assert len(s.new) == 3 and all(o in s.new for o in (t, *t.players))
                assert all(inspect(o).pending for o in (t, *t.players))
                event.remove(Player, "before_insert", refuse)
                s.commit()
                assert all(inspect(o).persistent for o in (t, *t.players))
                assert t.id is not None
                assert [p.team_id for p in t.players] == [t.id, t.id]
        finally:
            if event.contains(Player, "before_insert", refuse):
                event.remove(Player, "before_insert", refuse)
        with Session(engine) as s:
            got = _team(s, "T")
            assert sorted(p.name for p in got.players) == ["p1", "p2"]

    def test_raising_before_update_keeps_the_pending_change(
        self, engine: Engine, listen: Listen, redis_client: redis.Redis
    ) -> None:
        """A raising before_update: the stored object is unchanged, the session still
        holds the change (and the orphan cascade it planned is put back)."""
        calls: list[str] = []

        def refuse(t: Team) -> None:
            calls.append(t.name)
            raise ValueError("no")

        with Session(engine) as s:
            _setup_teams(s)
            b = _team(s, "B")
            key = inspect(b).redis_key
            assert key is not None
            before = redis_client.hgetall(key)
            listen(Team, "before_update", refuse)
            b.name = "B2"
            with pytest.raises(ValueError):
                s.commit()
            assert calls == ["B2"]
            assert redis_client.hgetall(key) == before
            assert b in s.dirty
            assert inspect(b).attrs["name"].history.added == ["B2"]

    def test_after_events_not_called_for_a_refused_flush(
        self, engine: Engine, listen: Listen
    ) -> None:
        """A flush refused with StaleDataError calls the before_ listeners, then none of
        the after_ ones (mapper or session)."""
        log: list[tuple[str, str]] = []
        with Session(engine) as s:
            s.add(Player(name="p"))
            s.commit()
        _record_all(listen, log)
        with Session(engine) as s1, Session(engine) as s2:
            p1 = s1.get(Player, 1)
            p2 = s2.get(Player, 1)
            assert p1 is not None and p2 is not None
            p2.score = 2
            s2.commit()
            log.clear()
            p1.score = 1
            with pytest.raises(StaleDataError):
                s1.commit()
            assert log == [
                ("before_commit", "session"),
                ("before_flush", "session"),
                ("before_update", "Player:p"),
            ]

    def test_propagate_reaches_mapped_subclasses(self, engine: Engine, listen: Listen) -> None:
        """A listener on an unmapped base with propagate=True runs for every mapped class
        deriving from it; without propagate the base is refused."""
        seen: list[str] = []

        def on(obj: Stamped) -> None:
            obj.stamp = "mixin"
            seen.append(type(obj).__name__)

        with pytest.raises(InvalidRequestError, match="not a mapped class"):
            event.listen(Stamped, "before_insert", on)
        listen(Stamped, "before_insert", on, propagate=True)
        with Session(engine, expire_on_commit=False) as s:
            t = Team(name="T", players=[Player(name="p")])
            s.add(t)
            s.add(Note(text="not stamped"))
            s.commit()
            assert seen == ["Team", "Player"]
            assert t.stamp == t.players[0].stamp == "mixin"

    def test_no_listener_no_lookup(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        """With no listener registered, a flush never asks for listeners (its cost is one
        test of an empty table per flush)."""

        def forbidden(*args: Any) -> Any:
            raise AssertionError("listeners looked up with none registered")

        monkeypatch.setattr(orm_events, "mapper_listeners", forbidden)
        monkeypatch.setattr(orm_events, "session_listeners", forbidden)
        with Session(engine) as s:
            t = Team(name="T", players=[Player(name="p")])
            s.add(t)
            s.commit()
            t.name = "U"
            s.delete(t.players[0])
            s.commit()
            s.rollback()


def _team(s: Session, name: str) -> Team:
    from redmap import select

    return s.scalars(select(Team).where(Team.name == name)).one()


@pytest.mark.usefixtures("driver")
class TestSessionEvents:
    def test_commit_and_rollback_events(self, engine: Engine, listen: Listen) -> None:
        """commit fires before_commit, before_flush, after_flush, after_commit; a
        commit with nothing to write skips the flush events; rollback fires
        after_rollback (also through `begin()` on an error)."""
        log: list[tuple[str, str]] = []
        _record_all(listen, log)
        with Session(engine) as s:
            s.commit()
            assert log == [("before_commit", "session"), ("after_commit", "session")]
            log.clear()
            s.add(Note(text="n"))
            s.flush()
            assert log == [("before_flush", "session"), ("after_flush", "session")]
            log.clear()
            s.rollback()
            assert log == [("after_rollback", "session")]
            log.clear()
            with pytest.raises(KeyError), s.begin():
                raise KeyError("x")
            assert log == [("after_rollback", "session")]

    def test_listener_receives_the_session(self, engine: Engine, listen: Listen) -> None:
        """Session listeners get the Session; `inspect(obj).session` is the same one."""
        got: list[Any] = []
        listen(Session, "after_commit", got.append)
        with Session(engine) as s:
            n = Note(text="n")
            s.add(n)
            s.commit()
            assert got == [s]
            assert inspect(n).session is s

    def test_before_flush_can_add_objects(self, engine: Engine, listen: Listen) -> None:
        """An object added by before_flush is written by the same flush."""

        def audit(session: Session) -> None:
            session.add(Note(text=f"{len(session.new)} new"))

        listen(Session, "before_flush", audit)
        with Session(engine, expire_on_commit=False) as s:
            p = Player(name="p")
            s.add(p)
            with assert_round_trips(engine, _flush_round_trips(engine, 3)):
                s.commit()
            note = s.get(Note, 1)
            assert note is not None and note.text == "1 new"
            assert not s.new

    def test_raising_before_flush_writes_nothing(
        self, engine: Engine, listen: Listen, redis_client: redis.Redis
    ) -> None:
        """An exception in before_flush ends the flush with nothing sent."""

        def refuse(session: Session) -> None:
            raise RuntimeError("closed")

        listen(Session, "before_flush", refuse)
        with Session(engine) as s:
            n = Note(text="n")
            s.add(n)
            with count_round_trips(engine) as rt, pytest.raises(RuntimeError):
                s.commit()
            assert rt.round_trips == 0
            assert redis_client.keys("*") == []
            assert inspect(n).pending
            event.remove(Session, "before_flush", refuse)
            s.commit()
            assert inspect(n).persistent

    def test_sessionmaker_and_instance_targets(self, engine: Engine, listen: Listen) -> None:
        """Listeners on a sessionmaker apply to the sessions it makes, those on a
        session to that session only."""
        maker = sessionmaker(engine)
        other = sessionmaker(engine)
        log: list[str] = []
        listen(maker, "after_commit", lambda s: log.append("maker"))
        with maker() as s1, other() as s2, Session(engine) as s3:
            listen(s3, "after_commit", lambda s: log.append("s3"))
            s1.commit()
            s2.commit()
            s3.commit()
        assert log == ["maker", "s3"]
        with maker.begin():
            pass
        assert log == ["maker", "s3", "maker"]


class TestAttributeEvents:
    def test_set_event_arguments(self, engine: Engine, listen: Listen) -> None:
        """`set` gets (target, value, oldvalue, initiator): NO_VALUE as the old value in
        the constructor, the previous value afterwards; loading does not fire it."""
        calls: list[tuple[Any, Any, Any, Any]] = []

        def on_set(target: Any, value: Any, old: Any, initiator: Any) -> None:
            calls.append((target, value, old, initiator.key))

        listen(Note.text, "set", on_set)
        n = Note(text="a")
        assert calls == [(n, "a", event.NO_VALUE, "text")]
        n.text = "b"
        assert calls[-1] == (n, "b", "a", "text")
        with Session(engine) as s:
            s.add(n)
            s.commit()
            calls.clear()
            assert s.get(Note, n.id) is n
            assert n.text == "b"  # loaded after the commit expired it
            s.expunge_all()
            again = s.get(Note, n.id)
            assert again is not None and again.text == "b"
        assert calls == []

    def test_retval_replaces_the_value(self, engine: Engine, listen: Listen) -> None:
        """With retval=True the listener's return value is stored, in the constructor
        too; listeners run in registration order, `insert=True` first."""

        def upper(target: Any, value: str, old: Any, initiator: Any) -> str:
            return value.upper()

        def exclaim(target: Any, value: str, old: Any, initiator: Any) -> str:
            return value + "!"

        listen(Note.text, "set", upper, retval=True)
        listen(Note.text, "set", exclaim, retval=True, insert=True)
        n = Note(text="hi")
        assert n.text == "HI!"
        with Session(engine) as s:
            s.add(n)
            s.commit()
            got = s.get(Note, n.id)
            assert got is not None and got.text == "HI!"

    def test_raising_listener_leaves_the_value(self, listen: Listen) -> None:
        """An exception in a set listener propagates; the attribute keeps its value."""

        def refuse(target: Any, value: Any, old: Any, initiator: Any) -> None:
            if value == "bad":
                raise ValueError(value)

        listen(Note.text, "set", refuse)
        n = Note(text="good")
        with pytest.raises(ValueError):
            n.text = "bad"
        assert n.text == "good"

    def test_many_to_one_set_and_no_event_for_the_foreign_key_sync(
        self, engine: Engine, listen: Listen
    ) -> None:
        """Assigning a many-to-one fires its set event; the foreign key redmap keeps in
        step fires none (the ORM's own assignment, as in SQLAlchemy)."""
        calls: list[tuple[str, Any]] = []
        listen(Player.team, "set", lambda t, v, o, i: calls.append(("team", v)))
        listen(Player.team_id, "set", lambda t, v, o, i: calls.append(("team_id", v)))
        with Session(engine) as s:
            t = Team(name="T")
            s.add(t)
            s.commit()
            p = Player(name="p")
            calls.clear()
            p.team = t
            assert calls == [("team", t)]
            assert p.team_id == t.id

    def test_once_and_contains(self, listen: Listen) -> None:
        """`once=True` runs a listener for the first event only; `contains` and
        `remove` find it by the function given."""
        calls: list[Any] = []

        def on(target: Any, value: Any, old: Any, initiator: Any) -> None:
            calls.append(value)

        listen(Note.text, "set", on, once=True)
        assert event.contains(Note.text, "set", on)
        Note(text="a")
        Note(text="b")
        assert calls == ["a"]
        event.remove(Note.text, "set", on)
        assert not event.contains(Note.text, "set", on)
        assert Note.text.hooks is None  # type: ignore[attr-defined]


class TestRegistration:
    def test_listens_for_returns_the_function(self) -> None:
        """The decorator registers and hands back the function unchanged."""

        def on(obj: Any) -> None:
            pass

        try:
            assert event.listens_for(Note, "before_insert")(on) is on
            assert event.contains(Note, "before_insert", on)
        finally:
            event.remove(Note, "before_insert", on)
        assert not event.contains(Note, "before_insert", on)

    def test_unknown_events_and_targets_are_refused(self) -> None:
        """Each target accepts its own events; anything else is InvalidRequestError."""

        def on(*args: Any) -> None:
            pass

        with pytest.raises(InvalidRequestError, match="no such event 'before_flush'"):
            event.listen(Note, "before_flush", on)
        with pytest.raises(InvalidRequestError, match="no such event 'before_insert'"):
            event.listen(Session, "before_insert", on)
        with pytest.raises(InvalidRequestError, match="no such event 'append'"):
            event.listen(Note.text, "append", on)
        with pytest.raises(InvalidRequestError, match="has no events"):
            event.listen(object(), "set", on)
        with pytest.raises(InvalidRequestError, match="retval"):
            event.listen(Note, "before_insert", on, retval=True)
        with pytest.raises(InvalidRequestError, match="no listener"):
            event.remove(Note, "before_insert", on)


class TestAsyncSession:
    def test_order_of_events_in_a_flush(self, redis_url: str, clean_redis: None) -> None:
        """The same flush as in TestMapperEvents, through an AsyncSession: the same
        events in the same order (the listeners on Session get its sync_session)."""
        log: list[tuple[str, str]] = []
        added: list[tuple[Any, str, Any]] = []

        def listen(target: Any, name: str, fn: Any, **kw: Any) -> None:
            event.listen(target, name, fn, **kw)
            added.append((target, name, fn))

        async def main() -> None:
            engine = create_async_engine(redis_url)
            try:
                async with AsyncSession(engine) as s:
                    a = Team(name="A", players=[Player(name="a1"), Player(name="a2")])
                    b = Team(name="B", players=[Player(name="b1")])
                    s.add_all([a, b])
                    await s.commit()
                    _record_all(listen, log)
                    b1 = b.players[0]
                    c1 = Player(name="c1")
                    s.add(c1)
                    c1.team = Team(name="C")
                    b1.score = 5
                    b.stamp = "changed"
                    await s.delete(a)
                    await s.commit()
            finally:
                await engine.dispose()

        try:
            asyncio.run(main())
        finally:
            for target, name, fn in added:
                event.remove(target, name, fn)
        assert log == EXPECTED_ORDER

    def test_raising_before_insert_writes_nothing(
        self, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """A raising before_insert under an AsyncSession: nothing written, the object
        still pending, committed once the listener is gone."""

        def refuse(n: Note) -> None:
            raise LookupError(n.text)

        async def main() -> None:
            engine = create_async_engine(redis_url)
            try:
                async with AsyncSession(engine) as s:
                    n = Note(text="n")
                    s.add(n)
                    event.listen(Note, "before_insert", refuse)
                    try:
                        with pytest.raises(LookupError):
                            await s.commit()
                    finally:
                        event.remove(Note, "before_insert", refuse)
                    assert redis_client.keys("*") == []
                    assert inspect(n).pending and n in s.new
                    await s.commit()
                    assert inspect(n).persistent
            finally:
                await engine.dispose()

        asyncio.run(main())
        assert redis_client.hget("{ev}:note:1", "text") == b"n"

    def test_stale_flush_calls_no_after_event(
        self, redis_url: str, clean_redis: None, listen: Listen
    ) -> None:
        """Under an AsyncSession too, a StaleDataError flush calls no after_ listener."""
        log: list[str] = []
        listen(Note, "before_update", lambda n: log.append("before_update"))
        listen(Note, "after_update", lambda n: log.append("after_update"))
        listen(Session, "after_commit", lambda s: log.append("after_commit"))

        async def main() -> None:
            engine = create_async_engine(redis_url)
            try:
                async with AsyncSession(engine) as s:
                    s.add(Note(text="n"))
                    await s.commit()
                async with AsyncSession(engine) as s1, AsyncSession(engine) as s2:
                    n1 = await s1.get(Note, 1)
                    n2 = await s2.get(Note, 1)
                    assert n1 is not None and n2 is not None
                    n2.text = "two"
                    await s2.commit()
                    log.clear()
                    n1.text = "one"
                    with pytest.raises(StaleDataError):
                        await s1.commit()
            finally:
                await engine.dispose()

        asyncio.run(main())
        assert log == ["before_update"]

    def test_asyncsession_targets(self, redis_url: str, clean_redis: None, listen: Listen) -> None:
        """Session events can be registered on AsyncSession, on an AsyncSession and on
        an async_sessionmaker; the listeners receive the sync_session."""
        got: list[tuple[str, Any]] = []
        listen(AsyncSession, "after_commit", lambda s: got.append(("class", s)))
        listen(Session, "after_rollback", lambda s: got.append(("rollback", s)))

        async def main() -> None:
            engine = create_async_engine(redis_url)
            try:
                factory = async_sessionmaker(engine)
                listen(factory, "before_commit", lambda s: got.append(("factory", s)))
                async with factory() as s:
                    listen(s, "after_flush", lambda ss: got.append(("instance", ss)))
                    s.add(Note(text="n"))
                    await s.commit()
                    await s.rollback()
                    sync = s.sync_session
                async with AsyncSession(engine) as other:
                    await other.commit()
                    other_sync = other.sync_session
            finally:
                await engine.dispose()
            assert got == [
                ("factory", sync),
                ("instance", sync),
                ("class", sync),
                ("rollback", sync),
                ("class", other_sync),
            ]

        asyncio.run(main())
