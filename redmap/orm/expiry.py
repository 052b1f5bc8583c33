"""Objects with a deadline: `ExpiresAt`, `__ttl__`, soft delete, timestamps; no I/O.

What "now" is. Every decision about whether an object is gone (loading, queries, counts,
relationship lists, a unique value taken over, an update refused, the sweep) compares its
deadline with one clock: the client's, `now_ms()`, which tests replace (`use_clock`).
Redis's own expiry of the object hash (`PEXPIREAT`) only gives memory back: it is set
`MARGIN_MS` after the deadline, so a server clock running ahead of the clients' by less
than that never removes a hash the clients still hold for alive (docs/expiry.md argues
the choice against reading the server's `TIME`).

What is kept per model (per shard): the deadline zset `#dl` (id -> deadline in ms), which
queries subtract server-side before paging and the sweep walks without a SCAN, and the
sweep data `#dv` (id -> the index, unique and foreign-key keys holding the id), which lets
the sweep clean those keys after Redis has dropped the hash itself.

The flush keeps both (`plan_insert`, `plan_update`, `plan_delete`, called from
`persistence.plan_flush`), stamps `CreatedAt`/`UpdatedAt` and the `__ttl__` default
(`stamp`, called by the unit of work), and may carry a bounded sweep
(`redmap.orm.sweep.piggyback`). The sweep itself is `redmap.orm.sweep`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..commands import Command
from ..exc import StaleDataError, ValidationError
from . import keys
from .keys import KeySpace
from .mapper import INCARNATION_FIELD, VERSION_FIELD
from .relationships import Direction
from .textindex import index_commands

if TYPE_CHECKING:
    from .mapper import ColumnProperty, Mapper
    from .state import InstanceState

__all__ = [
    "MARGIN_MS",
    "PIGGYBACK_LIMIT",
    "SOFT_FIELD",
    "SWEEP_BATCH",
    "deadline_of",
    "gone",
    "loose_child",
    "now_ms",
    "release_soft_child",
    "set_clock",
    "stamp",
    "use_clock",
    "version_of",
]

# Redis removes an object hash this long after its deadline (clock skew allowance).
MARGIN_MS = 60_000
# How many expired ids of each model a flush sweeps on the side (same MULTI).
PIGGYBACK_LIMIT = 16
# How many ids one sweep invocation purges (each invocation is one atomic script).
SWEEP_BATCH = 500
# Hash field of a soft-deleted object: when it was deleted (ms), the token its
# cascade shares.
SOFT_FIELD = "#d"
# The same as a fetched hash's key (bytes), for the readers of raw hashes.
SOFT_FIELD_BYTES = SOFT_FIELD.encode()

_clock: Callable[[], float] = time.time


def now_ms() -> int:
    """The current moment in ms since the epoch, by the (replaceable) client clock."""
    return int(_clock() * 1000)


def now_datetime() -> datetime:
    """`now_ms()` as an aware UTC datetime (what CreatedAt/UpdatedAt receive)."""
    return datetime.fromtimestamp(now_ms() / 1000, timezone.utc)


def set_clock(clock: Callable[[], float] | None) -> None:
    """Replace the clock (seconds since the epoch, like `time.time`); None restores it."""
    global _clock
    _clock = time.time if clock is None else clock


@contextlib.contextmanager
def use_clock(clock: Callable[[], float]) -> Iterator[None]:
    """Run a block under another clock (tests: a clock they move by hand)."""
    before = _clock
    set_clock(clock)
    try:
        yield
    finally:
        set_clock(before)


def to_ms(value: datetime, *, model: str, field: str) -> int:
    """An aware datetime as ms since the epoch; a naive one is refused (its moment is
    ambiguous, and every client must agree on when the object is gone)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(
            model=model,
            field=field,
            expected="an aware datetime (with tzinfo, e.g. datetime.now(timezone.utc))",
            actual="a naive datetime",
            detail="an expiry moment must be unambiguous",
        )
    return int(value.timestamp() * 1000)


@functools.lru_cache(maxsize=4096)
def _decode_ms(raw: bytes) -> int | None:
    try:
        value = datetime.fromisoformat(raw.decode())
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)  # written by another program: read as UTC
    return int(value.timestamp() * 1000)


