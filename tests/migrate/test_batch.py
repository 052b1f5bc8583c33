"""Tests for `redmap.migrate.batch` and `impl` run in-process on real Redis: scanning,
per-object atomicity, checkpoints, conflicts and error messages."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
import redis

import redmap
from redmap import Indexed, PrimaryKey, Sorted, Unique, registry
from redmap.exc import MigrationError, StaleDataError
from redmap.migrate import MigrationRun, RedisOperations, RedisVersionStore
from redmap.migrate.batch import Change, Target, glob_escape, rewrite
from redmap.migrate.layout import record, snapshot

reg = registry(prefix="u")


@reg.mapped
@dataclass
class Thing:
    name: Annotated[str, Indexed()]
    code: Annotated[Optional[str], Unique()] = None
    score: Annotated[Optional[int], Sorted()] = None
    n: int = 0
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Slugged:
    slug: Annotated[str, PrimaryKey()]
    label: str = ""


HOSTILE = ["a*b", "[x]", "q?", "back\\slash", "#hash", "x:y", "ünï", "plain"]


@pytest.fixture
def things(engine: redmap.Engine) -> list[int]:
    """Twelve things with codes c0..c11, scores 0..11, n = 10 * i."""
    with redmap.Session(engine) as s:
        objs = [Thing(name=f"n{i}", code=f"c{i}", score=i, n=10 * i) for i in range(12)]
        s.add_all(objs)
        s.commit()
        return [o.id for o in objs]


def make_run(client: redis.Redis, url: str, **options: Any) -> MigrationRun:
    return MigrationRun(client, url=url, prefix="u", registry=reg, **options)


def ops(run: MigrationRun) -> RedisOperations:
    return RedisOperations(run)


def test_glob_escape_escapes_every_match_metacharacter() -> None:
    """SCAN MATCH patterns built from names cannot widen: * ? [ ] and backslash are escaped."""
    assert glob_escape("{u}:a*b?[c]\\d") == "{u}:a\\*b\\?\\[c\\]\\\\d"


class TestScan:
    def test_object_batches_find_hostile_ids_and_skip_other_keys(
        self, engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
    ) -> None:
        """Every object is found once per batch size; index, foreign and sibling keys are not."""
        with redmap.Session(engine) as s:
            s.add_all(Slugged(slug=slug) for slug in HOSTILE)
            s.commit()
        redis_client.set("{u}:slugged:#weird", 1)
        redis_client.set(b"{u}:slugged:\xff", 1)
        redis_client.hset("{u}:sluggedx:1", "label", "x")
        run = make_run(redis_client, redis_url, batch_size=3)
        target = run.resolve("Slugged")
        batches = list(run.object_batches(target))
        assert all(len(b) <= 3 for b in batches)
        found = {target.keys.id_segment_of(k) for b in batches for k in b}
        mapper = target.mapper
        assert mapper is not None
        assert {mapper.pk_from_segment(s) for s in found} == set(HOSTILE)

    def test_resolve_accepts_class_keyspace_and_recorded_names(
        self, redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A model is found by class name, keyspace, recorded class name, else as a keyspace."""
        run = make_run(redis_client, redis_url)
        assert run.resolve("Thing").keys.keyspace == "thing"
        assert run.resolve("slugged").mapper is not None
        layout = snapshot(reg)
        layout["models"]["OldName"] = dict(layout["models"]["Thing"], keyspace="legacy")
        record(redis_client, layout, url=redis_url)
        assert run.resolve("OldName").keys.keyspace == "legacy"
        assert run.resolve("gone").keys.keyspace == "gone"
        with pytest.raises(MigrationError, match="no model or keyspace named 'Not Valid'"):
            run.resolve("Not Valid")


