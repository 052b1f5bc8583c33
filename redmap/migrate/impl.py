"""How each redmap migration operation runs on Redis, and what a dry run reports for it.

Registered on `RedisOperations` with `implementation_for`, so revisions reach these
through `op.<name>(...)`; `estimate` is called by `MigrationRun.estimate` in dry runs.
Per-object work goes through `batch.rewrite_by_script` (a field added, dropped or
renamed by a small script) or `batch.rewrite` (anything computed in Python), both
atomic per object and resumable; key work (index drops, renames) through
`batch.delete_keys` and `batch.move_keys`.
"""

from __future__ import annotations

import os.path
import secrets
from collections.abc import Callable, Iterable, Sized
from typing import Any

from alembic_like.messaging import plural
from alembic_like.operations import Operations

from ..dialects.base import translate_errors
from ..exc import DecodeError, MigrationError, ValidationError
from ..orm import expiry, keys
from ..orm.expiry import SOFT_FIELD
from ..orm.mapper import INCARNATION_FIELD, VERSION_FIELD, ColumnProperty
from ..orm.persistence import fk_score
from ..orm.textindex import index_commands
from ..orm.types import Codec, compile_codec
from . import deadlines
from .batch import (
    Change,
    Command,
    MigrationRun,
    RewriteResult,
    Row,
    Target,
    delete_keys,
    field_bytes,
    move_keys,
    rewrite,
    rewrite_by_script,
    scan_rows,
    shown,
)
from .ops import (
    INDEX_KINDS,
    AddField,
    CreateIndex,
    DropField,
    DropIndex,
    Execute,
    IndexKind,
    RedisOperation,
    RedisOperations,
    RenameField,
    RenameModel,
    Transform,
)

__all__ = ["estimate"]


def _run(operations: Operations) -> MigrationRun:
    run = operations.context
    if not isinstance(run, MigrationRun):
        raise MigrationError("redmap operations need a MigrationRun as the op's context")
    return run


def _report(run: MigrationRun, op: RedisOperation, text: str) -> None:
    run.messaging.msg(f"  {op.summary()}: {text}")


def _changed(result: RewriteResult) -> str:
    return f"{result.changed} of {result.visited} objects changed"


# -- fields ------------------------------------------------------------------------------


def _encode_default(target: Target, name: str, value: Any) -> bytes:
    """`value` encoded by the field's codec (the registry's, else one for its Python type)."""
    col = target.column(name)
    codec = col.codec if col is not None else None
    if codec is None:
        codec = compile_codec(type(value), model=target.name, field=name)
    codec.validate(value, model=target.name, field=name)
    return codec.encode(value)


# Per-object scripts: check, then bump the version (the only command that can fail, on
# a corrupt `#v`), then write; each returns 1 when it changed the object, else 0.
# The last three ARGV of each are the version field, the incarnation field and a fresh
# incarnation: a hash found without `#v` gets `#v` 1 with the new `#i` (as a flush does),
# so its version never restarts within one incarnation.
_BUMP = """
local function bump(version_field, incarnation_field, incarnation)
  if redis.call('HINCRBY', KEYS[1], version_field, 1) == 1 then
    redis.call('HSET', KEYS[1], incarnation_field, incarnation)
  end
end
"""
# KEYS[1]: an object. ARGV: field, encoded default. Sets the field where it is absent
# (never on a deleted object).
_ADD_FIELD = _BUMP + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return 0
end
bump(ARGV[3], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""
# ARGV: field. Deletes the field where present.
_DROP_FIELD = _BUMP + """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
bump(ARGV[2], ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
# ARGV: old field, new field. Moves the value where `old` is present.
_RENAME_FIELD = _BUMP + """
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
bump(ARGV[3], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], ARGV[2], value)
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


def _bump_args() -> tuple[str, str, str]:
    """The ARGV tail of a per-object script: version field, incarnation field, and a
    fresh incarnation (one per operation run: each object is written once by it)."""
    return (VERSION_FIELD, INCARNATION_FIELD, secrets.token_hex(8))


