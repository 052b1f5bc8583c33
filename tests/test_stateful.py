"""Property-based tests: random session histories against an in-memory reference model."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from redmap import (
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    create_engine,
    or_,
    registry,
    select,
)
from redmap.engine import Engine
from redmap.exc import IntegrityError, StaleDataError
from redmap.orm.persistence import TOKEN_TTL_MS
from tests.reliability._budget import Stats, check_minimums, examples_from_env, run_seeded

reg = registry(prefix="sm")

STATS = Stats()
"""Counts over a run (rules, flush outcomes, the stale-after-expire branch), printed at
the end; `MINIMUMS` per 100 examples must be reached."""

MINIMUMS = {
    "driver=sync": 10,
    "driver=async": 10,
    "flush=watch": 10,
    "flush=script": 10,
    "reload keeps old version (stale after expire)": 30,
    "stale after expire: flush refused": 40,
    "flushes refused: StaleDataError": 60,
    "flushes refused: IntegrityError": 4,
    # 30 to 135 per run of 120 (seed 29621802 gave 30, under the old minimum of 36).
    "objects updated": 10,
    "objects inserted": 25,
    "objects deleted": 15,
    "rule foreign_commit": 100,
}


@reg.mapped
@dataclass
class Item:
    """The model under test: one field per kind of index, and a plain one."""

    name: Annotated[str, Indexed()]
    code: Annotated[str | None, Unique()] = None
    rank: Annotated[int, Sorted()] = 0
    note: str | None = None
    id: Annotated[int | None, PrimaryKey()] = None


# Small alphabets, so that equality conditions, unique values and sort ties collide often.
NAMES = ("a", "b", "c")
CODES = ("w", "x", "y", "z")
RANKS = (-3, 3)
NOTES = (None, "n", "m")
FIELDS = ("name", "code", "rank", "note")
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(NAMES),
    "code": st.one_of(st.none(), st.sampled_from(CODES)),
    "rank": st.integers(*RANKS),
    "note": st.sampled_from(NOTES),
}
SESSIONS = st.sampled_from(("A", "B"))

# Every key of the model; flush tokens live next to it under "{sm}:#flush:".
BASE = "{sm}:item:"
TOKEN_PREFIX = "{sm}:#flush:"


@dataclass(frozen=True)
class Row:
    """The committed field values of one object."""

    name: str
    code: str | None
    rank: int
    note: str | None


ROWS = st.builds(Row, VALUES["name"], VALUES["code"], VALUES["rank"], VALUES["note"])


def row_of(obj: Item) -> Row:
    """The field values an object shows (reading them loads it if expired)."""
    return Row(obj.name, obj.code, obj.rank, obj.note)


class Tracked:
    """One session under test, and what the reference model says it holds."""

    def __init__(self, session: Session, *, autoflush: bool):
        self.session = session
        self.autoflush = autoflush
        # The identity map: persistent objects by primary key.
        self.objs: dict[int, Item] = {}
        # The committed row and version each object was loaded at.
        self.snap: dict[int, Row] = {}
        self.version: dict[int, int] = {}
        # Objects with unloaded attributes, and which of their fields were assigned since
        # they expired (those stay loaded: pending, or written by this session's flush).
        self.expired: set[int] = set()
        self.partial: dict[int, set[str]] = {}
        # Fields assigned while expired, until written or expired again: a flush writes
        # them even when equal to the snapshot (`InstanceState.blind`); a reload does
        # not end this, unlike `partial`.
        self.blind: dict[int, set[str]] = {}
        # Assignments since the snapshot (equal values included: they count once the
        # snapshot changes under them).
        self.dirty: dict[int, dict[str, Any]] = {}
        # Added objects not yet flushed, in order, and objects marked for deletion.
        self.new: list[tuple[Item, Row]] = []
        self.deleted: set[int] = set()
        # Objects a StaleDataError named since the last rollback, and those that
        # rollback marked: their next load or flush takes what Redis holds
        # (`InstanceState.reload`; tests/test_retry_after_rollback.py).
        self.refused: set[int] = set()
        self.reload: set[int] = set()

    def view(self, pk: int) -> Row:
        """What the session's object should show: the snapshot plus pending assignments."""
        return dataclasses.replace(self.snap[pk], **self.dirty.get(pk, {}))

    def changes(self) -> dict[int, dict[str, Any]]:
        """The fields a flush would write, per persistent object."""
        out = {}
        for pk in sorted(self.dirty):
            if pk in self.deleted:
                continue
            snap = self.snap[pk]
            blind = self.blind.get(pk, set())
            ch = {f: v for f, v in self.dirty[pk].items() if getattr(snap, f) != v or f in blind}
            if ch:
                out[pk] = ch
        return out

    def expire_all(self) -> None:
        """Like `Session.expire_all`: everything unloaded, assignments dropped."""
        self.expired = set(self.objs)
        self.partial.clear()
        self.blind.clear()
        self.dirty.clear()

    def rollback(self) -> None:
        """Like `Session.rollback`: new objects expunged, deletions dropped, all expired."""
        self.new.clear()
        self.deleted.clear()
        self.expire_all()
        self.reload |= self.refused
        self.refused.clear()

    def forget(self, pk: int) -> None:
        """The object was deleted by this session's flush: it leaves the identity map."""
        self.objs.pop(pk, None)
        self.snap.pop(pk, None)
        self.version.pop(pk, None)
        self.dirty.pop(pk, None)
        self.expired.discard(pk)
        self.partial.pop(pk, None)
        self.blind.pop(pk, None)
        self.refused.discard(pk)
        self.reload.discard(pk)


