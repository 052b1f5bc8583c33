"""Property-based: two sessions change objects *and relationships* against a reference model.

`tests/test_stateful.py` drives fields, indexes and queries. This machine drives the
relationship machinery: a one-to-many with ``cascade="all, delete-orphan"``
(`Parent.kids` / `Kid.parent`), a plain one-to-many whose children are detached when
their parent goes (`Team.members` / `Kid.team`) and a many-to-many (`Kid.tags` /
`Tag.kids`), each changed from either side (append, remove, reparent, assign the
many-to-one, assign None), plus inserts, renames, deletes, commit, rollback and expiry,
by two sessions whose commits interleave.

The reference is plain dicts: the committed objects, their versions and the links. Each
session's view is modelled too (what it loaded at which version, its in-memory lists,
its pending changes), because that is what decides a flush's outcome. A commit must
raise `StaleDataError` (and write nothing) exactly when it would write or delete an
object the session loaded before someone else changed it, point a foreign key at, or
link, an object that no longer exists, or when Redis lists a child under a parent being
deleted that the session holds, unchanged, under another. Otherwise it must apply the
session's intent on top of what is committed now: a deleted parent takes every child it
has once the commit applies (those someone else added included, those the session moved
away excluded, new ones dropped); a deleted team releases every such member; a deleted
object loses every link, links added in the same commit included; of an append on one
side of a many-to-many and a remove on the other, the last one wins.

Both sessions run with autoflush off, so every write is an explicit commit (checked
step); `tests/test_stateful.py` covers autoflush.

After every step: a fresh session sees exactly the reference's objects, and both sides
of every relationship; `redmap.audit` finds nothing; each session's loaded lists hold
what the model says. The full check is skipped only when neither the reference nor
Redis changed since the last one (Redis is compared with `DEBUG DIGEST`, one round trip).

Default: 200 examples x 50 steps; `-m soak`: 10,000 examples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from redmap import Session, create_engine, select
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import StaleDataError
from tests.reliability._budget import check_minimums, examples_from_env, run_seeded
from tests.reliability._family import Kid, Parent, Tag, Team, reg

MODELS: dict[str, type[Any]] = {"P": Parent, "T": Team, "K": Kid, "G": Tag}
KIND_OF_CLASS = {cls: kind for kind, cls in MODELS.items()}
KEYSPACES = {"parent": "P", "team": "T", "kid": "K", "tag": "G"}
NAMES = ("a", "b", "c")
SESSIONS = st.sampled_from(("A", "B"))

# One-to-many lists: (owner kind, list) -> the child's many-to-one, and delete-orphan.
O2M = {("P", "kids"): ("parent", True), ("T", "members"): ("team", False)}
# The child's many-to-one -> (owner kind, the owner's list).
M2O = {"parent": ("P", "kids"), "team": ("T", "members")}
M2M = {("K", "tags"): ("G", "kids"), ("G", "kids"): ("K", "tags")}
UNLOADED = "<unloaded>"

# A persistent object is ("P", 3); a pending one is a string handle such as "n7".
Ref = tuple[str, int]
H = Any


def is_ref(h: H) -> bool:
    """A persistent object's handle (kind, id), not a pending one's."""
    return isinstance(h, tuple)


def kind_of(h: H, sv: SessionModel | None = None) -> str:
    if isinstance(h, tuple):
        return str(h[0])
    assert sv is not None
    return sv.new_kind[h]


@dataclass
class Committed:
    """What Redis must hold: fields (kids: parent/team as ids), versions, links."""

    fields: dict[Ref, dict[str, Any]] = field(default_factory=dict)
    ver: dict[Ref, int] = field(default_factory=dict)
    links: set[tuple[int, int]] = field(default_factory=set)  # (kid id, tag id)
    top: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MODELS, 0))

    def members(self, owner: Ref, rel: str) -> set[Ref]:
        """The committed contents of a list relationship."""
        kind, pk = owner
        if (kind, rel) in O2M:
            attr = O2M[(kind, rel)][0]
            return {r for r, f in self.fields.items() if r[0] == "K" and f[attr] == pk}
        if kind == "K":
            return {("G", g) for k, g in self.links if k == pk}
        return {("K", k) for k, g in self.links if g == pk}


@dataclass
class SessionModel:
    """What one session holds, as redmap's identity map, attributes and lists should."""

    name: str
    session: Session
    engine: Engine
    present: set[Ref] = field(default_factory=set)  # in the identity map
    expired: set[Ref] = field(default_factory=set)  # ... with unloaded attributes
    ver: dict[Ref, int] = field(default_factory=dict)  # version each was loaded at
    snap: dict[Ref, dict[str, Any]] = field(default_factory=dict)  # committed values then
    # In-memory values of loaded and pending objects: "name", and for kids "parent"/"team"
    # as the handle the user last pointed them at (the intent).
    values: dict[H, dict[str, Any]] = field(default_factory=dict)
    # A kid's foreign-key column as redmap holds it (an id, or None) ...
    fkcol: dict[H, dict[str, Any]] = field(default_factory=dict)
    # ... and its many-to-one attributes when loaded (handle, None) or UNLOADED.
    m2o: dict[H, dict[str, Any]] = field(default_factory=dict)
    lists: dict[tuple[H, str], list[H]] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    new_kind: dict[str, str] = field(default_factory=dict)
    objs: dict[str, Any] = field(default_factory=dict)  # pending handle -> object
    deleted: list[Ref] = field(default_factory=list)
    orphans: list[H] = field(default_factory=list)
    link_ops: list[tuple[H, H, bool]] = field(default_factory=list)  # (kid, tag, added)

    @property
    def idle(self) -> bool:
        """No pending work at all (expiry then discards nothing)."""
        dirty = any(self.values[r] != self.snap[r] for r in self.loaded())
        return not (self.new or self.deleted or self.orphans or self.link_ops or dirty)

    def loaded(self) -> list[Ref]:
        return sorted(self.present - self.expired)

    def forget_views(self) -> None:
        for r in self.present:
            self.values.pop(r, None)
            self.fkcol.pop(r, None)
            self.m2o.pop(r, None)
        self.lists.clear()

    def expire_all(self) -> None:
        self.expired = set(self.present)
        self.forget_views()

    def rollback(self) -> None:
        for h in self.new:
            self.values.pop(h, None)
            self.fkcol.pop(h, None)
            self.m2o.pop(h, None)
        self.new.clear()
        self.objs.clear()
        self.deleted.clear()
        self.orphans.clear()
        self.link_ops.clear()
        self.expire_all()