@RedisOperations.implementation_for(AddField)
def add_field(operations: Operations, op: AddField) -> None:
    """Store the encoded default in every object that lacks the field."""
    run = _run(operations)
    with translate_errors(run.url):
        target = run.resolve(op.model)
        if op.default is None:
            col = target.column(op.name)
            if col is not None and col.codec is not None and not col.codec.nullable:
                raise MigrationError(
                    f"{op.summary()}: {target.name}.{op.name} is {col.codec.expected}, not "
                    f"Optional, so objects without it could not be loaded; give a default"
                )
            _report(run, op, "nothing to write (None is stored as an absent field)")
            return
        encoded = _encode_default(target, op.name, op.default)
        args = (op.name, encoded, *_bump_args())
        result = rewrite_by_script(run, target, op.summary(), _ADD_FIELD, args)
        deadlines.track(run, target, op.name)  # an ExpiresAt field: its bookkeeping too
    _report(run, op, _changed(result))


@RedisOperations.implementation_for(DropField)
def drop_field(operations: Operations, op: DropField) -> None:
    """Delete the field from every object holding it."""
    run = _run(operations)
    with translate_errors(run.url):
        target = run.resolve(op.model)
        args = (op.name, *_bump_args())
        result = rewrite_by_script(run, target, op.summary(), _DROP_FIELD, args)
        deadlines.untrack(run, target, op.name)  # it was the ExpiresAt field
    _report(run, op, _changed(result))


def _index_families(ks: keys.KeySpace, name: str) -> list[tuple[str, Callable[[str, str], str]]]:
    """(key prefix, builder) of each per-value index family of field `name`."""
    return [(build(name, ""), build) for build in (ks.index, ks.unique, ks.foreign, ks.word)]


def _index_moves(
    run: MigrationRun, target: Target, old: str, new: str
) -> Iterable[list[tuple[str, str]]]:
    """Batches of (key, renamed key) for the index keys of field `old`: the per-value
    families and the one-key indexes (sorted, ordered string, suffix), whose members
    do not name the field."""
    ks = target.keys
    families = _index_families(ks, old)
    singles = {build(old): build(new) for build in (ks.sorted, ks.lexical, ks.suffix)}
    common = os.path.commonprefix([p for p, _ in families] + list(singles))
    for batch in run.scan(common):
        moves = [(key, singles[key]) for key in batch if key in singles]
        for key in batch:
            for prefix, build in families:
                if key.startswith(prefix):
                    moves.append((key, build(new, key[len(prefix) :])))
        if moves:
            yield moves


@RedisOperations.implementation_for(RenameField)
def rename_field(operations: Operations, op: RenameField) -> None:
    """Move `old` to `new` where `old` exists, then rename the index keys of `old`."""
    run = _run(operations)
    with translate_errors(run.url):
        target = run.resolve(op.model)
        args = (op.old, op.new, *_bump_args())
        result = rewrite_by_script(run, target, op.summary(), _RENAME_FIELD, args)
        conflicts: list[str] = []
        moved = 0
        for moves in _index_moves(run, target, op.old, op.new):
            run.heartbeat()
            conflicts += move_keys(run, moves)
            moved += len(moves)
    if conflicts:
        raise MigrationError(
            f"{op.summary()}: {len(conflicts)} index keys could not be renamed because the "
            f"new name holds different data: {shown(conflicts)}"
        )
    _report(run, op, f"{_changed(result)}, {moved - len(conflicts)} index keys renamed")


# -- indexes -----------------------------------------------------------------------------


def _value_segment(raw: bytes | None) -> str:
    return keys.NULL_SEGMENT if raw is None else keys.escape(raw)


def _score(target: Target, name: str, codec: Codec, raw: bytes | None, segment: str) -> str:
    if raw is None:
        return "-inf"  # as persistence keeps None: first in ascending order
    try:
        return repr(codec.to_score(codec.decode(raw)))
    except (DecodeError, ValidationError) as exc:
        raise MigrationError(
            f"{target.name}.{name} of {target.show_id(segment)} cannot be kept in a sorted "
            f"index: {exc}"
        ) from None


def _sorted_codec(target: Target, name: str) -> Codec:
    col = target.column(name)
    if col is None or col.codec is None:
        raise MigrationError(
            f"a sorted index of {target.name}.{name} needs the field's type: map the model "
            f"with this field in the configured registry"
        )
    return col.codec


