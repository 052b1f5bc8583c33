"""`UOWTransaction`: gathers a session's pending work, validates it, and runs one flush.

Called by `Session.flush` with the session's `SessionContext`. Order: collect and
validate every value (no I/O), hand out generated primary keys (one pipelined INCRBY
round trip, only when needed),
build the `FlushPlan` (pure, `persistence`), execute it in one transaction
(the flush protocol, `flushprotocol`, driven by the engine's dialect), then record
the new committed state on each object.
On any error before or during the transaction the session's objects keep their
pending changes, so the flush can be retried.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..commands import Flush, Steps
from ..exc import (
    CrossSlotError,
    IntegrityError,
    InvalidRequestError,
    PartialCommitError,
    ValidationError,
)
from ..query.expression import Increment
from . import events, expiry, keys
from .attributes import state_of
from .dependency import RelationshipWork, prepare
from .gcpause import paused_gc
from .mapper import ColumnProperty, Mapper, mapper_of
from .persistence import (
    PLACEHOLDER,
    DeleteTask,
    FlushPlan,
    InsertTask,
    TargetRef,
    UpdateTask,
    plan_flush,
    plan_increments,
)
from .relationships import Direction

if TYPE_CHECKING:
    from .context import SessionContext
    from .state import InstanceState

__all__ = [
    "IncrementFlush",
    "UOWTransaction",
    "changed_fields",
    "incrementable",
    "only_changes_pending",
    "record_increment",
]


def _encode(mapper: Mapper[Any], col: ColumnProperty, value: Any) -> bytes | None:
    codec = col.codec
    assert codec is not None
    return codec.encode_valid(value, model=mapper.name, field=col.key)


def _same_as_loaded(st: InstanceState, name: str) -> bool:
    """Whether attribute `name` holds what the snapshot says Redis holds (unloaded: yes)."""
    d = st.obj.__dict__
    if name not in d:
        return True
    col = st.mapper.columns[name]
    if col.primary_key:
        return True
    if name in st.blind:
        return False
    try:
        return _encode(st.mapper, col, d[name]) == st.loaded.get(name)
    except ValidationError:
        return False  # the next flush reports it


def _written_by(ids: set[int]) -> Callable[[Any], bool]:
    """Whether an object's state is among `ids` (the states of applied parts)."""

    def written(obj: Any) -> bool:
        return id(state_of(obj)) in ids

    return written


def changed_fields(
    state: InstanceState, deferred: frozenset[str] = frozenset()
) -> dict[str, tuple[Any, bytes | None]]:
    """Fields of a persistent object whose current value differs from the snapshot.

    Assigned fields are compared; mutable (JSON) fields are always compared, since
    in-place changes do not pass through the attribute descriptor.
    """
    mapper = state.mapper
    d = state.obj.__dict__
    names = set(state.modified)
    names.update(c.key for c in mapper.mutable_columns if c.key in d)
    out: dict[str, tuple[Any, bytes | None]] = {}
    for name in deferred:
        # A foreign key to a new object: its value is known once ids are handed out.
        out[name] = (None, None)
        names.discard(name)
    for name in names:
        if name not in d:
            continue
        col = mapper.columns[name]
        value = d[name]
        if col.primary_key:
            if value != state.pk:
                raise InvalidRequestError(
                    f"the primary key of a persistent {mapper.name} cannot be changed "
                    f"({state.pk!r} -> {value!r}); delete it and add a new object"
                )
            continue
        if type(value) is Increment:
            out[name] = (value, None)  # applied by Redis (`persistence._plan_increment`)
            continue
        enc = _encode(mapper, col, value)
        if enc != state.loaded.get(name) or name in state.blind:
            out[name] = (value, enc)
    return out


_NONE_DEFERRED: frozenset[str] = frozenset()


