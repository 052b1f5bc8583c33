"""Turns a unit of work into a `FlushPlan` (`flushplan`): watched keys, checks and writes.

Called by `unitofwork`; the plan is run by the flush protocol (`flushprotocol`). Everything
that could make a command fail inside EXEC (wrong key types, taken unique values,
existing primary keys, stale versions) becomes a check answered before MULTI, so a
flush that reaches EXEC cannot fail half-way. Why this guards against concurrent
writers: `docs/design/flush-concurrency.md`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..commands import Command
from ..exc import IntegrityError, ValidationError
from ..query.expression import Increment
from . import expiry, keys, sweep
from .flushplan import (
    TOKEN_TTL_MS,
    ZADD_INCREMENTED,
    Check,
    FlushPlan,
    IdsTaken,
    guard_write,
    id_guard_key,
    summarise_errors,
)
from .keys import KeySpace
from .mapper import INCARNATION_FIELD, VERSION_FIELD, ColumnProperty, Mapper, mapper_of
from .textindex import index_commands
from .types import increment_command

if TYPE_CHECKING:
    from .dependency import RelationshipWork, SoftRelease
    from .state import InstanceState

__all__ = [
    "PLACEHOLDER",
    "TOKEN_TTL_MS",
    "Check",
    "DeleteTask",
    "FlushPlan",
    "IdsTaken",
    "InsertTask",
    "TargetRef",
    "UpdateTask",
    "bind_placeholders",
    "fk_score",
    "id_guard_key",
    "plan_flush",
    "plan_increments",
    "plan_soft_releases",
    "soft_release_plan",
    "summarise_errors",
]


@dataclasses.dataclass(frozen=True)
class TargetRef:
    """A foreign key written by one part of a cross-slot flush whose target lives under
    another hash tag: the target's part checks that the target exists."""

    state: InstanceState
    column: ColumnProperty
    value: Any


@dataclasses.dataclass
class InsertTask:
    """A new object: every stored field is written."""

    state: InstanceState
    pk: Any
    segment: str
    key: str
    values: dict[str, Any]
    encoded: dict[str, bytes | None]
    # The primary key was handed out by the model's counter in this flush.
    generated: bool = False
    # The object's keyspace: the registry's, or its shard's for a sharded model.
    ks: KeySpace | None = None


@dataclasses.dataclass
class UpdateTask:
    """A persistent object with changed fields: (new value, new encoding) per field."""

    state: InstanceState
    segment: str
    key: str
    changes: dict[str, tuple[Any, bytes | None]]
    ks: KeySpace | None = None


@dataclasses.dataclass
class DeleteTask:
    """A persistent object marked for deletion."""

    state: InstanceState
    segment: str
    key: str
    ks: KeySpace | None = None