def _string_kind(target: Target, name: str, kind: IndexKind) -> dict[str, bool] | None:
    """Which string index (`orm.textindex`) `kind` is for this field, or None: "text",
    "suffix", or "sorted" on a field the registry maps as str/Enum."""
    if kind == "sorted":
        col = target.column(name)
        if col is None or not col.lexical:
            return None
    elif kind not in ("text", "suffix"):
        return None
    return {"lexical": kind == "sorted", "text": kind == "text", "suffix": kind == "suffix"}


def _string_keys(target: Target, name: str, kind: IndexKind) -> list[str]:
    """The single keys of a string index (word sets are found by prefix)."""
    if kind == "suffix":
        return [target.keys.suffix(name)]
    if _string_kind(target, name, kind) is not None and kind == "sorted":
        return [target.keys.lexical(name)]
    return []


def _add_entries(
    target: Target,
    name: str,
    kind: IndexKind,
    raw: bytes | None,
    segment: str,
    codec: Codec | None,
) -> Change:
    """The index commands (and unique claims) making the object findable by `raw`."""
    ks = target.keys
    strings = _string_kind(target, name, kind)
    if strings is not None:
        commands = index_commands(ks, name, raw=raw, segment=segment, add=True, **strings)
        return Change(commands, bump=False)
    if kind == "indexed":
        return Change([("SADD", ks.index(name, _value_segment(raw)), segment)], bump=False)
    if kind == "unique":  # as persistence: equality entries for every value, None included
        entry = ("SADD", ks.index(name, _value_segment(raw)), segment)
        if raw is None:
            return Change([entry], bump=False)
        unique = ks.unique(name, keys.escape(raw))
        return Change([entry, ("SET", unique, segment)], claims=[(unique, segment)], bump=False)
    assert codec is not None
    score = _score(target, name, codec, raw, segment)
    return Change([("ZADD", ks.sorted(name), score, segment)], bump=False)


def _remove_entries(
    target: Target, name: str, kind: IndexKind, raw: bytes | None, segment: str
) -> list[Command]:
    ks = target.keys
    strings = _string_kind(target, name, kind)
    if strings is not None:
        return index_commands(ks, name, raw=raw, segment=segment, add=False, **strings)
    if kind in ("indexed", "unique"):
        removals: list[Command] = [("SREM", ks.index(name, _value_segment(raw)), segment)]
        if kind == "unique" and raw is not None:
            removals.append(("DEL", ks.unique(name, keys.escape(raw))))
        return removals
    return []  # sorted: the new ZADD replaces the score


def _show_value(raw: bytes) -> str:
    return repr(raw.decode("utf-8", "backslashreplace"))


def _duplicates(run: MigrationRun, target: Target, name: str) -> dict[bytes, list[str]]:
    """Values of `name` held by more than one object (read only), with their id segments."""
    owners: dict[bytes, list[str]] = {}
    label = f"check {target.name}.{name} for duplicates"
    for segment, row in scan_rows(run, target, [name], label):
        raw = row.get(name)
        if raw is not None:
            held = owners.setdefault(raw, [])
            if segment not in held:  # SCAN may return a key twice
                held.append(segment)
    return {
        value: sorted(segs, key=lambda s: (len(s), s))  # int ids in numeric order
        for value, segs in owners.items()
        if len(segs) > 1
    }


def _duplicates_text(target: Target, name: str, dups: dict[bytes, list[str]]) -> str:
    items = [
        f"{_show_value(v)} held by {', '.join(target.show_id(s) for s in segs)}"
        for v, segs in dups.items()
    ]
    return f"{len(dups)} values of {target.name}.{name} are not unique: {shown(items)}"


