"""Keeps both sides of a relationship in step in memory and records what a flush must write.

Called by `InstrumentedList` (collection adds/removes) and by the relationship
descriptor (scalar sets). `back_populates` is applied at once; foreign keys follow
when the target's primary key is known (else at flush); new related objects join
the session (save-update cascade); many-to-many link changes and delete-orphan
candidates are recorded on the owning session's context (`redmap.orm.context`);
`discard_expired` forgets the records that an expiry (or refresh) took back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .attributes import set_quietly, state_of
from .relationships import Direction

if TYPE_CHECKING:
    from .collections import InstrumentedList
    from .context import SessionContext
    from .relationships import RelationshipProperty
    from .state import InstanceState

__all__ = ["collection_added", "collection_removed", "discard_expired", "scalar_set"]


def _session_of(*objs: Any) -> SessionContext | None:
    for obj in objs:
        st = state_of(obj) if obj is not None else None
        if st is not None and st.session is not None:
            return st.session
    return None


def _cascade_add(session: SessionContext | None, prop: RelationshipProperty, obj: Any) -> None:
    if session is not None and obj is not None and "save-update" in prop.cascade:
        st = state_of(obj)
        if st is None or st.session is None:
            session.add(obj)


def _loaded_list(obj: Any, key: str) -> InstrumentedList[Any] | None:
    value = obj.__dict__.get(key)
    return value if value is not None and hasattr(value, "_append_quiet") else None


def _mark_fk(child: Any, prop_fk: str, parent: Any) -> None:
    """Point `child`'s foreign key at `parent` (None clears it), now if the key is known."""

    st = state_of(child)
    session: SessionContext | None = st.session if st is not None else _session_of(parent)
    if session is not None:
        session.relationship_changed(child)
    value = None if parent is None else _known_pk(parent)
    if parent is None or value is not None:
        set_quietly(child, prop_fk, value)  # the ORM's own sync: no validator, no event


def _known_pk(obj: Any) -> Any:
    from .mapper import mapper_of

    st = state_of(obj)
    if st is not None and st.identity is not None:
        return st.pk
    return obj.__dict__.get(mapper_of(type(obj)).pk.key)


def collection_added(owner: Any, prop: RelationshipProperty, item: Any) -> None:
    """`item` was added to `owner.<prop>` by user code."""
    session = _session_of(owner, item)
    _cascade_add(session, prop, item)
    if session is not None and _rescues_orphan(prop, item):
        session.orphans.pop(id(item), None)
    reverse = prop.reverse
    if prop.direction is Direction.ONETOMANY:
        if reverse is not None:
            old_parent = _current_parent(session, prop, item)
            if old_parent is not None and old_parent is not owner:
                old_list = _loaded_list(old_parent, prop.key)
                if old_list is not None:
                    old_list._remove_quiet(item)
            item.__dict__[reverse.key] = owner
        _mark_fk(item, prop.fk_column, owner)
    elif prop.direction is Direction.MANYTOMANY:
        if reverse is not None:
            other = _loaded_list(item, reverse.key)
            if other is not None:
                other._append_quiet(owner)
        if session is not None:
            session.record_link(owner, prop, item, added=True)


def _current_parent(session: SessionContext | None, prop: RelationshipProperty, item: Any) -> Any:
    """The parent `item` leaves when it joins another `prop` list: its many-to-one when
    loaded, else the object its foreign key names if the session holds it (no I/O, as
    for `kid.parent = x`, and as SQLAlchemy's back-reference), so that the old parent's
    loaded list lets it go too instead of listing it beside the new one."""
    reverse = prop.reverse
    assert reverse is not None
    if reverse.key in item.__dict__:
        return item.__dict__[reverse.key]
    st = state_of(item)
    if session is None or st is None or st.session is not session:
        return None
    return session.peek_many_to_one(st, reverse)


def _rescues_orphan(prop: RelationshipProperty, item: Any) -> bool:
    """Whether adding `item` to a collection undoes its removal from a delete-orphan one.

    As in SQLAlchemy: a new orphan leaves the session when removed and comes back with
    the save-update cascade of any collection it joins, so it is inserted after all; a
    persistent orphan is deleted unless it gets a parent again (checked at flush), and
    joining a team or a tag is not getting one.
    """
    if "delete-orphan" in prop.cascade:
        return True
    st = state_of(item)
    return "save-update" in prop.cascade and (st is None or st.identity is None)


