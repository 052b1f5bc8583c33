"""Relationship work of a flush: cascades, orphans, foreign keys and many-to-many links.

Called by `UOWTransaction.execute` before the plan is built. It may load
relationship collections (a deleted parent's children, a deleted object's links),
like SQLAlchemy does at flush time; everything it decides from those reads is
checked again under WATCH (`MemberCheck`), so a concurrent change makes the flush
fail instead of leaving dangling references.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..commands import Read, Steps
from ..exc import InvalidRequestError, StaleDataError
from . import expiry
from .attributes import state_of
from .journal import FlushJournal
from .loading import ensure_loaded
from .mapper import mapper_of
from .relationships import Direction
from .strategies import link_keys, selectin_load, unreadable

if TYPE_CHECKING:
    from .context import SessionContext
    from .keys import KeySpace
    from .mapper import Mapper
    from .relationships import RelationshipProperty
    from .state import InstanceState

__all__ = [
    "DeferredKey",
    "LinkChange",
    "MemberCheck",
    "RelationshipWork",
    "SoftRelease",
    "prepare",
    "soft_children",
]


@dataclasses.dataclass
class LinkChange:
    """Add or remove one many-to-many link between two objects (both sides' zsets)."""

    added: bool
    a: InstanceState
    link_name: str
    b: InstanceState
    reverse_link_name: str


@dataclasses.dataclass
class MemberCheck:
    """A link zset whose members the flush relied on; must still hold exactly these ids."""

    key: str
    expected: set[bytes]
    state: InstanceState


@dataclasses.dataclass
class DeferredKey:
    """A foreign key pointing at a new object whose id the counter has not handed out yet."""

    child: InstanceState
    column: str
    target: InstanceState


@dataclasses.dataclass
class SoftRelease:
    """A soft-deleted child of a parent gone for good, as Redis holds it (`data`): the
    flush detaches it (`end` False) or ends its grace period (`end`: the relationship
    cascades delete), checked against the version it was read with
    (`expiry.release_soft_child`). Queries and relationship lists leave such a child
    out, so it is found through the parent's children zset."""

    mapper: Mapper[Any]
    pk: Any
    ks: KeySpace
    key: str
    segment: str
    data: dict[bytes, bytes]
    fk: str
    end: bool


@dataclasses.dataclass
class RelationshipWork:
    links: list[LinkChange] = dataclasses.field(default_factory=list)
    member_checks: list[MemberCheck] = dataclasses.field(default_factory=list)
    drop_keys: list[str] = dataclasses.field(default_factory=list)
    deferred: list[DeferredKey] = dataclasses.field(default_factory=list)
    soft_releases: list[SoftRelease] = dataclasses.field(default_factory=list)
    # id() of the deleted states of soft-delete models that go for good all the same:
    # the children a delete cascade takes along from a parent deleted for good.
    purge: set[int] = dataclasses.field(default_factory=set)
    # What preparing this work changed in the session (None for the parts of a
    # cross-slot flush, which share their whole flush's journal).
    journal: FlushJournal | None = None

    def restore(self, written: set[int] | None = None) -> None:
        """Put the session back as it was before `prepare` (see FlushJournal.restore)."""
        if self.journal is not None:
            self.journal.restore(written or ())


def _read_members(pairs: list[tuple[InstanceState, str]]) -> Steps[dict[str, set[bytes]]]:
    """The members of link zsets as Redis holds them now (one round trip)."""
    keys_ = list(dict.fromkeys(k for _, k in pairs))
    replies = yield Read([("ZRANGE", k, 0, -1) for k in keys_])
    out: dict[str, set[bytes]] = {}
    whats = {k: f"the ids of {st.mapper.name}({st.pk!r})'s relationship" for st, k in pairs}
    for k, reply in zip(keys_, replies, strict=True):
        if isinstance(reply, Exception):
            raise unreadable(k, reply, whats[k])
        out[k] = set(reply)
    return out


def prepare(session: SessionContext) -> Steps[RelationshipWork]:
    """Apply orphan and delete cascades, sync foreign keys, and collect link changes.

    Every change this makes to the session goes through `work.journal`, so a flush
    that fails afterwards (or here) puts the session back as it was: a failed flush
    must not leave an orphan deleted that the user then re-attaches.
    """
    work = RelationshipWork(journal=FlushJournal(session))
    try:
        _orphans(session, work)
        yield from _cascade_deletes(session, work)
        _sync_foreign_keys(session, work)
        _links(session, work)
    except BaseException:
        work.restore()
        raise
    return work


def _orphans(session: SessionContext, work: RelationshipWork) -> None:
    """Delete the persistent objects left without a parent by a delete-orphan list;
    drop the new ones (never written).

    A read's autoflush deletes no persistent orphan: it stays recorded for the flush the
    user calls. Removing a child from one list is often the first half of a move, and
    the lazy load of the list it moves to (`new.kids.append(kid)`) autoflushes between
    the halves. A flush is a Redis transaction of its own, which no rollback undoes, so
    deleting there destroyed the child for good, and the append then brought back a
    deleted object: the commit raised StaleDataError (retried in vain by
    `run_in_transaction`). Meanwhile the autoflush writes the orphan as the session
    holds it: with its foreign key cleared, so the reads it serves do not list it.
    """
    journal = _journal(work)
    autoflush = session.autoflushing
    for key, (item, prop) in list(session.orphans.items()):
        st = state_of(item)
        if st is None or st.session is not session or st.deleted:
            continue
        # Re-parented since it was removed? The many-to-one says so when loaded (the key
        # column may still hold a parent it was moved away from before the removal);
        # otherwise the key column does.
        pointer, _ = _pointer(st, prop)
        if pointer is not None and pointer is not _UNKNOWN:
            continue
        if st.identity is None:
            journal.expunge(item)
        elif autoflush:
            journal.keep_orphan(key)
        else:
            journal.delete(item)


def _journal(work: RelationshipWork) -> FlushJournal:
    assert work.journal is not None, "prepare() gives its work a journal"
    return work.journal


def _cascade_deletes(session: SessionContext, work: RelationshipWork) -> Steps[None]:
    done: set[int] = set()
    while True:
        todo = [st for st in session.deleted_states() if id(st) not in done]
        if not todo:
            return
        by_mapper: dict[tuple[Any, bool], list[InstanceState]] = {}
        for st in todo:
            done.add(id(st))
            by_mapper.setdefault((st.mapper, id(st) in work.purge), []).append(st)
        for (mapper, purged), states in by_mapper.items():
            if mapper.expiry.soft_delete_ms is not None and not purged:
                # A soft delete keeps links and foreign keys (a restore needs them); its
                # delete cascades soft-delete the children, with the same `#d`.
                for prop in expiry.cascade_children(mapper):
                    yield from selectin_load(session, states, prop)
                    for st in states:
                        for child in list(st.obj.__dict__.get(prop.key) or []):
                            _journal(work).delete(child)
                continue
            for prop in mapper.relationships.values():
                if prop.direction is Direction.MANYTOONE:
                    continue
                yield from selectin_load(session, states, prop)
                current = yield from _read_members(
                    [(st, k) for st in states for k in link_keys(st, prop)]
                )
                pointing = _pointing(session, prop)
                unloaded: list[tuple[bytes, str]] = []
                for st in states:
                    members = list(st.obj.__dict__.get(prop.key) or [])
                    keys_ = link_keys(st, prop)
                    for k in keys_:
                        # What Redis holds now must still be there at EXEC.
                        work.member_checks.append(MemberCheck(k, current[k], st))
                    key = keys_[0]
                    listed = {m: k for k in keys_ for m in current[k]}
                    members = yield from _members_at_flush(
                        session, st, prop, members, listed, pointing
                    )
                    if prop.direction is Direction.ONETOMANY:
                        _detach_children(work, st, prop, members)
                        unloaded.extend(_not_held(session, prop, listed))
                    else:
                        for other in members:
                            ost = state_of(other)
                            if ost is not None and ost.identity is not None:
                                work.links.append(
                                    LinkChange(
                                        False, st, prop.link_name, ost, prop.reverse_link_name
                                    )
                                )
                        work.drop_keys.append(key)
                        if "delete" in prop.cascade:
                            for other in members:
                                _journal(work).delete(other)
                if unloaded:
                    # Soft-deleted children: lists leave them out, their parent's
                    # children zset (checked above) does not.
                    found = yield from soft_children(prop, unloaded, expiry.now_ms())
                    _check_optional(prop, found)
                    work.soft_releases.extend(found)
            for src in mapper.hidden_links:
                yield from _unlink_hidden(session, states, src, work)


def _not_held(
    session: SessionContext, prop: RelationshipProperty, listed: dict[bytes, str]
) -> list[tuple[bytes, str]]:
    """The children a deleted parent's children zsets list that the session does not
    hold (hidden from its loads: soft-deleted, or gone), with the zset listing each."""
    target = mapper_of(prop.target)
    out = []
    for seg, key in listed.items():
        pk = target.pk_from_segment(seg, key)
        if session.identity_map.get((prop.target, pk)) is None:
            out.append((seg, key))
    return out


def _check_optional(prop: RelationshipProperty, found: list[SoftRelease]) -> None:
    """A soft-deleted child is detached only if its foreign key may be None."""
    if not found or "delete" in prop.cascade:
        return
    child = found[0]
    if child.mapper.columns[prop.fk_column].required:
        raise InvalidRequestError(
            f"cannot delete the parent of the soft-deleted {child.mapper.name}"
            f"({child.pk!r}) for good: its {prop.fk_column} is required, and "
            f"{prop.parent.name if prop.parent else '?'}.{prop.key} does not cascade "
            f"delete; make it Optional or add cascade=\"all, delete\"; nothing was written"
        )


def soft_children(
    prop: RelationshipProperty, listed: list[tuple[bytes, str]], now: int
) -> Steps[list[SoftRelease]]:
    """Of the children `listed` (member of a one-to-many's children zset, that zset),
    the soft-deleted ones still restorable at `now` (one HGETALL each, one round trip),
    to be detached, or ended with a delete cascade, because their parent goes for good."""
    target = mapper_of(prop.target)
    if target.expiry.soft_delete_ms is None or not listed:
        return []
    pks = [target.pk_from_segment(seg, key) for seg, key in listed]
    object_keys = [target.object_key(pk) for pk in pks]
    replies = yield Read([("HGETALL", k) for k in object_keys])
    out = []
    for pk, key, data in zip(pks, object_keys, replies, strict=True):
        if isinstance(data, Exception):
            raise unreadable(key, data, f"a {target.name} child")
        if not expiry.loose_child(target, prop.fk_column, data, now):
            continue
        out.append(
            SoftRelease(
                target, pk, target.keys_for_pk(pk), key, target.pk_segment(pk), data,
                prop.fk_column, "delete" in prop.cascade,
            )
        )  # fmt: skip
    return out


def _members_at_flush(
    session: SessionContext,
    st: InstanceState,
    prop: RelationshipProperty,
    members: list[Any],
    listed: dict[bytes, str],
    pointing: dict[Any, list[InstanceState]],
) -> Steps[list[Any]]:
    """What a deleted object's list holds once this flush applies, not as last loaded.

    Redis's members (`listed`, checked again under WATCH) are loaded when the session
    lacks them, so a member someone else added since the list was loaded is not left
    pointing at a deleted object. For a one-to-many, each child counts by where the
    session points it: the children it added (new ones included) are in, the ones it
    moved away are out; a child Redis lists here that the session holds unchanged but
    pointing elsewhere was loaded before it was moved: StaleDataError.
    """
    target = mapper_of(prop.target)
    pks = [target.pk_from_segment(seg, listed[seg]) for seg in sorted(listed)]
    yield from ensure_loaded(session, target, pks)
    out: dict[int, Any] = {id(o): o for o in members}
    in_redis: set[int] = set()
    for pk in pks:
        tst = session.identity_map.get((prop.target, pk))
        if tst is not None and not tst.deleted:
            in_redis.add(id(tst.obj))
            out.setdefault(id(tst.obj), tst.obj)
    if prop.direction is not Direction.ONETOMANY:
        return list(out.values())
    for cst in [*pointing.get(("obj", id(st.obj)), ()), *pointing.get(("pk", st.pk), ())]:
        out.setdefault(id(cst.obj), cst.obj)
    children = []
    for obj in out.values():
        cst = state_of(obj)
        if cst is None or cst.deleted:
            continue
        pointer, moved = _pointer(cst, prop)
        if pointer is _UNKNOWN:
            if id(obj) in in_redis:
                children.append(obj)
        elif pointer is st.obj or (pointer is not None and pointer == st.pk):
            if id(obj) in in_redis and "delete" not in prop.cascade:
                _check_released(cst, st, prop)
            children.append(obj)
        elif id(obj) in in_redis and not moved:
            raise StaleDataError(
                f"{cst.mapper.name}({cst.pk!r}) is a child of the deleted "
                f"{st.mapper.name}({st.pk!r}) in Redis but not as this session loaded it; "
                f"nothing was written",
                objects=[obj],
                keys=[cst.key] if cst.key else [],
            )
    return children


def _check_released(cst: InstanceState, st: InstanceState, prop: RelationshipProperty) -> None:
    """A child Redis lists under the deleted `st` is released: its key must be written.

    When the session loaded the child pointing elsewhere (and then pointed it at `st`
    itself), someone else has written the child since; clearing the key would then
    compare equal to that stale load and write nothing, leaving the child pointing at
    a deleted object. The session's copy is stale: StaleDataError, as a write would.
    """
    if cst.identity is None or _loaded_fk(cst, prop) == st.pk:
        return
    raise StaleDataError(
        f"{cst.mapper.name}({cst.pk!r}) was made a child of the deleted "
        f"{st.mapper.name}({st.pk!r}) by someone else since this session loaded it; "
        f"nothing was written",
        objects=[cst.obj],
        keys=[cst.key] if cst.key else [],
    )


def _loaded_fk(cst: InstanceState, prop: RelationshipProperty) -> Any:
    """`prop`'s foreign key of a persistent child as the session last loaded or wrote it."""
    codec = cst.mapper.columns[prop.fk_column].codec
    raw = cst.loaded.get(prop.fk_column)
    return None if raw is None or codec is None or cst.identity is None else codec.decode(raw)


def _pointing(
    session: SessionContext, prop: RelationshipProperty
) -> dict[Any, list[InstanceState]]:
    """The session's objects on the many side of a one-to-many, by where they point:
    ("obj", id(parent)) or ("pk", parent primary key)."""
    out: dict[Any, list[InstanceState]] = {}
    if prop.direction is not Direction.ONETOMANY:
        return out
    for cst in [*session.pending_states(), *session.identity_map.states()]:
        if cst.mapper.class_ is not prop.target or cst.deleted:
            continue
        pointer, _ = _pointer(cst, prop)
        if pointer is _UNKNOWN or pointer is None:
            continue
        if isinstance(pointer, (int, str)) or not hasattr(pointer, "__dict__"):
            out.setdefault(("pk", pointer), []).append(cst)
        else:
            out.setdefault(("obj", id(pointer)), []).append(cst)
    return out


_UNKNOWN = object()


def _pointer(cst: InstanceState, prop: RelationshipProperty) -> tuple[Any, bool]:
    """Where a child points through `prop`'s foreign key as the session holds it (the
    related object, a primary key, None, or _UNKNOWN when not loaded), and whether the
    session changed it since loading."""
    d = cst.obj.__dict__
    reverse = prop.reverse
    loaded = _loaded_fk(cst, prop)
    if reverse is not None and reverse.key in d and not _hides_deleted(cst, reverse, d):
        target = d[reverse.key]
        tst = state_of(target) if target is not None else None
        pk = None if tst is None else tst.pk
        return target, cst.identity is None or pk != loaded or (target is not None and pk is None)
    if prop.fk_column in d:
        return d[prop.fk_column], cst.identity is None or d[prop.fk_column] != loaded
    return _UNKNOWN, False


def _hides_deleted(cst: InstanceState, reverse: RelationshipProperty, d: dict[str, Any]) -> bool:
    """Whether the many-to-one reads None only because its target is deleted in this session.

    A lazy load hides an object `delete()` marked (as `get` does) while the foreign key
    still names it. That None is no move away: the key decides, as in SQLAlchemy, where a
    relationship only loaded, not changed, leaves the column alone; else the delete's
    cascade would skip the child, or leave its key naming the deleted object.
    """
    fk = d.get(reverse.fk_column)
    if d[reverse.key] is not None or fk is None or cst.session is None:
        return False
    tst = cst.session.identity_map.get((reverse.target, fk))
    return tst is not None and tst.deleted


def _detach_children(
    work: RelationshipWork, st: InstanceState, prop: RelationshipProperty, children: list[Any]
) -> None:
    journal = _journal(work)
    for child in children:
        cst = state_of(child)
        if cst is None or cst.deleted:
            continue
        if "delete" in prop.cascade:
            if cst.identity is None:
                journal.expunge(child)  # a new child of a deleted parent is never written
            else:
                journal.delete(child)
                # Its parent goes for good (this is no soft delete's cascade): so does
                # it, even on a model with `__soft_delete__`, rather than stay
                # restorable with a foreign key to nothing.
                work.purge.add(id(cst))
        else:
            # As SQLAlchemy does without a delete cascade: the children stay, orphaned.
            if prop.reverse is not None:
                journal.set_plain(child, prop.reverse.key, None)
            journal.set_attribute(child, prop.fk_column, None)


def _unlink_hidden(
    session: SessionContext,
    states: list[InstanceState],
    src: RelationshipProperty,
    work: RelationshipWork,
) -> Steps[None]:
    """Remove deleted objects from the sets of a many-to-many that has no reverse side."""
    source_mapper = mapper_of(src.parent.class_) if src.parent else None
    if source_mapper is None:
        return
    keys = [
        st.mapper.keys_for_pk(st.pk).relation(src.reverse_link_name, st.mapper.pk_segment(st.pk))
        for st in states
    ]
    replies = yield Read([("ZRANGE", k, 0, -1) for k in keys])
    owners: list[list[Any]] = []
    for st, key, reply in zip(states, keys, replies, strict=True):
        if isinstance(reply, Exception):
            raise unreadable(key, reply, f"the {source_mapper.name} ids linked to {st.mapper.name}")
        work.member_checks.append(MemberCheck(key, set(reply), st))
        owners.append([source_mapper.pk_from_segment(seg, key) for seg in reply])
    # Every owner the session lacks is loaded in one round trip (it was one per owner).
    yield from ensure_loaded(session, source_mapper, [pk for pks in owners for pk in pks])
    for st, key, pks in zip(states, keys, owners, strict=True):
        for pk in pks:
            ost = session.identity_map.get((source_mapper.class_, pk))
            if ost is not None and not ost.deleted:
                work.links.append(LinkChange(False, ost, src.link_name, st, src.reverse_link_name))
        work.drop_keys.append(key)


def _sync_foreign_keys(session: SessionContext, work: RelationshipWork) -> None:
    objs = [st.obj for st in session.pending_states()]
    objs.extend(session.rel_dirty.values())
    seen: set[int] = set()
    for obj in objs:
        st = state_of(obj)
        if st is None or st.deleted or id(obj) in seen or st.session is not session:
            continue
        seen.add(id(obj))
        d = obj.__dict__
        for prop in st.mapper.relationships.values():
            if prop.key not in d:
                continue
            if prop.direction is Direction.MANYTOONE:
                _set_fk(session, st, prop.fk_column, d[prop.key], work)
            elif prop.direction is Direction.ONETOMANY:
                for child in d[prop.key] or ():
                    cst = state_of(child)
                    if cst is not None and _follows_list(session, cst, prop, obj):
                        _set_fk(session, cst, prop.fk_column, obj, work)


def _follows_list(
    session: SessionContext, cst: InstanceState, prop: RelationshipProperty, owner: Any
) -> bool:
    """Whether a child in `owner`'s one-to-many list takes its foreign key from the list.

    Not a child the flush dropped (a new orphan, expunged): nothing writes it. Not a
    child whose many-to-one points elsewhere: the list was loaded (autoflush off) after
    the child was moved, and, as SQLAlchemy syncs only the members a collection gained,
    the move wins. A member added by user code has its many-to-one set to the owner; one
    only loaded (many-to-one unloaded) holds the owner's key already, unless the key
    was assigned by hand since, which then wins too.
    """
    if cst.deleted or cst.session is not session:
        return False
    reverse = prop.reverse
    if reverse is None:
        return True  # the list is the only side: every member follows it
    return cst.obj.__dict__.get(reverse.key) is owner


def _set_fk(
    session: SessionContext, child: InstanceState, column: str, target: Any, work: RelationshipWork
) -> None:
    if target is None:
        # Clearing a relationship clears the key at once (relationship_events); a None
        # that was never set (the dataclass default) leaves a key set by hand alone.
        return
    tst = state_of(target)
    if tst is None or tst.session is not session:
        raise InvalidRequestError(
            f"{child.mapper.name}.{column} refers to a {type(target).__name__} that is not "
            f"in this session; add it (or keep the default save-update cascade)"
        )
    pk = tst.pk if tst.identity is not None else target.__dict__.get(tst.mapper.pk.key)
    if pk is None:
        work.deferred.append(DeferredKey(child, column, tst))
        return
    if child.obj.__dict__.get(column) != pk:
        _journal(work).set_attribute(child.obj, column, pk)


def _links(session: SessionContext, work: RelationshipWork) -> None:
    net: dict[tuple[int, str, int], LinkChange] = {}
    changes = list(session.links)
    for st in session.pending_states():
        # A new object's collections were filled before it met the session: every
        # member is a new link.
        for prop in st.mapper.relationships.values():
            if prop.direction is Direction.MANYTOMANY and prop.key in st.obj.__dict__:
                changes.extend((st.obj, prop, item, True) for item in st.obj.__dict__[prop.key])
    for owner, prop, item, added in changes:
        a, b = state_of(owner), state_of(item)
        if a is None or b is None or a.session is not session or b.session is not session:
            continue
        if a.deleted or b.deleted:
            continue  # the delete removes every link of the object, this one included
        # One link, whichever side changed it: the last change wins (an append on one
        # side then a remove on the other must not leave the link in place).
        key = min((id(a), prop.link_name, id(b)), (id(b), prop.reverse_link_name, id(a)))
        net.pop(key, None)
        net[key] = LinkChange(added, a, prop.link_name, b, prop.reverse_link_name)
    work.links.extend(net.values())