@RedisOperations.implementation_for(CreateIndex)
def create_index(operations: Operations, op: CreateIndex) -> None:
    """Backfill the index from each object's stored value; unique first checks every value."""
    run = _run(operations)
    with translate_errors(run.url):
        target = run.resolve(op.model)
        lexical = _string_kind(target, op.field, op.kind) is not None
        codec = _sorted_codec(target, op.field) if op.kind == "sorted" and not lexical else None
        if op.kind == "unique":
            dups = _duplicates(run, target, op.field)
            if dups:
                raise MigrationError(
                    f"cannot create the unique index: {_duplicates_text(target, op.field, dups)}; "
                    f"nothing was written"
                )

        fields = [op.field, SOFT_FIELD, *_deadline_fields(target)]

        def plan(key: str, segment: str, row: Row) -> Change | None:
            change = _add_entries(target, op.field, op.kind, row.get(op.field), segment, codec)
            if row.get(SOFT_FIELD) is not None:
                # Soft-deleted: in no query index until restored (`Session.restore` puts
                # every entry back), but its unique value stays held.
                change.commands = [c for c in change.commands if c[0] == "SET"]
            # An object with a deadline: the sweep must find the new entries too.
            change.commands[:0] = _sweep_data(target, segment, row)
            return change if change.commands else None

        result = rewrite(run, target, op.summary(), plan, fields=list(dict.fromkeys(fields)))
    if result.taken:
        raise MigrationError(
            f"{op.summary()}: values taken by other objects since the check: "
            f"{shown([f'{k} (wanted by {v})' for k, v in result.taken.items()])}"
        )
    _report(run, op, f"{plural(result.visited, 'object')} indexed")


def _index_prefixes(target: Target, name: str, kind: IndexKind) -> list[str]:
    ks = target.keys
    if kind == "indexed":
        return [ks.index(name, "")]
    if kind == "unique":  # a unique field's equality sets belong to its unique index
        return [ks.unique(name, ""), ks.index(name, "")]
    if kind == "text":
        return [ks.word_prefix(name)]
    return []


@RedisOperations.implementation_for(DropIndex)
def drop_index(operations: Operations, op: DropIndex) -> None:
    """Delete the index keys of the field; objects are not touched."""
    run = _run(operations)
    deleted = 0
    with translate_errors(run.url):
        target = run.resolve(op.model)
        if op.kind == "sorted":
            deleted = delete_keys(run, [target.keys.sorted(op.field)])
        deleted += delete_keys(run, _string_keys(target, op.field, op.kind))
        for prefix in _index_prefixes(target, op.field, op.kind):
            for batch in run.scan(prefix):
                run.heartbeat()
                deleted += delete_keys(run, batch)
    _report(run, op, f"{plural(deleted, 'key')} deleted")


# -- models ------------------------------------------------------------------------------


@RedisOperations.implementation_for(RenameModel)
def rename_model(operations: Operations, op: RenameModel) -> None:
    """RENAME every key of the old keyspace to the new one; keys already moved are skipped.

    A sharded model's keys live under its registry's tag (the id counter) and under each
    shard's tag; every key keeps its tag, so each RENAME stays within one slot.
    """
    run = _run(operations)
    conflicts: list[str] = []
    moved = 0
    with translate_errors(run.url), run.messaging.progress(None, op.summary()) as progress:
        for old, new in _renamed_spaces(run, op):
            for batch in run.scan(old.object_prefix):
                run.heartbeat()
                # The same key under the other keyspace: only the keyspace part differs.
                moves = [(k, new.object_prefix + k[len(old.object_prefix) :]) for k in batch]
                conflicts += move_keys(run, moves, counters=[old.seq()])
                moved += len(moves)
                progress.advance(len(moves))
    if conflicts:
        raise MigrationError(
            f"{op.summary()}: {len(conflicts)} keys exist under both keyspaces with different "
            f"data and were left in place: {shown(conflicts)}"
        )
    _report(run, op, f"{plural(moved, 'key')} moved")


def _renamed_spaces(
    run: MigrationRun, op: RenameModel
) -> list[tuple[keys.KeySpace, keys.KeySpace]]:
    """(old, new) keyspaces to move: the registry's, then each shard's of a sharded model."""
    mapper = run.sharded_mapper(op.new_keyspace) or run.sharded_mapper(op.old_keyspace)
    shards: list[int | None] = [None] if mapper is None else [None, *range(mapper.shards)]
    return [
        (
            keys.KeySpace(run.prefix, op.old_keyspace, shard),
            keys.KeySpace(run.prefix, op.new_keyspace, shard),
        )
        for shard in shards
    ]