class SessionHistories(RuleBasedStateMachine):
    """Two sessions (A autoflushes, B does not) and short-lived foreign writers on one Redis."""

    # Set by the test function before the machine runs (state machines take no fixtures):
    # an engine per driver, "sync" and "async" (tests/_async_driver.py); each example
    # draws one.
    engines: dict[str, Engine]
    client: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        STATS.bump("examples")
        self.client.flushall()
        # The committed state: rows and versions by primary key, and the id counter.
        self.ref: dict[int, Row] = {}
        self.ver: dict[int, int] = {}
        self.seq = 0
        self.tick = 0
        self.queried: tuple[tuple[int, Row], ...] | None = None
        self.sessions: dict[str, Tracked] = {}

    def teardown(self) -> None:
        """Close the two sessions (their objects stay in memory, detached)."""
        for t in self.sessions.values():
            t.session.close()

    # -- the model of a flush ---------------------------------------------------------

    def _predict(self, t: Tracked) -> tuple[set[type[Exception]], dict[int, dict[str, Any]]]:
        """The errors a flush of `t` must raise (empty: it succeeds) and its updates."""
        updates = t.changes()
        errors: set[type[Exception]] = set()
        claims = [(ch["code"], pk) for pk, ch in updates.items() if ch.get("code") is not None]
        claims += [(row.code, None) for _, row in t.new if row.code is not None]
        codes = [c for c, _ in claims]
        twice = len(set(codes)) < len(codes)
        if twice:
            errors.add(IntegrityError)
        released: dict[str, set[int]] = {}
        for pk in [*t.deleted, *(pk for pk, ch in updates.items() if "code" in ch)]:
            old = t.snap[pk].code
            if old is not None:
                released.setdefault(old, set()).add(pk)
        owners = {row.code: pk for pk, row in self.ref.items() if row.code is not None}
        for code, claimer in claims:
            owner = owners.get(code)
            if owner is not None and owner != claimer and owner not in released.get(code, ()):
                errors.add(IntegrityError)
        for pk in [*t.deleted, *updates]:
            if self.ver.get(pk) != t.version[pk]:
                # Staleness wins (issue 11 item 8): a retry may then succeed. A value
                # claimed twice in the flush may be refused before any I/O.
                errors = {StaleDataError} | ({IntegrityError} if twice else set())
        return errors, updates

    def _flushing(self, t: Tracked, action: Callable[[], Any]) -> tuple[bool, Any]:
        """Run `action`, which flushes `t`, and check it does what the model predicts.

        On success the flush is applied to the reference; on the predicted error the
        session is rolled back (the invariants then check that nothing was written).
        """
        saved = []
        if t.reload and (t.new or t.deleted or t.dirty):
            # A flush with anything pending first loads the objects a rollback marked
            # (those Redis still holds): their snapshot and version become current. A
            # failed flush puts them back as they were, marks included.
            for pk in sorted(t.reload & set(self.ref)):
                saved.append((pk, t.snap[pk], t.version[pk], pk in t.expired,
                              t.partial.get(pk)))
                if t.version[pk] != self.ver[pk]:
                    STATS.bump("flush reloaded a marked object that had changed")
                t.snap[pk] = self.ref[pk]
                t.version[pk] = self.ver[pk]
                t.expired.discard(pk)
                t.partial.pop(pk, None)
                t.reload.discard(pk)
        errors, updates = self._predict(t)
        if errors:
            with pytest.raises((StaleDataError, IntegrityError)) as info:
                action()
            assert type(info.value) in errors, f"{info.value!r}, expected one of {errors}"
            STATS.bump(f"flushes refused: {type(info.value).__name__}")
            for pk, snap, version, expired, partial in saved:
                t.snap[pk], t.version[pk] = snap, version
                if expired:
                    t.expired.add(pk)
                if partial is not None:
                    t.partial[pk] = partial
                t.reload.add(pk)
            if isinstance(info.value, StaleDataError):
                named = {id(o) for o in info.value.objects}
                t.refused |= {pk for pk, o in t.objs.items() if id(o) in named}
            t.session.rollback()
            t.rollback()
            return False, None
        result = action()
        STATS.bump("flushes applied")
        STATS.bump("objects deleted", len(t.deleted))
        STATS.bump("objects updated", len(updates))
        STATS.bump("objects inserted", len(t.new))
        for pk in sorted(t.deleted):
            del self.ref[pk], self.ver[pk]
            t.forget(pk)
        t.deleted.clear()
        for pk, ch in updates.items():
            self.ref[pk] = dataclasses.replace(self.ref[pk], **ch)
            self.ver[pk] += 1
            t.snap[pk] = self.ref[pk]
            t.version[pk] = self.ver[pk]
            t.dirty.pop(pk, None)
            t.blind.pop(pk, None)
        for obj, row in t.new:
            self.seq += 1
            assert obj.id == self.seq, "generated ids are handed out in order, none skipped"
            self.ref[self.seq] = row
            self.ver[self.seq] = 1
            t.objs[self.seq] = obj
            t.snap[self.seq] = row
            t.version[self.seq] = 1
        t.new.clear()
        return True, result

    def _get(self, t: Tracked, pk: int) -> Item | None:
        """`session.get`, checked against the model (identity, autoflush, reload, values)."""
        s = t.session
        if pk in t.deleted:
            assert s.get(Item, pk) is None
            return None
        if pk in t.objs and pk not in t.expired:
            obj = s.get(Item, pk)
            assert obj is t.objs[pk]
        else:
            if t.autoflush:
                ok, obj = self._flushing(t, lambda: s.get(Item, pk))
                if not ok:
                    return None
            else:
                obj = s.get(Item, pk)
            if pk in t.objs and pk not in t.expired:
                # Inserted by the autoflush just now.
                assert obj is t.objs[pk]
            elif pk not in self.ref:
                assert obj is None
                return None
            else:
                if pk in t.objs:
                    assert obj is t.objs[pk]
                else:
                    assert obj is not None
                    t.objs[pk] = obj
                kept = t.partial.pop(pk, set())
                marked = pk in t.reload  # (nothing read at the old version since)
                t.reload.discard(pk)
                if kept and t.version[pk] != self.ver[pk] and not marked:
                    # Fields assigned while expired, and the object changed since: the
                    # reload fills the other fields but keeps the old version, so the
                    # object never passes for current and a flush detects the conflict.
                    STATS.bump("reload keeps old version (stale after expire)")
                    old = t.snap[pk]
                    values = {f: getattr(old, f) for f in kept}
                    t.snap[pk] = dataclasses.replace(self.ref[pk], **values)
                else:
                    t.snap[pk] = self.ref[pk]
                    t.version[pk] = self.ver[pk]
                t.expired.discard(pk)
        assert obj is not None
        assert row_of(obj) == t.view(pk)
        return obj

    def _pick(self, data: st.DataObject, t: Tracked) -> int:
        """A primary key: committed, held by the session, or the next one to be handed out."""
        candidates = sorted(set(self.ref) | set(t.objs) | {self.seq + 1})
        return data.draw(st.sampled_from(candidates), label="pk")

    # -- rules ------------------------------------------------------------------------

    @initialize(
        rows=st.lists(ROWS, max_size=12),
        driver=st.sampled_from(("sync", "async")),
        flush=st.sampled_from(("watch", "script")),
    )
    def seed(self, rows: list[Row], driver: str, flush: str) -> None:
        """Start from up to 12 committed objects, so that ids reach two digits early; the
        sessions run on the drawn driver and commit the drawn way (WATCH + checks, or
        one script inside MULTI: issue 14)."""
        self.engine = self.engines[driver]
        self.engine.flush_script_threshold = 0 if flush == "script" else None
        STATS.bump(f"driver={driver}")
        STATS.bump(f"flush={flush}")
        self.sessions = {
            "A": Tracked(Session(self.engine, autoflush=True), autoflush=True),
            "B": Tracked(Session(self.engine, autoflush=False), autoflush=False),
        }
        taken: set[str | None] = {None}
        seeded = []
        for row in rows:
            if row.code in taken:
                row = dataclasses.replace(row, code=None)
            taken.add(row.code)
            seeded.append(row)
        with Session(self.engine) as s:
            objs = [Item(name=r.name, code=r.code, rank=r.rank, note=r.note) for r in seeded]
            s.add_all(objs)
            s.commit()
            for obj, row in zip(objs, seeded, strict=True):
                self.seq += 1
                assert obj.id == self.seq
                self.ref[self.seq] = row
                self.ver[self.seq] = 1

    @rule(who=SESSIONS, row=ROWS)
    @STATS.rule
    def add(self, who: str, row: Row) -> None:
        """A session adds a new object; it is written at that session's next flush."""
        t = self.sessions[who]
        obj = Item(name=row.name, code=row.code, rank=row.rank, note=row.note)
        t.session.add(obj)
        t.new.append((obj, row))

    @rule(who=SESSIONS, data=st.data(), via_get=st.booleans(), field=st.sampled_from(FIELDS))
    @STATS.rule
    def update(self, who: str, data: st.DataObject, via_get: bool, field: str) -> None:
        """A session assigns one field of an object it holds (loading it with get first)."""
        t = self.sessions[who]
        pk = self._pick(data, t)
        if via_get or pk not in t.objs or pk in t.deleted:
            obj = self._get(t, pk)
            if obj is None:
                return
        else:
            obj = t.objs[pk]  # possibly expired: assigning loads nothing
        # A value other than the one the session shows: every update is a change.
        current = getattr(t.view(pk), field)
        value = data.draw(VALUES[field].filter(lambda v: v != current), label="value")
        setattr(obj, field, value)
        t.dirty.setdefault(pk, {})[field] = value
        if pk in t.expired:
            t.partial.setdefault(pk, set()).add(field)
            t.blind.setdefault(pk, set()).add(field)

    @rule(who=SESSIONS, data=st.data(), via_get=st.booleans())
    @STATS.rule
    def delete(self, who: str, data: st.DataObject, via_get: bool) -> None:
        """A session marks an object it holds for deletion (loading it with get first)."""
        t = self.sessions[who]
        pk = self._pick(data, t)
        if via_get or pk not in t.objs or pk in t.deleted:
            obj = self._get(t, pk)
            if obj is None:
                return
        else:
            obj = t.objs[pk]
        t.session.delete(obj)
        t.deleted.add(pk)

    @rule(who=SESSIONS)
    @STATS.rule
    def commit(self, who: str) -> None:
        """A session commits: its changes are written atomically, or not at all."""
        t = self.sessions[who]
        ok, _ = self._flushing(t, t.session.commit)
        if ok:
            t.expire_all()

    @rule(who=SESSIONS)
    @STATS.rule
    def flush(self, who: str) -> None:
        """A session flushes without expiring its objects."""
        t = self.sessions[who]
        self._flushing(t, t.session.flush)

    @rule(who=SESSIONS, really=st.integers(0, 3))
    @STATS.rule
    def rollback(self, who: str, really: int) -> None:
        """A session rolls back: pending work is dropped, loaded objects are expired (one
        time in four: pending work is worth keeping for commits and conflicts)."""
        if really:
            return
        t = self.sessions[who]
        t.session.rollback()
        t.rollback()

    @rule(who=SESSIONS, really=st.integers(0, 3))
    @STATS.rule
    def expire_all(self, who: str, really: int) -> None:
        """A session expires every object: assignments are dropped, values reload on access
        (one time in four)."""
        if really:
            return
        t = self.sessions[who]
        t.session.expire_all()
        t.expire_all()

    @rule(who=SESSIONS, data=st.data(), field=st.sampled_from(FIELDS))
    @STATS.rule
    def stale_after_expire(self, who: str, data: st.DataObject, field: str) -> None:
        """A session holds an object, expires everything and assigns one field without
        loading; a foreign session changes the object; the session reads it (the reload
        keeps the old version) and flushes: StaleDataError, nothing written."""
        t = self.sessions[who]
        if t.new or t.deleted or t.changes() or not self.ref:
            return  # only an idle session: the expiry would drop pending work
        pk = data.draw(st.sampled_from(sorted(self.ref)), label="pk")
        if self._get(t, pk) is None:
            return
        t.session.expire_all()
        t.expire_all()
        obj = t.objs[pk]
        value = data.draw(VALUES[field], label="value")
        setattr(obj, field, value)
        t.dirty.setdefault(pk, {})[field] = value
        t.partial.setdefault(pk, set()).add(field)
        t.blind.setdefault(pk, set()).add(field)
        with Session(self.engine) as s:
            found = s.get(Item, pk)
            assert found is not None
            found.rank = self.ref[pk].rank + 1 if self.ref[pk].rank < RANKS[1] else RANKS[0]
            s.commit()
            self.ref[pk] = dataclasses.replace(self.ref[pk], rank=found.rank)
            self.ver[pk] += 1
        if self._get(t, pk) is None:  # autoflush (session A) refused the flush
            STATS.bump("stale after expire: flush refused")
            return
        ok, _ = self._flushing(t, t.session.flush)
        if not ok:
            STATS.bump("stale after expire: flush refused")

    @rule(data=st.data(), action=st.sampled_from(("insert", "update", "delete", "insert")))
    @STATS.rule
    def foreign_commit(self, data: st.DataObject, action: str) -> None:
        """A third, short-lived session inserts, changes or deletes one object and commits."""
        owners = {row.code: pk for pk, row in self.ref.items() if row.code is not None}
        with Session(self.engine) as s:
            if action == "insert" or not self.ref:
                row = data.draw(ROWS, label="row")
                obj = Item(name=row.name, code=row.code, rank=row.rank, note=row.note)
                s.add(obj)
                if row.code in owners:
                    with pytest.raises(IntegrityError):
                        s.commit()
                    return
                s.commit()
                self.seq += 1
                assert obj.id == self.seq
                self.ref[self.seq] = row
                self.ver[self.seq] = 1
                return
            pk = data.draw(st.sampled_from(sorted(self.ref)), label="pk")
            found = s.get(Item, pk)
            assert found is not None
            assert row_of(found) == self.ref[pk]
            if action == "delete":
                s.delete(found)
                s.commit()
                del self.ref[pk], self.ver[pk]
                return
            field = data.draw(st.sampled_from(FIELDS), label="field")
            value = data.draw(VALUES[field], label="value")
            setattr(found, field, value)
            new = dataclasses.replace(self.ref[pk], **{field: value})
            if new == self.ref[pk]:
                s.commit()  # nothing changed: nothing written, the version stays
                return
            if field == "code" and owners.get(value, pk) != pk:
                with pytest.raises(IntegrityError):
                    s.commit()
                return
            s.commit()
            self.ref[pk] = new
            self.ver[pk] += 1

    # -- invariants -------------------------------------------------------------------

    def _ids(self, pred: Callable[[Row], bool], *, order: str | None = None,
             limit: int | None = None, offset: int = 0) -> list[int]:
        """The reference's answer: ids by primary key, or by rank (docs/queries.md, Ordering:
        equal scores order by the text of the id, "10" before "9"; desc() reverses it all)."""
        ids = [pk for pk in sorted(self.ref) if pred(self.ref[pk])]
        if order is not None:
            ids.sort(key=lambda pk: (self.ref[pk].rank, str(pk)), reverse=order == "desc")
        ids = ids[offset:]
        return ids if limit is None else ids[:limit]

    @invariant()
    def queries_match_reference(self) -> None:
        """Every query form returns exactly the reference's ids, in order; count() agrees."""
        STATS.bump("steps")
        # Query results depend only on what Redis holds, which `keys_match_reference`
        # compares with the reference after every step: a state already queried (the
        # step wrote nothing) is not queried again, which keeps 200 x 50 steps fast.
        state = tuple(sorted(self.ref.items()))
        if state == self.queried:
            return
        self.queried = state
        self.tick += 1
        k = self.tick
        n1, n2 = NAMES[k % 3], NAMES[(k + 1) % 3]
        code = (None, *CODES)[k % 5]
        v = RANKS[0] + k % 7
        lo, hi = v - 1, v + k % 3
        limit = (None, 1, 2, 3)[k % 4]
        offset = (0, 1, 2)[k % 3]
        with Session(self.engine) as s:
            everything = s.scalars(select(Item)).all()
            assert [o.id for o in everything] == sorted(self.ref)
            assert {o.id: row_of(o) for o in everything} == self.ref
            cases: list[tuple[Any, Callable[[Row], bool]]] = [
                ([], lambda r: True),
                ([Item.name == n1], lambda r: r.name == n1),
                ([Item.name != n1], lambda r: r.name != n1),
                ([Item.name.in_([n1, n2, "absent"])], lambda r: r.name in (n1, n2)),
                ([Item.code == code], lambda r: r.code == code),
                ([Item.code != code], lambda r: r.code != code),
                ([Item.code.in_([code, CODES[k % 4]])], lambda r: r.code in (code, CODES[k % 4])),
                ([Item.rank < v], lambda r: r.rank < v),
                ([Item.rank <= v], lambda r: r.rank <= v),
                ([Item.rank > v], lambda r: r.rank > v),
                ([Item.rank >= v], lambda r: r.rank >= v),
                ([Item.rank.between(lo, hi)], lambda r: lo <= r.rank <= hi),
                ([or_(Item.name == n1, Item.rank >= v)], lambda r: r.name == n1 or r.rank >= v),
                ([or_(Item.code == code, Item.name != n2)],
                 lambda r: r.code == code or r.name != n2),
                ([Item.name == n1, Item.rank.between(lo, hi)],
                 lambda r: r.name == n1 and lo <= r.rank <= hi),
                ([Item.name != n2, Item.rank > v], lambda r: r.name != n2 and r.rank > v),
            ]
            for where, pred in cases:
                stmt = select(Item).where(*where)
                expected = self._ids(pred)
                got = [o.id for o in s.scalars(stmt)]
                assert got == expected, f"{stmt!r}: {got} != {expected}"
                assert s.count(stmt) == len(expected), stmt
            for where, pred in (cases[0], cases[1], cases[12]):
                for term, order in ((Item.rank, "asc"), (Item.rank.desc(), "desc")):
                    stmt = select(Item).where(*where).order_by(term).limit(limit).offset(offset)
                    expected = self._ids(pred, order=order, limit=limit, offset=offset)
                    got = [o.id for o in s.scalars(stmt)]
                    assert got == expected, f"{stmt!r} limit={limit} offset={offset}: {got}"
                    assert s.count(stmt) == len(expected), stmt
            page = select(Item).order_by(Item.id).limit(limit).offset(offset)
            got = [o.id for o in s.scalars(page)]
            assert got == self._ids(lambda r: True, limit=limit, offset=offset)
            page = select(Item).order_by(Item.id.desc()).limit(limit).offset(offset)
            got = [o.id for o in s.scalars(page)]
            assert got == sorted(self.ref, reverse=True)[offset:][:limit]

    @invariant()
    def keys_match_reference(self) -> None:
        """Redis holds exactly the reference's object hashes and index entries, nothing else."""
        expected: dict[str, Any] = {}
        for pk, row in self.ref.items():
            h = {"name": row.name, "rank": str(row.rank), "#v": str(self.ver[pk])}
            if row.code is not None:
                h["code"] = row.code
            if row.note is not None:
                h["note"] = row.note
            expected[f"{BASE}{pk}"] = h
            expected.setdefault(f"{BASE}#ix:name:{row.name}", set()).add(str(pk))
            code = "#null" if row.code is None else row.code
            expected.setdefault(f"{BASE}#ix:code:{code}", set()).add(str(pk))
            if row.code is not None:
                expected[f"{BASE}#uq:code:{row.code}"] = str(pk)
        if self.ref:
            expected[f"{BASE}#all"] = [(str(pk), float(pk)) for pk in sorted(self.ref)]
            expected[f"{BASE}#zs:rank"] = sorted(
                ((str(pk), float(r.rank)) for pk, r in self.ref.items()),
                key=lambda m: (m[1], m[0]),
            )
        if self.seq:
            # Refused flushes never move the counter: it equals the ids handed out.
            expected[f"{BASE}#seq"] = str(self.seq)
        present = {k.decode() for k in self.client.keys("*")}
        tokens = sorted(k for k in present if k.startswith(TOKEN_PREFIX))
        assert present.difference(tokens) == set(expected), (
            f"unexplained keys {sorted(present.difference(tokens, expected))}, "
            f"missing keys {sorted(set(expected) - present)}"
        )
        pipe = self.client.pipeline(transaction=False)
        for token in tokens:
            pipe.pttl(token)
        for key, want in expected.items():
            if isinstance(want, dict):
                pipe.hgetall(key)
            elif isinstance(want, set):
                pipe.smembers(key)
            elif isinstance(want, list):
                pipe.zrange(key, 0, -1, withscores=True)
            else:
                pipe.get(key)
        replies = pipe.execute()
        for token, ttl in zip(tokens, replies, strict=False):
            assert 0 < ttl <= TOKEN_TTL_MS, f"flush token {token} is not short-lived ({ttl} ms)"
        for (key, want), got in zip(expected.items(), replies[len(tokens):], strict=True):
            if isinstance(want, dict):
                # The incarnation is an opaque token written by the insert: present.
                assert got.pop(b"#i", b""), f"{key}: no incarnation #i in {got!r}"
            assert decoded(got) == want, f"{key}: {got!r} != {want!r}"


