"""`Session.restore`: bringing soft-deleted objects back; no I/O.

A soft delete (`__soft_delete__ = timedelta(...)`) is a flush write, planned by
`expiry.plan_soft_delete` for `persistence.plan_flush`: the object
leaves its query indexes (the id zset, its `Indexed`/`Unique` equality sets, its `Sorted`
zsets), so every query and count stops seeing it at once, while its hash, its `Unique`
claims, its foreign-key entries and its many-to-many links stay. The hash gets `#d`
(the moment of the delete, shared by everything one flush soft-deletes, which is how a
restore recognises the children a cascade took along) and a new version; the id joins
the deadline zset at the end of the grace period, so the sweep purges it then like an
expired object. Loading treats a hash with `#d` as absent (`expiry.hidden`), so `get`
and relationship lists hide it too, unless `get(..., include_deleted=True)`.

`restore_steps` reads the object (and its cascade's children, recursively, by their
foreign-key zsets), then commits one flush plan that puts back every index entry and
removes `#d`, checked against the versions it read: all of it or nothing.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from ..commands import Command, Flush, Read, Steps
from ..exc import NoResultFound
from . import expiry, keys
from .flushplan import TOKEN_TTL_MS, Check, FlushPlan
from .keys import KeySpace
from .mapper import INCARNATION_FIELD, VERSION_FIELD, Mapper, mapper_of
from .persistence import InsertTask, _all_score, _score
from .textindex import index_commands

__all__ = ["PlanJob", "restore_steps"]


# -- restore ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Found:
    mapper: Mapper[Any]
    pk: Any
    ks: KeySpace
    segment: str
    key: str
    data: dict[bytes, bytes]


@dataclasses.dataclass
class PlanJob:
    """A `FlushJob` (flushprotocol) of a ready plan: no inserts, no ids (a restore; the
    sweep's release of soft-deleted children)."""

    the_plan: FlushPlan
    inserts: list[InsertTask] = dataclasses.field(default_factory=list)

    def ids_first(self) -> bool:
        return False

    @property
    def size(self) -> int:
        return len(self.the_plan.checks)

    @property
    def has_increments(self) -> bool:
        return False

    def plan(self) -> FlushPlan:
        return self.the_plan


def _hidden_reason(mapper: Mapper[Any], data: dict[bytes, bytes], now: int) -> str | None:
    if not data:
        return "there is none"
    if expiry.SOFT_FIELD_BYTES not in data:
        return "it is not deleted"
    loaded = {k.decode(): v for k, v in data.items()}
    deadline = expiry.deadline_of(mapper, loaded)
    if deadline is not None and deadline <= now:
        return "its grace period ended (or it expired), so it is purged"
    return None


def restore_steps(mapper: Mapper[Any], pk: Any) -> Steps[list[tuple[Mapper[Any], Any]]]:
    """Bring back a soft-deleted object and the children its delete cascade soft-deleted
    with it, atomically; returns the (mapper, pk) of everything restored.
    NoResultFound when there is no restorable object."""
    mapper.validate_pk(pk)
    now = expiry.now_ms()
    key = mapper.object_key(pk)
    (data,) = yield Read([("HGETALL", key)])
    reason = _hidden_reason(mapper, data, now)
    if reason is not None:
        raise NoResultFound(
            f"no soft-deleted {mapper.name} with primary key {pk!r} to restore: {reason}"
        )
    ks = mapper.keys_for_pk(pk)
    root = _Found(mapper, pk, ks, mapper.pk_segment(pk), key, data)
    token = data[expiry.SOFT_FIELD_BYTES]
    found = [root]
    frontier = [root]
    while frontier:
        # The children each cascade soft-deleted in the same flush (same `#d`).
        asks: list[tuple[Mapper[Any], str]] = []
        for parent in frontier:
            for prop in expiry.cascade_children(parent.mapper):
                child = mapper_of(prop.target)
                for cks in child.all_keyspaces():
                    asks.append((child, cks.foreign(prop.fk_column, parent.segment)))
        frontier = []
        if not asks:
            break
        members = yield Read([("ZRANGE", k, 0, -1) for _, k in asks])
        wanted: list[tuple[Mapper[Any], Any]] = []
        for (child, _), ids in zip(asks, members, strict=True):
            if isinstance(ids, Exception):
                continue
            wanted.extend((child, child.pk_from_segment(m)) for m in ids)
        if not wanted:
            break
        child_keys = [m.object_key(p) for m, p in wanted]
        hashes = yield Read([("HGETALL", k) for k in child_keys])
        for (child, cpk), ckey, cdata in zip(wanted, child_keys, hashes, strict=True):
            if (
                isinstance(cdata, Exception)
                or not cdata
                or cdata.get(expiry.SOFT_FIELD_BYTES) != token
            ):
                continue
            f = _Found(
                child, cpk, child.keys_for_pk(cpk), child.pk_segment(cpk), ckey, cdata
            )
            found.append(f)
            frontier.append(f)
    plan = _restore_plan(found, now)
    yield Flush(PlanJob(plan))
    return [(f.mapper, f.pk) for f in found]


def _restore_plan(found: list[_Found], now: int) -> FlushPlan:
    token_key = keys.flush_token_key(found[0].ks.tag, uuid.uuid4().hex)
    watch: dict[str, None] = {}
    checks: list[Check] = []
    writes: list[Command] = []
    for f in found:
        mapper = f.mapper
        watch[f.key] = None
        version, incarnation = expiry.version_of(f.data)
        checks.append(
            Check(
                "version",
                f.key,
                ("HMGET", f.key, VERSION_FIELD, INCARNATION_FIELD),
                expected=(version, incarnation),
                value=f"{mapper.name}({f.pk!r})",
            )
        )
        loaded = {k.decode(): v for k, v in f.data.items()}
        writes.append(("HDEL", f.key, expiry.SOFT_FIELD))
        writes.append(("HSET", f.key, VERSION_FIELD, str((version or 0) + 1)))
        writes.append(("ZADD", f.ks.all(), _all_score(mapper, f.pk), f.segment))
        for col in mapper.indexed_columns:
            enc = loaded.get(col.key)
            if col.indexed or col.unique:
                vseg = keys.NULL_SEGMENT if enc is None else keys.escape(enc)
                writes.append(("SADD", f.ks.index(col.key, vseg), f.segment))
            if col.sorted:
                assert col.codec is not None
                score = "-inf" if enc is None else _score(mapper, col, col.codec.decode(enc))
                writes.append(("ZADD", f.ks.sorted(col.key), score, f.segment))
            if col.has_string_index:
                writes.extend(
                    index_commands(
                        f.ks, col.key, lexical=col.lexical, suffix=col.suffix, text=col.text,
                        raw=enc, segment=f.segment, add=True,
                    )
                )  # fmt: skip
        loaded.pop(expiry.SOFT_FIELD, None)
        own = expiry.deadline_of(mapper, loaded)
        if own is None:
            writes.extend(
                [
                    ("PERSIST", f.key),
                    ("ZREM", f.ks.deadlines(), f.segment),
                    ("HDEL", f.ks.sweep_data(), f.segment),
                ]
            )
        else:
            writes.extend(
                [
                    ("PEXPIREAT", f.key, own + expiry.MARGIN_MS),
                    ("ZADD", f.ks.deadlines(), own, f.segment),
                ]
            )
    watch[token_key] = None
    writes.append(("SET", token_key, b"applied", "PX", TOKEN_TTL_MS))
    return FlushPlan(
        token_key=token_key,
        token_ttl_ms=TOKEN_TTL_MS,
        watch=list(watch),
        checks=checks,
        writes=writes,
        states=[],
    )