# Hash fields that are redmap's own, not the object's data: its version, its incarnation
# and its soft-delete mark.
_BOOKKEEPING = (VERSION_FIELD, INCARNATION_FIELD, SOFT_FIELD)


@RedisOperations.implementation_for(Transform)
def transform(operations: Operations, op: Transform) -> None:
    """Pass each object's raw fields through `op.fn`, keeping mapped indexes in step.

    On a model with deadlines: an object already gone (its ExpiresAt moment or its soft
    delete's grace period passed, by the client clock) is left to the sweep as it is; a
    soft-deleted one is transformed but stays out of the query indexes (its unique
    claims move with its values; `Session.restore` indexes the new values); and the
    deadline zset and sweep data follow the new values, so the sweep cleans what the
    object holds by then."""
    run = _run(operations)
    position = operations.position if isinstance(operations, RedisOperations) else 0
    with translate_errors(run.url):
        target = run.resolve(op.model)
        indexed = _indexed_columns(target)
        tracked = target.mapper is not None and target.mapper.expiry.tracked

        def plan(key: str, segment: str, row: Row) -> Change | None:
            soft = row.get(SOFT_FIELD)
            if tracked and _gone(target, row):
                return None  # gone for every API: the sweep purges it as it was
            # `#v`, `#i` and `#d` are redmap's own, never the function's: they are left as
            # they are (the apply script bumps `#v`; `#i` stays, it is the same object;
            # `#d` keeps a soft-deleted object deleted).
            old = {k: v for k, v in row.items() if k not in _BOOKKEEPING}
            given = dict(old)
            try:
                out = op.fn(given)
            except Exception as exc:
                raise MigrationError(
                    f"{op.summary()} failed on {target.name} {target.show_id(segment)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            new = _checked_fields(op, given if out is None else out)
            change = _diff(target, key, segment, old, new, indexed, deleted=soft is not None)
            if change is not None and tracked:
                _follow_deadline(change, target, key, segment, old, new, soft)
            return change

        result = rewrite(run, target, op.summary(), plan, position=position)
    if result.taken:
        raise MigrationError(
            f"{op.summary()}: unique values already taken, those objects were left as they "
            f"were: {shown([f'{k} (wanted by {v})' for k, v in result.taken.items()])}"
        )
    _report(run, op, _changed(result))


def _indexed_columns(target: Target) -> list[tuple[ColumnProperty, list[IndexKind]]]:
    if target.mapper is None:
        return []
    out = []
    for col in target.mapper.stored_columns():
        kinds = [k for k in INDEX_KINDS if k in col.index_kinds]
        if kinds:
            out.append((col, kinds))
    return out


def _checked_fields(op: Transform, fields: Any) -> dict[str, bytes]:
    if not isinstance(fields, dict):
        raise MigrationError(f"{op.summary()}: the function must return a dict or None")
    out: dict[str, bytes] = {}
    for name, value in fields.items():
        if not isinstance(name, str):
            raise MigrationError(f"{op.summary()}: field names must be str, not {name!r}")
        if name in _BOOKKEEPING:
            raise MigrationError(
                f"{op.summary()}: the function returned {name!r}, redmap's own version, "
                f"incarnation or soft-delete field; leave it out (redmap keeps it)"
            )
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes):
            raise MigrationError(
                f"{op.summary()}: {name} must be bytes or str, not {type(value).__name__}"
            )
        out[name] = value
    return out


