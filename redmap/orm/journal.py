"""`FlushJournal`: what a flush's preparation changed in the session, to put back on failure.

Used by `dependency.prepare` (which records every change it makes to the session:
orphans deleted or expunged, cascade deletes, foreign keys set or cleared) and by
`UOWTransaction` (which restores the journal when the flush fails, and forgets the
relationship bookkeeping the flush consumed once it succeeded). A failed flush thus
leaves the session as it found it, so fixing the cause and flushing again writes
exactly what was intended.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from .attributes import set_quietly, state_of

if TYPE_CHECKING:
    from .context import SessionContext
    from .state import InstanceState

__all__ = ["FlushJournal"]

_ABSENT = object()


@dataclasses.dataclass
class _Saved:
    """A state's session-level facts as they were before the flush touched it."""

    state: InstanceState
    session: SessionContext | None
    deleted: bool
    modified: frozenset[str]
    marked: bool  # in the identity map's modified set
    mapped: bool  # held by the identity map
    names: set[str] = dataclasses.field(default_factory=set)  # attributes the flush set


class FlushJournal:
    """Records the session changes of one flush's preparation; `restore` undoes them."""

    def __init__(self, session: SessionContext):
        self.session = session
        self._new_order = list(session.new.items())
        self._saved: dict[int, _Saved] = {}
        self._values: list[tuple[Any, str, Any]] = []
        # The relationship bookkeeping this flush consumed: entries recorded later (by
        # code running while the flush is under way) stay for the next flush.
        self._links_seen = len(session.links)
        self._rel_dirty_seen = dict(session.rel_dirty)
        self._orphans_seen = dict(session.orphans)
        self._closed = False

    # -- recording (dependency.prepare) -------------------------------------------------

    def _touch(self, st: InstanceState) -> _Saved:
        saved = self._saved.get(id(st))
        if saved is None:
            s = self.session
            saved = _Saved(
                st,
                st.session,
                st.deleted,
                frozenset(st.modified),
                st in s.identity_map.modified,
                st.identity is not None and s.identity_map.get(st.identity) is st,
            )
            self._saved[id(st)] = saved
        return saved

    def delete(self, obj: Any) -> None:
        """`session.delete(obj)`, recorded."""
        st = state_of(obj)
        if st is not None:
            self._touch(st)
        self.session.delete(obj)

    def expunge(self, obj: Any) -> None:
        """`session.expunge(obj)`, recorded."""
        st = state_of(obj)
        if st is not None:
            self._touch(st)
        self.session.expunge(obj)

    def set_attribute(self, obj: Any, name: str, value: Any) -> None:
        """`setattr(obj, name, value)` through the instrumented attribute (tracked, without
        validators and "set" listeners: the ORM's own assignment), recorded."""
        self._remember(obj, name)
        st = state_of(obj)
        if st is not None:
            self._touch(st).names.add(name)
        set_quietly(obj, name, value)

    def set_plain(self, obj: Any, name: str, value: Any) -> None:
        """`obj.__dict__[name] = value` (no events, no change tracking), recorded."""
        self._remember(obj, name)
        obj.__dict__[name] = value

    def _remember(self, obj: Any, name: str) -> None:
        self._values.append((obj, name, obj.__dict__.get(name, _ABSENT)))

    def keep_orphan(self, key: int) -> None:
        """The orphan recorded under `key` is left for a later flush to decide: this
        flush does not consume it (`flushed` keeps it in the session)."""
        self._orphans_seen.pop(key, None)

    # -- outcome (unitofwork) -----------------------------------------------------------

    def restore(self, written: Collection[int] = ()) -> None:
        """Undo every recorded change, except on the states in `written` (ids of states
        whose part of the flush was applied). Does nothing once the flush is closed."""
        if self._closed:
            return
        self._closed = True
        s = self.session
        for obj, name, old in reversed(self._values):
            st = state_of(obj)
            if st is not None and id(st) in written:
                continue
            if old is _ABSENT:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old
        back_to_new: set[int] = set()
        for key, saved in self._saved.items():
            if key in written:
                continue
            st = saved.state
            st.session = saved.session
            st.deleted = saved.deleted
            # Names the flush set go; names assigned meanwhile by user code stay.
            st.modified -= saved.names - saved.modified
            st.modified |= saved.modified
            if saved.mapped:
                s.identity_map.add(st)
            if st.identity is not None and (saved.marked or (st.modified and saved.session is s)):
                s.identity_map.modified.add(st)
            else:
                s.identity_map.modified.discard(st)
            if saved.deleted and saved.session is s:
                s.deleted[id(st)] = st
            else:
                s.deleted.pop(id(st), None)
            if saved.session is s and st.identity is None:
                back_to_new.add(key)
        if back_to_new:
            # Pending objects keep their order (it is the order their ids are handed out).
            order = {k: st for k, st in self._new_order if k in s.new or k in back_to_new}
            for k, st in s.new.items():
                order.setdefault(k, st)
            s.new.clear()
            s.new.update(order)

    def flushed(self, written: Callable[[Any], bool] | None = None) -> None:
        """The flush succeeded (or, with `written`, succeeded for the objects it accepts):
        forget the relationship bookkeeping it consumed, keep everything recorded since."""
        self._closed = True
        s = self.session

        def done(obj: Any) -> bool:
            return written is None or written(obj)

        consumed, later = s.links[: self._links_seen], s.links[self._links_seen :]
        s.links[:] = [entry for entry in consumed if not done(entry[0])] + later
        for key, obj in self._rel_dirty_seen.items():
            if s.rel_dirty.get(key) is obj and done(obj):
                del s.rel_dirty[key]
        for key, entry in self._orphans_seen.items():
            if s.orphans.get(key) is entry and done(entry[0]):
                del s.orphans[key]
