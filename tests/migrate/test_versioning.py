"""Tests for `redmap.migrate.versioning`: heads, generations, the lock and the step log."""

from __future__ import annotations

import json
import time

import pytest
import redis

from alembic_like.exc import LockError
from alembic_like.revision import Direction
from redmap.exc import MigrationError
from redmap.migrate import RedisVersionStore


@pytest.fixture
def store(redis_client: redis.Redis, redis_url: str) -> RedisVersionStore:
    """A store for prefix `v` on an empty server, with a short lock TTL."""
    return RedisVersionStore(redis_client, "v", url=redis_url, lock_ttl=0.3)


def other(store: RedisVersionStore) -> RedisVersionStore:
    """A second migrator on the same database."""
    return RedisVersionStore(store.client, store.prefix, url=store.url, lock_ttl=store.lock_ttl)


class TestHeads:
    def test_heads_start_at_base_and_each_step_starts_a_generation(
        self, store: RedisVersionStore, redis_client: redis.Redis
    ) -> None:
        """set_heads stores the heads, bumps the generation and drops the finished checkpoints."""
        assert store.get_heads() == () and store.generation() == 0
        redis_client.sadd(store.checkpoint_key(0), "1:a")
        store.set_heads(("a1",))
        assert store.get_heads() == ("a1",) and store.generation() == 1
        assert not redis_client.exists(store.checkpoint_key(0))
        store.set_heads(("b2", "c3"))
        assert store.get_heads() == ("b2", "c3") and store.generation() == 2
        assert json.loads(redis_client.get("{v}:#meta:migrate:heads")) == {
            "heads": ["b2", "c3"],
            "generation": 2,
        }

    def test_foreign_heads_value_is_reported(
        self, store: RedisVersionStore, redis_client: redis.Redis
    ) -> None:
        """A heads key not written by redmap is an error naming the key, not a crash."""
        redis_client.set("{v}:#meta:migrate:heads", "garbage")
        with pytest.raises(MigrationError, match=r"\{v\}:#meta:migrate:heads does not hold"):
            store.get_heads()

    def test_record_step_keeps_a_log(
        self, store: RedisVersionStore, redis_client: redis.Redis
    ) -> None:
        """Each completed step is logged, newest first, with the lock holder."""
        with store.lock("host:1"):
            store.record_step("a1", Direction.UP)
            store.record_step("a1", Direction.DOWN)
        log = [json.loads(e) for e in redis_client.lrange("{v}:#meta:migrate:log", 0, -1)]
        assert [(e["revision"], e["direction"], e["owner"]) for e in log] == [
            ("a1", "downgrade", "host:1"),
            ("a1", "upgrade", "host:1"),
        ]


class TestLock:
    def test_second_holder_is_refused_naming_the_first(self, store: RedisVersionStore) -> None:
        """The lock is exclusive; the error names the holder, since when, and the expiry."""
        with store.lock("alpha:42"):
            with pytest.raises(LockError) as info:
                with other(store).lock("beta:7"):
                    pass
        assert info.value.owner == "alpha:42"
        assert "Migrations are locked by alpha:42 since " in str(info.value)
        assert "expires in" in str(info.value)
        with other(store).lock("beta:7"):  # free again once released
            pass

    def test_lock_is_renewed_while_held_and_released_after(
        self, store: RedisVersionStore, redis_client: redis.Redis
    ) -> None:
        """A run longer than the TTL keeps its lock; leaving the block deletes it."""
        with store.lock("alpha:42"):
            time.sleep(1.0)  # more than three TTLs
            assert redis_client.pttl(store.lock_key) > 0
            store.check_lock()
        assert not redis_client.exists(store.lock_key)

    def test_only_the_owner_releases_the_lock(
        self, store: RedisVersionStore, redis_client: redis.Redis
    ) -> None:
        """A holder whose lock expired and was taken over does not delete the new holder's."""
        with store.lock("alpha:42"):
            redis_client.set(store.lock_key, json.dumps({"owner": "beta:7"}), px=5000)
        assert json.loads(redis_client.get(store.lock_key)) == {"owner": "beta:7"}

    def test_a_lost_lock_stops_the_run(
        self, store: RedisVersionStore, redis_client: redis.Redis
    ) -> None:
        """Once the lock is gone, the next batch check and set_heads refuse to go on."""
        with store.lock("alpha:42"):
            redis_client.delete(store.lock_key)
            time.sleep(0.4)  # the renewal finds it gone
            with pytest.raises(MigrationError, match="lost the migration lock"):
                store.check_lock()
            with pytest.raises(MigrationError, match="lost the migration lock"):
                store.set_heads(("a1",))
        assert store.get_heads() == ()