class TestAtomicity:
    def test_objects_changed_between_read_and_write_are_retried(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A concurrent write between read and write wins; the change is re-planned on top."""
        run = make_run(redis_client, redis_url, batch_size=5)
        target = run.resolve("Thing")
        calls: Counter[str] = Counter()

        def plan(key: str, segment: str, row: dict[str, bytes]) -> Change:
            calls[key] += 1
            if calls[key] == 1:  # another writer gets in first, as a redmap flush would
                redis_client.hincrby(key, "n", 1)
                redis_client.hincrby(key, "#v", 1)
            return Change([("HSET", key, "label", b"n=" + row["n"])])

        result = rewrite(run, target, "test", plan, fields=["n"])
        assert result.changed == 12 and set(calls.values()) == {2}
        for pk in things:
            data = redis_client.hgetall(f"{{u}}:thing:{pk}")
            n = 10 * (pk - 1) + 1
            assert data[b"n"] == str(n).encode() and data[b"label"] == f"n={n}".encode()
            assert data[b"#v"] == b"3"

    def test_session_holding_an_old_version_gets_stale_data(
        self, things: list[int], engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A session that loaded an object before a rewrite cannot overwrite it afterwards."""
        with redmap.Session(engine) as s:
            thing = s.get(Thing, things[0])
            assert thing is not None
            ops(make_run(redis_client, redis_url)).add_field("Thing", "extra", default="e")
            thing.n = 999
            with pytest.raises(StaleDataError):
                s.commit()
        assert redis_client.hget(f"{{u}}:thing:{things[0]}", "n") == b"0"
        assert redis_client.hget(f"{{u}}:thing:{things[0]}", "extra") == b"e"

    def test_scripts_are_reloaded_after_the_server_forgets_them(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """SCRIPT FLUSH between two operations of one run is survived (NOSCRIPT, reload)."""
        op = ops(make_run(redis_client, redis_url))
        op.add_field("Thing", "a", default="1")
        op.transform("Thing", lambda f: {**f, "a": f["a"] + b"!"})
        redis_client.script_flush()
        op.add_field("Thing", "b", default="2")
        op.transform("Thing", lambda f: {**f, "b": f["b"] + b"?"})
        assert {redis_client.hget(f"{{u}}:thing:{pk}", "a") for pk in things} == {b"1!"}
        assert {redis_client.hget(f"{{u}}:thing:{pk}", "b") for pk in things} == {b"2?"}


class TestFailures:
    def test_a_write_failing_half_way_leaves_the_object_untouched(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """Index commands run before the object's writes: a refused one changes no object."""
        redis_client.set("{u}:thing:#ix:name:N0", "not a set")
        before = redis_client.hgetall("{u}:thing:1")
        op = ops(make_run(redis_client, redis_url))
        with pytest.raises(MigrationError, match=r"refused a migration write on \{u\}:thing:1\b"):
            op.transform("Thing", lambda f: {**f, "name": f["name"].upper()})
        after = redis_client.hgetall("{u}:thing:1")
        assert after.pop(b"#v") == b"2"  # bumped first: at worst a session retries
        assert after == {k: v for k, v in before.items() if k != b"#v"}

    def test_a_key_that_is_not_a_hash_is_named(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A foreign key under the model's prefix stops the run with its name, not WRONGTYPE."""
        redis_client.set("{u}:thing:999", "stray")
        with pytest.raises(MigrationError, match=r"\{u\}:thing:999 is under the model's keyspace"):
            ops(make_run(redis_client, redis_url)).create_index("Thing", "n")


class TestTransform:
    def test_runs_once_per_object_when_scan_repeats_keys(
        self,
        things: list[int],
        redis_client: redis.Redis,
        redis_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """SCAN may return a key twice: the checkpoint keeps a non-idempotent fn exactly-once."""
        run = make_run(redis_client, redis_url, batch_size=4)
        original = run.object_batches

        def twice(target: Target) -> Iterator[list[str]]:
            for batch in original(target):
                yield batch
                yield batch

        monkeypatch.setattr(run, "object_batches", twice)
        seen: Counter[bytes] = Counter()

        def bump(fields: dict[str, bytes]) -> None:
            seen[fields["name"]] += 1
            fields["n"] = str(int(fields["n"]) + 1).encode()

        ops(run).transform("Thing", bump)
        assert set(seen.values()) == {1}
        assert [redis_client.hget(f"{{u}}:thing:{pk}", "n") for pk in things] == [
            str(10 * i + 1).encode() for i in range(12)
        ]
        assert not list(redis_client.scan_iter(match="{u}:#meta:migrate:done:*"))

    def test_interrupted_transform_resumes_from_the_step_checkpoint(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A transform failing half-way resumes where it stopped; the step's end clears it."""
        store = RedisVersionStore(redis_client, "u", url=redis_url)
        calls = [0]

        def flaky(fields: dict[str, bytes]) -> None:
            calls[0] += 1
            if calls[0] == 8:
                raise RuntimeError("boom")
            fields["n"] = str(int(fields["n"]) + 1).encode()

        run = make_run(redis_client, redis_url, batch_size=3, store=store)
        with pytest.raises(MigrationError, match="failed on Thing .*RuntimeError: boom"):
            ops(run).transform("Thing", flaky)
        done = redis_client.smembers(store.checkpoint_key(0))
        assert len(done) == 6  # two whole batches were written and marked
        calls[0] = 100
        ops(make_run(redis_client, redis_url, batch_size=3, store=store)).transform("Thing", flaky)
        assert calls[0] == 100 + 12 - 6
        values = [redis_client.hget(f"{{u}}:thing:{pk}", "n") for pk in things]
        assert values == [str(10 * i + 1).encode() for i in range(12)]
        store.set_heads(("r1",))
        assert not redis_client.exists(store.checkpoint_key(0))

    def test_bad_return_values_are_refused(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """fn must return a dict of bytes or str (or None after editing in place)."""
        op = ops(make_run(redis_client, redis_url))
        with pytest.raises(MigrationError, match="n must be bytes or str, not int"):
            op.transform("Thing", lambda f: {**f, "n": 5})
        with pytest.raises(MigrationError, match="must return a dict or None"):
            op.transform("Thing", lambda f: [1])

    def test_unique_values_taken_are_reported(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A transform giving an object a unique value another object holds leaves it as it was."""
        op = ops(make_run(redis_client, redis_url))
        with pytest.raises(MigrationError, match="unique values already taken"):
            op.transform("Thing", lambda f: {**f, "code": b"c1"} if f["code"] == b"c0" else f)
        assert redis_client.hget(f"{{u}}:thing:{things[0]}", "code") == b"c0"
        assert redis_client.get("{u}:thing:#uq:code:c1") == str(things[1]).encode()


class TestIndexesAndKeys:
    def test_unique_value_claimed_after_the_check_is_reported(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A unique entry held by another id fails that object and names the key."""
        redis_client.delete(*redis_client.keys("{u}:thing:#uq:*"))
        redis_client.set("{u}:thing:#uq:code:c3", "999")
        op = ops(make_run(redis_client, redis_url))
        with pytest.raises(MigrationError, match=r"\{u\}:thing:#uq:code:c3 \(wanted by"):
            op.create_index("Thing", "code", kind="unique")
        assert redis_client.get("{u}:thing:#uq:code:c4") == str(things[4]).encode()

    def test_sorted_index_refuses_a_value_it_cannot_score(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """A stored value the field's codec rejects names the object in the error."""
        redis_client.hset(f"{{u}}:thing:{things[2]}", "score", "not a number")
        op = ops(make_run(redis_client, redis_url))
        with pytest.raises(MigrationError, match=f"Thing.score of {things[2]} cannot be kept"):
            op.create_index("Thing", "score", kind="sorted")

    def test_rename_field_merges_existing_index_keys_and_reports_conflicts(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """Equality sets and foreign zsets merge into existing ones; a differing owner conflicts."""
        redis_client.sadd("{u}:thing:#ix:label:n1", "77")
        redis_client.zadd("{u}:thing:#fk:name:3", {"5": 1})
        redis_client.set("{u}:thing:#uq:ref:c2", "999")
        op = ops(make_run(redis_client, redis_url))
        op.rename_field("Thing", "name", "label")
        assert redis_client.smembers("{u}:thing:#ix:label:n1") == {b"77", str(things[1]).encode()}
        assert redis_client.zrange("{u}:thing:#fk:label:3", 0, -1) == [b"5"]
        with pytest.raises(MigrationError, match=r"1 index keys could not be renamed.*code:c2"):
            op.rename_field("Thing", "code", "ref")
        assert redis_client.get("{u}:thing:#uq:ref:c3") == str(things[3]).encode()
        assert redis_client.get("{u}:thing:#uq:code:c2") == str(things[2]).encode()

    def test_rename_model_moves_what_it_can_and_lists_conflicts(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """Keys held differently under both keyspaces stay put and are listed; counters merge."""
        redis_client.hset("{u}:other:1", "name", "someone else")
        redis_client.set("{u}:other:#seq", 50)
        with pytest.raises(MigrationError, match=r"1 keys exist under both.*\{u\}:thing:1\b"):
            ops(make_run(redis_client, redis_url)).rename_model("thing", "other")
        assert redis_client.get("{u}:other:#seq") == b"50"
        assert redis_client.hget("{u}:other:2", "name") == b"n1"
        assert redis_client.exists("{u}:thing:1") and not redis_client.exists("{u}:thing:2")

    def test_add_field_without_default_on_a_required_field_is_refused(
        self, things: list[int], redis_client: redis.Redis, redis_url: str
    ) -> None:
        """default=None would leave a non-Optional field unloadable: refused, nothing written."""
        op = ops(make_run(redis_client, redis_url))
        with pytest.raises(MigrationError, match="Thing.name is str, not Optional"):
            op.add_field("Thing", "name", default=None)


def test_dry_run_describes_operations_with_counts(
    things: list[int], redis_client: redis.Redis, redis_url: str
) -> None:
    """Collected with dry_run, operations describe what they would change, measured now."""
    op = ops(make_run(redis_client, redis_url, dry_run=True))

    def upgrade(op: RedisOperations) -> None:
        op.drop_field("Thing", "score")
        op.drop_index("Thing", "name", kind="indexed")
        op.rename_model("thing", "item")
        op.transform("Thing", lambda f: f)
        op.execute(print)

    lines = [o.describe() for o in op.collect(upgrade)]
    thing_keys = len(list(redis_client.scan_iter(match="{u}:thing:*")))
    assert lines == [
        "drop_field Thing.score: would delete score from 12 of 12 objects",
        "drop_index Thing.name (indexed): would delete 12 keys",
        f"rename_model thing -> item: would move {thing_keys} keys",
        f"transform Thing with {upgrade.__qualname__}.<locals>.<lambda>: "
        "would pass 12 objects through the function",
        "execute print: would call the function (not measured)",
    ]