class _Builder:
    """Accumulates one plan; removals are emitted before additions so that a value
    released by one object can be taken by another in the same flush."""

    def __init__(self) -> None:
        # The hash tag of a cross-slot flush's part (None: the whole flush, one tag).
        self.tag: str | None = None
        self.watch: dict[str, None] = {}
        self.checks: list[Check] = []
        self.removals: list[Command] = []
        self.additions: list[Command] = []
        self.typed: dict[str, str] = {}
        # unique key -> (state, field, value, segment, keyspace) claiming it in this flush
        self.claims: dict[str, tuple[InstanceState, str, Any, str, KeySpace]] = {}
        # unique key -> segments releasing it in this flush
        self.releases: dict[str, set[str]] = {}
        # Increments (HINCRBY/HINCRBYFLOAT), sent before every other write so that a
        # refused one can be undone by the flush script; the state and field (None for
        # `#v`) each reply belongs to; the Sorted scores that follow the new values.
        self.increments: list[Command] = []
        self.incremented: list[tuple[InstanceState, str | None]] = []
        self.followups: list[Command] = []

    def expect_type(self, key: str, kind: str) -> None:
        if key not in self.typed:
            self.typed[key] = kind
            self.checks.append(Check("type", key, ("TYPE", key), expected=kind))

    # -- per-index maintenance ------------------------------------------------------

    def add_index_entries(
        self,
        mapper: Mapper[Any],
        ks: KeySpace,
        col: ColumnProperty,
        value: Any,
        enc: bytes | None,
        segment: str,
        state: InstanceState,
    ) -> None:
        if col.indexed or col.unique:
            vseg = keys.NULL_SEGMENT if enc is None else keys.escape(enc)
            ix = ks.index(col.key, vseg)
            self.expect_type(ix, "set")
            self.additions.append(("SADD", ix, segment))
        if col.unique and enc is not None:
            uq = ks.unique(col.key, keys.escape(enc))
            other = self.claims.get(uq)
            if other is not None and other[3] != segment:
                raise IntegrityError(
                    f"{mapper.name}.{col.key} value {value!r} is set on two objects of this "
                    f"flush (unique); nothing was written",
                    model=mapper.name,
                    field=col.key,
                    value=value,
                    key=uq,
                )
            self.claims[uq] = (state, col.key, value, segment, ks)
            self.additions.append(("SET", uq, segment))
        if col.sorted:
            # None is kept at -inf so that ordering includes it (first ascending);
            # range conditions start at "(-inf" and leave it out.
            score = "-inf" if enc is None else _score(mapper, col, value)
            zs = ks.sorted(col.key)
            self.expect_type(zs, "zset")
            self.additions.append(("ZADD", zs, score, segment))
        if col.has_string_index:
            self.string_entries(ks, col, enc, segment, add=True)

    def string_entries(
        self, ks: KeySpace, col: ColumnProperty, raw: bytes | None, segment: str, *, add: bool
    ) -> None:
        """The entries of `col`'s ordered, suffix and word indexes (`textindex`)."""
        cmds = index_commands(
            ks,
            col.key,
            lexical=col.lexical,
            suffix=col.suffix,
            text=col.text,
            raw=raw,
            segment=segment,
            add=add,
        )
        for cmd in cmds:
            self.expect_type(cmd[1], "set" if cmd[0] in ("SADD", "SREM") else "zset")
        (self.additions if add else self.removals).extend(cmds)

    def remove_index_entries(
        self,
        mapper: Mapper[Any],
        ks: KeySpace,
        col: ColumnProperty,
        old: bytes | None,
        segment: str,
        *,
        replaced: bool,
    ) -> None:
        """Take the object out of `col`'s query indexes and release its unique value."""
        self.remove_query_entries(ks, col, old, segment, replaced=replaced)
        if col.unique and old is not None:
            uq = ks.unique(col.key, keys.escape(old))
            self.releases.setdefault(uq, set()).add(segment)
            self.watch[uq] = None
            self.removals.append(("DEL", uq))

    def remove_query_entries(
        self,
        ks: KeySpace,
        col: ColumnProperty,
        old: bytes | None,
        segment: str,
        *,
        replaced: bool = False,
    ) -> None:
        """Take the object out of `col`'s query indexes (equality set, Sorted zset, string
        indexes), leaving its unique value held: what a soft delete does
        (`expiry.plan_soft_delete`), and the first half of `remove_index_entries`."""
        if col.indexed or col.unique:
            vseg = keys.NULL_SEGMENT if old is None else keys.escape(old)
            ix = ks.index(col.key, vseg)
            self.expect_type(ix, "set")
            self.removals.append(("SREM", ix, segment))
        if col.sorted and not replaced:
            zs = ks.sorted(col.key)
            self.expect_type(zs, "zset")
            self.removals.append(("ZREM", zs, segment))
        if col.has_string_index:
            self.string_entries(ks, col, old, segment, add=False)


def _score(mapper: Mapper[Any], col: ColumnProperty, value: Any) -> str:
    assert col.codec is not None
    try:
        score = col.codec.to_score(value)
    except ValidationError as exc:
        raise ValidationError(
            model=mapper.name,
            field=col.key,
            expected=exc.expected,
            actual=exc.actual,
            detail=exc.detail,
        ) from None
    if score == float("-inf"):
        raise ValidationError(
            model=mapper.name,
            field=col.key,
            expected="a value above -inf",
            actual="-inf",
            detail="a Sorted() index keeps None at -inf",
        )
    return repr(score)