def collection_removed(owner: Any, prop: RelationshipProperty, item: Any) -> None:
    """`item` was removed from `owner.<prop>` by user code."""
    session = _session_of(owner, item)
    reverse = prop.reverse
    if prop.direction is Direction.ONETOMANY:
        clear = _current_parent_is(item, prop, owner)
        if reverse is not None and item.__dict__.get(reverse.key) is owner:
            item.__dict__[reverse.key] = None
        if clear:
            _mark_fk(item, prop.fk_column, None)
        if session is not None and "delete-orphan" in prop.cascade:
            session.orphans[id(item)] = (item, prop)
    elif prop.direction is Direction.MANYTOMANY:
        if reverse is not None:
            other = _loaded_list(item, reverse.key)
            if other is not None:
                other._remove_quiet(owner)
        if session is not None:
            session.record_link(owner, prop, item, added=False)


def _current_parent_is(item: Any, prop: RelationshipProperty, owner: Any) -> bool:
    """Whether `item` points at `owner`, so that leaving its list clears its key.

    The many-to-one decides when loaded: after `kid.team = new_team` (a new object, its
    id unknown) the key still holds the old team until the flush, and removing the kid
    from the new team must clear it all the same. Otherwise the key decides: a child
    listed by a stale load but already moved elsewhere keeps its new parent.
    """
    reverse = prop.reverse
    if reverse is not None and reverse.key in item.__dict__:
        return item.__dict__[reverse.key] is owner
    fk = item.__dict__.get(prop.fk_column)
    return fk is None or fk == _known_pk(owner)


def scalar_set(obj: Any, prop: RelationshipProperty, old: Any, new: Any) -> None:
    """`obj.<prop>` (many-to-one) changed from `old` to `new` by user code."""
    session = _session_of(obj, new)
    _cascade_add(session, prop, new)
    _mark_fk(obj, prop.fk_column, new)
    reverse = prop.reverse
    if reverse is None:
        return
    if old is not None and old is not new:
        old_list = _loaded_list(old, reverse.key)
        if old_list is not None:
            old_list._remove_quiet(obj)
    if new is not None:
        new_list = _loaded_list(new, reverse.key)
        if new_list is not None:
            new_list._append_quiet(obj)
    if session is not None and new is None and "delete-orphan" in reverse.cascade:
        session.orphans[id(obj)] = (obj, reverse)


def discard_expired(session: SessionContext, expired: Iterable[Any] | None) -> None:
    """Forget the relationship changes that expiring `expired` (None: every object) took back.

    Expiry discards pending changes of the expired attributes, and the records kept
    beside them must follow, or the flush would still write a change the objects no
    longer show. A record stays while a loaded attribute the flush reads it from still
    holds it:
    - a delete-orphan release, while the child's many-to-one or foreign key is loaded
      (`dependency._orphans` decides by them); expiring only the parent leaves the
      child's own release (its key cleared) pending, as in SQLAlchemy;
    - a many-to-many change, while either side's list is loaded and shows it;
    - a relationship-changed mark, while the object has a relationship loaded.
    Cost: orphan releases and relationship-changed marks are keyed by `id(obj)`, so
    expiring some objects looks theirs up (expiring every object visits each once); the
    many-to-many changes are one pass over the list, only when it is not empty.
    """
    if not (session.orphans or session.links or session.rel_dirty):
        return
    ids = None if expired is None else {id(obj) for obj in expired}

    def touched(*objs: Any) -> bool:
        return ids is None or any(id(obj) in ids for obj in objs)

    orphan_keys = list(session.orphans) if ids is None else ids & session.orphans.keys()
    for key in orphan_keys:
        item, prop = session.orphans[key]
        if not _release_held(item, prop):
            del session.orphans[key]
    if session.links:
        session.links[:] = [
            entry
            for entry in session.links
            if not touched(entry[0], entry[2]) or _link_held(*entry)
        ]
    dirty_keys = list(session.rel_dirty) if ids is None else ids & session.rel_dirty.keys()
    for key in dirty_keys:
        if not _relationship_loaded(session.rel_dirty[key]):
            del session.rel_dirty[key]


def _release_held(child: Any, prop: RelationshipProperty) -> bool:
    """Whether the child still shows where it points (the flush's orphan test reads this)."""
    d = child.__dict__
    reverse = prop.reverse
    return prop.fk_column in d or (reverse is not None and reverse.key in d)


def _link_held(owner: Any, prop: RelationshipProperty, item: Any, added: bool) -> bool:
    """Whether a loaded list on either side still shows the link as this change left it
    (by identity: mapped dataclasses compare by value)."""

    def shows(holder: Any, key: str, member: Any) -> bool:
        value = holder.__dict__.get(key)
        return value is not None and any(x is member for x in value) == added

    reverse = prop.reverse
    return shows(owner, prop.key, item) or (reverse is not None and shows(item, reverse.key, owner))


def _relationship_loaded(obj: Any) -> bool:
    """Whether the flush's foreign-key sync has anything of `obj` to read."""
    st = state_of(obj)
    return st is None or any(key in obj.__dict__ for key in st.mapper.relationships)


def owner_state(obj: Any) -> InstanceState | None:
    return state_of(obj)