def decode_deadline(raw: bytes) -> int | None:
    """A stored ExpiresAt value as ms since the epoch (None if it is not a datetime)."""
    return _decode_ms(raw)


def deadline_of(mapper: Mapper[Any], loaded: Mapping[str, bytes | None]) -> int | None:
    """The deadline (ms) an object's stored fields give: its ExpiresAt moment, or the end
    of its soft delete's grace period, whichever comes first; None: none."""
    info = mapper.expiry
    out: int | None = None
    if info.expires is not None:
        raw = loaded.get(info.expires)
        if raw is not None:
            out = _decode_ms(raw)
    soft = loaded.get(SOFT_FIELD)
    if soft is not None and info.soft_delete_ms is not None:
        purge = int(soft) + info.soft_delete_ms
        out = purge if out is None else min(out, purge)
    return out


def gone(st: InstanceState, now: int | None = None) -> bool:
    """Whether a loaded object is gone for reads: its ExpiresAt moment has passed (what
    Redis holds, not a pending assignment), or it is soft-deleted (read with
    `include_deleted=True`: `get_many`, relationship lists and references still hide it,
    as they would have had they read it themselves)."""
    if st.soft_deleted:
        return True
    info = st.mapper.expiry
    if info.expires is None:
        return False
    raw = st.loaded.get(info.expires)
    if raw is None:
        return False
    ms = _decode_ms(raw)
    return ms is not None and ms <= (now_ms() if now is None else now)


def hidden(mapper: Mapper[Any], data: Mapping[bytes, bytes], now: int, *, deleted: bool) -> bool:
    """Whether a fetched hash stands for no object: expired, or soft-deleted (unless
    `deleted`, `get(..., include_deleted=True)`)."""
    info = mapper.expiry
    if info.expires is not None:
        raw = data.get(info.expires.encode())
        if raw is not None:
            ms = _decode_ms(raw)
            if ms is not None and ms <= now:
                return True
    if info.soft_delete_ms is not None:
        soft = data.get(SOFT_FIELD_BYTES)
        if soft is not None:
            # Past its grace period a soft-deleted object is gone like an expired one.
            return not deleted or (soft.isdigit() and int(soft) + info.soft_delete_ms <= now)
    return False


def soft_deleted_message(st: InstanceState, what: Literal["change", "delete"]) -> str:
    """Why a soft-deleted object (read with `include_deleted=True`) cannot be changed or
    deleted, and what to do instead. A write would put it back in the query indexes
    while reads still hide it; deleting it again would restart its grace period under a
    new `#d`, so that its restore no longer found the children its cascade took along."""
    name = st.mapper.name
    ident = f"{name}({st.pk!r})"
    if what == "delete":
        return (
            f"cannot delete {ident}: it is already soft-deleted (read with "
            f"include_deleted=True); restore it with session.restore({name}, {st.pk!r}), "
            f"or let its grace period end, when the sweep purges it"
        )
    return (
        f"cannot change {ident}: it is soft-deleted (read with include_deleted=True), and "
        f"reads hide it until it is restored; drop the change (session.rollback() or "
        f"session.expire(obj)), restore it with session.restore({name}, {st.pk!r}), then "
        f"change it; nothing was written"
    )


# -- the flush ------------------------------------------------------------------------


def stamp(st: InstanceState, *, insert: bool, now: datetime) -> bool:
    """Set CreatedAt / UpdatedAt / the `__ttl__` default on an object about to be written
    (straight into its `__dict__`: a flush value, not a user assignment). True when an
    attribute was set (an update must then collect its changes again)."""
    info = st.mapper.expiry
    d = st.obj.__dict__
    changed = False
    if insert:
        if info.created is not None and d.get(info.created) is None:
            d[info.created] = now
            changed = True
        if info.ttl_ms is not None and info.expires is not None and d.get(info.expires) is None:
            d[info.expires] = now + timedelta(milliseconds=info.ttl_ms)
            changed = True
    if info.updated is not None:
        d[info.updated] = now
        if not insert:
            st.modified.add(info.updated)
            if st.session is not None:
                st.session.identity_map.modified.add(st)
        changed = True
    return changed


