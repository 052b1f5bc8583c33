"""`Session`, `sessionmaker` and `run_in_transaction`: the public unit-of-work lifecycle.

A session holds an identity map (one object per model and primary key), tracks
changes per attribute, and flushes everything pending in one WATCH/MULTI/EXEC
(`unitofwork`). It is not thread-safe; use one per thread or task.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ..commands import Flush, Read, Steps
from ..engine import Engine, default_engine
from ..exc import (
    InvalidRequestError,
    NoResultFound,
    ObjectDeletedError,
    RedmapError,
    StaleDataError,
)
from . import events, expiry, keys, sweep
from .attributes import STATE_ATTR, state_of
from .context import SessionContext
from .counterlane import CounterLane
from .dependency import soft_children
from .identity import IdentitySet
from .loading import (
    ensure_loaded,
    load_instance,
    load_unloaded_steps,
    reload_states,
    unloaded_pks,
)
from .mapper import mapper_of
from .persistence import soft_release_plan
from .relationship_events import discard_expired
from .softdelete import PlanJob, restore_steps
from .state import InstanceState
from .strategies import selectin_for
from .strategy_options import Load, build_tree
from .unitofwork import IncrementFlush, UOWTransaction, changed_fields

if TYPE_CHECKING:
    from ..engine import EngineBase
    from ..query.dml import Delete, Result, Update
    from ..query.select import ScalarResult, Select
    from .relationships import RelationshipProperty

__all__ = ["Session", "run_in_transaction", "sessionmaker"]

M = TypeVar("M")
R = TypeVar("R")
S = TypeVar("S", bound="Session")


class Session:
    """The unit of work: add, change and delete objects, then `commit()` them atomically.

    >>> with Session(engine) as s:
    ...     s.add(Player(name="ann"))
    ...     s.commit()
    """

    # `redmap.event` accepts this class, its subclasses and their instances as targets of
    # session events.
    __redmap_events__ = "session"

    def __init__(
        self,
        bind: Engine | None = None,
        *,
        autoflush: bool = True,
        expire_on_commit: bool = True,
        allow_cross_slot: bool = False,
    ):
        self._bind = bind
        # What the layers below see of this session (`redmap.orm.context`): the identity
        # map, the pending and deleted states, the relationship bookkeeping, and the
        # session's own operations they call back (installed here, bound methods).
        self._context = SessionContext(
            add=self.add,
            delete=self.delete,
            expunge=self.expunge,
            autoflush=self._autoflush,
            load_unloaded=self._load_unloaded,
            load_relationship=self._load_relationship,
            supports_cluster=self._supports_cluster,
            allow_cross_slot=allow_cross_slot,
            owner=self,
        )
        self.autoflush = autoflush
        self.expire_on_commit = expire_on_commit
        self._no_autoflush = 0
        self._flushing = False
        # Held for the whole flush; with the flushing thread's id it lets a second
        # thread's use of the session fail loudly instead of racing the flush.
        self._flush_lock = threading.Lock()
        self._flush_thread: int | None = None
        # Set by `redmap.asyncio.AsyncSession` on the session it wraps: every read and
        # flush is then driven by the AsyncSession (awaited), and anything that would
        # need blocking I/O here (a lazy load on attribute access) raises instead.
        self._async_engine: EngineBase | None = None
        # What made or wraps this session (its sessionmaker; the AsyncSession driving it
        # and that one's async_sessionmaker): their session-event listeners apply to it.
        self._event_owners: tuple[object, ...] = ()
        # The unit of work of the last flush applied (what a statement synchronizes).
        # What ran the last flush (tests read which path a flush took; a statement's
        # own session reads its unit of work back).
        self._last_flush: UOWTransaction | CounterLane | None = None

    @property
    def allow_cross_slot(self) -> bool:
        """On Redis Cluster: commit a flush spanning several hash slots slot by slot
        (each part atomic, the whole not) instead of refusing it."""
        return self._context.allow_cross_slot

    @allow_cross_slot.setter
    def allow_cross_slot(self, value: bool) -> None:
        self._context.allow_cross_slot = value

    @property
    def bind(self) -> Engine:
        """The engine; the default one (see `redmap.configure`) when none was given."""
        if self._async_engine is not None:
            raise InvalidRequestError(
                "this Session is driven by an AsyncSession: use AsyncSession.bind"
            )
        if self._bind is None:
            self._bind = default_engine()
        return self._bind

    def _run(self, steps: Steps[R]) -> R:
        """Drive a core generator (`redmap.commands.Steps`) on the engine, blocking."""
        if self._async_engine is not None:
            steps.close()
            raise InvalidRequestError(
                "this Session is driven by an AsyncSession: await the AsyncSession's "
                "method instead (a blocking call would stall the event loop)"
            )
        return self.bind.run(steps)

    def _supports_cluster(self) -> bool:
        """Whether the engine reaches a Redis Cluster (a flush may then be split by tag)."""
        engine: Any = self._async_engine if self._async_engine is not None else self.bind
        return bool(engine.dialect.supports_cluster)

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ctx = self._context
        return f"<Session {len(ctx.identity_map)} persistent, {len(ctx.new)} pending>"

    # -- membership -------------------------------------------------------------------

    def _state(self, obj: object) -> InstanceState:
        st = state_of(obj)
        if st is None:
            mapper = mapper_of(type(obj))
            st = InstanceState(obj, mapper)
            obj.__dict__[STATE_ATTR] = st
        else:
            mapper_of(type(obj))
        return st

    def _own_state(self, obj: object, action: str) -> InstanceState:
        st = state_of(obj)
        if st is None or st.session is not self._context:
            raise InvalidRequestError(f"cannot {action} {obj!r}: it is not in this session")
        return st

    def _check_thread(self, action: str) -> None:
        """Refuse `action` from another thread while this session flushes.

        A Session is not thread-safe; used from two threads at once it would lose or
        tear changes, so the misuse is reported instead.
        """
        flushing = self._flush_thread
        if flushing is not None and flushing != threading.get_ident():
            raise InvalidRequestError(
                f"cannot {action}: this Session is flushing in another thread. A Session "
                f"is not thread-safe; use one Session per thread"
            )

    def add(self, obj: object) -> None:
        """Put a new or detached object in the session; it is written at the next flush."""
        self._check_thread("add an object")
        st = self._state(obj)
        ctx = self._context
        if st.session is ctx:
            return
        if st.session is not None:
            raise InvalidRequestError(
                f"{st.mapper.name} object is already attached to another session; "
                f"expunge it there or use merge()"
            )
        if st.identity is None:
            st.session = ctx
            ctx.new[id(st)] = st
            if st.in_doubt:
                ctx.doubt.add(st)
            self._cascade_add(st)
            return
        existing = ctx.identity_map.get(st.identity)
        if existing is not None and existing is not st:
            raise InvalidRequestError(
                f"another {st.mapper.name} object with primary key {st.pk!r} is already in "
                f"this session; use merge()"
            )
        st.session = ctx
        ctx.identity_map.add(st)
        if st.modified:
            ctx.identity_map.modified.add(st)
        if st.in_doubt:
            ctx.doubt.add(st)
        if st.reload:
            ctx.reload.add(st)
        self._cascade_add(st)

    def _cascade_add(self, st: InstanceState) -> None:
        """save-update cascade: related objects already attached in memory join too."""
        d = st.obj.__dict__
        for prop in st.mapper.relationships.values():
            if "save-update" not in prop.cascade or prop.key not in d:
                continue
            value = d[prop.key]
            related = value if isinstance(value, list) else [value]
            for obj in related:
                if obj is not None:
                    other = state_of(obj)
                    if other is None or other.session is None:
                        self.add(obj)
                    self._context.relationship_changed(obj)
            self._context.relationship_changed(st.obj)

    # -- lazy loads (installed in the context: `InstanceState.load_relationship` and
    # `load_unloaded` call them on attribute access) ----------------------------------

    def _load_relationship(self, st: InstanceState, prop: RelationshipProperty) -> None:
        """Load a relationship of `st` on access, blocking; under an AsyncSession only
        what needs no I/O."""
        from .strategies import load_relationship_steps

        steps = load_relationship_steps(self._context, st, prop)
        if self._async_engine is None:
            self._run(steps)
            return
        # An AsyncSession loads what needs no I/O (a many-to-one whose target is in
        # the session) and refuses the rest: the first request the steps yield.
        try:
            next(steps)
        except StopIteration:
            return
        steps.close()
        self._refuse_lazy_load(st, prop.key, relationship=True)

    def _refuse_lazy_load(self, st: InstanceState, name: str, *, relationship: bool) -> None:
        """Raise the AsyncSession's error for an attribute that would need I/O to load."""
        owner = f"{st.mapper.name}.{name}"
        if relationship:
            ways = (
                f"load it first with `await session.refresh(obj, [{name!r}])`, load it in "
                f"the statement with `.options(selectinload({owner}))`, or give the "
                f'relationship lazy="selectin" so that gets and queries load it'
            )
        else:
            ways = (
                "load it first with `await session.refresh(obj)` (attributes are expired "
                "by expire(), rollback() and, with expire_on_commit=True, commit())"
            )
        raise InvalidRequestError(
            f"{owner} is not loaded and loading it needs I/O, which an AsyncSession never "
            f"does on attribute access (it would block the event loop); {ways}"
        )

    def add_all(self, objs: Iterable[object]) -> None:
        for obj in objs:
            self.add(obj)

    def delete(self, obj: object) -> None:
        """Mark a persistent object for deletion at the next flush."""
        self._check_thread("delete an object")
        st = self._state(obj)
        if st.identity is None:
            raise InvalidRequestError(f"{st.mapper.name} object is not persisted; cannot delete")
        if st.soft_deleted:
            raise InvalidRequestError(expiry.soft_deleted_message(st, "delete"))
        if st.session is None:
            self.add(obj)
        elif st.session is not self._context:
            raise InvalidRequestError(f"{st.mapper.name} object belongs to another session")
        st.deleted = True
        self._context.deleted[id(st)] = st

    def expunge(self, obj: object) -> None:
        """Remove an object from the session; its loaded attributes stay readable."""
        self._context.detach(self._own_state(obj, "expunge"))

    def expunge_all(self) -> None:
        ctx = self._context
        for st in [*ctx.identity_map.states(), *ctx.new.values(), *ctx.deleted.values()]:
            ctx.detach(st)
        ctx.identity_map.clear()
        ctx.new.clear()
        ctx.deleted.clear()

    def close(self) -> None:
        """Release every object; loaded attributes stay readable, the rest raise
        DetachedInstanceError."""
        self.expunge_all()

    # -- state views --------------------------------------------------------------------

    @property
    def new(self) -> IdentitySet:
        """Objects added and not yet flushed."""
        return IdentitySet(st.obj for st in self._context.new.values())

    @property
    def deleted(self) -> IdentitySet:
        """Objects marked for deletion and not yet flushed."""
        return IdentitySet(st.obj for st in self._context.deleted.values())

    @property
    def dirty(self) -> IdentitySet:
        """Persistent objects whose values differ from what was loaded."""
        return IdentitySet(
            st.obj
            for st in self._context.dirty_candidates()
            if not st.deleted and st.identity is not None and changed_fields(st)
        )

    def is_modified(self, obj: object) -> bool:
        """Whether flushing `obj` would write anything."""
        st = self._state(obj)
        if st.identity is None:
            return True
        return bool(changed_fields(st))

    def __contains__(self, obj: object) -> bool:
        st = state_of(obj)
        return st is not None and st.session is self._context

    def __iter__(self) -> Iterator[Any]:
        for st in [*self._context.identity_map.states(), *self._context.new.values()]:
            yield st.obj

    # -- flush and transaction ------------------------------------------------------------

    def flush(self) -> None:
        """Write every pending change in one WATCH/MULTI/EXEC transaction.

        Round trips: none when nothing changed; 2 otherwise, plus 1 when new objects
        need generated primary keys. On error nothing is written and the session is
        as it was before the flush: every pending change stays pending.

        Raises InvalidRequestError when another thread is flushing this session (a
        Session is not thread-safe). An attribute assigned by another thread while
        the flush runs is not lost: it stays a pending change for the next flush.
        """
        if not self._counter_lane():
            self._run(self._flush_steps())

    def _counter_lane(self) -> bool:
        """Run the flush by the counter lane (`redmap.orm.counterlane`) when it takes
        what is pending (increments of one object): True once it ran, applied or
        raising what the general path raises; False, with nothing done, otherwise.

        Only `commit()` and `flush()` of a Session on the sync driver come here, and
        without the steps machinery (a counter's commit is mostly that machinery): an
        AsyncSession, an autoflush and a statement's own session (which reads the
        flush's unit of work back) take the general path."""
        if self._async_engine is not None or not self._flush_lock.acquire(blocking=False):
            return False  # (another flush running: the general path says so)
        try:
            ctx = self._context
            if ctx.doubt or ctx.to_reload():
                return False  # the general path refuses doubt, and reloads marked objects
            lane = CounterLane.collect(ctx)
            if lane is None:
                return False
            engine = self.bind
            self._flush_thread = threading.get_ident()
            self._flushing = True
            try:
                sent = engine.lone_script(lane.request)
                if sent is not None and sent.interrupt is None and lane.record(sent.reply):
                    self._last_flush = lane
                else:
                    self._last_flush = engine.run(lane.finish(ctx, sent))
            except StaleDataError as stale:
                self._refused(stale)
                raise
            finally:
                self._flushing = False
                self._flush_thread = None
            return True
        finally:
            self._flush_lock.release()

    def _flush_steps(self) -> Steps[None]:
        """`flush()` as core steps (see `redmap.commands`), for both drivers."""
        if not self._flush_lock.acquire(blocking=False):
            if self._flush_thread == threading.get_ident():
                raise InvalidRequestError("Session is already flushing")
            self._check_thread("flush")
            raise InvalidRequestError("Session is flushing in another thread")
        try:
            self._flush_thread = threading.get_ident()
            ctx = self._context
            doubt = ctx.doubtful()
            if doubt:
                raise InvalidRequestError(
                    f"the outcome of an earlier flush of {len(doubt)} object(s) is unknown; "
                    f"call rollback() so they reload from what Redis holds"
                )
            # Objects a rollback marked to reload (refused as stale, or in doubt): load
            # them first, so that a retry writes against what Redis holds now.
            marked = ctx.to_reload()
            reloaded = None
            if marked and self._has_pending():
                reloaded = yield from reload_states(ctx, marked)
            try:
                # Only increments (a counter's commit, no listener): the general unit of
                # work without its collection, same protocol and outcome
                # (`IncrementFlush`).
                fast = IncrementFlush.collect_increments(ctx)
                # Session events fire only for a flush with something to write, as
                # SQLAlchemy's (one dict test when no listener exists).
                fire = fast is None and events.session_events_enabled() and self._has_pending()
                if fire:
                    self._dispatch("before_flush")
                self._flushing = True
                uow = fast if fast is not None else UOWTransaction(self._context)
                try:
                    yield from uow.execute_steps()
                finally:
                    self._flushing = False
            except BaseException as failed:
                if isinstance(failed, StaleDataError):
                    self._refused(failed)
                if reloaded is not None:
                    reloaded.undo()  # a failed flush leaves the session as it was
                raise
            self._last_flush = uow
            if fire:
                self._dispatch("after_flush")
        finally:
            self._flush_thread = None
            self._flush_lock.release()

    def _refused(self, stale: StaleDataError) -> None:
        """Remember the objects a flush refused as stale, for `rollback()` to mark them
        to reload. Nothing else changes: retried without a rollback, the same pending
        changes (perhaps computed from what was stale) are refused again."""
        ctx = self._context
        for obj in stale.objects:
            st = state_of(obj)
            if st is not None and st.session is ctx:
                ctx.refused.add(st)

    def _dispatch(self, name: str) -> None:
        """Call the listeners of session event `name` with this session."""
        for listener in events.session_listeners(name, self, self._event_owners):
            listener.call(self)

    def _has_pending(self) -> bool:
        """Whether a flush may have something to write (what an autoflush checks)."""
        ctx = self._context
        return bool(
            ctx.new
            or ctx.deleted
            or ctx.identity_map.modified
            or ctx.rel_dirty
            or ctx.links
            or ctx.orphans
            or ctx.identity_map.mutable
        )

    def _autoflush(self) -> Steps[None]:
        """Flush pending changes before a read (unless autoflush is off); core steps."""
        self._check_thread("read through the session")
        ctx = self._context
        if self.autoflush and not self._no_autoflush and not self._flushing:
            if (
                ctx.new
                or ctx.deleted
                or ctx.identity_map.modified
                or ctx.identity_map.mutable
            ):
                ctx.autoflushing = True
                try:
                    yield from self._flush_steps()
                finally:
                    ctx.autoflushing = False

    @property
    @contextlib.contextmanager
    def no_autoflush(self) -> Iterator[Session]:
        """`with session.no_autoflush:` queries and gets inside do not flush first."""
        self._no_autoflush += 1
        try:
            yield self
        finally:
            self._no_autoflush -= 1

    def commit(self) -> None:
        """Flush, then (with expire_on_commit) expire every object so it reloads on access.

        Session events: `before_commit` before the flush, `after_commit` once it was
        applied (not when it raised).
        """
        if self._counter_lane():
            if self.expire_on_commit:
                self.expire_all()
            return
        self._run(self._commit_steps())

    def _commit_steps(self) -> Steps[None]:
        """`commit()` as core steps, for both drivers."""
        if events.session_events_enabled():
            self._dispatch("before_commit")
        yield from self._flush_steps()
        if self.expire_on_commit:
            self.expire_all()
        if events.session_events_enabled():
            self._dispatch("after_commit")

    def rollback(self) -> None:
        """Discard pending changes: new objects are expunged, the others expired."""
        self._check_thread("roll back")
        ctx = self._context
        ctx.forget_relationship_changes()
        for st in list(ctx.new.values()):
            st.in_doubt = False
            ctx.detach(st)
        for st in list(ctx.deleted.values()):
            st.deleted = False
        ctx.deleted.clear()
        # Objects a flush refused as stale, or whose last flush's outcome is unknown:
        # what the session loaded of them is known to be, or may be, out of date. The
        # user redoes the change after this rollback; it is written against what Redis
        # holds then (`InstanceState.reload`), or a retry would be refused forever.
        refused = ctx.refused
        for st in ctx.identity_map.states():
            if st.in_doubt or st in refused:
                st.reload = True
                ctx.reload.add(st)
            st.in_doubt = False
            st.expire()
        refused.clear()
        ctx.identity_map.modified.clear()
        if events.session_events_enabled():
            self._dispatch("after_rollback")

    @contextlib.contextmanager
    def begin(self) -> Iterator[Session]:
        """Commit at the end of the block, or roll back if it raises."""
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    # -- expiry and refresh ----------------------------------------------------------------

    def expire(self, obj: object, attribute_names: Sequence[str] | None = None) -> None:
        """Forget loaded values (and pending changes to them); they reload on access.

        Relationship changes recorded beside the attributes go with them once no loaded
        attribute holds them any more (`relationship_events.discard_expired`): a child
        released from a delete-orphan list whose many-to-one and key are expired is no
        longer deleted as an orphan.
        """
        st = self._own_state(obj, "expire")
        st.expire(None if attribute_names is None else list(attribute_names))
        if not st.modified:
            self._context.identity_map.modified.discard(st)
        discard_expired(self._context, [obj])

    def expire_all(self) -> None:
        """Expire every persistent object: all pending changes to them are discarded,
        relationship changes included (those held by new objects stay)."""
        ctx = self._context
        for st in ctx.identity_map.states():
            st.expire()
        ctx.identity_map.modified.clear()
        discard_expired(ctx, None)

    def refresh(self, obj: object, attribute_names: Sequence[str] | None = None) -> None:
        """Reload attributes from Redis now, discarding pending changes to them.

        Without `attribute_names`: every field (1 round trip); relationships are expired
        (they reload on access from the refreshed keys), so a pending relationship
        change of `obj` goes too, as with `expire(obj)`. With names: those fields, and
        those relationships loaded now (2 round trips for a list, 1 for a many-to-one
        whose target is not in the session), as SQLAlchemy's `refresh(obj, [names])`.
        """
        self._run(self._refresh_steps(obj, attribute_names))

    def _refresh_steps(self, obj: object, attribute_names: Sequence[str] | None) -> Steps[None]:
        from .strategies import selectin_load

        st = self._own_state(obj, "refresh")
        if st.identity is None or st.key is None:
            raise InvalidRequestError(f"{st.mapper.name} object is pending; nothing to refresh")
        rels = []
        columns: list[str] | None = None
        if attribute_names is not None:
            columns = []
            for name in attribute_names:
                if name in st.mapper.relationships:
                    rels.append(st.mapper.relationships[name])
                elif name in st.mapper.columns and name != st.mapper.pk.key:
                    columns.append(name)
                elif name != st.mapper.pk.key:
                    raise InvalidRequestError(
                        f"{st.mapper.name} has no attribute {name!r} to refresh (fields: "
                        f"{', '.join(st.mapper.columns)}; relationships: "
                        f"{', '.join(st.mapper.relationships) or 'none'})"
                    )
        ctx = self._context
        if columns is None or columns:
            (data,) = yield Read([("HGETALL", st.key)])
            if columns is None:
                st.expire()
                ctx.identity_map.modified.discard(st)
                discard_expired(ctx, [obj])
                found = load_instance(ctx, st.mapper, st.pk, st.key, data, refresh=True)
            else:
                st.expire(columns)
                if not st.modified:
                    ctx.identity_map.modified.discard(st)
                discard_expired(ctx, [obj])
                found = load_instance(ctx, st.mapper, st.pk, st.key, data)
            if found is None:
                raise ObjectDeletedError(
                    f"{st.mapper.name} with primary key {st.pk!r} no longer exists"
                )
        for prop in rels:
            st.obj.__dict__.pop(prop.key, None)
            yield from selectin_load(ctx, [st], prop)

    def _load_unloaded(self, st: InstanceState, name: str | None = None) -> None:
        """Load the expired attributes of `st` (on access to `name`), blocking."""
        if self._async_engine is not None:
            self._refuse_lazy_load(st, name or "?", relationship=False)
        self._run(load_unloaded_steps(self._context, st))

    # -- loading ----------------------------------------------------------------------------

    def get(
        self,
        model: type[M],
        pk: Any,
        *,
        options: Sequence[Load] = (),
        include_deleted: bool = False,
    ) -> M | None:
        """The object with this primary key, or None (also once it expired, or while it
        is soft-deleted, unless `include_deleted`: docs/expiry.md).

        No command when the object is already in the session and loaded; else
        1 round trip (after an autoflush of pending changes, if any), plus those of its
        lazy="selectin" relationships. `options` are loader options as in
        `select().options()`; unlike SQLAlchemy they apply to an object found in the
        identity map too (a `selectinload` of a relationship it has not loaded loads it).
        """
        if not options:
            answered, obj = self._get_without_io(model, pk)
            if answered and (obj is not None or not include_deleted):
                return obj
        return self._run(self._get_steps(model, pk, options, include_deleted))

    def _get_without_io(self, model: type[M], pk: Any) -> tuple[bool, M | None]:
        """(True, the object or None) when the identity map answers `get` alone (a loaded
        or a deleted object), else (False, None). A plain call, not steps: `get` of a
        loaded object is a hot loop in applications and needs no driver."""
        mapper_of(model).validate_pk(pk)
        st = self._context.identity_map.get((model, pk))
        if st is not None:
            if st.soft_deleted and st.unloaded():
                return False, None  # (expired since: read again, it may be restored)
            if (
                st.deleted
                or st.soft_deleted  # (read with include_deleted=True)
                or (st.mapper.expiry.expires is not None and expiry.gone(st))
            ):
                return True, None
            if not st.unloaded():
                obj: M = st.obj
                return True, obj
        return False, None

    def _get_steps(
        self,
        model: type[M],
        pk: Any,
        options: Sequence[Load] = (),
        include_deleted: bool = False,
    ) -> Steps[M | None]:
        mapper = mapper_of(model)
        tree = build_tree(mapper, options) if options else None
        answered, found = self._get_without_io(model, pk)
        if include_deleted and found is None:
            answered = False  # a soft-deleted object is read from Redis
        if not answered:
            yield from self._autoflush()
            key = mapper.object_key(pk)
            (data,) = yield Read([("HGETALL", key)])
            found = load_instance(
                self._context, mapper, pk, key, data, include_deleted=include_deleted
            )
            if found is not None and mapper.relationships:
                yield from selectin_for(self._context, [found], tree)
        elif found is not None and tree:
            yield from selectin_for(self._context, [found], tree)
        return found

    def restore(self, model: type[M], pk: Any) -> M:
        """Bring back a soft-deleted object (a model with `__soft_delete__`), its indexes
        and links, and the children its delete cascade soft-deleted with it, atomically
        and at once (not at the next flush); returns it. `NoResultFound` when there is no
        such object to restore (never deleted, or its grace period ended).

        Round trips: the object's read, one or two per level of cascaded children, and
        the restore's own flush; then the object is loaded.
        """
        return self._run(self._restore_steps(model, pk))

    def _restore_steps(self, model: type[M], pk: Any) -> Steps[M]:
        mapper = mapper_of(model)
        if mapper.expiry.soft_delete_ms is None:
            raise InvalidRequestError(
                f"{mapper.name} has no __soft_delete__: its deletes are final and there is "
                f"nothing to restore"
            )
        yield from self._autoflush()
        restored = yield from restore_steps(mapper, pk)
        for m, p in restored:
            st = self._context.identity_map.get((m.class_, p))
            if st is not None:
                st.expire()  # read as deleted: its version moved
        obj = yield from self._get_one_steps(model, pk)
        return obj

    def get_one(self, model: type[M], pk: Any, *, options: Sequence[Load] = ()) -> M:
        """The object with this primary key; `NoResultFound` when there is none.

        `get()` for when the object must exist: typed `M`, not `M | None`, so the
        result needs no None check (SQLAlchemy's `Session.get_one`).
        """
        return self._run(self._get_one_steps(model, pk, options))

    def _get_one_steps(
        self, model: type[M], pk: Any, options: Sequence[Load] = ()
    ) -> Steps[M]:
        obj = yield from self._get_steps(model, pk, options)
        if obj is None:
            raise NoResultFound(f"no {mapper_of(model).name} with primary key {pk!r}")
        return obj

    def get_many(self, model: type[M], pks: Iterable[Any]) -> list[M | None]:
        """The objects for `pks`, in order, None where absent; 1 round trip at most (plus
        those of lazy="selectin" relationships)."""
        return self._run(self._get_many_steps(model, pks))

    def _get_many_steps(self, model: type[M], pks: Iterable[Any]) -> Steps[list[M | None]]:
        mapper = mapper_of(model)
        pks = list(pks)
        for pk in pks:
            mapper.validate_pk(pk)
        ctx = self._context
        if unloaded_pks(ctx, mapper, pks):
            yield from self._autoflush()
            yield from ensure_loaded(ctx, mapper, pks)
        out: list[M | None] = []
        for pk in pks:
            st = ctx.identity_map.get((model, pk))
            out.append(None if st is None or st.deleted or expiry.gone(st) else st.obj)
        if mapper.relationships:
            yield from selectin_for(ctx, [o for o in out if o is not None])
        return out

    def merge(self, obj: M) -> M:
        """Copy `obj`'s state onto the session's object with the same primary key
        (loading it, or adding a new one), and return that object.

        A copy that was loaded from Redis (a detached object, or one of another
        session) carries the version it was loaded at, as `add()` does: when Redis
        now holds another version, or no longer holds the object, the copy is stale
        and writing its values back would undo someone else's change, so merge raises
        StaleDataError (as SQLAlchemy does on a version mismatch) and changes nothing.
        An object built by hand (never loaded) carries no version and simply
        overwrites.
        """
        return self._run(self._merge_steps(obj))

    def _merge_steps(self, obj: M) -> Steps[M]:
        mapper = mapper_of(type(obj))
        pk = obj.__dict__.get(mapper.pk.key)
        source = state_of(obj)
        if source is not None and source.session is self._context:
            if source.deleted:
                raise InvalidRequestError(
                    f"cannot merge {mapper.name}({pk!r}): it is marked for deletion in this session"
                )
            return obj  # already the session's own object
        # The version travels only with a copy of the same identity it was loaded as.
        versioned = source is not None and source.identity is not None and source.pk == pk
        target: M | None = None
        if pk is not None:
            target = yield from self._get_steps(type(obj), pk)
        if target is None:
            if versioned:
                assert source is not None
                since = (
                    f"was soft-deleted then (read with include_deleted=True), and Redis holds "
                    f"no live object under its key: restore it first (session.restore("
                    f"{mapper.name}, {pk!r}))"
                    if source.soft_deleted
                    else "has been deleted since"
                )
                raise StaleDataError(
                    f"cannot merge {mapper.name}({pk!r}): it was loaded at version "
                    f"{source.version} and {since}; nothing was merged",
                    objects=[obj],
                    keys=[source.key] if source.key else [],
                )
            target = mapper.class_.__new__(mapper.class_)
            if pk is not None:
                target.__dict__[mapper.pk.key] = pk
            for col in mapper.stored_columns():
                if col.key in obj.__dict__:
                    target.__dict__[col.key] = obj.__dict__[col.key]
            self.add(target)
            return target
        if versioned:
            assert source is not None
            current = self._state(target)
            if (current.version, current.incarnation) != (source.version, source.incarnation):
                # Another incarnation: the object was deleted and inserted again since.
                held = (
                    f"version {current.version}"
                    if current.incarnation == source.incarnation
                    else f"another object under the same key (version {current.version})"
                )
                raise StaleDataError(
                    f"cannot merge {mapper.name}({pk!r}): the copy was loaded at version "
                    f"{source.version} and Redis holds {held} (a change made in between "
                    f"would be overwritten); nothing was merged. Load the object again and "
                    f"reapply the change",
                    objects=[obj],
                    keys=[current.key] if current.key else [],
                )
        _copy_fields(obj, target)
        return target

    # -- statements (see redmap.query.dml) ----------------------------------------------------

    def replace_all(self, model: type[M], objects: Iterable[M]) -> None:
        """Make `objects` the whole stored set of `model` at the next flush: every stored
        object not among them (by primary key) is deleted, with its cascades, and the
        others are saved, in that flush's one transaction, so readers see the old set or
        the new one, never a mix (API.md section 9).

        Reads now (the stored ids, and the stored objects in one round trip each): an
        object whose key is stored is copied onto the session's copy of it, as `merge`
        does, so that only the fields that differ are written; new ones are added. The
        flush then also checks that the stored set is still the one read here, and
        raises StaleDataError (nothing written) if another client added or removed an
        object of `model` since. Relationships of `objects` are not copied.
        """
        self._run(self._replace_all_steps(model, objects))

    def _replace_all_steps(self, model: type[M], objects: Iterable[M]) -> Steps[None]:
        mapper = mapper_of(model)
        given = list(objects)
        yield from self._autoflush()
        spaces = mapper.all_keyspaces()
        replies = yield Read([("ZRANGE", ks.all(), 0, -1) for ks in spaces])
        stored: list[Any] = []
        guards = []
        for ks, members in zip(spaces, replies, strict=True):
            if isinstance(members, Exception):
                raise RedmapError(
                    f"Redis refused to read {ks.all()!r} ({members}); nothing was replaced"
                )
            stored.extend(mapper.pk_from_segment(m, ks.all()) for m in members)
            guards.append((ks.all(), frozenset(members), f"the stored {mapper.name} objects"))
        loaded = yield from self._get_many_steps(model, stored)
        by_pk: dict[Any, Any] = {
            pk: o for pk, o in zip(stored, loaded, strict=True) if o is not None
        }
        pk_key = mapper.pk.key
        kept: set[Any] = set()
        for obj in given:
            pk = obj.__dict__.get(pk_key)
            target = by_pk.get(pk) if pk is not None else None
            if target is None:
                self.add(obj)
            elif target is not obj:
                # As `merge`: dirty tracking then writes only the fields that differ.
                _copy_fields(obj, target)
            if pk is not None:
                kept.add(pk)
        for pk, obj in by_pk.items():
            if pk not in kept:
                self.delete(obj)
        self._context.replace_guards.extend(guards)

    def execute(self, stmt: Update[Any] | Delete[Any]) -> Result:
        """Run an `update()` or `delete()` statement: pending changes are flushed first,
        then every matching object is updated (or deleted) in one atomic flush, with
        every index, unique claim, relationship link and cascade kept as the unit of
        work keeps them. Objects of this session take the new values (deleted ones
        leave it). `Result.rowcount` is the number of objects matched.

        Round trips: those of the query, one to load the matching objects, and the
        flush's; none of them grows with the number of objects. A matched object that
        another client changes before the flush makes it raise StaleDataError with
        nothing written (retry with `run_in_transaction`).
        """
        return self._run(self._execute_steps(stmt))

    def _execute_steps(self, stmt: Update[Any] | Delete[Any]) -> Steps[Result]:
        from ..query.dml import Result, Update
        from ..query.select import select

        yield from self._flush_steps()
        # The statement runs in a session of its own, so that a refused flush leaves
        # this one as it was; its outcome is copied here once applied.
        inner = Session(
            None if self._async_engine is not None else self.bind,
            autoflush=False,
            expire_on_commit=False,
            allow_cross_slot=self.allow_cross_slot,
        )
        inner._async_engine = self._async_engine
        inner._event_owners = self._event_owners
        try:
            found = yield from inner._scalars_steps(select(stmt.model).where(*stmt.conditions))
            objs = found.all()
            if isinstance(stmt, Update):
                for obj in objs:
                    for name, value in stmt.values_.items():
                        setattr(obj, name, value)
            else:
                for obj in objs:
                    inner.delete(obj)
            yield from inner._flush_steps()
            if isinstance(inner._last_flush, UOWTransaction):  # never the lane
                self._synchronize(inner._last_flush, stmt)
        finally:
            inner.close()
        return Result(rowcount=len(objs))

    def _synchronize(self, applied: UOWTransaction, stmt: Update[Any] | Delete[Any]) -> None:
        """Make this session's objects show what a statement's flush wrote: updated ones
        take the stored values (and version) of the statement's copies, deleted ones
        (cascades included) leave the session, and loaded collections holding them or
        many-to-ones whose foreign key changed are expired."""
        ctx = self._context
        imap = ctx.identity_map
        # Models whose objects moved between parents or left: collections of them that
        # this session loaded may be wrong now (cheap to expire, costly to patch).
        moved: set[type] = set()
        for u in applied.updates:
            src = u.state
            mine = imap.get((src.mapper.class_, src.pk))
            if mine is None or mine is src:
                continue
            d, from_d = mine.obj.__dict__, src.obj.__dict__
            for col in src.mapper.stored_columns():
                if col.key in from_d:
                    codec = col.codec
                    value = from_d[col.key]
                    d[col.key] = codec.copy_value(value) if codec is not None else value
                else:
                    d.pop(col.key, None)
            mine.loaded = dict(src.loaded)
            mine.version, mine.incarnation = src.version, src.incarnation
            mine.modified.clear()
            mine.blind.clear()
            imap.modified.discard(mine)
            for prop in src.mapper.relationships.values():
                if prop.fk_column and prop.fk_column in u.changes:
                    moved.add(src.mapper.class_)
                    d.pop(prop.key, None)
        for dt in applied.deletes:
            moved.add(dt.state.mapper.class_)
            mine = imap.get((dt.state.mapper.class_, dt.state.pk))
            if mine is not None and mine is not dt.state:
                ctx.detach(mine)
        if moved:
            for st in imap.states():
                d = st.obj.__dict__
                for name, prop in st.mapper.relationships.items():
                    if name in d and prop.target in moved:
                        del d[name]

    # -- queries (see redmap.query.select) ------------------------------------------------------

    def scalars(self, stmt: Select[M]) -> ScalarResult[M]:
        """Run a `select()` and return its objects."""
        return self._run(self._scalars_steps(stmt))

    def _scalars_steps(self, stmt: Select[M]) -> Steps[ScalarResult[M]]:
        from ..query.select import execute_select

        yield from self._autoflush()
        return (yield from execute_select(self._context, stmt))

    def count(self, stmt: Select[Any]) -> int:
        """How many objects `stmt` matches (limit/offset applied); 1 round trip."""
        return self._run(self._count_steps(stmt))

    def _count_steps(self, stmt: Select[Any]) -> Steps[int]:
        from ..query.select import execute_count

        yield from self._autoflush()
        return (yield from execute_count(self._context, stmt))


