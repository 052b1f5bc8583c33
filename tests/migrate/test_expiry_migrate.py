"""Issue 15: migrations add and drop an `ExpiresAt` field with its bookkeeping."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated

import pytest
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


def test_create_index_then_the_sweep_cleans_the_new_entries(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
) -> None:
    """An index created while an object has a deadline (here: soft-deleted) is added to
    its sweep data, so the sweep that purges it releases its new unique claim too."""
    with expiry.use_clock(lambda: T0), redmap.Session(engine) as s:
        s.add_all([Memo(title="same", code="a", id="a"), Memo(title="same", code="b", id="b")])
        s.commit()
        memo = s.get(Memo, "a")
        assert memo is not None
        s.delete(memo)
        s.commit()
    ops = _ops(redis_client, redis_url, soft_new)
    for kind in ("indexed", "sorted", "text"):
        ops.create_index("Memo2", "title", kind)
    ops.create_index("Memo2", "code", "unique")
    assert redis_client.get("{mx}:memo:#uq:code:a") == b"a"
    with expiry.use_clock(lambda: T0 + 600):
        assert engine.sweep(soft_new) == 1
    report = audit(redis_client, soft_new)
    assert report.ok, report.mismatches + report.unexplained
    assert not redis_client.exists("{mx}:memo:a", "{mx}:memo:#uq:code:a")


def _memos(engine: redmap.Engine) -> None:
    """Memos "a" (soft-deleted at T0) and "b", both titled "same", through the new model."""
    with expiry.use_clock(lambda: T0), redmap.Session(engine) as s:
        s.add_all([Memo2(title="same", code="a", id="a"), Memo2(title="same", code="b", id="b")])
        s.commit()
        memo = s.get(Memo2, "a")
        assert memo is not None
        s.delete(memo)
        s.commit()


def _renamed(fields: dict[str, bytes]) -> dict[str, bytes]:
    return {**fields, "title": b"new " + fields["title"], "code": fields["code"] + b"2"}


@pytest.mark.usefixtures("driver")
def test_transform_leaves_soft_deleted_objects_out(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
) -> None:
    """`op.transform` changing the indexed fields of a soft-deleted object keeps it out
    of every query index (its unique claim moves to the new value), and `restore` then
    indexes the transformed values; the sweep leaves nothing once its grace period ends."""
    _memos(engine)
    with expiry.use_clock(lambda: T0 + 1):
        _ops(redis_client, redis_url, soft_new).transform("Memo2", _renamed)
    assert redis_client.hget("{mx}:memo:a", "#d") is not None  # still deleted
    assert redis_client.get("{mx}:memo:#uq:code:a2") == b"a"  # claimed under its new value
    assert not redis_client.exists("{mx}:memo:#uq:code:a")
    with expiry.use_clock(lambda: T0 + 2), redmap.Session(engine) as s:
        for q in (
            Memo2.title == "new same",
            Memo2.title.startswith("new"),
            Memo2.title.match("new"),
        ):
            assert [m.id for m in s.scalars(select(Memo2).where(q))] == ["b"]
        assert s.count(select(Memo2).where(Memo2.code == "a2")) == 0
        assert s.count(select(Memo2).where(Memo2.title == "new same")) == 1
        assert s.count(select(Memo2).where(Memo2.title.match("new"))) == 1
        assert [m.id for m in s.scalars(select(Memo2).order_by(Memo2.title))] == ["b"]
        report = audit(redis_client, soft_new)
        assert report.ok, report.mismatches + report.unexplained
        back = s.restore(Memo2, "a")
        assert (back.title, back.code) == ("new same", "a2")
        got = s.scalars(select(Memo2).where(Memo2.title.match("new")).order_by(Memo2.id))
        assert [m.id for m in got] == ["a", "b"]
        assert s.count(select(Memo2).where(Memo2.code == "a2")) == 1
        assert s.count(select(Memo2).where(Memo2.title == "new same")) == 2
    report = audit(redis_client, soft_new)
    assert report.ok, report.mismatches + report.unexplained
    # Deleted again, then purged: nothing of "a" is left.
    with expiry.use_clock(lambda: T0 + 3), redmap.Session(engine) as s:
        memo = s.get(Memo2, "a")
        assert memo is not None
        s.delete(memo)
        s.commit()
    with expiry.use_clock(lambda: T0 + 3 + 600):
        assert engine.sweep(soft_new) == 1
    report = audit(redis_client, soft_new)
    assert report.ok, report.mismatches + report.unexplained
    assert not redis_client.exists("{mx}:memo:a", "{mx}:memo:#uq:code:a2")
    assert redis_client.smembers("{mx}:memo:#ix:title:new%20same") == {b"b"}
    assert redis_client.zrange("{mx}:memo:#all", 0, -1) == [b"b"]


timed = registry(prefix="mx")


@timed.mapped
@dataclass
class Pass3:
    __keyspace__ = "pass"
    holder: Annotated[str, Indexed(), Text()]
    code: Annotated[str, Unique()] = ""
    rank: Annotated[int, Sorted()] = 0
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


def _moved(fields: dict[str, bytes]) -> dict[str, bytes]:
    return {**fields, "holder": fields["holder"] + b" x", "code": fields["code"] + b"x"}


@pytest.mark.usefixtures("driver")
def test_transform_of_expiring_objects_stays_sweepable(
    engine: redmap.Engine, redis_client: redis.Redis, redis_url: str
) -> None:
    """`op.transform` leaves an expired, unswept object as it is (it is gone; the sweep
    purges it as it was), and keeps the sweep data of a live expiring object in step with
    its new index values, and its deadline with a moved expiry: after a sweep, audit is
    clean and only the objects that never expire are left."""
    at = {1: 10, 2: 100, 3: None, 4: 100}
    with expiry.use_clock(lambda: T0), redmap.Session(engine) as s:
        for i, when in at.items():
            moment = None if when is None else datetime.fromtimestamp(T0 + when, timezone.utc)
            s.add(Pass3(holder=f"h{i}", code=f"c{i}", rank=i, expires=moment, id=i))
        s.commit()

    def fn(fields: dict[str, bytes]) -> dict[str, bytes]:
        out = _moved(fields)
        if out["code"] == b"c4x":  # its expiry moves: from T0 + 100 to T0 + 50
            out["expires"] = datetime.fromtimestamp(T0 + 50, timezone.utc).isoformat().encode()
        return out

    with expiry.use_clock(lambda: T0 + 20):  # 1 is gone, 2 and 4 are live
        _ops(redis_client, redis_url, timed).transform("Pass3", fn)
        with redmap.Session(engine) as s:
            assert sorted(p.holder for p in s.scalars(select(Pass3))) == ["h2 x", "h3 x", "h4 x"]
            assert s.count(select(Pass3).where(Pass3.holder.match("h1"))) == 0
    assert redis_client.hget("{mx}:pass:1", "holder") == b"h1"  # left to the sweep
    assert redis_client.zscore("{mx}:pass:#dl", "4") == (T0 + 50) * 1000
    expires_at = (T0 + 50) * 1000 + expiry.MARGIN_MS  # the hash's own expiry moved too
    assert abs(redis_client.pttl("{mx}:pass:4") - (expires_at - time.time() * 1000)) < 10_000
    with expiry.use_clock(lambda: T0 + 60), redmap.Session(engine) as s:
        assert sorted(p.id for p in s.scalars(select(Pass3))) == [2, 3]
    with expiry.use_clock(lambda: T0 + 200):
        assert engine.sweep(timed) == 3
    report = audit(redis_client, timed)
    assert report.ok, report.mismatches + report.unexplained
    left = {k for k in redis_client.keys("{mx}:pass:*") if not k.endswith(b"#seq")}
    assert left == {
        b"{mx}:pass:3", b"{mx}:pass:#all", b"{mx}:pass:#ix:holder:h3%20x",
        b"{mx}:pass:#ix:code:c3x", b"{mx}:pass:#uq:code:c3x", b"{mx}:pass:#zs:rank",
        b"{mx}:pass:#tx:holder:h3", b"{mx}:pass:#tx:holder:x",
    }  # fmt: skip