class _Builder(Protocol):
    """What `persistence._Builder` offers the expiry planning."""

    removals: list[Command]
    additions: list[Command]

    def expect_type(self, key: str, kind: str) -> None: ...

    def remove_query_entries(
        self,
        ks: KeySpace,
        col: ColumnProperty,
        old: bytes | None,
        segment: str,
        *,
        replaced: bool = False,
    ) -> None: ...


def sweep_keys(mapper: Mapper[Any], ks: KeySpace, encoded: Mapping[str, bytes | None]) -> bytes:
    """The keys the sweep must take the id out of once its deadline passes (besides the
    id zset and the Sorted zsets, which it knows by name), "\\n"-joined: keys never hold a
    newline (escaped segments)."""
    out: list[str] = []
    for col in mapper.indexed_columns:
        enc = encoded.get(col.key)
        if col.indexed or col.unique:
            vseg = keys.NULL_SEGMENT if enc is None else keys.escape(enc)
            out.append(ks.index(col.key, vseg))
        if col.has_string_index:
            # Word sets hold the id (a key line). An ordered or suffix zset holds a member
            # made of the value, then the id, which the sweep cannot rebuild once Redis
            # dropped the hash: "key <member without its id, in hex>" (keys hold no space,
            # hex no newline); the sweep appends the id.
            for cmd in index_commands(
                ks, col.key, lexical=col.lexical, suffix=col.suffix, text=col.text,
                raw=enc, segment="", add=False,
            ):  # fmt: skip
                if cmd[0] == "ZREM":
                    out.append(f"{cmd[1]} {str(cmd[2]).encode().hex()}")
                else:
                    out.append(cmd[1])
        if enc is None:
            continue
        if col.unique:
            out.append(ks.unique(col.key, keys.escape(enc)))
        if col.foreign_key is not None:
            out.append(ks.foreign(col.key, keys.escape(enc)))
    return "\n".join(out).encode()


def _value_deadline(mapper: Mapper[Any], value: Any) -> int | None:
    if value is None:
        return None
    field = mapper.expiry.expires or "?"
    return to_ms(value, model=mapper.name, field=field)


def track(b: _Builder, ks: KeySpace, key: str, segment: str, deadline: int, data: bytes) -> None:
    b.expect_type(ks.deadlines(), "zset")
    b.expect_type(ks.sweep_data(), "hash")
    b.additions.append(("PEXPIREAT", key, deadline + MARGIN_MS))
    b.additions.append(("ZADD", ks.deadlines(), deadline, segment))
    # Lower-case on purpose: `bind_placeholders` rewrites the field (a placeholder id
    # segment) only in commands other than "HSET", whose fields it skips for speed.
    b.additions.append(("hset", ks.sweep_data(), segment, data))


def _untrack(b: _Builder, ks: KeySpace, key: str | None, segment: str) -> None:
    b.expect_type(ks.deadlines(), "zset")
    b.expect_type(ks.sweep_data(), "hash")
    if key is not None:
        b.additions.append(("PERSIST", key))
    b.removals.append(("ZREM", ks.deadlines(), segment))
    b.removals.append(("HDEL", ks.sweep_data(), segment))


def plan_insert(
    b: _Builder,
    mapper: Mapper[Any],
    ks: KeySpace,
    key: str,
    segment: str,
    values: Mapping[str, Any],
    encoded: Mapping[str, bytes | None],
) -> None:
    """A new object with an ExpiresAt moment: its hash expires (with the margin), its id
    joins the deadline zset, its index keys the sweep data."""
    info = mapper.expiry
    if info.expires is None:
        return
    deadline = _value_deadline(mapper, values.get(info.expires))
    if deadline is not None:
        track(b, ks, key, segment, deadline, sweep_keys(mapper, ks, encoded))


def plan_update(
    b: _Builder,
    st: InstanceState,
    ks: KeySpace,
    key: str,
    segment: str,
    changes: Mapping[str, tuple[Any, bytes | None]],
    now: int,
) -> None:
    """An update of a tracked object: refused once it expired (it is gone: a session
    that loaded it before must not bring it back); the deadline moves or is cancelled
    with the field; the sweep data follows its index values."""
    mapper = st.mapper
    info = mapper.expiry
    if info.expires is None:
        return
    if gone(st, now):
        raise StaleDataError(
            f"{mapper.name}({st.pk!r}) expired since it was loaded; nothing was written",
            objects=[st.obj],
            keys=[key],
        )
    old = deadline_of(mapper, {info.expires: st.loaded.get(info.expires)})
    merged = dict(st.loaded)
    for name, (_, enc) in changes.items():
        merged[name] = enc
    if info.expires in changes:
        new = _value_deadline(mapper, changes[info.expires][0])
        if new is None:
            if old is not None:
                _untrack(b, ks, key, segment)
            return
        track(b, ks, key, segment, new, sweep_keys(mapper, ks, merged))
        return
    if old is not None and any(mapper.columns[n].has_index for n in changes):
        b.additions.append(("hset", ks.sweep_data(), segment, sweep_keys(mapper, ks, merged)))