class sessionmaker(Generic[S]):  # noqa: N801 - SQLAlchemy's name
    """A factory of sessions with preset options.

    >>> Session = sessionmaker(engine)
    >>> with Session.begin() as s:
    ...     s.add(obj)
    """

    # Session events registered on a sessionmaker apply to the sessions it makes.
    __redmap_events__ = "session"

    # Two signatures so that `sessionmaker(engine)` is a `sessionmaker[Session]` to type
    # checkers without an annotation, and `class_=MySession` a `sessionmaker[MySession]`.
    @overload
    def __init__(
        self: sessionmaker[Session],
        bind: Engine | None = None,
        *,
        autoflush: bool = True,
        expire_on_commit: bool = True,
        allow_cross_slot: bool = False,
    ) -> None: ...
    @overload
    def __init__(
        self,
        bind: Engine | None = None,
        *,
        class_: type[S],
        autoflush: bool = True,
        expire_on_commit: bool = True,
        allow_cross_slot: bool = False,
    ) -> None: ...
    def __init__(
        self,
        bind: Engine | None = None,
        *,
        class_: type[S] = Session,  # type: ignore[assignment]
        autoflush: bool = True,
        expire_on_commit: bool = True,
        allow_cross_slot: bool = False,
    ) -> None:
        self.bind = bind
        self.class_ = class_
        self.kw: dict[str, Any] = {
            "autoflush": autoflush,
            "expire_on_commit": expire_on_commit,
            "allow_cross_slot": allow_cross_slot,
        }

    def __call__(self, **overrides: Any) -> S:
        kw = {**self.kw, **overrides}
        bind = kw.pop("bind", self.bind)
        session = self.class_(bind, **kw)
        session._event_owners += (self,)
        return session

    @contextlib.contextmanager
    def begin(self) -> Iterator[S]:
        """A new session committed at the end of the block, rolled back on error, then closed."""
        with self() as session, session.begin():
            yield session


