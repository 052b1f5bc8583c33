"""Regressions of issue 11 in the session's semantics: merge versions, failed flushes
leaving the session as it was, partial cross-slot commits, a session misused by two
threads, and run_in_transaction under contention. Every test runs on real Redis."""

from __future__ import annotations

import pytest
import redis

from redmap import Session
from redmap.attributes import state_of
from redmap.engine import Engine
from redmap.exc import StaleDataError
from tests._fixtures import Counter, Doc


def _seed_counter(engine: Engine, value: int = 100) -> None:
    with Session(engine) as s:
        s.add(Counter(value=value))
        s.commit()


def _stored_value(engine: Engine, pk: int = 1) -> int:
    with Session(engine) as s:
        c = s.get(Counter, pk)
        assert c is not None
        return c.value


def _set_elsewhere(engine: Engine, value: int, pk: int = 1) -> None:
    with Session(engine) as s:
        c = s.get(Counter, pk)
        assert c is not None
        c.value = value
        s.commit()


# -- item 3: merge carries the version of the copy ------------------------------------


class TestMergeVersion:
    def test_merge_of_copy_older_than_redis_raises_stale(self, engine: Engine) -> None:
        """A detached copy loaded at version 1 cannot be merged after someone else wrote
        version 2: merge raises StaleDataError and the concurrent value survives."""
        _seed_counter(engine, 100)
        with Session(engine, expire_on_commit=False) as s:
            old = s.get(Counter, 1)
            assert old is not None and state_of(old).version == 1  # type: ignore[union-attr]
        _set_elsewhere(engine, 500)
        with Session(engine) as s:
            with pytest.raises(StaleDataError) as err:
                s.merge(old)
            assert err.value.objects == [old]
            assert not s.dirty and not s.new
            s.commit()
        assert _stored_value(engine) == 500

    def test_merge_of_changed_older_copy_raises_stale(self, engine: Engine) -> None:
        """A detached copy changed by the user after loading is still version-checked:
        its change is refused, not written over the concurrent one."""
        _seed_counter(engine, 100)
        with Session(engine, expire_on_commit=False) as s:
            old = s.get(Counter, 1)
            assert old is not None
        old.value = 150
        _set_elsewhere(engine, 500)
        with Session(engine) as s, pytest.raises(StaleDataError):
            s.merge(old)
        assert _stored_value(engine) == 500

    def test_merge_then_concurrent_change_is_stale_at_flush(self, engine: Engine) -> None:
        """When the session loaded the object at the copy's version and someone writes
        in between, the merged change fails its version check at flush."""
        _seed_counter(engine, 100)
        with Session(engine, expire_on_commit=False) as s:
            old = s.get(Counter, 1)
            assert old is not None
        old.value = 150
        with Session(engine) as s:
            merged = s.merge(old)  # versions agree: 1 and 1
            assert merged is not old and merged.value == 150
            _set_elsewhere(engine, 500)
            with pytest.raises(StaleDataError):
                s.commit()
        assert _stored_value(engine) == 500

    def test_merge_of_deleted_copy_raises_stale(self, engine: Engine) -> None:
        """A copy of an object someone else deleted is stale: merge does not resurrect it."""
        _seed_counter(engine, 100)
        with Session(engine, expire_on_commit=False) as s:
            old = s.get(Counter, 1)
            assert old is not None
        with Session(engine) as s:
            s.delete(s.get(Counter, 1))
            s.commit()
        with Session(engine) as s:
            with pytest.raises(StaleDataError):
                s.merge(old)
            assert not s.new
            s.commit()
        with Session(engine) as s:
            assert s.get(Counter, 1) is None

    def test_merge_of_current_copy_writes_its_change(self, engine: Engine) -> None:
        """A detached copy at the version Redis holds merges and its change is written."""
        _seed_counter(engine, 100)
        with Session(engine, expire_on_commit=False) as s:
            old = s.get(Counter, 1)
            assert old is not None
        old.value = 150
        with Session(engine) as s:
            merged = s.merge(old)
            assert merged in s.dirty and old not in s
            s.commit()
        assert _stored_value(engine) == 150

    def test_merge_of_unversioned_object_overwrites(self, engine: Engine) -> None:
        """An object built by hand (never loaded) carries no version and overwrites."""
        _seed_counter(engine, 100)
        _set_elsewhere(engine, 500)
        with Session(engine) as s:
            s.merge(Counter(value=7, id=1))
            s.commit()
        assert _stored_value(engine) == 7

    def test_merged_new_object_joins_the_session_and_is_written(
        self, engine: Engine, redis_client: redis.Redis
    ) -> None:
        """merge() of objects Redis does not hold adds a pending copy to the session
        (with a generated id, and with an explicit one), and commit writes it."""
        with Session(engine, expire_on_commit=False) as s:
            generated = s.merge(Counter(value=5))
            assert generated in s and generated in s.new
            explicit = s.merge(Doc(slug="intro", body="hello"))  # autoflushes `generated`
            assert explicit in s and explicit in s.new
            s.commit()
            assert generated.id == 1
        assert redis_client.hget("{t}:counter:1", "value") == b"5"
        assert redis_client.hget("{t}:doc:intro", "body") == b"hello"

    def test_merge_of_own_object_returns_it(self, engine: Engine) -> None:
        """merge() of an object already in this session returns that object unchanged."""
        _seed_counter(engine, 100)
        with Session(engine) as s:
            c = s.get(Counter, 1)
            assert s.merge(c) is c and not s.dirty