def _all_score(mapper: Mapper[Any], pk: Any) -> str:
    # Integer ids order numerically; other ids share score 0 and order by member bytes.
    return str(pk) if mapper.pk.codec is not None and isinstance(pk, int) else "0"


def plan_flush(
    inserts: Sequence[InsertTask],
    updates: Sequence[UpdateTask],
    deletes: Sequence[DeleteTask],
    *,
    token_key: str,
    incarnation: bytes,
    work: RelationshipWork | None = None,
    replace_guards: Sequence[tuple[str, frozenset[bytes], str]] = (),
    tag: str | None = None,
    targets: Sequence[TargetRef] = (),
    cross_slot_allowed: bool = False,
) -> FlushPlan:
    """Build the plan for one flush. Raises IntegrityError for conflicts visible without I/O.

    `incarnation` is this flush's fresh random `#i`, written by every insert and by
    every update of a hash loaded without `#v` (docs/design/flush-concurrency.md, I1).

    `tag`, `targets` and `cross_slot_allowed` are set for one part of a cross-slot
    flush (`UOWTransaction._split_by_registry`): a part only checks foreign-key targets
    under its own hash `tag` (one transaction cannot watch another slot); the part of the
    targets' tag checks them instead, as `targets`, and runs first.
    """
    b = _Builder()
    b.tag = tag
    segments: dict[int, str] = {}
    all_tasks: list[InsertTask | UpdateTask | DeleteTask] = [*inserts, *updates, *deletes]
    spaces: dict[int, KeySpace] = {}
    for t in all_tasks:
        segments[id(t.state)] = t.segment
        spaces[id(t.state)] = _ks(t)
    new_pks = {id(t.state): t.pk for t in inserts}
    new_keys = {t.key for t in inserts}
    deleted_keys = {d.key for d in deletes}
    seqmax: dict[str, Check] = {}
    guards: set[str] = set()
    now = expiry.now_ms()
    # Keyspaces of models with deadlines this flush writes (a bounded sweep rides along).
    tracked: dict[str, tuple[Mapper[Any], KeySpace]] = {}

    purge = work.purge if work is not None else set()
    for d in deletes:
        st = d.state
        mapper = st.mapper
        ks = _ks(d)
        b.watch[d.key] = None
        b.checks.extend(_version_checks(d.key, st))
        if mapper.expiry.soft_delete_ms is not None and id(st) not in purge:
            tracked[ks.deadlines()] = (mapper, ks)
            expiry.plan_soft_delete(b, st, ks, d.key, d.segment, now, incarnation)
            continue
        b.removals.append(("DEL", d.key))
        b.removals.append(("ZREM", ks.all(), d.segment))
        b.expect_type(ks.all(), "zset")
        for col in mapper.indexed_columns:
            b.remove_index_entries(
                mapper, ks, col, st.loaded.get(col.key), d.segment, replaced=False
            )
            old_fk = st.loaded.get(col.key)
            if col.foreign_key is not None and old_fk is not None:
                b.removals.append(("ZREM", ks.foreign(col.key, keys.escape(old_fk)), d.segment))
        if mapper.expiry.tracked:
            tracked[ks.deadlines()] = (mapper, ks)
            expiry.plan_delete(b, st, ks, d.segment)

    for u in updates:
        st = u.state
        mapper = st.mapper
        b.watch[u.key] = None
        incs = {n: v for n, (v, _) in u.changes.items() if type(v) is Increment}
        # Only increments: they commute with every other write, so the object need only
        # still be the same incarnation (API.md section 9: never stale).
        only_incs = (
            bool(incs)
            and len(incs) + _blind_stamp(mapper, u.changes) == len(u.changes)
            and st.version is not None
            and st.incarnation is not None
        )
        if mapper.expiry.tracked:
            tracked[_ks(u).deadlines()] = (mapper, _ks(u))
            expiry.plan_update(b, st, _ks(u), u.key, u.segment, u.changes, now)
        if only_incs:
            _plan_increments_only(b, u)
            _update_foreign_keys(b, u, new_keys)
            continue
        b.checks.extend(_version_checks(u.key, st))
        for name, inc in incs.items():
            _plan_increment(b, u, name, inc)
        sets: list[Any] = []
        dels: list[str] = []
        for name, (value, enc) in u.changes.items():
            if name in incs:
                continue
            if enc is None:
                dels.append(name)
            else:
                sets.extend((name, enc))
            col = mapper.columns[name]
            if col.has_index:
                ks = _ks(u)
                b.remove_index_entries(
                    mapper, ks, col, st.loaded.get(name), u.segment, replaced=True
                )
                b.add_index_entries(mapper, ks, col, value, enc, u.segment, st)
        _update_foreign_keys(b, u, new_keys)
        if dels:
            b.additions.append(("HDEL", u.key, *dels))
        # The version is checked under WATCH, so the new one can be set, not incremented.
        sets.extend((VERSION_FIELD, str((st.version or 0) + 1).encode()))
        if st.version is None:
            # A hash without `#v` restarts at 1: as a new incarnation, so that a session
            # holding version 1 of it from before the `#v` went missing is stale.
            sets.extend((INCARNATION_FIELD, incarnation))
        b.additions.append(("HSET", u.key, *sets))

    fresh: dict[str, list[str]] = {}  # id guard -> keys of generated ids handed out
    for ins in inserts:
        st = ins.state
        mapper = st.mapper
        if ins.generated:
            # The counter never hands an id out twice, but an explicit insert may take
            # one before this flush writes it: the flush watches the keyspace's id guard,
            # which such an insert writes, and once it knows its ids, checks that none
            # exists (docs/design/flush-concurrency.md, I4).
            guard = id_guard_key(_ks(ins))
            b.watch[guard] = None
            if ins.pk is not None:
                fresh.setdefault(guard, []).append(ins.key)
        else:
            b.watch[ins.key] = None
            if ins.key not in deleted_keys:
                b.checks.append(
                    Check("absent", ins.key, ("EXISTS", ins.key), state=st, value=ins.pk)
                )
            if mapper.pk.generated and isinstance(ins.pk, int):
                if mapper.shard_key is None:
                    seq = mapper.keys.seq()
                    prev = seqmax.get(seq)
                    # Watched, and read after this flush's own INCRBY if it has one (a
                    # flush mixing explicit and generated ids of a model takes its ids
                    # first), so the flush does not abort on its own counter.
                    if prev is None:
                        seqmax[seq] = Check(
                            "seqmax",
                            seq,
                            ("GET", seq),
                            expected=ins.pk,
                            value=ins.pk,
                            guard=id_guard_key(mapper.keys),
                        )
                        b.watch[seq] = None
                    else:
                        prev.value = max(prev.value, ins.pk)
                        prev.expected = min(prev.expected, ins.pk)
                else:
                    # The counter lives under another tag: whether the id is above it
                    # cannot be checked here, so the shard's guard is always written.
                    guards.add(id_guard_key(_ks(ins)))
        fields: list[Any] = []
        for name, enc in ins.encoded.items():
            if enc is not None:
                fields.extend((name, enc))
        fields.extend((VERSION_FIELD, b"1", INCARNATION_FIELD, incarnation))
        b.additions.append(("HSET", ins.key, *fields))
        ks = _ks(ins)
        if mapper.expiry.tracked:
            tracked[ks.deadlines()] = (mapper, ks)
            expiry.plan_insert(b, mapper, ks, ins.key, ins.segment, ins.values, ins.encoded)
            if not ins.generated:
                # An id whose object expired (or ended its grace period) and awaits the
                # sweep is not free yet: its old index entries are still to be removed.
                b.checks.append(
                    Check(
                        "unswept",
                        ins.key,
                        ("ZSCORE", ks.deadlines(), ins.segment),
                        state=st,
                        value=ins.pk,
                    )
                )
        b.expect_type(ks.all(), "zset")
        # A placeholder segment also stands in for its score: once the counter answers,
        # both become the same decimal text (see `bind_placeholders`).
        pk_score = ins.segment if ins.pk is None else _all_score(mapper, ins.pk)
        b.additions.append(("ZADD", ks.all(), pk_score, ins.segment))
        for col in mapper.indexed_columns:
            b.add_index_entries(
                mapper,
                ks,
                col,
                ins.values.get(col.key),
                ins.encoded.get(col.key),
                ins.segment,
                st,
            )
            enc = ins.encoded.get(col.key)
            if col.foreign_key is not None and enc is not None:
                _expect_target(b, st, col, ins.values.get(col.key), new_keys)
                fk_key = ks.foreign(col.key, keys.escape(enc))
                b.expect_type(fk_key, "zset")
                score = (
                    ins.segment
                    if ins.pk is None and col.order_column is None
                    else fk_score(mapper, col, ins.values.get(col.order_column or ""), ins.pk)
                )
                b.additions.append(("ZADD", fk_key, score, ins.segment))

    for ref in targets:
        # Foreign keys of another part's objects pointing at this part's tag (after the
        # deletes and updates above: a key they watch is checked by its version already).
        _expect_target(b, ref.state, ref.column, ref.value, new_keys)
    if work is not None:
        _plan_relationships(b, work, segments, new_pks, spaces, now)
        for r in work.soft_releases:
            if r.end:
                # Ended at `now`: the bounded sweep this flush carries purges it (unless
                # its model has children: `Engine.sweep` then does).
                tracked[r.ks.deadlines()] = (r.mapper, r.ks)
    for key, members, what in replace_guards:
        # `Session.replace_all`: the id zset still lists exactly what it read.
        b.watch[key] = None
        b.checks.append(
            Check("members", key, ("ZRANGE", key, 0, -1), expected=set(members), value=what)
        )
    b.checks.extend(seqmax.values())
    for guard, fresh_keys in fresh.items():
        b.watch[guard] = None
        b.checks.append(Check("fresh", guard, ("EXISTS", *fresh_keys)))
    for guard in sorted(guards):
        b.additions.append(guard_write(guard))
    for uq, (st, field, value, segment, ks) in b.claims.items():
        b.watch[uq] = None
        allowed = {segment.encode()} | {s.encode() for s in b.releases.get(uq, ())}
        b.checks.append(
            Check(
                "unique",
                uq,
                ("GET", uq),
                expected=allowed,
                state=st,
                field=field,
                value=value,
                takeover=expiry.takeover(st.mapper, ks, now),
            )
        )

    b.watch[token_key] = None
    writes = [
        *b.increments,
        *b.followups,
        *_merge(b.removals),
        *_merge(b.additions),
        ("SET", token_key, b"applied", "PX", TOKEN_TTL_MS),
    ]
    states = [t.state for t in all_tasks]
    tag = token_key.partition(":")[0]
    return FlushPlan(
        token_key=token_key,
        token_ttl_ms=TOKEN_TTL_MS,
        watch=list(b.watch),
        checks=b.checks,
        writes=writes,
        states=states,
        cross_slot_allowed=cross_slot_allowed,
        incremented=b.incremented,
        sweep=sweep.piggyback([t for t in tracked.values() if t[1].tag == tag], now),
    )