class UOWTransaction:
    """The work of one flush of one session (given as its context)."""

    def __init__(self, session: SessionContext):
        self.session = session
        self.inserts: list[InsertTask] = []
        self.updates: list[UpdateTask] = []
        self.deletes: list[DeleteTask] = []
        self.work = RelationshipWork()
        self._deferred: dict[int, frozenset[str]] = {}
        # The `#i` this flush writes (a fresh one per flush: see `_run`).
        self.incarnation = b""
        # The flush's token key (see `_run`; docs/design/flush-concurrency.md, I3).
        self.token_key = ""
        # Set on the parts of a cross-slot flush (`_split_by_registry`): the part's hash
        # tag, and the foreign keys of other parts whose targets this part checks.
        self.tag: str | None = None
        self.targets: list[TargetRef] = []
        self._tags: dict[int, str] | None = None  # see `_tag_of`

    # -- collect: validation only, no I/O -------------------------------------------

    def _deferred_columns(self, st: InstanceState) -> frozenset[str]:
        """Foreign-key columns of `st` that wait for a parent's generated id."""
        return self._deferred.get(id(st), _NONE_DEFERRED)

    def collect(self) -> Steps[None]:
        s = self.session
        self.work = yield from prepare(s)
        with paused_gc(len(s.new) + len(s.identity_map)):
            self._collect_tasks()

    def _collect_tasks(self) -> None:
        """The tasks of the flush, from the session and the prepared relationship work."""
        s = self.session
        # Indexed once: scanning the deferred list per object made a flush of N new
        # children of new parents quadratic.
        grouped: dict[int, set[str]] = {}
        deferred_states: dict[int, InstanceState] = {}
        for d in self.work.deferred:
            grouped.setdefault(id(d.child), set()).add(d.column)
            deferred_states[id(d.child)] = d.child
        self._deferred = {k: frozenset(v) for k, v in grouped.items()}
        for st in s.deleted_states():
            assert st.key is not None
            self.deletes.append(DeleteTask(st, st.mapper.pk_segment(st.pk), st.key))
        candidates = s.dirty_candidates()
        known = {id(c) for c in candidates}
        candidates += [c for i, c in deferred_states.items() if i not in known]
        stamp_at = expiry.now_datetime()
        for st in candidates:
            if st.deleted or st.identity is None:
                continue
            changes = changed_fields(st, self._deferred_columns(st))
            if changes and st.soft_deleted:
                raise InvalidRequestError(expiry.soft_deleted_message(st, "change"))
            if changes and st.mapper.expiry.updated is not None:
                # Every write that changes the object moves its UpdatedAt.
                expiry.stamp(st, insert=False, now=stamp_at)
                changes = changed_fields(st, self._deferred_columns(st))
            if changes:
                assert st.key is not None
                self.updates.append(UpdateTask(st, st.mapper.pk_segment(st.pk), st.key, changes))
        seen: dict[str, InstanceState] = {}
        for st in s.pending_states():
            info = st.mapper.expiry
            if info.stamped or info.ttl_ms is not None:
                expiry.stamp(st, insert=True, now=stamp_at)
            self.inserts.append(self._insert_task(st))
        self._place_in_shards()
        for task in self.inserts:
            if not task.generated:
                self._check_identity(task, seen)

    def _insert_task(self, st: InstanceState) -> InsertTask:
        mapper = st.mapper
        d = st.obj.__dict__
        values: dict[str, Any] = {}
        encoded: dict[str, bytes | None] = {}
        deferred = self._deferred_columns(st)
        for col in mapper.stored_columns():
            value = d.get(col.key)
            values[col.key] = value
            encoded[col.key] = None if col.key in deferred else _encode(mapper, col, value)
        pk = d.get(mapper.pk.key)
        generated = False
        if pk is None:
            inner = mapper.pk.codec.expected if mapper.pk.codec else "?"
            if mapper.pk.generated:
                generated = True
            elif "UUID" in inner:
                pk = uuid.uuid4()
            else:
                raise ValidationError(
                    model=mapper.name,
                    field=mapper.pk.key,
                    expected=inner,
                    actual="None",
                    detail="only int and UUID primary keys are generated; set this one",
                )
        if pk is not None:
            mapper.validate_pk(pk)
            segment = mapper.pk_segment(pk)
        else:
            # Until the counter answers, a placeholder no escaped id can equal ("#" is
            # never produced by escaping) keeps the objects of one flush apart.
            segment = f"{PLACEHOLDER}{len(self.inserts)}"
        ks = mapper.keys if mapper.shard_key is None else None  # shards: _place_in_shards
        key = "" if ks is None else ks.object(segment)
        return InsertTask(st, pk, segment, key, values, encoded, generated, ks)

    def _place_in_shards(self) -> None:
        """Give each new object of a sharded model its shard's keyspace.

        The shard comes from the shard-key value; a value still to be handed out (a
        foreign key to a new parent) takes the parent's shard; a model sharded by its
        own generated id joins the shard of the flush's other objects when it has any.
        """
        pending = [t for t in self.inserts if t.ks is None]
        if not pending:
            return
        by_state = {id(t.state): t for t in self.inserts}
        waiting_on = {
            id(d.child): by_state.get(id(d.target))
            for d in self.work.deferred
            if d.column == d.child.mapper.shard_key
        }
        for _ in range(len(pending) + 1):
            left = []
            for task in pending:
                shard = self._shard_of(task, waiting_on)
                if shard is None:
                    left.append(task)
                    continue
                mapper = task.state.mapper
                if task.pk is not None and mapper.shard_of_pk(task.pk) != shard:
                    raise ValidationError(
                        model=mapper.name,
                        field=mapper.pk.key,
                        expected=f"an id in shard {shard}",
                        actual=str(task.pk),
                        detail="ids of a sharded model carry their shard (id % shards)",
                    )
                task.ks = mapper.keys_for_shard(shard)
                task.key = task.ks.object(task.segment)
            if not left:
                return
            pending = left
        raise InvalidRequestError("cannot place new objects in shards (circular shard keys)")

    def _shard_of(self, task: InsertTask, waiting_on: dict[int, InsertTask | None]) -> int | None:
        mapper = task.state.mapper
        assert mapper.shard_key is not None
        if id(task.state) in waiting_on:
            parent = waiting_on[id(task.state)]
            if parent is None or parent.ks is None:
                return None
            return parent.ks.shard
        if mapper.shard_key == mapper.pk.key:
            if task.pk is not None:
                return mapper.shard_of_value(task.pk)
            return self._flush_shard(mapper)
        value = task.values.get(mapper.shard_key)
        if value is None:
            raise ValidationError(
                model=mapper.name,
                field=mapper.shard_key,
                expected="a shard-key value",
                actual="None",
                detail="the shard key picks where the object is stored",
            )
        return mapper.shard_of_value(value)

    def _tasks(self) -> list[InsertTask | UpdateTask | DeleteTask]:
        return [*self.inserts, *self.updates, *self.deletes]

    def _flush_shard(self, mapper: Mapper[Any]) -> int:
        for t in self._tasks():
            ks = t.ks
            if ks is None and t.state.identity is not None:
                ks = t.state.mapper.keys_for_pk(t.state.pk)
            if ks is not None and ks.shard is not None and ks.shard < mapper.shards:
                return int(ks.shard)
        return random.randrange(mapper.shards)

    def _tag_of(self, st: InstanceState) -> str:
        """The hash tag of an object of this flush (its shard's, for a new sharded one).

        Indexed once per flush: scanning the tasks per object made splitting a flush of
        N objects by tag quadratic.
        """
        if self._tags is None:
            self._tags = {}
            for t in self._tasks():
                if t.ks is not None:
                    self._tags.setdefault(id(t.state), t.ks.tag)
        tag = self._tags.get(id(st))
        return tag if tag is not None else st.mapper.keys_for_pk(st.pk).tag

    def _check_identity(self, task: InsertTask, seen: dict[str, InstanceState]) -> None:
        mapper = task.state.mapper
        other = seen.get(task.key)
        existing = self.session.identity_map.get((mapper.class_, task.pk))
        if (other is not None) or (existing is not None and not existing.deleted):
            raise IntegrityError(
                f"two {mapper.name} objects in this session have primary key {task.pk!r}; "
                f"nothing was written",
                model=mapper.name,
                field=mapper.pk.key,
                value=task.pk,
                key=task.key,
            )
        seen[task.key] = task.state

    @property
    def empty(self) -> bool:
        return not (
            self.inserts or self.updates or self.deletes or self.work.links or self.work.drop_keys
        )

    # -- generated keys -----------------------------------------------------------------

    def _bind_deferred(self) -> None:
        """Fill foreign keys that point at new objects, now that every new object has its
        id: handed out by a counter, or known without I/O (a generated UUID). Runs for
        every flush, not only those with counter ids (a UUID parent's key was lost)."""
        tasks: dict[int, InsertTask | UpdateTask] = {id(t.state): t for t in self.inserts}
        tasks.update({id(t.state): t for t in self.updates})
        for d in self.work.deferred:
            target = tasks.get(id(d.target))
            assert isinstance(target, InsertTask) and target.pk is not None
            mapper = d.child.mapper
            col = mapper.columns[d.column]
            enc = _encode(mapper, col, target.pk)
            task = tasks[id(d.child)]
            if isinstance(task, InsertTask):
                task.values[d.column] = target.pk
                task.encoded[d.column] = enc
            else:
                task.changes[d.column] = (target.pk, enc)

    # -- run ----------------------------------------------------------------------------

    def execute_steps(self) -> Steps[None]:
        """Collect, plan and run the flush; on any error put the session back as it was.

        `prepare` (in collect) records what it changes in the session (orphans and
        cascades deleted, foreign keys set) in `self.work.journal`: a flush that fails
        restores it, so fixing the cause and flushing again writes what was intended.
        """
        try:
            yield from self.collect()
            if events.mapper_events_enabled() and self._before_events():
                self._collect_again()
            if self.empty:
                self._flushed()
                self.session.replace_guards.clear()  # nothing replaced: nothing to guard
                return
            if self.session.allow_cross_slot and self.session.supports_cluster():
                groups = self._split_by_registry()
                if len(groups) > 1:
                    yield from self._run_parts(groups)
                    self.session.replace_guards.clear()
                    return
            yield from self._run()
        except BaseException:
            self.work.restore()
            raise
        if events.mapper_events_enabled():
            self._after_events()

    # -- mapper events (redmap.event) -----------------------------------------------------

    def _before_events(self) -> bool:
        """Call the before_insert, before_update and before_delete listeners, once per
        object, in flush order; True when any was called (the tasks are then collected
        again, so what the listeners assigned goes into this flush)."""
        called = self._dispatch("before_insert", self.inserts, parents_first=True)
        called |= self._dispatch("before_update", self.updates, parents_first=True)
        called |= self._dispatch("before_delete", self.deletes, parents_first=False)
        return called

    def _after_events(self) -> None:
        """Call the after_ listeners once the flush was applied (never for a refused one)."""
        self._dispatch("after_insert", self.inserts, parents_first=True)
        self._dispatch("after_update", self.updates, parents_first=True)
        self._dispatch("after_delete", self.deletes, parents_first=False)

    def _collect_again(self) -> None:
        """Build the tasks again from the session, after before_ listeners changed
        attributes (the relationship work prepared before them stays as it is)."""
        self.inserts.clear()
        self.updates.clear()
        self.deletes.clear()
        self._tags = None
        with paused_gc(len(self.session.new) + len(self.session.identity_map)):
            self._collect_tasks()

    def _dispatch(
        self,
        name: str,
        tasks: Sequence[InsertTask | UpdateTask | DeleteTask],
        *,
        parents_first: bool,
    ) -> bool:
        """Call `name`'s listeners for the tasks' objects; parents before their children
        (inserts, updates) or children before their parents (deletes)."""
        if not any(events.mapper_listeners(t.state.mapper.class_, name) for t in tasks):
            return False
        for st in self._dependency_order([t.state for t in tasks], parents_first):
            for listener in events.mapper_listeners(st.mapper.class_, name):
                listener.call(st.obj)
        return True

    def _dependency_order(
        self, states: list[InstanceState], parents_first: bool
    ) -> list[InstanceState]:
        """`states` with each many-to-one target before the objects pointing at it (or
        after them), otherwise in the order given. A Redis transaction applies its
        commands at once, so this order is the events' only: the one SQLAlchemy's unit
        of work gives. Objects in a cycle keep the order given."""
        index = {id(st): i for i, st in enumerate(states)}
        by_identity = {st.identity: i for i, st in enumerate(states) if st.identity is not None}
        parents: list[set[int]] = [set() for _ in states]
        for i, st in enumerate(states):
            d = st.obj.__dict__
            for prop in st.mapper.relationships.values():
                if prop.direction is not Direction.MANYTOONE:
                    continue
                target = d.get(prop.key)
                j: int | None = None
                if target is not None:
                    tst = state_of(target)
                    j = None if tst is None else index.get(id(tst))
                elif d.get(prop.fk_column) is not None:
                    j = by_identity.get((prop.target, d[prop.fk_column]))
                if j is not None and j != i:
                    parents[i].add(j)
        for dk in self.work.deferred:
            child, target = index.get(id(dk.child)), index.get(id(dk.target))
            if child is not None and target is not None and child != target:
                parents[child].add(target)
        before = parents
        if not parents_first:  # children first: each object waits for its children
            before = [set() for _ in states]
            for i, ps in enumerate(parents):
                for p in ps:
                    before[p].add(i)
        order: list[int] = []
        placed: set[int] = set()
        left = list(range(len(states)))
        while left:
            ready = [i for i in left if before[i] <= placed]
            if not ready:
                order += left  # a cycle
                break
            order += ready
            placed.update(ready)
            left = [i for i in left if i not in placed]
        return [states[i] for i in order]

    def _flushed(self, written: Callable[[Any], bool] | None = None) -> None:
        """Forget the relationship bookkeeping this flush consumed (see FlushJournal)."""
        if self.work.journal is not None:
            self.work.journal.flushed(written)

    def _run_parts(self, parts: list[UOWTransaction]) -> Steps[None]:
        """Run a cross-slot flush one part (hash tag) at a time.

        Each part is atomic, the whole is not. When a part fails after others were
        applied, the outcome is reported as it is, PartialCommitError naming what was
        and was not written, never as the part's own error: a StaleDataError there
        would make run_in_transaction apply the written parts a second time. The
        session keeps the pending changes (and relationship bookkeeping) of the
        parts not applied.
        """
        done: list[UOWTransaction] = []
        for i, part in enumerate(parts):
            try:
                yield from part._run()
            except BaseException as exc:
                if getattr(exc, "redmap_applied", None) is True:
                    done.append(part)  # interrupted, but settled as applied (finalized)
                if not any(p._writes_anything() for p in done):
                    # Nothing applied yet (a check-only part writes just its own token):
                    # the part's own error says it all.
                    raise
                written = {id(st): st for p in done for st in p._states()}
                # The applied parts keep what they wrote; the rest is put back.
                self.work.restore(set(written))
                self._flushed(_written_by(set(written)))
                if not isinstance(exc, Exception):
                    raise  # KeyboardInterrupt and the like pass through as they are
                in_doubt = any(st.in_doubt for st in part._states())
                unknown = part._states() if in_doubt else []
                rest = [st for p in parts[i + (1 if in_doubt else 0) :] for st in p._states()]
                raise PartialCommitError(
                    f"a cross-slot flush was applied in part: {len(done)} of {len(parts)} "
                    f"transactions (hash tags) were applied, {len(written)} object(s) "
                    f"written, {len(rest)} not written"
                    + (f", {len(unknown)} unknown" if unknown else "")
                    + f"; stopped by {type(exc).__name__}: {exc}. Do not retry the whole "
                    f"work: the written part would be applied twice",
                    written=[st.obj for st in written.values()],
                    not_written=[st.obj for st in rest],
                    unknown=[st.obj for st in unknown],
                    cause=exc,
                ) from exc
            done.append(part)
        self._flushed()

    def _writes_anything(self) -> bool:
        """Whether this part changes stored data: a check-only part (another tag's
        foreign-key targets, `_split_by_registry`) writes only its flush token."""
        return bool(self._tasks() or self.work.links or self.work.drop_keys)

    def _states(self) -> list[InstanceState]:
        """The objects this unit of work writes (fields, deletion or links), once each."""
        out: dict[int, InstanceState] = {}
        for t in self._tasks():
            out.setdefault(id(t.state), t.state)
        for link in self.work.links:
            out.setdefault(id(link.a), link.a)
            out.setdefault(id(link.b), link.b)
        return list(out.values())

    def _split_by_registry(self) -> list[UOWTransaction]:
        """One unit of work per hash tag (registry or shard), for allow_cross_slot.

        A part only WATCHes and checks keys of its own tag: checks of another tag's keys
        (foreign-key targets, lists of children) go to that tag's part, a check-only one
        if the tag has nothing to write, which runs first (`_order_parts`). Otherwise in
        tag order, so that a flush commits its parts in the same order every time
        (which part a failure leaves unwritten does not depend on set iteration).
        """
        parts: dict[str, UOWTransaction] = {}

        def part(st: InstanceState) -> UOWTransaction:
            tag = self._tag_of(st)
            if tag not in parts:
                parts[tag] = UOWTransaction(self.session)
            return parts[tag]

        for ins in self.inserts:
            part(ins.state).inserts.append(ins)
        for u in self.updates:
            part(u.state).updates.append(u)
        for d in self.deletes:
            part(d.state).deletes.append(d)
        for link in self.work.links:
            if self._tag_of(link.a) != self._tag_of(link.b):
                raise CrossSlotError(
                    f"a many-to-many link between {link.a.mapper.name} and "
                    f"{link.b.mapper.name} spans two hash tags (registries or shards); "
                    f"nothing was written"
                )
            part(link.a).work.links.append(link)
        after: dict[str, set[str]] = {}
        for mc in self.work.member_checks:
            # A zset of another tag (the children of a sharded parent, listed per shard)
            # is checked by that tag's part, run before the part relying on it.
            own_tag = self._tag_of(mc.state)
            key_tag = mc.key[: mc.key.index("}") + 1]
            if key_tag == own_tag:
                part(mc.state).work.member_checks.append(mc)
                continue
            if key_tag not in parts:
                parts[key_tag] = UOWTransaction(self.session)
            parts[key_tag].work.member_checks.append(mc)
            after.setdefault(own_tag, set()).add(key_tag)
        for dk in self.work.deferred:
            if self._tag_of(dk.child) != self._tag_of(dk.target):
                raise CrossSlotError(
                    f"{dk.child.mapper.name}.{dk.column} points at a new "
                    f"{dk.target.mapper.name} under another hash tag; flush the target first"
                )
            part(dk.child).work.deferred.append(dk)
        for key in self.work.drop_keys:
            owner = next((p for tag, p in parts.items() if key.startswith(tag + ":")), None)
            if owner is not None:
                owner.work.drop_keys.append(key)
        for rel in self.work.soft_releases:
            # A soft-deleted child is written by its own tag's part.
            tag = rel.ks.tag
            if tag not in parts:
                parts[tag] = UOWTransaction(self.session)
            parts[tag].work.soft_releases.append(rel)
        self._route_targets(parts, after)
        for tag, p in parts.items():
            p.tag = tag
            p.work.purge = self.work.purge
        return self._order_parts(parts, after)

    def _route_targets(self, parts: dict[str, UOWTransaction], after: dict[str, set[str]]) -> None:
        """Move each foreign-key target check to the part of the target's hash tag.

        One transaction cannot WATCH a key of another slot, so a part checks only the
        targets under its own tag. A target under another tag is checked by that tag's
        part (one of its own, writing only its token, when the tag has no other work),
        or needs no check when that part inserts it. Adds to `after`, per tag, the tags
        whose parts must run before it: the targets' parts, so that a child is written
        only once its parent was seen (or written) by a committed transaction.
        """
        refs: list[tuple[InstanceState, dict[str, Any]]] = [
            (t.state, t.values) for t in self.inserts
        ]
        refs += [(u.state, {k: v for k, (v, _) in u.changes.items()}) for u in self.updates]
        for st, values in refs:
            mapper = st.mapper
            for col in mapper.indexed_columns:
                value = values.get(col.key)
                if col.foreign_key is None or value is None:
                    continue  # None: no target, or one bound later (same tag: see above)
                target_tag = mapper_of(col.foreign_key.target).keys_for_pk(value).tag
                own_tag = self._tag_of(st)
                if target_tag == own_tag:
                    continue
                if target_tag not in parts:
                    parts[target_tag] = UOWTransaction(self.session)
                parts[target_tag].targets.append(TargetRef(st, col, value))
                after.setdefault(own_tag, set()).add(target_tag)

    @staticmethod
    def _order_parts(
        parts: dict[str, UOWTransaction], after: dict[str, set[str]]
    ) -> list[UOWTransaction]:
        """The parts in tag order, except that a part runs after the parts making the
        checks it relies on (`after`: its foreign keys' targets, its children's lists).
        Parts relying on each other both ways cannot be ordered so: refused before any
        I/O. Tags are few (registries and shards): the quadratic search is cheap."""
        order: list[str] = []
        done: set[str] = set()
        left = sorted(parts)
        while left:
            ready = next((t for t in left if after.get(t, set()) <= done), None)
            if ready is None:
                raise CrossSlotError(
                    f"the transactions of this cross-slot flush for the hash tags "
                    f"{', '.join(left)} each rely on a check the other makes (foreign "
                    f"keys, or lists of children, pointing both ways between tags), so "
                    f"no order checks every parent before its children are written; "
                    f"nothing was written. Flush one direction first, then the other",
                )
            order.append(ready)
            done.add(ready)
            left.remove(ready)
        return [parts[tag] for tag in order]

    def _run(self) -> Steps[None]:
        """Run the flush protocol (`redmap.orm.flushprotocol`) through the engine's driver,
        then record what Redis now holds.

        Round trips with generated ids: 3 (WATCH + checks, INCRBY, MULTI/EXEC). The
        protocol decides when ids are handed out, when the flush is planned again
        (`plan`) and what a failure means; this unit of work only plans.
        """
        self.start()
        try:
            yield Flush(self)
        except BaseException as exc:
            # A flush interrupted (task cancelled, KeyboardInterrupt) after its EXEC may
            # have been sent is settled by the driver like a lost reply; when that found
            # it applied, the session records it before the interruption goes on.
            if getattr(exc, "redmap_applied", None) is True:
                self.finalize()
            raise
        self.finalize()

    def start(self) -> None:
        """Give the flush its token key and the incarnation its inserts write; no I/O.

        Separate from `_run` so that tests can drive the flush protocol by hand
        (tests/test_flush_protocol.py).
        """
        # 128 random bits (as uuid4, without its fixed bits: one read of the OS's
        # random source for both values, which `uuid4()` and `secrets` read apart).
        rand = os.urandom(24).hex()
        token = rand[:32]
        # 64 random bits for every hash this flush inserts (no flush inserts one key
        # twice): a key deleted and inserted again never gets the `#i` it had.
        self.incarnation = rand[32:].encode()
        tasks: list[InsertTask | UpdateTask | DeleteTask] = [
            *self.inserts,
            *self.updates,
            *self.deletes,
        ]
        if self.tag is not None:
            tag = self.tag  # a part of a cross-slot flush (maybe only checking targets)
        elif tasks:
            tag = (tasks[0].ks or tasks[0].state.mapper.keys_for_pk(tasks[0].state.pk)).tag
        else:
            a = self.work.links[0].a
            tag = a.mapper.keys_for_pk(a.pk).tag
        self.token_key = keys.flush_token_key(tag, token)

    def plan(self) -> FlushPlan:
        """The flush as a plan, with the ids handed out so far (the protocol's `FlushJob`).

        Deferred keys wait only for ids handed out already (`ids_first`), or known
        without I/O (UUIDs). Pure: no I/O.
        """
        with paused_gc(len(self.inserts) + len(self.updates) + len(self.deletes)):
            self._bind_deferred()
            self.last_plan = plan_flush(
                self.inserts,
                self.updates,
                self.deletes,
                token_key=self.token_key,
                incarnation=self.incarnation,
                work=self.work,
                replace_guards=self._guards(),
                tag=self.tag,
                targets=self.targets,
                cross_slot_allowed=self.session.allow_cross_slot,
            )
            return self.last_plan

    @property
    def size(self) -> int:
        """How many objects the flush writes (the protocol picks its strategy by it)."""
        return len(self.inserts) + len(self.updates) + len(self.deletes)

    @property
    def has_increments(self) -> bool:
        """Whether a field is incremented (`Model.field + n`): a scripted flush then."""
        return any(
            type(value) is Increment for u in self.updates for value, _ in u.changes.values()
        )

    def ids_first(self) -> bool:
        """Whether generated ids must be handed out before the checks: when keys that
        need checking carry them (a new parent's children zset, a new object's link
        zsets, a `Unique` foreign key's claim), when the object keys themselves need an
        existence check (sharded models: explicit ids there do not raise the counter),
        and when explicit ids of the same model must be checked against the counter.
        """
        generated = {id(t.state) for t in self.inserts if t.generated}
        if not generated:
            return False
        explicit = {t.state.mapper for t in self.inserts if not t.generated}
        if any(t.generated and t.state.mapper in explicit for t in self.inserts):
            # Explicit and generated ids of one model: the counter is read (and watched)
            # by the checks after the INCRBY, not before it, and the generated ids skip
            # the explicit ones.
            return True
        if any(id(d.target) in generated for d in self.work.deferred):
            return True
        if any(id(ln.a) in generated or id(ln.b) in generated for ln in self.work.links):
            return True
        return any(t.generated and t.state.mapper.shard_key is not None for t in self.inserts)

    def _guards(self) -> list[tuple[str, frozenset[bytes], str]]:
        """The `replace_all` guards this flush (or this part of a cross-slot flush: those
        of its hash tag) must check."""
        guards = self.session.replace_guards
        if self.tag is None:
            return list(guards)
        return [g for g in guards if g[0].startswith(self.tag)]

    def finalize(self) -> None:
        """Record what Redis now holds on each flushed object.

        Only what this flush wrote is recorded: an attribute assigned after `collect`
        (a session misused by two threads) differs from the value flushed and stays a
        pending change, so the next flush writes it instead of it being lost.
        """
        with paused_gc(len(self.inserts) + len(self.updates) + len(self.deletes)):
            self._record_written()
        if self.tag is None:
            self.session.replace_guards.clear()

    def _increment_results(self) -> tuple[dict[tuple[int, str | None], Any], bool]:
        """What Redis computed for each increment of the flush, by (id(state), field;
        None for `#v`), and whether the flush had increments whose replies were lost."""
        plan = getattr(self, "last_plan", None)
        if plan is None or not plan.incremented:
            return {}, False
        if plan.replies is None:
            return {}, True
        return {
            (id(st), name): reply
            for (st, name), reply in zip(plan.incremented, plan.replies, strict=True)
        }, False

    @staticmethod
    def _record_increment(
        st: InstanceState, name: str, inc: Increment, computed: dict[tuple[int, str | None], Any]
    ) -> bool:
        return record_increment(st, name, inc, computed.get((id(st), name)))

    def _record_written(self) -> None:
        s = self.session
        # Foreign keys bound to new parents' ids: written by this flush, set below.
        deferred = {(id(dk.child), dk.column) for dk in self.work.deferred}
        for d in self.deletes:
            s.forget_deleted(d.state)
        computed, unknown = self._increment_results()
        for u in self.updates:
            st = u.state
            now = st.obj.__dict__
            counted = False
            settled: set[str] = set()  # incremented attributes that took Redis's value
            for name, (value, enc) in u.changes.items():
                if type(value) is Increment:
                    counted = True
                    if self._record_increment(st, name, value, computed):
                        settled.add(name)
                else:
                    st.loaded[name] = enc
            if counted and (id(st), None) in computed:
                # Only increments: the version is the one Redis computed (`#v` + 1).
                st.version = int(computed[(id(st), None)])
            elif counted and unknown:
                st.expire()  # applied, values unknown (lost reply): reload on access
            else:
                if st.version is None:
                    st.incarnation = self.incarnation  # the update wrote a new one
                st.version = (st.version or 0) + 1
            for name in list(st.modified):
                flushed = u.changes.get(name)
                if name in settled:
                    st.modified.discard(name)
                elif flushed is not None:
                    if (id(st), name) in deferred or (name in now and now[name] is flushed[0]):
                        st.modified.discard(name)
                elif _same_as_loaded(st, name):
                    st.modified.discard(name)
            # What was written is what Redis holds now: no longer blind.
            st.blind.difference_update(u.changes)
            if not st.modified:
                s.identity_map.modified.discard(st)
        for ins in self.inserts:
            st = ins.state
            mapper = st.mapper
            st.loaded = dict(ins.encoded)
            st.version = 1
            st.incarnation = self.incarnation
            now = st.obj.__dict__
            late = {
                name
                for name, value in ins.values.items()
                if name != mapper.pk.key
                and name in now
                and now[name] is not value
                and (id(st), name) not in deferred
            }
            st.modified.clear()
            now[mapper.pk.key] = ins.pk
            s.make_persistent(st, ins.pk, ins.key)
            for name in late:
                st.modified_attribute(name)
        for dk in self.work.deferred:
            dk.child.obj.__dict__[dk.column] = dk.target.pk
        self._flushed()