# run_in_transaction's default retry policy. Under contention on one object every
# attempt races the other writers' commits, and one that lost has no better odds the
# next time, so what makes calls survive is the number of tries; the growing random
# wait spreads the writers out and bounds the time: at most about 2.3 s of waiting in
# all (1 ms doubling up to 50 ms per retry), with the defaults.
RETRIES = 50
BACKOFF_FIRST = 0.001
BACKOFF_MAX = 0.05


def backoff(attempt: int) -> float:
    """The wait before retry number `attempt` (1, 2, ...): random in [0, bound), the
    bound doubling from 2 ms up to BACKOFF_MAX ("full jitter")."""
    return random.uniform(0, min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 30)))


def run_in_transaction(
    fn: Callable[[Session], R],
    session_factory: Callable[[], Session] = Session,
    retries: int = RETRIES,
) -> R:
    """Call `fn(session)` and commit; on StaleDataError retry with a fresh session.

    Up to `retries` retries (default 50) after the first attempt. Before retry n it
    waits a random time of up to 2**n ms, never more than 50 ms, so that competing
    writers spread out: the waits of 50 retries add up to at most about 2.3 s. The
    last StaleDataError is re-raised when the retries run out. Any other error
    propagates at once; in particular a PartialCommitError (a cross-slot flush applied
    in part) is never retried, since running `fn` again would apply the written part
    twice.

    Autoflush is off while `fn` runs: every change `fn` makes goes into the one
    commit at the end, so a retried attempt can never find part of an earlier one
    already written. Queries inside `fn` therefore see what Redis holds, not `fn`'s
    own pending changes.
    """
    attempt = 0
    while True:
        with session_factory() as session:
            try:
                with session.no_autoflush:
                    result = fn(session)
                session.commit()
                return result
            except StaleDataError:
                session.rollback()
                if attempt >= retries:
                    raise
        attempt += 1
        time.sleep(backoff(attempt))