def plan_delete(b: _Builder, st: InstanceState, ks: KeySpace, segment: str) -> None:
    """A deleted object leaves the deadline zset and the sweep data (the hash goes with
    the delete's DEL)."""
    if deadline_of(st.mapper, st.loaded) is not None:
        _untrack(b, ks, None, segment)


def cascade_children(mapper: Mapper[Any]) -> list[Any]:
    """The one-to-many relationships whose children a soft delete takes along."""
    return [
        p
        for p in mapper.relationships.values()
        if p.direction is Direction.ONETOMANY and "delete" in p.cascade
    ]


def plan_soft_delete(
    b: _Builder,
    st: InstanceState,
    ks: KeySpace,
    key: str,
    segment: str,
    now: int,
    incarnation: bytes,
) -> None:
    """The writes of a soft delete (after the version check `plan_flush` adds)."""
    mapper = st.mapper
    info = mapper.expiry
    assert info.soft_delete_ms is not None
    b.expect_type(ks.all(), "zset")
    b.removals.append(("ZREM", ks.all(), segment))
    for col in mapper.indexed_columns:
        b.remove_query_entries(ks, col, st.loaded.get(col.key), segment)
    fields: list[Any] = [SOFT_FIELD, str(now), VERSION_FIELD, str((st.version or 0) + 1)]
    if st.version is None:
        fields.extend((INCARNATION_FIELD, incarnation))
    b.additions.append(("HSET", key, *fields))
    deadline = deadline_of(mapper, {**st.loaded, SOFT_FIELD: str(now).encode()})
    assert deadline is not None
    track(b, ks, key, segment, deadline, sweep_keys(mapper, ks, st.loaded))


def loose_child(
    child: Mapper[Any], fk: str, data: Mapping[bytes, bytes], now: int
) -> bool:
    """Whether a fetched child hash is a soft-deleted object still restorable at `now`
    that holds a foreign key in `fk`: what a parent gone for good must release itself
    (queries and relationship lists leave such children out)."""
    if not data or SOFT_FIELD_BYTES not in data or child.expiry.soft_delete_ms is None:
        return False
    if data.get(fk.encode()) is None:
        return False
    deadline = deadline_of(child, {k.decode(): v for k, v in data.items()})
    return deadline is not None and deadline > now


def version_of(data: Mapping[bytes, bytes]) -> tuple[int | None, bytes | None]:
    """The (`#v`, `#i`) of a fetched hash, as a version check expects them."""
    raw = data.get(VERSION_FIELD.encode())
    version = int(raw) if raw is not None and raw.isdigit() else None
    return version, data.get(INCARNATION_FIELD.encode())