def plan_increments(
    updates: Sequence[UpdateTask], *, token_key: str, cross_slot_allowed: bool = False
) -> FlushPlan:
    """The plan of a flush made only of increments (`Model.field + n`) of persistent
    objects whose version and incarnation are known (`unitofwork.IncrementFlush`).

    The very plan `plan_flush` builds for such updates (its `only_incs` branch: an
    incarnation check, the increments, `#v` + 1, the Sorted scores, the token), without
    the bookkeeping of every other kind of change; tests/test_counters.py compares them.
    """
    b = _Builder()
    for u in updates:
        b.watch[u.key] = None
        _plan_increments_only(b, u)
    b.watch[token_key] = None
    return FlushPlan(
        token_key=token_key,
        token_ttl_ms=TOKEN_TTL_MS,
        watch=list(b.watch),
        checks=b.checks,
        writes=[*b.increments, *b.followups, ("SET", token_key, b"applied", "PX", TOKEN_TTL_MS)],
        states=[u.state for u in updates],
        cross_slot_allowed=cross_slot_allowed,
        incremented=b.incremented,
        blind=True,
    )


def _plan_increments_only(b: _Builder, u: UpdateTask) -> None:
    """An update made only of increments: they commute with every other write, so the
    object need only still be the same incarnation (API.md section 9: never stale);
    its version moves by `HINCRBY`, whose reply the session records."""
    st = u.state
    b.checks.append(
        Check(
            "incarnation",
            u.key,
            ("HGET", u.key, INCARNATION_FIELD),
            expected=st.incarnation,
            state=st,
            value=st.pk,
        )
    )
    for name, (inc, enc) in u.changes.items():
        if type(inc) is Increment:
            _plan_increment(b, u, name, inc)
        else:  # the UpdatedAt stamp (`_blind_stamp`): the last write's moment wins
            b.followups.append(("HSET", u.key, name, enc))
    b.increments.append(("HINCRBY", u.key, VERSION_FIELD, 1))
    b.incremented.append((st, None))