def decoded(reply: Any) -> Any:
    """A redis-py reply with bytes turned into str, in the shape `keys_match_reference` uses."""
    if isinstance(reply, bytes):
        return reply.decode()
    if isinstance(reply, dict):
        return {decoded(k): decoded(v) for k, v in reply.items()}
    if isinstance(reply, set):
        return {decoded(m) for m in reply}
    if isinstance(reply, list):
        return [(decoded(m), s) for m, s in reply]
    return reply


def _run(redis_url: str, max_examples: int, test_id: str) -> None:
    """Run the state machine on the server at `redis_url` (FLUSHALLed at every example)."""
    from tests._async_driver import LoopEngine

    engines: dict[str, Engine] = {"sync": create_engine(redis_url), "async": LoopEngine(redis_url)}
    client = redis.Redis.from_url(redis_url)
    SessionHistories.engines = engines
    SessionHistories.client = client
    STATS.clear()
    t0 = time.perf_counter()
    try:
        run_seeded(
            "fields state machine",
            SessionHistories,
            max_examples=max_examples,
            steps=50,
            test_id=test_id,
        )
    finally:
        client.close()
        for engine in engines.values():
            engine.dispose()
    print(f"fields state machine: {STATS.get('examples', 0)} examples, "
          f"{STATS.get('steps', 0)} steps, {time.perf_counter() - t0:.0f}s; "
          f"counts: {dict(sorted(STATS.items()))}")
    check_minimums(STATS, MINIMUMS, examples=max_examples, per=100)


def test_session_histories(redis_url: str) -> None:
    """120 random histories of two sessions and foreign writers keep Redis equal to the
    model, and reach their interesting branches (stale after expire, refused flushes)."""
    _run(redis_url, max_examples=examples_from_env(120),
         test_id="tests/test_stateful.py::test_session_histories")


@pytest.mark.soak
def test_session_histories_soak(redis_url: str) -> None:
    """The same state machine, run for 10,000 examples."""
    _run(redis_url, max_examples=10_000,
         test_id="tests/test_stateful.py::test_session_histories_soak")
