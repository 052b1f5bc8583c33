"""Issues 15 and 16 together: string indexes (`Sorted()` on str, `Text()`, `Suffix()`) on
models whose objects expire or are soft-deleted.

An expired object is gone for string queries and counts before any sweep, as for every
other query; the sweep removes its string index entries (members made of its value and
its id, which it rebuilds from the sweep data once Redis dropped the hash), leaving the
audit clean. A soft delete takes the object out of its string indexes and a restore puts
it back. Sync, asyncio and scripted flushes (`driver` fixture); a clock the test moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated

import pytest
import redis

from redmap import (
    ExpiresAt,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Suffix,
    Text,
    registry,
    select,
)
from redmap.audit import audit
from redmap.engine import Engine
from tests._clock import T0, Clock

reg = registry(prefix="exs")


@reg.mapped
@dataclass
class Note:
    title: Annotated[str, Sorted()]
    body: Annotated[str, Text()]
    mail: Annotated[str, Suffix()]
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Page:
    __soft_delete__ = timedelta(minutes=5)
    title: Annotated[str, Sorted()]
    body: Annotated[str, Text()]
    mail: Annotated[str, Suffix()]
    id: Annotated[str | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Shard:
    """Sharded by its own key: a query without the key reads every shard."""

    __shard_key__ = "id"
    title: Annotated[str | None, Sorted()] = None
    rank: Annotated[int, Indexed()] = 0
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


def raw(engine: Engine) -> redis.Redis:
    client: redis.Redis = engine.dialect.client
    return client


def _ok(engine: Engine) -> None:
    report = audit(raw(engine), reg)
    assert report.ok, report.mismatches + report.unexplained


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


def _titles(s: Session, stmt: object) -> list[str]:
    return [n.title for n in s.scalars(stmt)]  # type: ignore[arg-type]


@pytest.mark.usefixtures("driver")
def test_expired_objects_leave_string_queries_before_the_sweep(
    engine: Engine, clock: Clock
) -> None:
    with Session(engine) as s:
        for i in range(8):
            # Odd ones expire at 10 * i seconds; values share words, prefixes, suffixes,
            # and hold the characters the encoding escapes.
            s.add(
                Note(
                    title=f"red\n#{i}",
                    body=f"fast redis mapper {i % 2}",
                    mail=f"u{i}@example.com",
                    expires=_at(10 * i) if i % 2 else None,
                )
            )
        s.commit()
    clock.now = T0 + 35  # 1 and 3 expired; 5 and 7 alive
    with Session(engine) as s:
        alive = ["red\n#0", "red\n#2", "red\n#4", "red\n#5", "red\n#6", "red\n#7"]
        q = select(Note).where(Note.title.startswith("red"))
        assert sorted(_titles(s, q)) == alive
        assert _titles(s, q.order_by(Note.title)) == alive
        assert _titles(s, q.order_by(Note.title.desc()).offset(1).limit(3)) == alive[::-1][1:4]
        assert _titles(s, select(Note).order_by(Note.title).limit(3)) == alive[:3]
        assert s.count(q) == 6
        assert s.count(select(Note).where(Note.body.match("redis 1"))) == 2
        assert sorted(_titles(s, select(Note).where(Note.body.match("mapper 1")))) == alive[3::2]
        assert s.count(select(Note).where(Note.mail.endswith("@example.com"))) == 6
        ended = select(Note).where(Note.mail.endswith("3@example.com"))
        assert _titles(s, ended) == [] and s.count(ended) == 0
        assert s.count(select(Note).where(Note.title >= "red\n#3")) == 4
    clock.now = T0 + 1000  # every odd one expired, then swept
    assert engine.sweep(reg) == 4
    client = raw(engine)
    for key in client.keys("{exs}:note:#*"):
        kind = client.type(key)
        if kind not in (b"zset", b"set"):
            continue
        members = client.zrange(key, 0, -1) if kind == b"zset" else client.smembers(key)
        for m in members:
            # No entry of a swept object is left (members end with their id).
            assert not any(m.endswith(b"\x00" + str(i).encode()) for i in (2, 4, 6, 8)), m
            assert m not in (b"2", b"4", b"6", b"8"), (key, m)
    assert client.scard("{exs}:note:#tx:body:1") == 0
    _ok(engine)


@pytest.mark.usefixtures("driver")
def test_soft_delete_leaves_the_string_indexes_and_restore_brings_it_back(
    engine: Engine, clock: Clock
) -> None:
    with Session(engine) as s:
        s.add_all(
            [
                Page(title="Alpha", body="one two", mail="a@x.org", id="a"),
                Page(title="Beta", body="two three", mail="b@x.org", id="b"),
            ]
        )
        s.commit()
    with Session(engine) as s:
        page = s.get(Page, "a")
        assert page is not None
        s.delete(page)
        s.commit()
    _ok(engine)
    with Session(engine) as s:
        assert _titles(s, select(Page).where(Page.body.match("two"))) == ["Beta"]
        assert _titles(s, select(Page).where(Page.mail.endswith("x.org"))) == ["Beta"]
        assert _titles(s, select(Page).order_by(Page.title)) == ["Beta"]
        assert s.count(select(Page).where(Page.title < "Z")) == 1
        s.restore(Page, "a")
    _ok(engine)
    with Session(engine) as s:
        assert _titles(s, select(Page).where(Page.body.match("two")).order_by(Page.title)) == [
            "Alpha",
            "Beta",
        ]
        assert s.count(select(Page).where(Page.mail.endswith("@x.org"))) == 2
        page = s.get(Page, "a")
        assert page is not None
        s.delete(page)
        s.commit()
    clock.now = T0 + 600  # the grace period ended: purged by the sweep
    assert engine.sweep(reg) == 1
    client = raw(engine)
    assert client.zrange("{exs}:page:#lx:title", 0, -1) == [b"\x01Beta\x00b"]
    assert client.smembers("{exs}:page:#tx:body:one") == set()
    _ok(engine)


@pytest.mark.usefixtures("driver")
def test_string_order_of_a_sharded_expiring_model_across_shards(
    engine: Engine, clock: Clock
) -> None:
    """Found by the expiry state machine (seed 1, 30 examples): on a model with ExpiresAt
    the order of a string field is a temporary zset scored by rank *within its shard*,
    and the fan-out merged the shards by those ranks, so "redder" (first of its shard)
    came before "Red" (first of another). The shards' pages are now merged by the
    members the values make, as one index would order them."""
    titles = {1: "redder", 2: "Red", 3: None, 4: "blue", 5: "red\x00fox", 6: "Red", 7: "#1"}
    with Session(engine) as s:
        for pk, title in titles.items():
            # 8 expires at 10 s: it leaves every page once gone.
            s.add(Shard(title=title, id=pk))
        s.add(Shard(title="a", id=8, expires=_at(10)))
        s.commit()
    clock.now = T0 + 11
    # None first, then by code point (UTF-8 bytes), equal values by id bytes.
    asc = [None, "#1", "Red", "Red", "blue", "red\x00fox", "redder"]
    ids = [3, 7, 2, 6, 4, 5, 1]
    with Session(engine) as s:
        assert _titles(s, select(Shard).order_by(Shard.title)) == asc
        assert [o.id for o in s.scalars(select(Shard).order_by(Shard.title))] == ids
        assert _titles(s, select(Shard).order_by(Shard.title.desc())) == asc[::-1]
        assert _titles(s, select(Shard).order_by(Shard.title).offset(1).limit(3)) == asc[1:4]
        assert _titles(s, select(Shard).order_by(Shard.title.desc()).offset(2).limit(2)) == (
            asc[::-1][2:4]
        )
        q = select(Shard).where(Shard.title.startswith("re")).order_by(Shard.title)
        assert _titles(s, q.limit(1)) == ["red\x00fox"]
        q = select(Shard).where(Shard.rank == 0).order_by(Shard.title.desc(), Shard.id)
        assert [o.id for o in s.scalars(q.limit(4))] == [1, 5, 4, 2]