def _copy_fields(source: object, target: object) -> None:
    """Assign `source`'s stored field values to `target` (its session's copy of the same
    object), as `merge` and `replace_all` do: through the attributes, so dirty tracking
    keeps only the values that differ from what the target loaded."""
    d = source.__dict__
    for col in mapper_of(type(target)).stored_columns():
        if col.key in d:
            setattr(target, col.key, d[col.key])


# -- the children of objects the sweep purges ----------------------------------------------

# Parents whose children one unit of work detaches (a bound on the session's size).
_DETACH_BATCH = 500
# Passes over the gone parents (each after one that changed something); a bound, not a
# need: one pass leaves nothing to change unless children of the same model were deleted.
_DETACH_PASSES = 5


def _detach_children_steps(engine: Any, mappers: Sequence[Any], now: int) -> Steps[int]:
    """Detach the children of every object of `mappers` whose deadline passed by `now`
    (their foreign key set to None), or delete them where the relationship cascades
    delete: what a flush does for a deleted parent, through the same unit of work (the
    children's indexes, unique values, cascades, versions and `UpdatedAt` included).

    Run by the sweep (`sweep.sweep_all_steps`) before it purges the parents, so that no
    child keeps a foreign key to a purged object. The gone parents are read from their
    deadline zsets in batches; a pass that changed something is followed by another, until
    one finds nothing left to change (deleting children may move the offsets). Children
    that are themselves gone are left to their own model's sweep. Soft-deleted children
    (which queries leave out) are read from the parents' `#fk` zsets and released by a
    version-checked plan: detached, or, with a delete cascade, ended at `now` so that the
    purge after this step removes them (`_detach_batch`). Returns how many children were
    changed.
    """
    changed = 0
    for _ in range(_DETACH_PASSES):
        again = False
        for mapper in mappers:
            props = sweep.child_relationships(mapper) if mapper.expiry.tracked else []
            if not props:
                continue
            for ks in mapper.all_keyspaces():
                offset = 0
                while True:
                    (segments,) = yield Read(
                        [
                            (
                                "ZRANGEBYSCORE", ks.deadlines(), "-inf", now,
                                "LIMIT", offset, _DETACH_BATCH,
                            )  # fmt: skip
                        ]
                    )
                    if isinstance(segments, Exception):
                        raise RedmapError(
                            f"the sweep of {mapper.name} could not read "
                            f"{ks.deadlines()!r}: {segments}; run `redmap audit`"
                        )
                    if not segments:
                        break
                    offset += len(segments)
                    pks = [mapper.pk_from_segment(seg) for seg in segments]
                    n = yield from _detach_batch(engine, mapper, props, pks, now)
                    changed += n
                    again = again or n > 0
        if not again:
            break
    return changed


