"""Tests for `redmap.orm.session`: identity map, dirty tracking, lifecycle and the flush."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import uuid
from decimal import Decimal
from typing import Any

import pytest
import redis

from redmap import Session, create_engine, run_in_transaction, select, sessionmaker
from redmap.engine import Engine
from redmap.exc import (
    DecodeError,
    DetachedInstanceError,
    FlushError,
    IntegrityError,
    InvalidRequestError,
    StaleDataError,
    ValidationError,
)
from redmap.orm.attributes import state_of
from redmap.orm.base import ObjectStatus
from redmap.testing.assertions import assert_round_trips, count_round_trips, dump_keys
from tests._fixtures import Author, Color, Counter, Doc, Everything, Point, Token


class TestAddAndCommit:
    def test_commit_assigns_generated_ids(self, engine: Engine) -> None:
        """A new object without a primary key gets the next counter value at flush."""
        with Session(engine) as s:
            a, b = Author(name="ann", email="a@x"), Author(name="bob", email="b@x")
            s.add_all([a, b])
            assert a.id is None
            s.commit()
            assert (a.id, b.id) == (1, 2)

    @pytest.mark.parametrize("n", [1, 10, 300])
    def test_commit_of_n_inserts_is_three_round_trips(self, engine: Engine, n: int) -> None:
        """WATCH+checks, INCRBY for the ids, MULTI/EXEC: three round trips whatever N;
        past 64 objects INCRBY and the flush script (WATCH token, MULTI, EVAL, EXEC)."""
        with Session(engine) as s:
            s.add_all([Author(name=f"n{i}", email=f"{i}@x", age=i) for i in range(n)])
            with assert_round_trips(engine, 3 if n <= 64 else 2):
                s.commit()

    def test_commit_with_explicit_keys_is_two_round_trips(self, engine: Engine) -> None:
        """Inserts whose primary keys are given need no counter round trip."""
        with Session(engine) as s:
            s.add_all([Doc(slug=f"d{i}", body="x") for i in range(50)])
            with assert_round_trips(engine, 2):
                s.commit()

    def test_commit_of_n_updates_is_two_round_trips(self, engine: Engine) -> None:
        """Updating N loaded objects costs WATCH+checks and MULTI/EXEC, whatever N; past
        64 objects, one round trip (the flush script)."""
        for n, trips in ((60, 2), (100, 1)):
            with Session(engine) as s:
                s.add_all([Counter() for _ in range(n)])
                s.commit()
                ids = [c.id for c in s.scalars(select(Counter))][-n:]
            with Session(engine) as s:
                objs = s.get_many(Counter, ids)
                for c in objs:
                    assert c is not None
                    c.value += 1
                with assert_round_trips(engine, trips):
                    s.commit()

    def test_unchanged_session_sends_nothing(self, engine: Engine) -> None:
        """A flush with nothing changed sends no command at all."""
        with Session(engine) as s:
            s.add(Counter(value=3))
            s.commit()
        with Session(engine) as s:
            c = s.get(Counter, 1)
            assert c is not None
            c.value = 3  # same value: not a change
            with assert_round_trips(engine, 0):
                s.commit()

    def test_only_changed_fields_are_written(self, engine: Engine) -> None:
        """An update writes the changed field and the version, nothing else."""
        with Session(engine) as s:
            s.add(Author(name="ann", email="a@x", age=3, bio="hi"))
            s.commit()
        with Session(engine) as s:
            a = s.get(Author, 1)
            assert a is not None
            a.bio = "new"
            with count_round_trips(engine) as rt:
                s.commit()
            writes = [c for c in rt.commands if c[0] in ("HSET", "HDEL", "HINCRBY")]
            assert writes == [("HSET", "{t}:author:1", "bio", b"new", "#v", b"2")]

    def test_setting_none_removes_the_field(self, engine: Engine, redis_client: Any) -> None:
        """None is stored as an absent hash field, distinct from an empty string."""
        with Session(engine) as s:
            s.add(Author(name="ann", email="a@x", bio=""))
            s.commit()
            assert redis_client.hget("{t}:author:1", "bio") == b""
            a = s.get(Author, 1)
            assert a is not None
            a.bio = None
            s.commit()
        assert redis_client.hexists("{t}:author:1", "bio") is False
        with Session(engine) as s:
            a = s.get(Author, 1)
            assert a is not None and a.bio is None


class TestIdentityMap:
    def test_get_twice_is_same_object_and_no_command(self, engine: Engine) -> None:
        """The second get of a loaded object returns it without a round trip."""
        with Session(engine) as s:
            s.add(Author(name="ann", email="a@x"))
            s.commit()
        with Session(engine) as s:
            a = s.get(Author, 1)
            with assert_round_trips(engine, 0):
                assert s.get(Author, 1) is a

    def test_get_many_is_one_round_trip_in_order(self, engine: Engine) -> None:
        """get_many returns objects in the order asked, None for missing keys."""
        with Session(engine) as s:
            s.add_all([Counter(value=i) for i in range(5)])
            s.commit()
        with Session(engine) as s, assert_round_trips(engine, 1):
            got = s.get_many(Counter, [3, 99, 1])
        assert [c.value if c else None for c in got] == [2, None, 0]

    def test_get_missing_returns_none(self, engine: Engine) -> None:
        """get of an absent key is None."""
        with Session(engine) as s:
            assert s.get(Author, 42) is None

    def test_get_wrong_pk_type_is_validation_error(self, engine: Engine) -> None:
        """A primary key of the wrong type is refused before any key is built."""
        with Session(engine) as s, pytest.raises(ValidationError) as err:
            s.get(Author, "1")
        assert err.value.model == "Author" and err.value.field == "id"


class TestDirtyTracking:
    def test_in_place_list_and_dict_mutation_is_a_change(self, engine: Engine) -> None:
        """Appending to a list field or setting a dict key marks the object dirty."""
        with Session(engine) as s:
            s.add(Everything())
            s.commit()
        with Session(engine) as s:
            e = s.get(Everything, 1)
            assert e is not None
            assert not s.is_modified(e)
            e.items.append(7)
            e.meta["k"] = [1, 2]
            assert s.is_modified(e) and e in s.dirty
            s.commit()
        with Session(engine) as s:
            e = s.get(Everything, 1)
            assert e is not None and e.items == [7] and e.meta == {"k": [1, 2]}

    def test_nested_dataclass_mutation_is_a_change(self, engine: Engine) -> None:
        """Changing a field of a nested dataclass in place is written at commit."""
        with Session(engine) as s:
            s.add(Everything(point=Point(1, 2)))
            s.commit()
        with Session(engine) as s:
            e = s.get(Everything, 1)
            assert e is not None and e.point is not None
            e.point.x = 10
            s.commit()
        with Session(engine) as s:
            e = s.get(Everything, 1)
            assert e is not None and e.point == Point(10, 2)

    def test_new_dirty_deleted_views(self, engine: Engine) -> None:
        """new, dirty and deleted list the objects in each pending state, by identity."""
        with Session(engine) as s:
            a, b = Author(name="a", email="a@x"), Author(name="b", email="b@x")
            s.add_all([a, b])
            assert a in s.new and len(s.new) == 2
            s.commit()
            a.age = 5
            s.delete(b)
            assert a in s.dirty and b not in s.dirty
            assert b in s.deleted
            assert Author(name="a", email="a@x", age=5, id=1) not in s.dirty  # equal, not same


class TestLifecycle:
    def test_expire_on_commit_reloads_on_access(self, engine: Engine) -> None:
        """After commit, attributes reload from Redis on next access."""
        with Session(engine) as s:
            c = Counter(value=1)
            s.add(c)
            s.commit()
            with redis.Redis.from_url(engine.dialect.url) as raw:
                raw.hset("{t}:counter:1", "value", b"41")
            with assert_round_trips(engine, 1):
                assert c.value == 41

    def test_expire_on_commit_off_keeps_values(self, engine: Engine) -> None:
        """With expire_on_commit=False values stay loaded after commit."""
        factory = sessionmaker(engine, expire_on_commit=False)
        with factory() as s:
            c = Counter(value=1)
            s.add(c)
            s.commit()
            with assert_round_trips(engine, 0):
                assert c.value == 1

    def test_refresh_discards_pending_change(self, engine: Engine) -> None:
        """refresh reloads every attribute and forgets unflushed changes."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            s.commit()
            c = s.get(Counter, 1)
            assert c is not None
            c.value = 9
            s.refresh(c)
            assert c.value == 1 and not s.is_modified(c)

    def test_expire_single_attribute(self, engine: Engine) -> None:
        """expire(obj, [name]) reloads only that attribute."""
        with Session(engine, expire_on_commit=False) as s:
            s.add(Author(name="ann", email="a@x", age=1))
            s.commit()
            a = s.get(Author, 1)
            assert a is not None
            a.age = 99
            s.expire(a, ["age"])
            assert a.age == 1

    def test_rollback_expunges_new_and_expires_rest(self, engine: Engine) -> None:
        """rollback drops pending objects and pending changes."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            s.commit()
            c = s.get(Counter, 1)
            assert c is not None
            c.value = 100
            fresh = Counter(value=5)
            s.add(fresh)
            s.rollback()
            assert fresh not in s and state_of(fresh) is not None
            assert c.value == 1
            with assert_round_trips(engine, 0):
                s.commit()

    def test_close_detaches_and_unloaded_raises(self, engine: Engine) -> None:
        """After close, loaded attributes are readable and expired ones raise."""
        s = Session(engine)
        s.add(Counter(value=1))
        s.commit()  # expires
        c = s.get(Counter, 1)
        assert c is not None
        s.expire(c)
        loaded = s.get(Counter, 1)
        assert loaded is c and c.value == 1
        s.expire(c)
        s.close()
        state = state_of(c)
        assert state is not None and state.status is ObjectStatus.DETACHED
        with pytest.raises(DetachedInstanceError):
            _ = c.value
        assert c.id == 1  # the primary key stays readable

    def test_expunge_keeps_loaded_values(self, engine: Engine) -> None:
        """An expunged object keeps its loaded values and is no longer tracked."""
        with Session(engine, expire_on_commit=False) as s:
            c = Counter(value=4)
            s.add(c)
            s.commit()
            s.expunge(c)
            assert c.value == 4 and c not in s
            c.value = 5
            with assert_round_trips(engine, 0):
                s.commit()

    def test_reattach_detached_object_and_update(self, engine: Engine) -> None:
        """A detached object added to a new session flushes its later changes."""
        with Session(engine, expire_on_commit=False) as s:
            c = Counter(value=1)
            s.add(c)
            s.commit()
        with Session(engine) as s2:
            s2.add(c)
            c.value = 2
            s2.commit()
        with Session(engine) as s3:
            got = s3.get(Counter, 1)
            assert got is not None and got.value == 2

    def test_object_in_two_sessions_is_refused(self, engine: Engine) -> None:
        """An object belongs to one session at a time."""
        with Session(engine) as a, Session(engine) as b:
            c = Counter()
            a.add(c)
            with pytest.raises(InvalidRequestError):
                b.add(c)

    def test_merge_copies_onto_persistent(self, engine: Engine) -> None:
        """merge loads the persistent object and copies the given values onto it."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            s.commit()
        with Session(engine) as s:
            merged = s.merge(Counter(value=7, id=1))
            assert merged is s.get(Counter, 1) and merged.value == 7
            s.commit()
            assert s.get(Counter, 1).value == 7  # type: ignore[union-attr]

    def test_delete_removes_the_object(self, engine: Engine, redis_client: Any) -> None:
        """delete then commit removes the hash and every index entry."""
        with Session(engine) as s:
            s.add(Author(name="ann", email="a@x", age=3))
            s.commit()
            a = s.get(Author, 1)
            s.delete(a)
            s.commit()
            assert s.get(Author, 1) is None
        leftover = [k for k in redis_client.keys("{t}:author:*") if not k.endswith(b"#seq")]
        assert leftover == [b"{t}:author:#zs:age"] or leftover == []
        assert redis_client.zcard("{t}:author:#zs:age") == 0

    def test_begin_commits_or_rolls_back(self, engine: Engine) -> None:
        """sessionmaker.begin commits on success and rolls back on error."""
        factory = sessionmaker(engine)
        with factory.begin() as s:
            s.add(Counter(value=1))
        with pytest.raises(RuntimeError), factory.begin() as s:
            s.add(Counter(value=2))
            raise RuntimeError("boom")
        with factory() as s:
            assert [c.value if c else None for c in s.get_many(Counter, [1, 2])] == [1, None]

    def test_no_autoflush(self, engine: Engine) -> None:
        """Inside no_autoflush a get does not flush pending objects."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            with s.no_autoflush:
                assert s.get(Counter, 1) is None
            assert s.get(Counter, 1) is not None  # autoflush wrote it


class TestKeysAndTypes:
    def test_every_type_round_trips_through_redis(self, engine: Engine) -> None:
        """Every supported field type reads back equal and of the same type."""
        tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
        e = Everything(
            s="",
            i=-(2**70),
            f=-0.0,
            b=True,
            raw=bytes(range(256)),
            d=Decimal("1.10"),
            when=dt.datetime(2024, 2, 29, 12, 0, 1, 5, tzinfo=tz),
            day=dt.date(1999, 12, 31),
            at=dt.time(23, 59, 59, 1),
            span=dt.timedelta(days=-1, microseconds=3),
            u=uuid.uuid4(),
            color=Color.GREEN,
            maybe=None,
            items=[1, 2],
            meta={"a": None},
            point=Point(3, 4),
        )
        with Session(engine, expire_on_commit=False) as s:
            s.add(e)
            s.commit()
        with Session(engine) as s:
            got = s.get(Everything, 1)
            assert got is not None
            for name in (
                "s",
                "i",
                "f",
                "b",
                "raw",
                "d",
                "when",
                "day",
                "at",
                "span",
                "u",
                "color",
                "maybe",
                "items",
                "meta",
                "point",
            ):
                mine, theirs = getattr(e, name), getattr(got, name)
                assert theirs == mine and type(theirs) is type(mine), name
            assert str(got.f) == "-0.0" and str(got.d) == "1.10"
            assert got.when.utcoffset() == dt.timedelta(hours=5, minutes=30)

    @pytest.mark.parametrize(
        "slug", ["a:b", "*", "{x}", "a b", "ключ", "", "?[]\\", "x" * 2000, "#seq", "%41"]
    )
    def test_hostile_string_ids_round_trip_in_their_own_key(
        self, engine: Engine, redis_client: Any, slug: str
    ) -> None:
        """Ids with separators, globs, braces, spaces, unicode stay in one key of their own."""
        with Session(engine) as s:
            s.add(Doc(slug=slug, body="mine"))
            s.add(Doc(slug="A", body="other"))
            s.commit()
        with Session(engine) as s:
            got = s.get(Doc, slug)
            assert got is not None and got.slug == slug and got.body == "mine"
        objects = [
            k
            for k in redis_client.keys("*")
            if k.startswith(b"{t}:doc:") and not k[len(b"{t}:doc:") :].startswith(b"#")
        ]
        assert len(objects) == 2 and all(k.count(b"{") == 1 for k in objects)
        assert all(k.count(b":") == 2 for k in objects)

    def test_uuid_primary_key_generated(self, engine: Engine, redis_client: Any) -> None:
        """A None UUID primary key gets a random (version 4) UUID at flush, stored under its
        canonical text, and loads back as the same UUID with its fields."""
        with Session(engine) as s:
            t, u = Token(label="x"), Token(label="y")
            s.add_all([t, u])
            s.commit()
            assert isinstance(t.id, uuid.UUID) and t.id.version == 4
            assert t.id != u.id
            tid = t.id
        # The key layout: {t}:token:<canonical text>, listed in the id zset; no counter.
        key = f"{{t}}:token:{tid}"
        assert redis_client.hget(key, "label") == b"x"
        assert str(tid).encode() in redis_client.zrange("{t}:token:#all", 0, -1)
        assert sorted(redis_client.keys("{t}:token:*")) == sorted(
            [b"{t}:token:#all", key.encode(), f"{{t}}:token:{u.id}".encode()]
        )
        with Session(engine) as s:
            got = s.get(Token, tid)
            assert got is not None and got.id == tid and got.label == "x"
            assert isinstance(got.id, uuid.UUID)
            # Looked up by an equal UUID built from its text: the same object.
            assert s.get(Token, uuid.UUID(str(tid).upper())) is got

    def test_wrong_type_is_validation_error_and_nothing_sent(self, engine: Engine) -> None:
        """A value of the wrong type fails the flush before any command is sent."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            s.add(Author(name="ann", email="a@x", age="old"))  # type: ignore[arg-type]
            with assert_round_trips(engine, 0), pytest.raises(ValidationError) as err:
                s.flush()
        e = err.value
        assert (e.model, e.field, e.expected, e.actual) == ("Author", "age", "int", "str")
        assert "Author.age" in str(e)

    def test_corrupt_stored_value_names_key_and_field(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A stored value the codec rejects raises DecodeError naming key and field."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            s.commit()
        redis_client.hset("{t}:counter:1", "value", b"not-a-number")
        with Session(engine) as s, pytest.raises(DecodeError) as err:
            s.get(Counter, 1)
        assert err.value.key == "{t}:counter:1" and err.value.field == "value"


class TestAtomicity:
    def test_one_stale_object_among_ten_writes_nothing(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """A flush with one stale object leaves every key byte-for-byte unchanged."""
        with Session(engine) as s:
            s.add_all([Author(name=f"a{i}", email=f"{i}@x", age=i) for i in range(10)])
            s.commit()
        with Session(engine) as s:
            objs = s.get_many(Author, range(1, 11))
            with Session(engine) as other:
                o = other.get(Author, 5)
                assert o is not None
                o.age = 500
                other.commit()
            before = dump_keys(redis_client)
            for a in objs:
                assert a is not None
                a.age += 1
                a.name = a.name.upper()
            s.add(Author(name="new", email="new@x"))
            with pytest.raises(StaleDataError) as err:
                s.commit()
            assert dump_keys(redis_client) == before
            assert [getattr(o, "id", None) for o in err.value.objects] == [5]
            assert s.is_modified(objs[0])  # pending changes are kept

    def test_stale_delete_writes_nothing(self, engine: Engine, redis_client: Any) -> None:
        """Deleting an object someone else changed raises StaleDataError."""
        with Session(engine) as s:
            s.add(Counter(value=1))
            s.commit()
        with Session(engine) as a, Session(engine) as b:
            ca, cb = a.get(Counter, 1), b.get(Counter, 1)
            assert ca is not None and cb is not None
            ca.value = 2
            a.commit()
            b.delete(cb)
            before = dump_keys(redis_client)
            with pytest.raises(StaleDataError):
                b.commit()
            assert dump_keys(redis_client) == before

    def test_existing_primary_key_is_integrity_error(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """Inserting a primary key that exists raises IntegrityError; nothing is written."""
        with Session(engine) as s:
            s.add(Doc(slug="x", body="first"))
            s.commit()
        before = dump_keys(redis_client)
        with Session(engine) as s:
            s.add(Doc(slug="y", body="fine"))
            s.add(Doc(slug="x", body="second"))
            with pytest.raises(IntegrityError) as err:
                s.commit()
        assert err.value.model == "Doc" and err.value.value == "x"
        assert dump_keys(redis_client) == before

    def test_wrong_key_type_is_refused_before_multi(
        self, engine: Engine, redis_client: Any
    ) -> None:
        """An index key of the wrong type stops the flush before MULTI, naming the key."""
        redis_client.set("{t}:author:#zs:age", "oops")
        before = dump_keys(redis_client)
        with Session(engine) as s:
            s.add(Author(name="ann", email="a@x", age=1))
            with pytest.raises(FlushError) as err:
                s.commit()
        assert err.value.key == "{t}:author:#zs:age"
        assert dump_keys(redis_client) == before

    def test_failed_flush_can_be_retried(self, engine: Engine, redis_client: Any) -> None:
        """After a refused flush, fixing the cause and flushing again commits."""
        redis_client.set("{t}:author:#zs:age", "oops")
        with Session(engine) as s:
            a = Author(name="ann", email="a@x", age=1)
            s.add(a)
            with pytest.raises(FlushError):
                s.commit()
            redis_client.delete("{t}:author:#zs:age")
            s.commit()
            assert a.id is not None


def _increment_worker(url: str, n: int) -> None:
    engine = create_engine(url)
    factory = sessionmaker(engine)

    def bump(s: Session) -> None:
        c = s.get(Counter, 1)
        assert c is not None
        c.value += 1

    for _ in range(n):
        run_in_transaction(bump, factory, retries=1000)
    engine.dispose()


class TestConcurrency:
    def test_four_processes_increment_without_lost_updates(
        self, engine: Engine, redis_url: str
    ) -> None:
        """4 processes x 200 increments through run_in_transaction end at exactly 800."""
        with Session(engine) as s:
            s.add(Counter(value=0))
            s.commit()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_increment_worker, args=(redis_url, 200)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        with Session(engine) as s:
            c = s.get(Counter, 1)
            assert c is not None and c.value == 800

    def test_run_in_transaction_gives_up_after_retries(self, engine: Engine) -> None:
        """run_in_transaction re-raises StaleDataError once its retries are spent."""
        with Session(engine) as s:
            s.add(Counter(value=0))
            s.commit()
        calls = []

        def always_conflicts(s: Session) -> None:
            c = s.get(Counter, 1)
            assert c is not None
            c.value += 1
            calls.append(1)
            with Session(engine) as other:
                o = other.get(Counter, 1)
                assert o is not None
                o.value += 10
                other.commit()

        with pytest.raises(StaleDataError):
            run_in_transaction(always_conflicts, sessionmaker(engine), retries=3)
        assert len(calls) == 4


class TestRegressions:
    def test_explicit_and_generated_ids_in_one_flush(self, engine: Engine) -> None:
        """Generated ids never collide with an explicit id added in the same flush (they
        skip it), and the counter ends at or above the explicit id."""
        with Session(engine) as s:
            s.add(Counter(value=0))
            s.commit()
        with Session(engine, expire_on_commit=False) as s:
            explicit, generated = Counter(value=3, id=3), Counter(value=4)
            s.add_all([explicit, generated])
            s.commit()
            assert generated.id is not None and generated.id not in (1, 3)
        with Session(engine) as s:
            later = Counter(value=5)
            s.add(later)
            s.commit()
            assert later.id is not None and later.id > 3
        with Session(engine) as s:
            got = s.get_many(Counter, [3, generated.id])
            assert [c.value if c else None for c in got] == [3, 4]

    def test_reload_of_expired_attribute_keeps_conflict_check(self, engine: Engine) -> None:
        """Reading an expired attribute does not forgive a concurrent change."""
        with Session(engine) as s:
            s.add(Author(name="a", email="a@x", age=1))
            s.commit()
        with Session(engine) as s:
            a = s.get(Author, 1)
            assert a is not None
            s.expire(a, ["name"])
            a.age = 2
            with Session(engine) as other:
                o = other.get(Author, 1)
                assert o is not None
                o.age = 50
                other.commit()
            assert a.name == "a"  # reloads the expired attribute
            with pytest.raises(StaleDataError):
                s.commit()

    def test_in_doubt_objects_block_flush_until_rollback(self, engine: Engine) -> None:
        """A session whose last flush outcome is unknown refuses to flush until rolled back."""
        with Session(engine) as s:
            c = Counter(value=1)
            s.add(c)
            s.commit()
            c.value = 2
            state = state_of(c)
            assert state is not None
            state.in_doubt = True
            with pytest.raises(InvalidRequestError, match="rollback"):
                s.flush()
            s.rollback()
            assert c.value == 1