# Counters over a whole test run, printed at the end.
STATS: dict[str, int] = {}


def bump(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


class RelationshipHistories(RuleBasedStateMachine):
    """Two sessions (no autoflush: each flush is an explicit commit) on one Redis."""

    engines: dict[str, Engine]
    client: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        self.client.flushall()
        self.ref = Committed()
        self.sv: dict[str, SessionModel] = {}
        self.listeners: list[tuple[Engine, Any]] = []
        self.next_handle = 0
        self.checked: tuple[Any, Any] | None = None
        self.steps = 0
        bump("examples")

    def _open_sessions(self, driver: str, flush: str) -> None:
        """Sessions A and B on the drawn driver: the sync engines, or the asyncio driver
        behind the same Session API (tests/_async_driver.py); committing the drawn way
        (WATCH + checks, or one script inside MULTI: issue 14)."""
        bump(f"flush={flush}")
        for who in ("A", "B"):
            engine = self.engines[who if driver == "sync" else f"{who}-async"]
            engine.flush_script_threshold = 0 if flush == "script" else None
            sv = SessionModel(who, Session(engine, autoflush=False), engine)
            self.sv[who] = sv
            listener = self._listener(sv)
            engine.add_listener(listener)
            self.listeners.append((engine, listener))
        bump(f"driver={driver}")

    def teardown(self) -> None:
        bump("full-length examples" if self.steps >= STEPS else "cut-short examples")
        for engine, listener in self.listeners:
            engine.remove_listener(listener)
        for sv in self.sv.values():
            sv.session.close()

    # -- loads, observed on the wire -------------------------------------------------

    def _listener(self, sv: SessionModel) -> Any:
        def on_round_trip(commands: Any) -> None:
            for cmd in commands:
                if str(cmd[0]).upper() == "HGETALL":
                    self._loaded(sv, str(cmd[1]))

        return on_round_trip

    def _loaded(self, sv: SessionModel, key: str) -> None:
        """An HGETALL is about to read the committed state of one object into `sv`."""
        _, keyspace, seg = key.split(":")
        ref = (KEYSPACES[keyspace], int(seg))
        if ref not in self.ref.fields:
            return  # absent: nothing enters the session
        if ref in sv.present and ref not in sv.expired:
            raise AssertionError(f"{sv.name} reloaded {ref}, which it holds loaded")
        sv.present.add(ref)
        sv.expired.discard(ref)
        sv.ver[ref] = self.ref.ver[ref]
        committed = self.ref.fields[ref]
        sv.snap[ref] = {
            k: (M2O[k][0], v) if k in M2O and v is not None else v for k, v in committed.items()
        }
        sv.values[ref] = dict(sv.snap[ref])
        if ref[0] == "K":
            sv.fkcol[ref] = {a: committed[a] for a in M2O}
            sv.m2o[ref] = dict.fromkeys(M2O, UNLOADED)

    # -- helpers ---------------------------------------------------------------------

    def _candidates(self, sv: SessionModel, kind: str, *, pending: bool = True) -> list[H]:
        refs = {r for r in self.ref.fields if r[0] == kind}
        refs |= {r for r in sv.present if r[0] == kind}
        out: list[H] = sorted(refs)
        if pending:
            out += [h for h in sv.new if sv.new_kind[h] == kind]
        return out

    def _pick(self, data: st.DataObject, sv: SessionModel, kind: str, **kw: Any) -> H | None:
        options = self._candidates(sv, kind, **kw)
        if not options:
            return None
        return data.draw(st.sampled_from(options), label=kind)

    def _get(self, sv: SessionModel, h: H) -> Any:
        """The session's object for a handle (`Session.get` for persistent ones), or None."""
        if not isinstance(h, tuple):
            return sv.objs[h]
        kind, pk = h
        obj = sv.session.get(MODELS[kind], pk)
        if h in sv.deleted:
            assert obj is None, f"{sv.name}: get({h}) of an object marked deleted"
            return None
        if h not in self.ref.fields and (h not in sv.present or h in sv.expired):
            assert obj is None, f"{sv.name}: get({h}) found an object the reference lacks"
            return None
        assert obj is not None, f"{sv.name}: get({h}) found nothing"
        assert h in sv.present and h not in sv.expired
        return obj

    def _handle(self, sv: SessionModel, obj: Any) -> H:
        for h, o in sv.objs.items():
            if o is obj:
                return h
        assert obj.id is not None
        return (KIND_OF_CLASS[type(obj)], obj.id)

    def _list(self, sv: SessionModel, h: H, rel: str) -> list[Any]:
        """Read a list relationship (loading it when unloaded) and mirror the load."""
        obj = self._get(sv, h)
        assert obj is not None
        if (h, rel) not in sv.lists:
            if isinstance(h, tuple):
                # Loaded from Redis: the committed contents, minus objects being deleted.
                committed = self.ref.members(h, rel)
                sv.lists[(h, rel)] = sorted(r for r in committed if r not in sv.deleted)
            else:
                sv.lists[(h, rel)] = []
        value: list[Any] = getattr(obj, rel)
        return value

    def _new(self, sv: SessionModel, kind: str, obj: Any) -> str:
        self.next_handle += 1
        h = f"n{self.next_handle}"
        sv.new.append(h)
        sv.new_kind[h] = kind
        sv.objs[h] = obj
        sv.values[h] = {"name": obj.__dict__["name"]}
        if kind == "K":
            sv.values[h].update(parent=None, team=None)
            sv.fkcol[h] = {"parent": None, "team": None}
            sv.m2o[h] = {"parent": None, "team": None}
        for k, rel in [*O2M, *M2M]:
            if k == kind:
                sv.lists[(h, rel)] = []
        return h

    # -- in-memory effects of relationship changes (redmap.orm.relationship_events) -----

    def _known_pk(self, h: H | None) -> int | None:
        return h[1] if isinstance(h, tuple) else None

    def _mark_fk(self, sv: SessionModel, kid: H, attr: str, target: H | None) -> None:
        pk = self._known_pk(target)
        if target is None or pk is not None:
            sv.fkcol[kid][attr] = pk

    def _o2m_added(self, sv: SessionModel, owner: H, rel: str, kid: H) -> None:
        attr, delete_orphan = O2M[(kind_of(owner, sv), rel)]
        self._rescue(sv, kid, delete_orphan)
        old = sv.m2o[kid][attr]
        if old == UNLOADED:
            # As for `kid.parent = x`: the parent its key names, when the session holds it.
            col = sv.fkcol[kid][attr]
            peek = (M2O[attr][0], col) if col is not None else None
            old = peek if peek in sv.present else None
        if old is not None and old != owner and (old, rel) in sv.lists:
            if kid in sv.lists[(old, rel)]:
                sv.lists[(old, rel)].remove(kid)
        sv.m2o[kid][attr] = owner
        self._mark_fk(sv, kid, attr, owner)
        sv.values[kid][attr] = owner

    def _rescue(self, sv: SessionModel, kid: H, parent: bool) -> None:
        """A kid added to a list is an orphan no more when that gives it a parent again,
        or when it is new: as in SQLAlchemy, a new orphan left the session when removed
        and the save-update cascade of any list it joins brings it back. A persistent
        orphan joining a team or a tag is still deleted."""
        if kid in sv.orphans and (parent or not is_ref(kid)):
            sv.orphans.remove(kid)

    def _o2m_removed(self, sv: SessionModel, owner: H, rel: str, kid: H) -> None:
        attr, orphan = O2M[(kind_of(owner, sv), rel)]
        # The key is cleared when the kid points here: by its many-to-one when loaded
        # (the key may still hold a parent it left for a new one), else by its key.
        before, col = sv.m2o[kid][attr], sv.fkcol[kid][attr]
        if before == UNLOADED:
            here = col is None or col == self._known_pk(owner)
        else:
            here = before == owner
        if before == owner:
            sv.m2o[kid][attr] = None
        if here:
            sv.fkcol[kid][attr] = None
        if orphan and kid not in sv.orphans:
            sv.orphans.append(kid)
        # The kid now points where its many-to-one says when loaded, else its key: a kid
        # listed here only by a stale load, and already moved elsewhere, stays there.
        m2o, col = sv.m2o[kid][attr], sv.fkcol[kid][attr]
        if m2o != UNLOADED:
            sv.values[kid][attr] = m2o
        else:
            sv.values[kid][attr] = None if col is None else (M2O[attr][0], col)

    def _m2o_set(self, sv: SessionModel, kid: H, attr: str, new: H | None) -> None:
        owner_kind, rel = M2O[attr]
        old = sv.m2o[kid][attr]
        points = old == UNLOADED and sv.fkcol[kid][attr] is not None
        if old == UNLOADED:
            col = sv.fkcol[kid][attr]
            peek = (owner_kind, col) if col is not None else None
            old = peek if peek in sv.present else None
        sv.m2o[kid][attr] = new
        sv.values[kid][attr] = new
        if old is None and new is None and not points:
            return
        self._mark_fk(sv, kid, attr, new)
        if old is not None and old != new and (old, rel) in sv.lists:
            if kid in sv.lists[(old, rel)]:
                sv.lists[(old, rel)].remove(kid)
        if new is not None and (new, rel) in sv.lists:
            if kid not in sv.lists[(new, rel)]:
                sv.lists[(new, rel)].append(kid)
        if new is None and O2M[(owner_kind, rel)][1] and kid not in sv.orphans:
            sv.orphans.append(kid)

    def _m2m(self, sv: SessionModel, owner: H, rel: str, item: H, added: bool) -> None:
        _, reverse = M2M[(kind_of(owner, sv), rel)]
        other = sv.lists.get((item, reverse))
        if other is not None:
            if added and owner not in other:
                other.append(owner)
            elif not added and owner in other:
                other.remove(owner)
        kid, tag = (owner, item) if rel == "tags" else (item, owner)
        if added and rel == "kids":
            self._rescue(sv, kid, parent=False)
        sv.link_ops.append((kid, tag, added))

    # -- rules: new objects ----------------------------------------------------------

    @initialize(
        parents=st.integers(0, 2),
        teams=st.integers(0, 2),
        tags=st.integers(0, 2),
        kids=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.booleans()), max_size=4),
        driver=st.sampled_from(("sync", "async")),
        flush=st.sampled_from(("watch", "script")),
    )
    def seed(
        self,
        parents: int,
        teams: int,
        tags: int,
        kids: list[tuple[int, int, bool]],
        driver: str,
        flush: str,
    ) -> None:
        """Start from a few committed objects, some of them related; open the sessions on
        the drawn driver, committing the drawn way."""
        self._open_sessions(driver, flush)
        with Session(self.engines["check"]) as s:
            ps = [Parent(name=NAMES[i % 3]) for i in range(parents)]
            ts = [Team(name=NAMES[i % 3]) for i in range(teams)]
            gs = [Tag(name=NAMES[i % 3]) for i in range(tags)]
            s.add_all([*ps, *ts, *gs])
            s.commit()
            ks = []
            for p, t, tagged in kids:
                k = Kid(
                    name="a",
                    parent_id=ps[p].id if p < parents else None,
                    team_id=ts[t].id if t < teams else None,
                )
                if tagged and gs:
                    k.tags.append(gs[p % len(gs)])
                ks.append(k)
            s.add_all(ks)
            s.commit()
            for kind, objs in (("P", ps), ("T", ts), ("G", gs), ("K", ks)):
                for i, o in enumerate(objs):
                    ref = (kind, o.id)
                    if kind == "K":
                        # What the constructor was given, not what reads back.
                        p, t, _ = kids[i]
                        self.ref.fields[ref] = {
                            "name": "a",
                            "parent": ps[p].id if p < parents else None,
                            "team": ts[t].id if t < teams else None,
                        }
                    else:
                        self.ref.fields[ref] = {"name": NAMES[i % 3]}
                    self.ref.ver[ref] = 1
                    self.ref.top[kind] = max(self.ref.top[kind], o.id)
            for k, (p, _, tagged) in zip(ks, kids, strict=True):
                if tagged and gs:
                    self.ref.links.add((k.id, gs[p % len(gs)].id))

    @rule(who=SESSIONS, kind=st.sampled_from(("P", "T", "G")), name=st.sampled_from(NAMES))
    def add_owner(self, who: str, kind: str, name: str) -> None:
        """A new parent, team or tag."""
        sv = self.sv[who]
        obj = MODELS[kind](name=name)
        sv.session.add(obj)
        self._new(sv, kind, obj)

    @rule(
        who=SESSIONS,
        data=st.data(),
        name=st.sampled_from(NAMES),
        how=st.sampled_from(("plain", "ctor", "append")),
    )
    def add_kid(self, who: str, data: st.DataObject, name: str, how: str) -> None:
        """A new kid: alone, built with parent=..., or appended to a parent's list."""
        sv = self.sv[who]
        parent = self._pick(data, sv, "P") if how != "plain" else None
        if parent is not None and self._get(sv, parent) is None:
            return
        if how == "ctor" and parent is not None:
            kid = Kid(name=name, parent=self._get(sv, parent))
            h = self._new(sv, "K", kid)
            sv.m2o[h]["parent"] = None  # the constructor's assignment is the event below
            self._m2o_set(sv, h, "parent", parent)
            sv.session.add(kid)
        elif how == "append" and parent is not None:
            lst = self._list(sv, parent, "kids")
            kid = Kid(name=name)
            sv.session.add(kid)
            h = self._new(sv, "K", kid)
            lst.append(kid)
            sv.lists[(parent, "kids")].append(h)
            self._o2m_added(sv, parent, "kids", h)
        else:
            kid = Kid(name=name)
            sv.session.add(kid)
            self._new(sv, "K", kid)

    # -- rules: fields and deletes ------------------------------------------------------

    @rule(
        who=SESSIONS,
        data=st.data(),
        kind=st.sampled_from(tuple(MODELS)),
        name=st.sampled_from(NAMES),
    )
    def rename(self, who: str, data: st.DataObject, kind: str, name: str) -> None:
        sv = self.sv[who]
        h = self._pick(data, sv, kind)
        obj = None if h is None else self._get(sv, h)
        if obj is None:
            return
        obj.name = name
        sv.values[h]["name"] = name

    @rule(who=SESSIONS, data=st.data(), kind=st.sampled_from(tuple(MODELS)))
    def delete(self, who: str, data: st.DataObject, kind: str) -> None:
        """Mark a persistent object for deletion; cascades happen at the commit."""
        sv = self.sv[who]
        h = self._pick(data, sv, kind, pending=False)
        obj = None if h is None else self._get(sv, h)
        if obj is None:
            return
        sv.session.delete(obj)
        sv.deleted.append(h)

    # -- rules: one-to-many -------------------------------------------------------------

    @rule(
        who=SESSIONS,
        data=st.data(),
        via=st.sampled_from(("append", "assign")),
        rel=st.sampled_from(tuple(O2M)),
    )
    def reparent(self, who: str, data: st.DataObject, via: str, rel: tuple[str, str]) -> None:
        """Point a kid at a parent (or team): owner.list.append(kid) or kid.attr = owner."""
        sv = self.sv[who]
        owner_kind, lst_name = rel
        attr, _ = O2M[rel]
        owner, kid = self._pick(data, sv, owner_kind), self._pick(data, sv, "K")
        if owner is None or kid is None:
            return
        owner_obj, kid_obj = self._get(sv, owner), self._get(sv, kid)
        if owner_obj is None or kid_obj is None:
            return
        if via == "append":
            lst = self._list(sv, owner, lst_name)
            mirror = sv.lists[(owner, lst_name)]
            before = kid in mirror
            lst.append(kid_obj)
            if not before:  # appending a member again does nothing at all
                mirror.append(kid)
                self._o2m_added(sv, owner, lst_name, kid)
        else:
            setattr(kid_obj, attr, owner_obj)
            self._m2o_set(sv, kid, attr, owner)

    @rule(
        who=SESSIONS,
        data=st.data(),
        via=st.sampled_from(("remove", "assign")),
        rel=st.sampled_from(tuple(O2M)),
    )
    def release(self, who: str, data: st.DataObject, via: str, rel: tuple[str, str]) -> None:
        """Take a kid from its parent (delete-orphan) or team: list.remove or attr = None."""
        sv = self.sv[who]
        owner_kind, lst_name = rel
        attr, _ = O2M[rel]
        if via == "remove":
            owner = self._pick(data, sv, owner_kind)
            if owner is None or self._get(sv, owner) is None:
                return
            lst = self._list(sv, owner, lst_name)
            mirror = sv.lists[(owner, lst_name)]
            if not mirror:
                return
            kid = data.draw(st.sampled_from(list(mirror)), label="kid")
            if self._get(sv, kid) is None:  # loads it if it was expired
                return
            kid_obj = next(o for o in lst if self._handle(sv, o) == kid)
            lst.remove(kid_obj)
            mirror.remove(kid)
            self._o2m_removed(sv, owner, lst_name, kid)
        else:
            kid = self._pick(data, sv, "K")
            kid_obj = None if kid is None else self._get(sv, kid)
            if kid_obj is None:
                return
            setattr(kid_obj, attr, None)
            self._m2o_set(sv, kid, attr, None)

    # -- rules: many-to-many -------------------------------------------------------------

    @rule(who=SESSIONS, data=st.data(), side=st.sampled_from(("K", "G")), add=st.booleans())
    def link(self, who: str, data: st.DataObject, side: str, add: bool) -> None:
        """Link or unlink a kid and a tag from either side."""
        sv = self.sv[who]
        kid, tag = self._pick(data, sv, "K"), self._pick(data, sv, "G")
        if kid is None or tag is None:
            return
        if self._get(sv, kid) is None or self._get(sv, tag) is None:
            return
        owner, item, rel = (kid, tag, "tags") if side == "K" else (tag, kid, "kids")
        lst = self._list(sv, owner, rel)
        mirror = sv.lists[(owner, rel)]
        item_obj = self._get(sv, item)
        if add:
            if item in mirror:
                return
            lst.append(item_obj)
            mirror.append(item)
        else:
            if item not in mirror:
                return
            lst.remove(item_obj)
            mirror.remove(item)
        self._m2m(sv, owner, rel, item, add)

    # -- rules: transactions ---------------------------------------------------------------

    @rule(data=st.data(), kind=st.sampled_from(tuple(MODELS)), name=st.sampled_from(NAMES))
    def foreign_rename(self, data: st.DataObject, kind: str, name: str) -> None:
        """A third, short-lived session renames a committed object: what A or B hold of it
        is stale from now on (their writes and deletes of it must be refused)."""
        refs = sorted(r for r in self.ref.fields if r[0] == kind)
        if not refs:
            return
        r = data.draw(st.sampled_from(refs), label="rename")
        with Session(self.engines["check"]) as s:
            obj = s.get(MODELS[kind], r[1])
            assert obj is not None
            obj.name = name
            s.commit()
        if self.ref.fields[r]["name"] != name:
            self.ref.fields[r]["name"] = name
            self.ref.ver[r] += 1
            bump("foreign renames")

    @rule(who=SESSIONS, really=st.integers(0, 1))
    def commit(self, who: str, really: int) -> None:
        """Commit (one time in two, so that work piles up and commits interleave); the
        outcome is checked against the model, then applied to the reference."""
        if not really:
            return
        sv = self.sv[who]
        error: Exception | None = None
        try:
            sv.session.commit()
        except StaleDataError as exc:
            error = exc
        outcome = self._predict(sv)
        if isinstance(outcome, tuple):
            kind, why = outcome
            assert error is not None, f"{who}: commit succeeded, expected a conflict: {why}"
            bump("commits refused (stale)")
            bump(f"stale: {kind}")
            sv.session.rollback()
            sv.rollback()
            return
        assert error is None, f"{who}: unexpected {error!r}"
        bump("commits applied")
        for key in ("doomed", "expunged", "changes", "inserts", "net"):
            if outcome[key]:
                bump(f"commits with {key}")
        self._apply(sv, outcome)

    @rule(who=SESSIONS, really=st.integers(0, 2))
    def rollback(self, who: str, really: int) -> None:
        """Roll back (one time in three: pending work is worth keeping for conflicts)."""
        if really:
            return
        sv = self.sv[who]
        sv.session.rollback()
        sv.rollback()
        bump("rollbacks")

    @precondition(lambda self: self.sv["A"].idle or self.sv["B"].idle)
    @rule(who=SESSIONS, data=st.data(), one=st.booleans())
    def expire(self, who: str, data: st.DataObject, one: bool) -> None:
        """Expire everything, or one object, of a session with no pending work."""
        sv = self.sv[who]
        if not sv.idle:
            return
        if not one:
            sv.session.expire_all()
            sv.expire_all()
        else:
            loaded = sv.loaded()
            if not loaded:
                return
            h = data.draw(st.sampled_from(loaded), label="expire")
            sv.session.expire(self._get(sv, h))
            sv.expired.add(h)
            sv.values.pop(h, None)
            sv.fkcol.pop(h, None)
            sv.m2o.pop(h, None)
            for key in [k for k in sv.lists if k[0] == h]:
                del sv.lists[key]
        bump("expiries")

    # -- the model of a commit -------------------------------------------------------------

    def _final_attr(self, sv: SessionModel, kid: H, attr: str) -> H | None:
        """Where a kid points after the commit: the session's change if it made one, else
        what is committed now."""
        if not is_ref(kid):
            return sv.values[kid][attr]
        if kid in sv.values and sv.values[kid][attr] != sv.snap[kid][attr]:
            return sv.values[kid][attr]
        pk = self.ref.fields[kid][attr] if kid in self.ref.fields else None
        return None if pk is None else (M2O[attr][0], pk)

    def _predict(self, sv: SessionModel) -> tuple[str, str] | dict[str, Any]:
        """The conflict the commit must report (its kind, a description), or what it writes.

        Computed after the commit ran: loads redmap made during the flush (cascades read
        children and links) are then recorded, and they read what was committed before.
        """
        ref = self.ref
        kids: list[H] = sorted(
            {r for r in ref.fields if r[0] == "K"} | {r for r in sv.present if r[0] == "K"}
        )
        kids += [h for h in sv.new if sv.new_kind[h] == "K"]
        # Deletes: marked ones, orphans (delete-orphan), and their cascades.
        expunged: set[H] = set()
        doomed: list[H] = list(sv.deleted)
        for h in sv.orphans:
            # An orphan is one the session itself left without a parent (in memory).
            if h in doomed or h in expunged or sv.values[h]["parent"] is not None:
                continue
            if is_ref(h):
                doomed.append(h)
            else:
                expunged.add(h)
        released: set[H] = set()
        i = 0
        while i < len(doomed):
            d = doomed[i]
            i += 1
            for (kind, _rel), (attr, _) in O2M.items():
                if d[0] != kind:
                    continue
                # The children it has once the commit applies: where the session points
                # a kid it holds loaded (or new), where Redis does for the others.
                members = set()
                for k in kids:
                    committed = ref.fields.get(k, {}).get(attr) == d[1] if is_ref(k) else False
                    if not is_ref(k) or (k in sv.values and k not in sv.expired):
                        pointer = sv.values[k][attr]
                        if pointer == d:
                            members.add(k)
                        elif committed and pointer == sv.snap[k][attr]:
                            return "moved", f"{k} was moved to {d} since {sv.name} loaded it"
                    elif committed:
                        members.add(k)
                for m in sorted(members, key=repr):
                    if kind == "P":
                        if not is_ref(m):
                            expunged.add(m)
                        elif m not in doomed:
                            doomed.append(m)
                    else:
                        released.add(m)
        gone = set(doomed) | expunged
        # Updates: the session's own changes to loaded objects, and released members.
        changes: dict[Ref, dict[str, Any]] = {}
        for r in sorted(sv.present - sv.expired):
            if r in gone or r not in sv.values:
                continue
            changed = {f: v for f, v in sv.values[r].items() if v != sv.snap[r][f]}
            if changed:
                changes[r] = changed
        for k in sorted((k for k in released if is_ref(k) and k not in gone), key=repr):
            if k in sv.values and k not in sv.expired:
                after = {**sv.values[k], "team": None}
                changed = {f: v for f, v in after.items() if v != sv.snap[k][f]}
                if ref.fields.get(k, {}).get("team") is not None:
                    # Redis lists it under the team being deleted: it must be written,
                    # even if the session loaded it already without a team.
                    changed["team"] = None
                if changed:
                    changes[k] = changed
                else:
                    changes.pop(k, None)
            elif ref.fields[k]["team"] is not None:
                changes.setdefault(k, {})["team"] = None
        inserts = [h for h in sv.new if h not in gone]

        def final(h: H) -> dict[str, Any]:
            """Values after the commit, kids' references as handles."""
            if not is_ref(h):
                out = dict(sv.values[h])
                if h in released:
                    out["team"] = None
                return out
            committed = ref.fields[h]
            out = {
                f: (M2O[f][0], v) if f in M2O and v is not None else v for f, v in committed.items()
            }
            out.update(changes.get(h, {}))
            return out

        # Conflicts: what the commit writes or deletes must be as the session loaded it,
        # and whatever it points at or links must still exist.
        for r in [*(d for d in doomed if is_ref(d)), *changes]:
            if r not in ref.fields:
                return "deleted", f"{r} was deleted by someone else"
            if r in sv.present and sv.ver.get(r) != ref.ver[r]:
                return "changed", f"{r} changed since {sv.name} loaded it"
        for h in [*changes, *inserts]:
            if kind_of(h, sv) != "K":
                continue
            values = final(h)
            for attr in M2O:
                target = values[attr]
                if is_ref(target) and (target not in ref.fields or target in gone):
                    return "target gone", f"{h}.{attr} points at {target}, which is gone"
        net: dict[tuple[H, H], bool] = {}
        for kid, tag, added in sv.link_ops:
            net[(kid, tag)] = added
        for (kid, tag), added in net.items():
            if added and kid not in gone and tag not in gone:
                for end in (kid, tag):
                    if is_ref(end) and end not in ref.fields:
                        return (
                            "link end gone",
                            f"link {kid}-{tag}: {end} was deleted by someone else",
                        )
        return {
            "doomed": doomed,
            "expunged": expunged,
            "changes": changes,
            "inserts": inserts,
            "net": net,
            "final": final,
        }

    def _apply(self, sv: SessionModel, plan: dict[str, Any]) -> None:
        """Apply a successful commit to the reference and to the committing session."""
        ref = self.ref
        ids: dict[H, Ref] = {}
        for h in plan["inserts"]:
            obj = sv.objs[h]
            kind = sv.new_kind[h]
            assert obj.id is not None and obj.id > ref.top[kind], f"{h} got id {obj.id}"
            ref.top[kind] = obj.id
            ids[h] = (kind, obj.id)
        for h in plan["expunged"]:
            assert sv.objs[h].__dict__.get("id") is None, f"{h} was inserted, not dropped"

        def pk(target: H | None) -> int | None:
            if target is None:
                return None
            return int((target if is_ref(target) else ids[target])[1])

        def stored(h: H) -> dict[str, Any]:
            values = plan["final"](h)
            out = {"name": values["name"]}
            if kind_of(h, sv) == "K":
                out.update(parent=pk(values["parent"]), team=pk(values["team"]))
            return out

        new_fields = {r: stored(r) for r in plan["changes"]}
        new_fields.update({ids[h]: stored(h) for h in plan["inserts"]})
        links = set(ref.links)
        for (kid, tag), added in plan["net"].items():
            if kid in plan["expunged"] or tag in plan["expunged"]:
                continue
            pair = (pk(kid), pk(tag))
            if added:
                links.add(pair)  # type: ignore[arg-type]
            else:
                links.discard(pair)  # type: ignore[arg-type]
        for d in plan["doomed"]:
            ref.fields.pop(d, None)
            ref.ver.pop(d, None)
            if d[0] == "K":
                links = {p for p in links if p[0] != d[1]}
            elif d[0] == "G":
                links = {p for p in links if p[1] != d[1]}
        for r, values in new_fields.items():
            ref.fields[r] = values
            ref.ver[r] = ref.ver.get(r, 0) + 1
        ref.links = links
        # The session: deleted objects leave it, new ones become persistent, all expire.
        for d in plan["doomed"]:
            sv.present.discard(d)
        for r in plan["changes"]:
            if r in sv.present:
                sv.ver[r] = ref.ver[r]
        sv.forget_views()
        for h in sv.new:
            sv.values.pop(h, None)
            sv.fkcol.pop(h, None)
            sv.m2o.pop(h, None)
        for r in ids.values():
            sv.present.add(r)
            sv.ver[r] = 1
        sv.expired = set(sv.present)
        sv.new.clear()
        sv.objs.clear()
        sv.deleted.clear()
        sv.orphans.clear()
        sv.link_ops.clear()

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def session_lists_match_model(self) -> None:
        """Each session's loaded lists hold what the model says (no I/O: loaded ones only)."""
        bump("steps")
        self.steps += 1
        for sv in self.sv.values():
            for (h, rel), mirror in sv.lists.items():
                obj = sv.objs[h] if not isinstance(h, tuple) else None
                if obj is None:
                    kind, pk = h
                    obj = next(
                        (o for o in sv.session if isinstance(o, MODELS[kind]) and o.id == pk), None
                    )
                    if obj is None:
                        continue
                value = obj.__dict__.get(rel)
                assert value is not None, f"{sv.name}: {h}.{rel} should be loaded"
                got = sorted((self._handle(sv, o) for o in value), key=repr)
                assert got == sorted(mirror, key=repr), f"{sv.name}: {h}.{rel} {got} != {mirror}"

    @invariant()
    def redis_matches_reference(self) -> None:
        """A fresh session sees exactly the reference, both sides of every relationship;
        the audit is clean."""
        try:
            digest = self.client.execute_command("DEBUG", "DIGEST")
        except redis.ResponseError:
            digest = None  # DEBUG disabled: check everything every step
        state = (
            tuple(sorted(self.ref.fields.items())),
            tuple(sorted(self.ref.links)),
            tuple(sorted(self.ref.ver.items())),
        )
        if digest is not None and self.checked == (digest, state):
            return
        bump("full checks")
        ref = self.ref
        with Session(self.engines["check"]) as s:
            seen: dict[str, list[Any]] = {}
            for kind, model in MODELS.items():
                objs = s.scalars(select(model)).all()
                seen[kind] = objs
                got = {(kind, o.id): o.name for o in objs}
                want = {r: f["name"] for r, f in ref.fields.items() if r[0] == kind}
                assert got == want, f"{kind}: {got} != {want}"
            for k in seen["K"]:
                f = ref.fields[("K", k.id)]
                where = f"kid {k.id}: committed {f}"
                assert (k.parent_id, k.team_id) == (f["parent"], f["team"]), where
                assert (k.parent.id if k.parent else None) == f["parent"], where
                assert (k.team.id if k.team else None) == f["team"], where
                assert {g.id for g in k.tags} == {g for kk, g in ref.links if kk == k.id}, where
            for p in seen["P"]:
                assert {k.id for k in p.kids} == {r[1] for r in ref.members(("P", p.id), "kids")}
            for t in seen["T"]:
                want_members = {r[1] for r in ref.members(("T", t.id), "members")}
                assert {k.id for k in t.members} == want_members, f"team {t.id}"
            for g in seen["G"]:
                assert {k.id for k in g.kids} == {k for k, gg in ref.links if gg == g.id}, g.id
        report = audit(self.client, reg)
        assert report.ok, report.mismatches[:5] + report.unexplained[:5]
        versions = {}
        pipe = self.client.pipeline(transaction=False)
        for kind, pk in sorted(ref.fields):
            pipe.hget(f"{{pp}}:{MODELS[kind].__name__.lower()}:{pk}", "#v")
        for r, v in zip(sorted(ref.fields), pipe.execute(), strict=True):
            versions[r] = int(v)
        assert versions == ref.ver, f"versions {versions} != {ref.ver}"
        self.checked = (digest, state) if digest is not None else None