def _diff(
    target: Target,
    key: str,
    segment: str,
    old: dict[str, bytes],
    new: dict[str, bytes],
    indexed: list[tuple[ColumnProperty, list[IndexKind]]],
    *,
    deleted: bool = False,
) -> Change | None:
    """The commands taking the object from `old` to `new`: index entries, then the hash.

    A soft-deleted object (`deleted`) is in no query index: only its unique claims move
    (the old value's released, the new one's claimed)."""
    sets = {name: value for name, value in new.items() if old.get(name) != value}
    dels = [name for name in old if name not in new]
    if not sets and not dels:
        return None
    change, additions = Change([]), []
    for col, kinds in indexed:
        before, after = old.get(col.key), new.get(col.key)
        if before == after:
            continue
        for kind in kinds:
            removals = _remove_entries(target, col.key, kind, before, segment)
            added = _add_entries(target, col.key, kind, after, segment, col.codec)
            if deleted:
                removals = [c for c in removals if c[0] == "DEL"]  # the unique claim
                added.commands = [c for c in added.commands if c[0] == "SET"]
            change.commands += removals
            additions += added.commands
            change.claims += added.claims
    links = _foreign_key_moves(target, segment, old, new)
    change.commands += [c for c in links if c[0] == "ZREM"]
    change.commands += additions
    change.commands += [c for c in links if c[0] == "ZADD"]
    if dels:
        change.commands.append(("HDEL", key, *map(field_bytes, dels)))
    if sets:
        pairs = [item for name, value in sets.items() for item in (field_bytes(name), value)]
        change.commands.append(("HSET", key, *pairs))
    return change


def _foreign_key_moves(
    target: Target, segment: str, old: dict[str, bytes], new: dict[str, bytes]
) -> list[Command]:
    """The parent's list of children follows a transformed foreign key (or the field
    ordering that list): the object leaves the old parent's zset and joins the new one's
    with the score a flush gives it. Soft-deleted objects too: a soft delete keeps its
    foreign-key entries, which a restore needs."""
    mapper = target.mapper
    if mapper is None:
        return []
    out: list[Command] = []
    for col in mapper.stored_columns():
        if col.foreign_key is None:
            continue
        before, after = old.get(col.key), new.get(col.key)
        order = col.order_column
        if before == after and (order is None or old.get(order) == new.get(order)):
            continue
        if before is not None:
            out.append(("ZREM", target.keys.foreign(col.key, keys.escape(before)), segment))
        if after is not None:
            score = _child_score(target, col, new.get(order) if order else None, segment)
            zset = target.keys.foreign(col.key, keys.escape(after))
            out.append(("ZADD", zset, score, segment))
    return out


def _child_score(target: Target, col: ColumnProperty, order: bytes | None, segment: str) -> str:
    """A child's score in its parent's zset, as the flush writes it (`fk_score`)."""
    mapper = target.mapper
    assert mapper is not None
    try:
        value = None
        if col.order_column is not None and order is not None:
            codec = mapper.columns[col.order_column].codec
            assert codec is not None
            value = codec.decode(order)
        return fk_score(mapper, col, value, mapper.pk_from_segment(segment))
    except (DecodeError, ValidationError) as exc:
        raise MigrationError(
            f"{target.name} {target.show_id(segment)}: its {col.order_column!r} orders the "
            f"children of {col.key!r} and cannot be scored ({exc}); fix the transform"
        ) from None


def _deadline_fields(target: Target) -> list[str]:
    """The fields `_sweep_data` reads: a tracked model's indexed fields and ExpiresAt."""
    mapper = target.mapper
    if mapper is None or not mapper.expiry.tracked:
        return []
    out = [c.key for c in mapper.indexed_columns]
    return out if mapper.expiry.expires is None else [*out, mapper.expiry.expires]


def _sweep_data(target: Target, segment: str, row: Row) -> list[Command]:
    """The sweep data of an object with a deadline, from its stored values (as a flush
    writes it, `expiry.sweep_keys`): none for an object without one."""
    mapper = target.mapper
    if mapper is None or not mapper.expiry.tracked or expiry.deadline_of(mapper, row) is None:
        return []
    encoded = {c.key: row.get(c.key) for c in mapper.indexed_columns}
    data = expiry.sweep_keys(mapper, target.keys, encoded)
    return [("HSET", target.keys.sweep_data(), segment, data)]


def _gone(target: Target, row: Row) -> bool:
    """Whether an object's stored deadline (ExpiresAt, or the end of its soft delete's
    grace period) has passed by the client clock."""
    assert target.mapper is not None
    deadline = expiry.deadline_of(target.mapper, row)
    return deadline is not None and deadline <= expiry.now_ms()