def _blind_stamp(mapper: Mapper[Any], changes: Mapping[str, tuple[Any, bytes | None]]) -> int:
    """1 when `changes` holds the flush's `UpdatedAt` stamp on a field with no index, else 0.

    Such a stamp is written without a version check beside increments: every writer of
    the object stamps it, so whichever write lands last leaves its own moment, which is
    what the field means, and increments with a stamp stay never stale (API.md section 9).
    An indexed stamp moves an index entry from the value loaded, so it needs the check.
    """
    name = mapper.expiry.updated
    if name is None or name not in changes or mapper.columns[name].has_index:
        return 0
    return 1


def _plan_increment(b: _Builder, u: UpdateTask, name: str, inc: Increment) -> None:
    """`field = Model.field + delta`: HINCRBY (int) or HINCRBYFLOAT (float, Decimal), and
    the field's Sorted score set to the value Redis computes (`ZADD_INCREMENTED`)."""
    st = u.state
    col = st.mapper.columns[name]
    assert col.codec is not None
    command = increment_command(col.codec)
    assert command is not None  # refused at assignment (FieldAttribute._check_increment)
    delta = inc.delta
    text = repr(delta) if isinstance(delta, float) else str(delta)
    index = len(b.increments)
    b.increments.append((command, u.key, name, text))
    b.incremented.append((st, name))
    if col.sorted:
        zs = _ks(u).sorted(name)
        b.expect_type(zs, "zset")
        b.followups.append((ZADD_INCREMENTED, zs, index, u.segment))