def _detach_batch(
    engine: Any, mapper: Any, props: Sequence[Any], pks: list[Any], now: int
) -> Steps[int]:
    """One unit of work over the live children of the gone parents `pks` of `mapper`,
    then one plan per hash tag over their soft-deleted children."""
    from ..query.expression import col
    from ..query.select import select

    # Soft-deleted children first: a required foreign key stops the sweep before
    # anything is written (as for live children, below). Only such a key needs them
    # read now; the release below reads them anyway.
    for prop in props:
        if "delete" in prop.cascade or not mapper_of(prop.target).columns[prop.fk_column].required:
            continue
        soft = yield from _soft_children_of(mapper, prop, pks, now)
        if soft:
            _require_optional(mapper, prop)
    inner = Session(engine if isinstance(engine, Engine) else None, autoflush=False)
    if not isinstance(engine, Engine):
        inner._async_engine = engine
    n = 0
    try:
        for prop in props:
            fk = prop.fk_column
            found = yield from inner._scalars_steps(
                select(prop.target).where(col(prop.target, fk).in_(pks))
            )
            for obj in found.all():
                n += 1
                if "delete" in prop.cascade:
                    inner.delete(obj)
                    continue
                _require_optional(mapper, prop)
                setattr(obj, fk, None)
        if n:
            yield from inner._commit_steps()
    finally:
        inner.close()
    # Then every soft-deleted child, those the delete cascade above just soft-deleted
    # included: detached, or (delete cascade) ended at `now`, so that the purge after
    # this step removes it in the same run. A child changed meanwhile (restored, say)
    # fails its version check: the next pass reads it again.
    for prop in props:
        released = yield from _soft_children_of(mapper, prop, pks, now)
        by_tag: dict[str, list[Any]] = {}
        for rel in released:
            by_tag.setdefault(rel.ks.tag, []).append(rel)
        for tag, rels in by_tag.items():
            token_key = keys.flush_token_key(tag, uuid.uuid4().hex)
            try:
                yield Flush(PlanJob(soft_release_plan(rels, token_key, now)))
            except StaleDataError:
                pass  # another pass reads them again
            n += len(rels)
    return n


