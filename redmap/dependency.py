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

from .attributes import state_of
from .exc import InvalidRequestError
from .mapper import mapper_of
from .relationships import Direction
from .strategies import link_keys, selectin_load

if TYPE_CHECKING:
    from .relationships import RelationshipProperty
    from .session import Session
    from .state import InstanceState

__all__ = ["DeferredKey", "LinkChange", "MemberCheck", "RelationshipWork", "prepare"]


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
class RelationshipWork:
    links: list[LinkChange] = dataclasses.field(default_factory=list)
    member_checks: list[MemberCheck] = dataclasses.field(default_factory=list)
    drop_keys: list[str] = dataclasses.field(default_factory=list)
    deferred: list[DeferredKey] = dataclasses.field(default_factory=list)


def _read_members(
    session: Session, pairs: list[tuple[InstanceState, str]]
) -> dict[str, set[bytes]]:
    """The members of link zsets as Redis holds them now (one round trip)."""
    keys_ = list(dict.fromkeys(k for _, k in pairs))
    replies = session.bind.execute([("ZRANGE", k, 0, -1) for k in keys_])
    out: dict[str, set[bytes]] = {}
    for k, reply in zip(keys_, replies, strict=True):
        if isinstance(reply, Exception):
            raise InvalidRequestError(f"cannot read {k!r}: {reply}")
        out[k] = set(reply)
    return out


def prepare(session: Session) -> RelationshipWork:
    """Apply orphan and delete cascades, sync foreign keys, and collect link changes."""
    work = RelationshipWork()
    _orphans(session)
    _cascade_deletes(session, work)
    _sync_foreign_keys(session, work)
    _links(session, work)
    return work


def _orphans(session: Session) -> None:
    for item, prop in list(session._orphans.values()):
        st = state_of(item)
        if st is None or st.session is not session or st.deleted:
            continue
        if item.__dict__.get(prop.fk_column) is not None:
            continue  # re-parented since it was removed
        reverse = prop.reverse
        if reverse is not None and item.__dict__.get(reverse.key) is not None:
            continue
        if st.identity is None:
            session.expunge(item)
        else:
            session.delete(item)


def _cascade_deletes(session: Session, work: RelationshipWork) -> None:
    done: set[int] = set()
    while True:
        todo = [st for st in session._deleted_states() if id(st) not in done]
        if not todo:
            return
        by_mapper: dict[Any, list[InstanceState]] = {}
        for st in todo:
            done.add(id(st))
            by_mapper.setdefault(st.mapper, []).append(st)
        for mapper, states in by_mapper.items():
            for prop in mapper.relationships.values():
                if prop.direction is Direction.MANYTOONE:
                    continue
                selectin_load(session, states, prop)
                current = _read_members(
                    session, [(st, k) for st in states for k in link_keys(st, prop)]
                )
                for st in states:
                    members = list(st.obj.__dict__.get(prop.key) or [])
                    keys_ = link_keys(st, prop)
                    for k in keys_:
                        # What Redis holds now must still be there at EXEC.
                        work.member_checks.append(MemberCheck(k, current[k], st))
                    key = keys_[0]
                    if prop.direction is Direction.ONETOMANY:
                        _detach_children(session, st, prop, members)
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
                                session.delete(other)
            for src in mapper.hidden_links:
                _unlink_hidden(session, states, src, work)


def _detach_children(
    session: Session, st: InstanceState, prop: RelationshipProperty, children: list[Any]
) -> None:
    for child in children:
        cst = state_of(child)
        if cst is None or cst.deleted:
            continue
        if "delete" in prop.cascade:
            session.delete(child)
        else:
            # As SQLAlchemy does without a delete cascade: the children stay, orphaned.
            if prop.reverse is not None:
                child.__dict__[prop.reverse.key] = None
            setattr(child, prop.fk_column, None)


def _unlink_hidden(
    session: Session,
    states: list[InstanceState],
    src: RelationshipProperty,
    work: RelationshipWork,
) -> None:
    """Remove deleted objects from the sets of a many-to-many that has no reverse side."""
    source_mapper = mapper_of(src.parent.class_) if src.parent else None
    if source_mapper is None:
        return
    keys = [
        st.mapper.keys_for_pk(st.pk).relation(src.reverse_link_name, st.mapper.pk_segment(st.pk))
        for st in states
    ]
    replies = session.bind.execute([("ZRANGE", k, 0, -1) for k in keys])
    for st, key, reply in zip(states, keys, replies, strict=True):
        if isinstance(reply, Exception):
            raise InvalidRequestError(f"cannot read {key!r}: {reply}")
        work.member_checks.append(MemberCheck(key, set(reply), st))
        for seg in reply:
            pk = source_mapper.pk_from_segment(seg)
            owner = session.get(source_mapper.class_, pk)
            ost = state_of(owner) if owner is not None else None
            if ost is not None:
                work.links.append(LinkChange(False, ost, src.link_name, st, src.reverse_link_name))
        work.drop_keys.append(key)


def _sync_foreign_keys(session: Session, work: RelationshipWork) -> None:
    objs = [st.obj for st in session._pending_states()]
    objs.extend(session._rel_dirty.values())
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
                    if cst is not None and not cst.deleted:
                        _set_fk(session, cst, prop.fk_column, obj, work)


def _set_fk(
    session: Session, child: InstanceState, column: str, target: Any, work: RelationshipWork
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
        setattr(child.obj, column, pk)


def _links(session: Session, work: RelationshipWork) -> None:
    net: dict[tuple[int, str, int], LinkChange] = {}
    changes = list(session._links)
    for st in session._pending_states():
        # A new object's collections were filled before it met the session: every
        # member is a new link.
        for prop in st.mapper.relationships.values():
            if prop.direction is Direction.MANYTOMANY and prop.key in st.obj.__dict__:
                changes.extend((st.obj, prop, item, True) for item in st.obj.__dict__[prop.key])
    for owner, prop, item, added in changes:
        a, b = state_of(owner), state_of(item)
        if a is None or b is None or a.session is not session or b.session is not session:
            continue
        net[(id(a), prop.link_name, id(b))] = LinkChange(
            added, a, prop.link_name, b, prop.reverse_link_name
        )
    work.links.extend(net.values())