def _version_checks(key: str, st: InstanceState) -> list[Check]:
    """The object must still be what the session loaded: same `#v` of the same
    incarnation `#i` (a key deleted and inserted again restarts at version 1), and
    present (a hash loaded without `#v` must still exist, or a stale update would
    resurrect it)."""
    version = Check(
        "version",
        key,
        ("HMGET", key, VERSION_FIELD, INCARNATION_FIELD),
        expected=(st.version, st.incarnation),
        state=st,
        value=st.pk,
    )
    if st.version is not None:
        return [version]  # a missing hash has no `#v`: stale already
    return [version, Check("exists", key, ("EXISTS", key), state=st, value=st.pk)]


PLACEHOLDER = "#new"
_PLACEHOLDER_RE = re.compile(r"#new[0-9]+")


def bind_placeholders(writes: list[Command], ids: dict[str, str]) -> list[Command]:
    """Replace generated-id placeholders (`#new<n>`) in keys, members and scores.

    Placeholders are only ever segments of integer ids, whose escaped segment and
    score are the same decimal text, so one substitution serves both.
    """

    def fix(arg: str) -> str:
        # Fast paths: a member or score is the placeholder itself; a key ends with it.
        whole = ids.get(arg)
        if whole is not None:
            return whole
        head, sep, tail = arg.rpartition(":")
        last = ids.get(tail)
        if last is not None:
            return head + sep + last
        return _PLACEHOLDER_RE.sub(lambda m: ids[m.group(0)], arg)

    # The test is inline: most arguments are encoded values (bytes), and a call per
    # argument cost more than the rest of the binding. An HSET (one per insert) can hold
    # a placeholder only in its key: its field names are column names (identifiers, or
    # `#v`/`#i`) and its values encoded bytes.
    out: list[Command] = []
    for cmd in writes:
        if cmd[0] == "HSET":
            key = cmd[1]
            if type(key) is str and PLACEHOLDER in key:
                cmd = (cmd[0], fix(key), *cmd[2:])
            out.append(cmd)
        else:
            out.append(tuple([fix(a) if type(a) is str and PLACEHOLDER in a else a for a in cmd]))
    return out