def record_increment(st: InstanceState, name: str, inc: Increment, reply: Any) -> bool:
    """The attribute takes the value Redis computed (`reply`; None when unknown), unless
    it was assigned again since the flush collected it (then that assignment stays
    pending: False). Shared by the unit of work and the counter lane."""
    now = st.obj.__dict__
    if reply is None:
        st.loaded.pop(name, None)
        if now.get(name) is inc:
            del now[name]  # applied, value unknown: reloads on access
            return True
        return False
    enc = b"%d" % reply if isinstance(reply, int) else bytes(reply)
    st.loaded[name] = enc
    if now.get(name) is inc:
        col = st.mapper.columns[name]
        assert col.codec is not None
        now[name] = col.codec.decode(enc)
        return True
    return False


def only_changes_pending(session: SessionContext) -> bool:
    """Whether nothing but assignments to persistent objects is pending (no new or
    deleted object, no relationship bookkeeping, no `replace_all` guard, no object with
    mutable fields) and no mapper or session listener exists: what a flush made only of
    increments needs of the session (`IncrementFlush`, the counter lane)."""
    return not (
        session.new
        or session.deleted
        or session.rel_dirty
        or session.links
        or session.orphans
        or session.replace_guards
        or session.identity_map.mutable
        or events.mapper_events_enabled()
        or events.session_events_enabled()
    )


