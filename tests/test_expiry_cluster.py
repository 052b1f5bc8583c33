"""Issue 15 on Redis Cluster: deadlines per shard, queries fanned out over shards, the
sweep and the audit, on one server and on a 3-node cluster (`sengine`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import redmap
from redmap import (
    ExpiresAt,
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    registry,
    relationship,
    select,
)
from redmap.audit import audit
from tests._clock import T0, Clock

creg = registry(prefix="xc", shards=4)


@creg.mapped
@dataclass
class Visit:
    __shard_key__ = "site"
    site: Annotated[int, Indexed()]
    page: Annotated[str, Indexed()]
    rank: Annotated[int, Sorted()] = 0
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@creg.mapped
@dataclass
class Invite:
    __soft_delete__ = timedelta(seconds=10)
    code: Annotated[str, Unique()]
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


rreg = registry(prefix="xr")


@rreg.mapped
@dataclass
class Shelf:
    name: str
    books: list[Book] = relationship(back_populates="shelf", cascade="all, delete")
    notes: list[Note] = relationship(back_populates="shelf")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@rreg.mapped
@dataclass
class Book:
    __soft_delete__ = timedelta(seconds=20)
    title: str
    shelf_id: Annotated[int | None, ForeignKey("Shelf")] = None
    shelf: Shelf | None = relationship(back_populates="books")
    id: Annotated[int | None, PrimaryKey()] = None


@rreg.mapped
@dataclass
class Note:
    __soft_delete__ = timedelta(seconds=20)
    text: str
    shelf_id: Annotated[int | None, ForeignKey("Shelf")] = None
    shelf: Shelf | None = relationship(back_populates="notes")
    id: Annotated[int | None, PrimaryKey()] = None


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(T0 + seconds, timezone.utc)


def test_per_shard_deadlines(sengine: redmap.Engine, clock: Clock) -> None:
    for site in range(8):
        with Session(sengine) as s:
            for i in range(5):
                s.add(Visit(site=site, page=f"p{i % 2}", rank=10 * site + i, expires=_at(i)))
            s.commit()
    with Session(sengine) as s:
        s.add(Invite(code="a", expires=_at(3)))
        s.add(Invite(code="b"))
        s.commit()
    clock.now = T0 + 2.5  # i = 0, 1, 2 expired: 2 live visits per site
    with Session(sengine) as s:
        assert s.count(select(Visit)) == 16
        assert s.count(select(Visit).where(Visit.page == "p1")) == 8
        top = s.scalars(select(Visit).order_by(Visit.rank.desc()).limit(3)).all()
        assert [v.rank for v in top] == [74, 73, 64]
        page = s.scalars(select(Visit).where(Visit.site == 3).order_by(Visit.rank)).all()
        assert [v.rank for v in page] == [33, 34]
    clock.now = T0 + 4
    with Session(sengine) as s:
        inv = s.scalars(select(Invite).where(Invite.code == "b")).one()
        s.delete(inv)
        s.commit()
        s.add(Invite(code="a"))  # "a" expired: taken over
        s.commit()
        assert s.count(select(Invite)) == 1
    clock.now = T0 + 100  # the soft delete's grace period is over too
    sengine.sweep(creg)
    report = audit(sengine.dialect.client, creg)
    assert report.ok, report.mismatches + report.unexplained
    client: Any = sengine.dialect.client
    keys = [k for k in client.keys("*") if b"#flush:" not in k and not k.endswith(b"#seq")]
    # Left: the one live Invite ("a", inserted at T0+4 without an expiry).
    assert all(b"xc}:invite" in k for k in keys), keys


def test_soft_deleted_children_of_an_expired_parent(sengine: redmap.Engine, clock: Clock) -> None:
    """On one server and on the cluster: the sweep of an expired shelf purges its books
    (delete cascade), the soft-deleted one too, and detaches its notes, the soft-deleted
    one too (restored, it has no shelf); the audit is clean after the sweep."""
    with Session(sengine) as s:
        shelf = Shelf(name="s", expires=_at(10))
        shelf.books = [Book(title="live"), Book(title="hidden")]
        shelf.notes = [Note(text="live"), Note(text="hidden")]
        s.add(shelf)
        s.commit()
        book, note = s.get(Book, 2), s.get(Note, 2)
        assert book is not None and book.title == "hidden"
        assert note is not None and note.text == "hidden"
        s.delete(book)
        s.delete(note)
        s.commit()
    clock.now = T0 + 11
    sengine.sweep(rreg)
    report = audit(sengine.dialect.client, rreg)
    assert report.ok, report.mismatches + report.unexplained
    with Session(sengine) as s:
        assert s.count(select(Book)) == 0
        assert s.get(Book, 2, include_deleted=True) is None
        notes = {n.text: n for n in s.scalars(select(Note)).all()}
        assert list(notes) == ["live"] and notes["live"].shelf_id is None
        back = s.restore(Note, 2)
        assert back.shelf_id is None
        s.commit()
    assert audit(sengine.dialect.client, rreg).ok
