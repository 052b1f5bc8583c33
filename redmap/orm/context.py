"""`SessionContext`: what the layers below the `Session` know of it; owned by the session.

A session's identity map, its pending and deleted states, the relationship
bookkeeping kept between flushes, and the operations that change them.
`InstanceState.session` points at the context, not at the `Session`, and `state`,
`attributes`, `relationship_events`, `journal`, `dependency`, `strategies`, `loading`,
`query` and `unitofwork` receive a context: none of them imports `redmap.orm.session`, so
imports point one way and the Session's private names stay its own
(`tests/test_layers.py` checks both). Below the Session, a parameter or attribute
named `session` is this context (`load_instance(session, ...)`, `UOWTransaction.session`).

What needs the session's lifecycle or its driver (adding an object with its cascade,
deleting and expunging, the autoflush before a read, a lazy load on attribute access,
whether the engine is a cluster) is a callable the `Session` installs when it builds
its context: the context itself does no I/O and knows no engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .identity import IdentityMap

if TYPE_CHECKING:
    from ..commands import Steps
    from .relationships import RelationshipProperty
    from .state import InstanceState

__all__ = ["SessionContext"]

# A many-to-many change recorded between flushes: (owner, relationship, item, added).
Link = tuple[Any, "RelationshipProperty", Any, bool]


class SessionContext:
    """The state of one session that the mapping, loading and flush layers share.

    Built by `Session.__init__`, one per session, for the session's whole life. Every
    container is changed in place, never replaced: a `FlushJournal` keeps the lengths
    and copies it needs, and the session reads the same objects.
    """

    __slots__ = (
        "add",
        "allow_cross_slot",
        "autoflush",
        "autoflushing",
        "delete",
        "deleted",
        "expunge",
        "identity_map",
        "links",
        "load_relationship",
        "load_unloaded",
        "new",
        "orphans",
        "owner",
        "rel_dirty",
        "replace_guards",
        "supports_cluster",
        "doubt",
        "refused",
        "reload",
    )

    def __init__(
        self,
        *,
        add: Callable[[object], None],
        delete: Callable[[object], None],
        expunge: Callable[[object], None],
        autoflush: Callable[[], Steps[None]],
        load_unloaded: Callable[[InstanceState, str | None], None],
        load_relationship: Callable[[InstanceState, RelationshipProperty], None],
        supports_cluster: Callable[[], bool],
        allow_cross_slot: bool = False,
        owner: object = None,
    ) -> None:
        # Persistent (and deleted, not yet flushed) states by identity, and the modified set.
        self.identity_map = IdentityMap()
        # Pending (added, never flushed) states in insertion order, by id(state).
        self.new: dict[int, InstanceState] = {}
        # States marked in doubt while in this session (`InstanceState.in_doubt`); some
        # may have left it or been reloaded since: `doubtful()` says which still are.
        self.doubt: set[InstanceState] = set()
        # States a flush of this session refused as stale since the last rollback (named
        # by its StaleDataError): the rollback marks them to reload
        # (`InstanceState.reload`), together with the states in doubt ...
        self.refused: set[InstanceState] = set()
        # ... and those marks, until a load or a flush's `reload_states` clears them:
        # `to_reload()` says which still hold.
        self.reload: set[InstanceState] = set()
        # Persistent states marked for deletion, by id(state).
        self.deleted: dict[int, InstanceState] = {}
        # Relationship bookkeeping between flushes (consumed by `dependency.prepare`):
        # objects whose relationships changed, by id(obj) ...
        self.rel_dirty: dict[int, Any] = {}
        # ... objects removed from a delete-orphan collection: (object, relationship) ...
        self.orphans: dict[int, tuple[Any, RelationshipProperty]] = {}
        # ... and many-to-many changes in order.
        self.links: list[Link] = []
        # `Session.replace_all`: (id zset, its members as read, what it lists) that the
        # next flush requires unchanged, so that it replaces exactly the set it read.
        self.replace_guards: list[tuple[str, frozenset[bytes], str]] = []
        # True while a read's autoflush runs: it leaves persistent orphans for the flush
        # the user calls (see `dependency._orphans`).
        self.autoflushing = False
        # On Redis Cluster: commit a flush spanning several hash slots slot by slot
        # (each part atomic, the whole not) instead of refusing it (`Session.allow_cross_slot`).
        self.allow_cross_slot = allow_cross_slot
        # Installed by the Session. `add`, `delete`, `expunge`: its public methods, with
        # their cascades and checks (relationship events add related objects; a flush's
        # journal deletes orphans and cascades).
        self.add = add
        self.delete = delete
        self.expunge = expunge
        # The autoflush before a read (core steps; nothing when autoflush is off or the
        # session is flushing already).
        self.autoflush = autoflush
        # Lazy loads on attribute access (`InstanceState.load_unloaded/load_relationship`):
        # driven by the session's engine, blocking, or refused under an AsyncSession.
        self.load_unloaded = load_unloaded
        self.load_relationship = load_relationship
        # Whether the engine reaches a Redis Cluster (a flush may then be split by tag).
        self.supports_cluster = supports_cluster
        # The public session object owning this context, opaque here: what
        # `redmap.inspect(obj).session` answers (nothing below the session calls it).
        self.owner = owner

    def __repr__(self) -> str:
        return f"<SessionContext {len(self.identity_map)} persistent, {len(self.new)} pending>"

    # -- relationship bookkeeping (relationship_events, dependency, journal) ------------

    def relationship_changed(self, obj: Any) -> None:
        """Mark `obj` for the flush's foreign-key sync (`dependency._sync_foreign_keys`)."""
        self.rel_dirty[id(obj)] = obj

    def record_link(self, owner: Any, prop: RelationshipProperty, item: Any, added: bool) -> None:
        """Record a many-to-many change for the next flush, in order."""
        self.links.append((owner, prop, item, added))
        self.rel_dirty[id(owner)] = owner

    def forget_relationship_changes(self) -> None:
        """Drop every recorded relationship change (a rollback)."""
        self.rel_dirty.clear()
        self.orphans.clear()
        self.links.clear()

    def peek_many_to_one(self, st: InstanceState, prop: RelationshipProperty) -> Any:
        """The current many-to-one target if it is in the session, without I/O."""
        fk = st.obj.__dict__.get(prop.fk_column)
        if fk is None:
            return None
        target = self.identity_map.get((prop.target, fk))
        return None if target is None else target.obj

    # -- lifecycle (loading, unitofwork) ------------------------------------------------

    def make_persistent(self, st: InstanceState, pk: Any, key: str) -> None:
        """Record that `st` is backed by `key` (after an insert or a load)."""
        self.new.pop(id(st), None)
        st.identity = (st.mapper.class_, pk)
        st.key = key
        st.session = self
        self.identity_map.add(st)
        if st.in_doubt:
            self.doubt.add(st)
        if st.reload:
            self.reload.add(st)

    def doubtful(self) -> list[InstanceState]:
        """The states of this session whose last flush's outcome is unknown: O(their
        number), not O(the session's size)."""
        if not self.doubt:
            return []
        self.doubt = {st for st in self.doubt if st.in_doubt and st.session is self}
        return list(self.doubt)

    def to_reload(self) -> list[InstanceState]:
        """The persistent states of this session marked to reload before their next
        flush (`InstanceState.reload`): O(their number)."""
        if not self.reload:
            return []
        self.reload = {
            st for st in self.reload if st.reload and st.session is self and not st.in_doubt
        }
        return list(self.reload)

    def forget_deleted(self, st: InstanceState) -> None:
        """A deletion was flushed: `st` leaves the session (detached)."""
        self.identity_map.discard(st)
        self.deleted.pop(id(st), None)
        self.refused.discard(st)
        self.reload.discard(st)
        st.deleted = False
        st.session = None

    def detach(self, st: InstanceState) -> None:
        """`st` leaves the session (expunge, close, the rollback of a pending object)."""
        self.identity_map.discard(st)
        self.new.pop(id(st), None)
        self.deleted.pop(id(st), None)
        self.refused.discard(st)
        self.reload.discard(st)  # (its mark goes with it: `make_persistent` takes it back)
        st.deleted = False
        st.session = None

    # -- views (unitofwork, dependency, Session.new/dirty/deleted) ----------------------

    def pending_states(self) -> list[InstanceState]:
        """The pending states, in the order they were added (their ids' order)."""
        return list(self.new.values())

    def deleted_states(self) -> list[InstanceState]:
        return list(self.deleted.values())

    def dirty_candidates(self) -> list[InstanceState]:
        """The states a flush compares: the modified ones, and every state with a mutable
        (JSON) field, whose in-place changes bypass the attribute descriptors."""
        out = list(self.identity_map.modified)
        seen = {id(s) for s in out}
        for st in self.identity_map.mutable.values():
            if id(st) not in seen:
                out.append(st)
        return out