def incrementable(st: InstanceState, session: SessionContext) -> bool:
    """Whether `st` is an object of `session` an increments-only flush can write: stored,
    its version and incarnation known, not deleted or in doubt, with assignments."""
    return not (
        st.deleted
        or st.in_doubt
        or st.identity is None
        or st.version is None
        or st.incarnation is None
        or st.key is None
        or st.session is not session
        or not st.modified
    )


class IncrementFlush(UOWTransaction):
    """A flush made only of increments of persistent objects (a hot counter's commit).

    What the general unit of work would do for it, without its general collection:
    there is no relationship work to prepare, nothing to insert or delete, no value to
    encode or compare, and its plan is `plan_increments` (the one `plan_flush` builds
    for such updates). It runs through the same flush protocol (the flush script, the
    incarnation checks, the token, a lost reply settled, objects in doubt) and records
    its outcome with `UOWTransaction.finalize`, as the general path does.
    """

    @classmethod
    def collect_increments(cls, session: SessionContext) -> IncrementFlush | None:
        """The flush, if everything pending is increments this path takes; else None
        (the general unit of work then runs). No I/O, nothing in the session changes.

        Refused here: new or deleted objects, relationship bookkeeping, `replace_all`
        guards, mapper or session listeners, objects in doubt or loaded without `#v`
        or `#i`, an attribute that is not an increment (or an increment of a column
        ordering a foreign key's list), objects with mutable (JSON) fields in the
        session, and objects under several hash tags.
        """
        if not only_changes_pending(session):
            return None
        modified = session.identity_map.modified
        if not modified:
            return None
        updates: list[UpdateTask] = []
        tag: str | None = None
        for st in modified:
            mapper = st.mapper
            if not incrementable(st, session):
                return None
            d = st.obj.__dict__
            changes: dict[str, tuple[Any, bytes | None]] = {}
            for name in st.modified:
                value = d.get(name)
                if type(value) is not Increment:
                    return None
                changes[name] = (value, None)
            if any(col.order_column in changes for col in mapper.indexed_columns):
                return None  # a list's order moves: `plan_flush` keeps it
            if mapper.expiry.tracked or mapper.expiry.updated is not None:
                return None  # deadlines and UpdatedAt: `plan_flush` keeps them
            ks = mapper.keys_for_pk(st.pk)
            if tag is None:
                tag = ks.tag
            elif ks.tag != tag:
                return None
            assert st.key is not None  # (incrementable)
            updates.append(UpdateTask(st, mapper.pk_segment(st.pk), st.key, changes, ks))
        flush = cls(session)
        flush.updates = updates
        return flush

    # The reply to this flush's script invocation when the counter lane sent it already
    # (`redmap.orm.counterlane`), and when it was sent: the protocol reads it as its
    # first round trip's. The lane set `token_key` to the token it sent.
    first_reply: tuple[Any, float] | None = None

    def start(self) -> None:
        if self.first_reply is None:
            super().start()

    def execute_steps(self) -> Steps[None]:
        """Run the flush; a failed one leaves the session as it was (nothing was
        collected into it: `finalize` runs only once the flush was applied)."""
        yield from self._run()

    def plan(self) -> FlushPlan:
        self.last_plan = plan_increments(
            self.updates,
            token_key=self.token_key,
            cross_slot_allowed=self.session.allow_cross_slot,
        )
        return self.last_plan