STEPS = 50


def _run(redis_url: str, max_examples: int, test_id: str) -> None:
    from tests._async_driver import LoopEngine

    engines: dict[str, Engine] = {w: create_engine(redis_url) for w in ("A", "B", "check")}
    engines.update({f"{w}-async": LoopEngine(redis_url) for w in ("A", "B")})
    client = redis.Redis.from_url(redis_url)
    RelationshipHistories.engines = engines
    RelationshipHistories.client = client
    STATS.clear()
    t0 = time.perf_counter()
    try:
        # Seeded and replayable (REDMAP_SEED); every example runs all 50 steps
        # (Hypothesis may otherwise stop some early).
        run_seeded(
            "relationship state machine",
            RelationshipHistories,
            max_examples=max_examples,
            steps=STEPS,
            min_steps=STEPS,
            test_id=test_id,
        )
    finally:
        client.close()
        for e in engines.values():
            e.dispose()
    full = STATS.get("full-length examples", 0)
    print(
        f"\nrelationship state machine: {full} examples of {STEPS} steps "
        f"({STATS.get('cut-short examples', 0)} more cut short by Hypothesis), "
        f"{STATS.get('steps', 0)} steps in all, invariants after every step "
        f"({STATS.get('full checks', 0)} full checks: fresh session + audit + versions; the "
        f"rest found Redis and the reference unchanged); commits: "
        f"{STATS.get('commits applied', 0)} applied, "
        f"{STATS.get('commits refused (stale)', 0)} refused as stale, as predicted; "
        f"{STATS.get('rollbacks', 0)} rollbacks, {STATS.get('expiries', 0)} expiries; "
        f"0 falsifying examples; {time.perf_counter() - t0:.0f}s; "
        f"outcomes: { {k: v for k, v in sorted(STATS.items()) if ':' in k or 'with' in k} }"
    )
    assert full >= max_examples
    check_minimums(STATS, MINIMUMS, examples=max_examples, per=100)