def _require_optional(mapper: Any, prop: Any) -> None:
    """Children of a gone parent without a delete cascade are detached: their foreign
    key must be Optional."""
    child = mapper_of(prop.target)
    fk = prop.fk_column
    if child.columns[fk].required:
        raise RedmapError(
            f"cannot sweep {mapper.name}: its expired objects have {child.name} "
            f"children whose {fk} is required, and {mapper.name}.{prop.key} does "
            f"not cascade delete; make {child.name}.{fk} Optional or add "
            f'cascade="all, delete" to the relationship'
        )


def _soft_children_of(mapper: Any, prop: Any, pks: list[Any], now: int) -> Steps[list[Any]]:
    """The soft-deleted children (still restorable at `now`) of the parents `pks` of
    `mapper` through `prop`, found by the parents' children zsets (queries leave them
    out): one round trip for the zsets, one for the hashes."""
    child = mapper_of(prop.target)
    if child.expiry.soft_delete_ms is None:
        return []
    zsets = [
        cks.foreign(prop.fk_column, mapper.pk_segment(pk))
        for pk in pks
        for cks in child.all_keyspaces()
    ]
    replies = yield Read([("ZRANGE", k, 0, -1) for k in zsets])
    listed: list[tuple[bytes, str]] = []
    for key, members in zip(zsets, replies, strict=True):
        if isinstance(members, Exception):
            raise RedmapError(
                f"the sweep of {mapper.name} could not read {key!r}: {members}; run "
                f"`redmap audit`"
            )
        listed.extend((m, key) for m in members)
    found: list[Any] = yield from soft_children(prop, listed, now)
    return found


sweep.detach_children = _detach_children_steps