def _follow_deadline(
    change: Change,
    target: Target,
    key: str,
    segment: str,
    old: dict[str, bytes],
    new: dict[str, bytes],
    soft: bytes | None,
) -> None:
    """Keep the deadline zset and the sweep data of a transformed object in step with
    its new values, as a flush would (`expiry.track`): a moved deadline moves in `#dl`
    and on the hash's expiry, and the sweep data lists the new values' index keys."""
    mapper = target.mapper
    assert mapper is not None
    ks = target.keys
    marks = {} if soft is None else {SOFT_FIELD: soft}
    before = expiry.deadline_of(mapper, {**old, **marks})
    after = expiry.deadline_of(mapper, {**new, **marks})
    cols = [c.key for c in mapper.indexed_columns]
    if after is None:
        if before is not None:
            untrack = [("ZREM", ks.deadlines(), segment), ("HDEL", ks.sweep_data(), segment)]
            change.commands[:0] = untrack
            change.commands.append(("PERSIST", key))
        return
    if after == before and all(old.get(c) == new.get(c) for c in cols):
        return
    data = expiry.sweep_keys(mapper, ks, {c: new.get(c) for c in cols})
    # Before the hash's own writes (which cannot fail), like the index commands.
    change.commands[:0] = [
        ("ZADD", ks.deadlines(), after, segment),
        ("HSET", ks.sweep_data(), segment, data),
    ]
    if after != before:
        change.commands.append(("PEXPIREAT", key, after + expiry.MARGIN_MS))


@RedisOperations.implementation_for(Execute)
def execute(operations: Operations, op: Execute) -> None:
    """Call the function with the raw client."""
    run = _run(operations)
    with translate_errors(run.url):
        op.fn(run.client)
    _report(run, op, "done")


# -- dry runs ----------------------------------------------------------------------------


_MODEL_OPS = (AddField, DropField, RenameField, CreateIndex, DropIndex, Transform)


def _count(run: MigrationRun, target: Target, name: str) -> tuple[int, int]:
    """(objects holding field `name`, objects seen); reads only."""
    seen = holding = 0
    for _, row in scan_rows(run, target, [name]):
        seen += 1
        holding += name in row
    return holding, seen


def _count_keys(batches: Iterable[Sized]) -> int:
    return sum(len(b) for b in batches)


def estimate(run: MigrationRun, op: RedisOperation) -> str:
    """What `op` would change on the database as it is now, with counts; reads only."""
    with translate_errors(run.url):
        if isinstance(op, RenameModel):
            spaces = _renamed_spaces(run, op)
            found = sum(_count_keys(run.scan(old.object_prefix)) for old, _ in spaces)
            return f"would move {plural(found, 'key')}"
        if isinstance(op, Execute):
            return "would call the function (not measured)"
        if not isinstance(op, _MODEL_OPS):
            return "not measured"
        target = run.resolve(op.model)
        if isinstance(op, AddField):
            if op.default is None:
                return "nothing to write (None is stored as an absent field)"
            n, seen = _count(run, target, op.name)
            return f"would set {op.name} on {seen - n} of {seen} objects"
        if isinstance(op, DropField):
            n, seen = _count(run, target, op.name)
            return f"would delete {op.name} from {n} of {seen} objects"
        if isinstance(op, RenameField):
            n, seen = _count(run, target, op.old)
            index_keys = _count_keys(_index_moves(run, target, op.old, op.new))
            return (
                f"would move {op.old} in {n} of {seen} objects and rename {index_keys} index keys"
            )
        if isinstance(op, CreateIndex):
            if op.kind == "unique":
                dups = _duplicates(run, target, op.field)
                if dups:
                    return f"would FAIL: {_duplicates_text(target, op.field, dups)}"
            return f"would index {_count(run, target, op.field)[1]} objects"
        if isinstance(op, DropIndex):
            if op.kind in ("sorted", "suffix"):
                single = [target.keys.sorted(op.field), *_string_keys(target, op.field, op.kind)]
                found = int(run.client.exists(*single))
            else:
                prefixes = _index_prefixes(target, op.field, op.kind)
                found = sum(_count_keys(run.scan(p)) for p in prefixes)
            return f"would delete {plural(found, 'key')}"
        return f"would pass {_count(run, target, VERSION_FIELD)[1]} objects through the function"