_VARIADIC = {"SADD": 1, "SREM": 1, "ZADD": 2, "ZREM": 1}


def _merge(commands: list[Command]) -> list[Command]:
    """Fold the member commands of one key into one variadic command, dropping repeats.

    Within one list (removals, or additions) these commands commute, so a key's
    members can all ride on the command's first occurrence.
    """
    out: list[Command | list[Any]] = []
    seen: set[Command] = set()
    at: dict[tuple[str, str], int] = {}
    for cmd in commands:
        if cmd in seen:
            continue
        seen.add(cmd)
        width = _VARIADIC.get(cmd[0])
        if width is None:
            out.append(cmd)
            continue
        slot = (cmd[0], cmd[1])
        if slot in at:
            merged = out[at[slot]]
            assert isinstance(merged, list)
            merged.extend(cmd[2:])
        else:
            at[slot] = len(out)
            out.append(list(cmd))
    return [tuple(c) for c in out]


def fk_score(mapper: Mapper[Any], col: ColumnProperty, order_value: Any, pk: Any) -> str:
    """Score of a child in its parent's zset: its order_by field, else its primary key."""
    if col.order_column is None:
        return _all_score(mapper, pk)
    if order_value is None:
        return "-inf"
    return _score(mapper, mapper.columns[col.order_column], order_value)


def _current_value(st: InstanceState, u: UpdateTask, name: str) -> Any:
    if name in u.changes:
        return u.changes[name][0]
    d = st.obj.__dict__
    if name in d:
        return d[name]
    raw = st.loaded.get(name)
    codec = st.mapper.columns[name].codec
    return None if raw is None or codec is None else codec.decode(raw)


def _ks(task: InsertTask | UpdateTask | DeleteTask) -> KeySpace:
    """The keyspace of a task's object (its shard's, for a sharded model)."""
    if task.ks is not None:
        return task.ks
    return task.state.mapper.keys_for_pk(task.state.pk)


def _expect_target(
    b: _Builder,
    st: InstanceState,
    col: ColumnProperty,
    value: Any,
    new_keys: set[str],
) -> None:
    """A foreign key written by this flush must name an object that exists at EXEC (as
    many-to-many link ends must): one deleted meanwhile makes the flush stale instead of
    leaving the key, and the parent's list of children, pointing at nothing."""
    if value is None or col.foreign_key is None:
        return
    target = mapper_of(col.foreign_key.target)
    space = target.keys_for_pk(value)
    if b.tag is not None and space.tag != b.tag:
        return  # another part of a cross-slot flush checks it, before this one runs
    key = space.object(target.pk_segment(value))
    if key in new_keys or key in b.watch:
        return  # inserted by this flush, or already checked by it (version check)
    b.watch[key] = None
    b.checks.append(
        Check(
            "target",
            key,
            ("EXISTS", key),
            expected=target.name,
            state=st,
            field=col.key,
            value=value,
        )
    )


def _update_foreign_keys(b: _Builder, u: UpdateTask, new_keys: set[str]) -> None:
    st = u.state
    mapper = st.mapper
    ks = _ks(u)
    for col in mapper.indexed_columns:
        if col.foreign_key is None:
            continue
        moved = col.key in u.changes
        reordered = col.order_column is not None and col.order_column in u.changes
        if not (moved or reordered):
            continue
        old = st.loaded.get(col.key)
        new = u.changes[col.key][1] if moved else old
        if moved and old is not None:
            b.removals.append(("ZREM", ks.foreign(col.key, keys.escape(old)), u.segment))
        if new is not None:
            if moved:
                _expect_target(b, st, col, u.changes[col.key][0], new_keys)
            fk_key = ks.foreign(col.key, keys.escape(new))
            b.expect_type(fk_key, "zset")
            order_value = _current_value(st, u, col.order_column) if col.order_column else None
            b.additions.append(
                ("ZADD", fk_key, fk_score(mapper, col, order_value, st.pk), u.segment)
            )


