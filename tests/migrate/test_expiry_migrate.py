"""Issue 15: migrations add and drop an `ExpiresAt` field with its bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated

import redis

import redmap
from redmap import ExpiresAt, Indexed, PrimaryKey, Sorted, Text, Unique, registry, select
from redmap.audit import audit
from redmap.migrate.batch import MigrationRun
from redmap.migrate.ops import RedisOperations
from redmap.orm import expiry

T0 = 1_900_000_000.0

old = registry(prefix="mx")


@old.mapped
@dataclass
class Pass:
    __keyspace__ = "pass"
    holder: Annotated[str, Indexed()]
    id: Annotated[int | None, PrimaryKey()] = None


new = registry(prefix="mx")


@new.mapped
@dataclass
class Pass2:
    __keyspace__ = "pass"
    holder: Annotated[str, Indexed()]
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


def _ops(client: redis.Redis, url: str, reg: registry) -> RedisOperations:
    return RedisOperations(MigrationRun(client, url=url, prefix="mx", registry=reg))


def test_add_then_drop_expires_at(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
) -> None:
    with redmap.Session(engine) as s:
        s.add_all(Pass(holder=f"h{i % 3}") for i in range(10))
        s.commit()
    moment = datetime.fromtimestamp(T0 + 10, timezone.utc)
    _ops(redis_client, redis_url, new).add_field("Pass2", "expires", default=moment)
    assert redis_client.zcard("{mx}:pass:#dl") == 10
    assert redis_client.hlen("{mx}:pass:#dv") == 10
    assert redis_client.pttl("{mx}:pass:1") > 0
    assert audit(redis_client, new).ok
    with expiry.use_clock(lambda: T0 + 11):
        with redmap.Session(engine) as s:
            assert s.count(select(Pass2)) == 0
            assert s.get(Pass2, 1) is None
    with expiry.use_clock(lambda: T0 + 5):
        with redmap.Session(engine) as s:
            assert s.count(select(Pass2)) == 10
    # Dropped again: nothing expires any more.
    _ops(redis_client, redis_url, old).drop_field("Pass", "expires")
    assert not redis_client.exists("{mx}:pass:#dl", "{mx}:pass:#dv")
    assert redis_client.ttl("{mx}:pass:1") == -1
    report = audit(redis_client, old)
    assert report.ok, report.mismatches + report.unexplained
    with expiry.use_clock(lambda: T0 + 10**6), redmap.Session(engine) as s:
        assert s.count(select(Pass)) == 10


soft_old = registry(prefix="mx")


@soft_old.mapped
@dataclass
class Memo:
    __soft_delete__ = timedelta(minutes=5)
    title: str
    code: str
    id: Annotated[str | None, PrimaryKey()] = None


soft_new = registry(prefix="mx")


@soft_new.mapped
@dataclass
class Memo2:
    __keyspace__ = "memo"
    __soft_delete__ = timedelta(minutes=5)
    title: Annotated[str, Indexed(), Sorted(), Text()]
    code: Annotated[str, Unique()]
    id: Annotated[str | None, PrimaryKey()] = None


def test_create_index_leaves_soft_deleted_objects_out(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
) -> None:
    """A soft-deleted object is in no query index until restored: an index created while
    it is deleted leaves it out (its unique value is still claimed), and a restore puts
    it in."""
    with expiry.use_clock(lambda: T0), redmap.Session(engine) as s:
        s.add_all([Memo(title="same", code="a", id="a"), Memo(title="same", code="b", id="b")])
        s.commit()
        memo = s.get(Memo, "a")
        assert memo is not None
        s.delete(memo)
        s.commit()
    ops = _ops(redis_client, redis_url, soft_new)
    ops.create_index("Memo2", "title", "indexed")
    ops.create_index("Memo2", "title", "sorted")
    ops.create_index("Memo2", "title", "text")
    ops.create_index("Memo2", "code", "unique")
    assert redis_client.get("{mx}:memo:#uq:code:a") == b"a"  # still held
    with expiry.use_clock(lambda: T0 + 1), redmap.Session(engine) as s:
        for q in (Memo2.title == "same", Memo2.title.startswith("sa"), Memo2.title.match("same")):
            assert [m.id for m in s.scalars(select(Memo2).where(q))] == ["b"]
        assert s.count(select(Memo2).where(Memo2.code == "a")) == 0
        report = audit(redis_client, soft_new)
        assert report.ok, report.mismatches + report.unexplained
        s.restore(Memo2, "a")
        got = s.scalars(select(Memo2).where(Memo2.title.match("same")).order_by(Memo2.id))
        assert [m.id for m in got] == ["a", "b"]
        assert s.count(select(Memo2).where(Memo2.code == "a")) == 1
    assert audit(redis_client, soft_new).ok