def release_soft_child(
    child: Mapper[Any],
    ks: KeySpace,
    key: str,
    segment: str,
    data: Mapping[bytes, bytes],
    fk: str,
    *,
    end: bool,
    now: int,
) -> tuple[list[Command], list[str]]:
    """The writes that release a soft-deleted child (`loose_child`) from a parent gone
    for good, to send after a version check of `key` against `version_of(data)`.

    Without `end` (no delete cascade) the child is detached: its foreign key goes (HDEL:
    None), it leaves the parent's children zset, and its sweep data no longer lists that
    zset; it stays soft-deleted and restorable, and comes back with no parent. With `end`
    (the relationship cascades delete) its grace period ends at `now`: `#d` moves back so
    that the hash, `#dl` and a restore all agree the object is gone, and the sweep purges
    it with every index, unique and link entry (in the same run, when the sweep itself
    ends it); an optional foreign key is cleared too, so nothing names the parent until
    then. Both bump `#v`, so a restore or update planned before fails its check.
    Returns the writes and the unique claims they release (a `Unique` foreign key): the
    caller watches each and checks that it still names the child."""
    version, _ = version_of(data)
    fields: list[Any] = [VERSION_FIELD, str((version or 0) + 1)]
    writes: list[Command] = []
    info = child.expiry
    assert info.soft_delete_ms is not None
    if end:
        fields.extend((SOFT_FIELD, str(now - info.soft_delete_ms)))
        writes.append(("ZADD", ks.deadlines(), now, segment))
        writes.append(("PEXPIREAT", key, now + MARGIN_MS))
    writes.insert(0, ("HSET", key, *fields))
    old = data.get(fk.encode())
    if old is None or (end and child.columns[fk].required):
        return writes, []
    writes.append(("HDEL", key, fk))
    writes.append(("ZREM", ks.foreign(fk, keys.escape(old)), segment))
    held: list[str] = []
    if child.columns[fk].unique:
        held.append(ks.unique(fk, keys.escape(old)))
        writes.append(("DEL", held[0]))
    loaded = {k.decode(): v for k, v in data.items() if k.decode() != fk}
    writes.append(("HSET", ks.sweep_data(), segment, sweep_keys(child, ks, loaded)))
    return writes, held


def takeover(mapper: Mapper[Any], ks: KeySpace, now: int) -> tuple[str, int] | None:
    """For a unique claim of `mapper`: where a holder's deadline is read and the moment it
    is compared with (None: the model has no deadlines, a holder always wins)."""
    if not mapper.expiry.tracked:
        return None
    return ks.deadlines(), now


def expect_deadlines(
    mapper: Mapper[Any],
    objs: Mapping[str, tuple[Any, Mapping[str, Any]]],
    expected: dict[str, Any],
    hints: dict[str, str],
) -> list[str]:
    """For `redmap audit`: what each deadline zset of `mapper` must hold given its
    objects (id -> deadline in ms), added to `expected`; returns the sweep-data keys,
    which the objects with a deadline explain (their content is the sweep's to read)."""
    info = mapper.expiry
    explained: list[str] = []
    for seg, (pk, values) in objs.items():
        ks = mapper.keys_for_pk(pk)
        soft = values.get(SOFT_FIELD)
        if soft is not None:
            _expect_soft_deleted(mapper, ks, seg, pk, values, expected, hints)
        deadlines: list[int] = []
        value = values.get(info.expires) if info.expires is not None else None
        if isinstance(value, datetime):
            deadlines.append(int(value.timestamp() * 1000))
        if soft is not None and info.soft_delete_ms is not None:
            deadlines.append(int(soft) + info.soft_delete_ms)
        if not deadlines:
            continue
        key = ks.deadlines()
        expected.setdefault(key, {})[seg] = float(min(deadlines))
        hints[key] = (
            f"ZADD {key} <deadline in ms> <id> for each object with a deadline, ZREM the "
            f"others (or run `redmap sweep` if their objects are gone)"
        )
        explained.append(ks.sweep_data())
    return explained


def _expect_soft_deleted(
    mapper: Mapper[Any],
    ks: KeySpace,
    seg: str,
    pk: Any,
    values: Mapping[str, Any],
    expected: dict[str, Any],
    hints: dict[str, str],
) -> None:
    """A soft-deleted object keeps its unique claims and its foreign-key entries (and its
    links, which the audit checks from the link zsets); it is in no query index."""
    for col in mapper.indexed_columns:
        value = values.get(col.key)
        if value is None or col.codec is None:
            continue
        vseg = keys.escape(col.codec.encode(value))
        if col.unique:
            key = ks.unique(col.key, vseg)
            expected.setdefault(key, seg)
            hints[key] = f"SET {key} {seg} (a soft-deleted object keeps its unique values)"
        if col.foreign_key is not None:
            key = ks.foreign(col.key, vseg)
            order = col.order_column
            if order is not None:
                ocol = mapper.columns[order]
                ovalue = values.get(order)
                assert ocol.codec is not None
                score = float("-inf") if ovalue is None else ocol.codec.to_score(ovalue)
            else:
                score = float(pk) if isinstance(pk, int) else 0.0
            expected.setdefault(key, {})[seg] = score
            hints[key] = f"ZADD {key} <score> {seg} (its children, soft-deleted ones too)"