def _plan_relationships(
    b: _Builder,
    work: RelationshipWork,
    segments: dict[int, str],
    new_pks: dict[int, Any],
    spaces: dict[int, KeySpace],
    now: int,
) -> None:
    def seg(st: InstanceState) -> str:
        known = segments.get(id(st))
        return known if known is not None else st.mapper.pk_segment(st.pk)

    def space(st: InstanceState) -> KeySpace:
        known = spaces.get(id(st))
        return known if known is not None else st.mapper.keys_for_pk(st.pk)

    def pk_score(st: InstanceState) -> str:
        pk = st.pk if st.identity is not None else new_pks.get(id(st))
        return seg(st) if pk is None else _all_score(st.mapper, pk)

    for mc in work.member_checks:
        b.watch[mc.key] = None
        b.checks.append(
            Check(
                "members",
                mc.key,
                ("ZRANGE", mc.key, 0, -1),
                expected=mc.expected,
                state=mc.state,
                value=mc.state.pk,
            )
        )
    for link in work.links:
        a_key = space(link.a).relation(link.link_name, seg(link.a))
        b_key = space(link.b).relation(link.reverse_link_name, seg(link.b))
        b.expect_type(a_key, "zset")
        b.expect_type(b_key, "zset")
        if link.added:
            for end in (link.a, link.b):
                if id(end) not in new_pks and end.key is not None and end.key not in b.watch:
                    # The other end must still exist when the link is written.
                    b.watch[end.key] = None
                    b.checks.append(
                        Check("exists", end.key, ("EXISTS", end.key), state=end, value=end.pk)
                    )
            b.additions.append(("ZADD", a_key, pk_score(link.b), seg(link.b)))
            b.additions.append(("ZADD", b_key, pk_score(link.a), seg(link.a)))
        else:
            b.removals.append(("ZREM", a_key, seg(link.b)))
            b.removals.append(("ZREM", b_key, seg(link.a)))
    for key in work.drop_keys:
        b.removals.append(("DEL", key))
    plan_soft_releases(b, work.soft_releases, now)


def plan_soft_releases(b: _Builder, releases: Sequence[SoftRelease], now: int) -> None:
    """Detach (or end) soft-deleted children of parents gone for good, each checked
    against the version it was read with, and its released unique claim against its id
    (`expiry.release_soft_child`)."""
    for r in releases:
        b.watch[r.key] = None
        b.checks.append(
            Check(
                "version",
                r.key,
                ("HMGET", r.key, VERSION_FIELD, INCARNATION_FIELD),
                expected=expiry.version_of(r.data),
                value=f"{r.mapper.name}({r.pk!r})",
            )
        )
        writes, held = expiry.release_soft_child(
            r.mapper, r.ks, r.key, r.segment, r.data, r.fk, end=r.end, now=now
        )
        for claim in held:
            b.watch[claim] = None
            b.checks.append(
                Check(
                    "unique", claim, ("GET", claim), expected={r.segment.encode()},
                    field=r.fk, value=r.pk,
                )
            )  # fmt: skip
        b.additions.extend(writes)


def soft_release_plan(releases: Sequence[SoftRelease], token_key: str, now: int) -> FlushPlan:
    """A plan made only of `plan_soft_releases` (the sweep's, for the soft-deleted
    children of gone parents; all under `token_key`'s hash tag)."""
    b = _Builder()
    plan_soft_releases(b, releases, now)
    b.watch[token_key] = None
    return FlushPlan(
        token_key=token_key,
        token_ttl_ms=TOKEN_TTL_MS,
        watch=list(b.watch),
        checks=b.checks,
        writes=[*b.additions, ("SET", token_key, b"applied", "PX", TOKEN_TTL_MS)],
        states=[],
    )
