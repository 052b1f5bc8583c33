"""Migrations and the incarnation field `#i` (docs/key-layout.md, "The object hash, its
version and its incarnation"): a rewrite keeps `#i` and bumps `#v`; a rewrite of a hash
found without `#v` restarts it at 1 with a new `#i`, as a flush does, so a session that
loaded version 1 before the `#v` went missing is stale, never passed; a `transform`
function never sees `#i`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
import redis

import redmap
from redmap import Indexed, PrimaryKey, registry
from redmap.exc import MigrationError, StaleDataError
from redmap.migrate import MigrationRun, RedisOperations

reg = registry(prefix="mi")


@reg.mapped
@dataclass
class Item:
    name: Annotated[str, Indexed()]
    n: int = 0
    extra: Optional[str] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


KEY = "{mi}:item:1"

# Each operation rewrites the one object's hash (it holds `n`, lacks `extra`).
OPERATIONS: dict[str, Callable[[RedisOperations], None]] = {
    "add_field": lambda op: op.add_field("Item", "extra", default="e"),
    "drop_field": lambda op: op.drop_field("Item", "n"),
    "rename_field": lambda op: op.rename_field("Item", "n", "m"),
    "transform": lambda op: op.transform("Item", lambda f: {**f, "name": b"NEW"}),
}


def _operations(client: redis.Redis, url: str) -> RedisOperations:
    return RedisOperations(MigrationRun(client, url=url, prefix="mi", registry=reg))


def _insert(engine: redmap.Engine) -> None:
    """Item 1, version 1 (the only object of the keyspace)."""
    with redmap.Session(engine) as s:
        s.add(Item(name="a", n=1))
        s.commit()


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_rewrite_keeps_the_incarnation_and_bumps_the_version(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str, name: str
) -> None:
    """Every per-object rewrite leaves `#i` as the insert wrote it and moves `#v` on."""
    _insert(engine)
    before = redis_client.hmget(KEY, ["#v", "#i"])
    assert before[0] == b"1" and before[1]
    OPERATIONS[name](_operations(redis_client, redis_url))
    assert redis_client.hmget(KEY, ["#v", "#i"]) == [b"2", before[1]]


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_a_rewrite_of_a_hash_without_version_is_a_new_incarnation(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str, name: str
) -> None:
    """A hash whose `#v` went missing gets `#v` 1 and a new `#i` from a rewrite, so a
    session holding version 1 from before cannot write its old snapshot back."""
    _insert(engine)
    old = redmap.Session(engine)
    held = old.get_one(Item, 1)  # version 1
    with redmap.Session(engine) as s:  # version 2
        s.get_one(Item, 1).n = 2
        s.commit()
    first = redis_client.hget(KEY, "#i")
    redis_client.hdel(KEY, "#v")  # corruption from outside
    OPERATIONS[name](_operations(redis_client, redis_url))
    version, incarnation = redis_client.hmget(KEY, ["#v", "#i"])
    assert version == b"1"
    assert incarnation and incarnation != first and re.fullmatch(rb"[0-9a-f]{16}", incarnation)
    held.name = "stale"
    with pytest.raises(StaleDataError):
        old.commit()
    old.close()
    assert redis_client.hget(KEY, "name") != b"stale"


def test_transform_never_sees_or_writes_the_incarnation(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
) -> None:
    """The function gets the stored fields only; returning `#i` (or `#v`) is refused with
    a message naming it, and nothing is written."""
    _insert(engine)
    seen: list[dict[str, Any]] = []

    def look(fields: dict[str, Any]) -> None:
        seen.append(dict(fields))

    op = _operations(redis_client, redis_url)
    op.transform("Item", look)
    assert seen == [{"name": b"a", "n": b"1"}]
    before = redis_client.hgetall(KEY)
    for field in ("#i", "#v"):
        with pytest.raises(MigrationError, match=f"returned '{field}', redmap's own"):
            op.transform("Item", lambda f, field=field: {**f, field: b"x"})
    assert redis_client.hgetall(KEY) == before
    # A function that builds a new dict without the bookkeeping fields keeps them.
    op.transform("Item", lambda f: {"name": b"b", "n": f["n"]})
    after = redis_client.hgetall(KEY)
    assert after[b"#i"] == before[b"#i"] and after[b"#v"] == b"2" and after[b"name"] == b"b"