# The least each outcome must occur per 100 examples (scaled to the run): low enough that
# no seed of a sound run falls below them, high enough to fail a run that skipped the
# branch. "commits with net" is counted and printed but has no minimum: it ran 1 to 48
# times in 200 examples over runs on 2026-12-06, too wide to bound.
MINIMUMS = {
    "driver=sync": 5,
    "driver=async": 5,
    "flush=watch": 5,
    "flush=script": 5,
    "commits applied": 100,
    "commits refused (stale)": 2,
    "stale: changed": 1,
    "commits with doomed": 4,
    # (a rule's own count: 92 in the 200 examples of seed 7, under a first minimum of 50
    # per 100; hypothesis's swarm testing switches the rule off in whole examples)
    "foreign renames": 25,
}


def test_relationship_histories(redis_url: str) -> None:
    """200 random two-session histories of relationship changes keep Redis equal to the model."""
    _run(
        redis_url,
        max_examples=examples_from_env(200),
        test_id="tests/reliability/test_properties.py::test_relationship_histories",
    )


@pytest.mark.soak
def test_relationship_histories_soak(redis_url: str) -> None:
    """The same state machine, 10,000 examples."""
    _run(
        redis_url,
        max_examples=10_000,
        test_id="tests/reliability/test_properties.py::test_relationship_histories_soak",
    )
