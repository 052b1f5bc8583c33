"""Objects with a deadline: `ExpiresAt`, `__ttl__`, soft delete, and the sweep; no I/O.

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
(`stamp`, called by the unit of work), and may carry a bounded sweep (`piggyback`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

from ..commands import Command, Read, Steps
from ..exc import RedmapError, StaleDataError, ValidationError
from . import keys
from .keys import KeySpace
from .mapper import INCARNATION_FIELD, VERSION_FIELD, mapper_of
from .relationships import Direction
from .textindex import index_commands

if TYPE_CHECKING:
    from .mapper import ColumnProperty, Mapper
    from .state import InstanceState

__all__ = [
    "MARGIN_MS",
    "PIGGYBACK_LIMIT",
    "SOFT_FIELD",
    "FINISH_SCRIPT",
    "SWEEP_BATCH",
    "SWEEP_SCRIPT",
    "SWEEP_SHA",
    "deadline_of",
    "gone",
    "now_ms",
    "piggyback",
    "registry_mappers",
    "set_clock",
    "stamp",
    "child_relationships",
    "detach_children",
    "far_links",
    "finish_steps",
    "sweep_all_steps",
    "sweep_steps",
    "use_clock",
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
    """Whether a loaded object's ExpiresAt moment has passed (what Redis holds, not a
    pending assignment)."""
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
        soft = data.get(_SOFT)
        if soft is not None:
            # Past its grace period a soft-deleted object is gone like an expired one.
            return not deleted or (soft.isdigit() and int(soft) + info.soft_delete_ms <= now)
    return False


_SOFT = SOFT_FIELD.encode()


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


def takeover(mapper: Mapper[Any], ks: KeySpace, now: int) -> tuple[str, int] | None:
    """For a unique claim of `mapper`: where a holder's deadline is read and the moment it
    is compared with (None: the model has no deadlines, a holder always wins)."""
    if not mapper.expiry.tracked:
        return None
    return ks.deadlines(), now


# -- the sweep ------------------------------------------------------------------------

# The deadline-zset score of an id the sweep purged whose many-to-many links under
# other hash tags are still to be removed (`FINISH_SCRIPT`): below every real deadline,
# so the id stays gone for every read and unswept for inserts, and a flush's bounded
# sweep passes over it ("(-inf" as its lower bound) while `Engine.sweep` comes back to it.
WAITING = "-inf"

SWEEP_SCRIPT = r"""
-- redmap sweep (redmap/orm/expiry.py): purge the objects whose deadline passed.
-- KEYS[1] the deadline zset; ARGV: sweep data hash, id zset, object key prefix, now (ms),
-- batch size, lower bound ('-inf': ids waiting for their far links too; '(-inf': not),
-- number of Sorted zsets, those zsets, number of link pairs, then per many-to-many
-- relationship the prefix of the object's own link zsets and of the far side's (same
-- hash tag), then the number of relationships whose far side may live under another
-- hash tag and the prefix of the object's own link zsets of each.
-- Returns {purged, ids still to purge, ids waiting, waiting}: an id with links under
-- another hash tag is purged here but kept in KEYS[1] with the score -inf, and listed in
-- waiting as {id, relationship number, its members, ...}; FINISH_SCRIPT ends it.
local dl = KEYS[1]
local a = ARGV
local dv, all, pre, now, limit, low = a[1], a[2], a[3], a[4], tonumber(a[5]), a[6]
local nz = tonumber(a[7])
local i = 8
local zs = {}
for j = 1, nz do zs[j] = a[i]; i = i + 1 end
local nr = tonumber(a[i]); i = i + 1
local rels = {}
for j = 1, nr do rels[j] = {a[i], a[i + 1]}; i = i + 2 end
local nc = tonumber(a[i]); i = i + 1
local cross = {}
for j = 1, nc do cross[j] = a[i]; i = i + 1 end
local found = redis.call('ZRANGEBYSCORE', dl, low, now, 'WITHSCORES', 'LIMIT', 0, limit)
local purged, waiting = 0, {}
for k = 1, #found, 2 do
  local id = found[k]
  if found[k + 1] ~= '-inf' then
    redis.call('DEL', pre .. id)
    redis.call('ZREM', all, id)
    for _, z in ipairs(zs) do redis.call('ZREM', z, id) end
    local data = redis.call('HGET', dv, id)
    if data then
      for key in string.gmatch(data, '[^\n]+') do
        local zkey, hex = string.match(key, '^(%S+) (%x+)$')
        if zkey then
          -- a string index member (value and id): removed as it was written
          redis.call('ZREM', zkey, (string.gsub(hex, '..', function(h)
            return string.char(tonumber(h, 16)) end)) .. id)
        else
          local t = redis.call('TYPE', key)
          t = t.ok or t
          if t == 'set' then redis.call('SREM', key, id)
          elseif t == 'zset' then redis.call('ZREM', key, id)
          elseif t == 'string' then
            -- a unique value: released only if this object still holds it (it may have
            -- been taken over since the deadline passed).
            if redis.call('GET', key) == id then redis.call('DEL', key) end
          end
        end
      end
    end
    for _, r in ipairs(rels) do
      local own = r[1] .. id
      for _, m in ipairs(redis.call('ZRANGE', own, 0, -1)) do
        redis.call('ZREM', r[2] .. m, id)
      end
      redis.call('DEL', own)
    end
    redis.call('HDEL', dv, id)
    purged = purged + 1
  end
  local linked = {id}
  for j, p in ipairs(cross) do
    local m = redis.call('ZRANGE', p .. id, 0, -1)
    if #m > 0 then linked[#linked + 1] = j; linked[#linked + 1] = m end
  end
  if #linked > 1 then
    redis.call('ZADD', dl, '-inf', id)
    waiting[#waiting + 1] = linked
  else
    redis.call('ZREM', dl, id)
  end
end
return {purged, redis.call('ZCOUNT', dl, '(-inf', now),
        redis.call('ZCOUNT', dl, '-inf', '-inf'), waiting}
"""

SWEEP_SHA = hashlib.sha1(SWEEP_SCRIPT.encode()).hexdigest()

FINISH_SCRIPT = r"""
-- redmap sweep, second step (redmap/orm/expiry.py): end purged ids still waiting (score
-- -inf in the deadline zset KEYS[1]) for their links under other hash tags.
-- ARGV: number of own link-zset prefixes, those prefixes, then per id: the id, 1 to end
-- it here (0: only remove the far entries given), the number of far link zsets, those.
-- An id no longer waiting (another sweep ended it) is left alone. Returns how many ended.
local dl = KEYS[1]
local a = ARGV
local np = tonumber(a[1])
local i = np + 2
local ended = 0
while i <= #a do
  local id, last, nf = a[i], a[i + 1], tonumber(a[i + 2])
  if redis.call('ZSCORE', dl, id) == '-inf' then
    for j = i + 3, i + 2 + nf do redis.call('ZREM', a[j], id) end
    if last == '1' then
      for j = 2, np + 1 do redis.call('DEL', a[j] .. id) end
      redis.call('ZREM', dl, id)
      ended = ended + 1
    end
  end
  i = i + 3 + nf
end
return ended
"""

# Far link zsets per FINISH_SCRIPT invocation (an object's links beyond it take several,
# all in the same round trip; only the last ends the id).
_FINISH_KEYS = 20_000


def sweep_args(
    mapper: Mapper[Any], ks: KeySpace, now: int, limit: int, *, waiting: bool = True
) -> list[Any]:
    """KEYS and ARGV of one sweep invocation over keyspace `ks` of `mapper` (`waiting`:
    ids left waiting for their far links by an earlier sweep are reported again)."""
    zsets = [ks.sorted(c.key) for c in mapper.indexed_columns if c.sorted]
    rels: list[str] = []
    for own, far in _same_tag_links(mapper, ks):
        rels.extend((own, far))
    cross = [own for own, _, _ in far_links(mapper, ks)]
    return [
        1,
        ks.deadlines(),
        ks.sweep_data(),
        ks.all(),
        ks.object(""),
        now,
        limit,
        WAITING if waiting else "(" + WAITING,
        len(zsets),
        *zsets,
        len(rels) // 2,
        *rels,
        len(cross),
        *cross,
    ]


def _links_of(mapper: Mapper[Any]) -> list[tuple[str, str, Mapper[Any]]]:
    """Per many-to-many relationship of `mapper` (hidden ones included): the name of its
    own link zsets, of the far side's, and the far side's mapper."""
    out = []
    for prop in [*mapper.relationships.values(), *mapper.hidden_links]:
        if prop.secondary is None:
            continue
        if prop.parent is mapper:
            out.append((prop.link_name, prop.reverse_link_name, mapper_of(prop.target)))
        elif prop.parent is not None:  # a hidden link: another model's relationship here
            out.append((prop.reverse_link_name, prop.link_name, prop.parent))
    return out


def _same_tag_links(mapper: Mapper[Any], ks: KeySpace) -> list[tuple[str, str]]:
    """The prefixes (`...#rel:<name>:`) of this side's and the far side's link zsets of
    the many-to-many relationships whose far side is unsharded under `ks`'s hash tag:
    the sweep script removes both sides itself."""
    out = []
    for name, far_name, far in _links_of(mapper):
        if far.shard_key is None and far.keys.tag == ks.tag:
            out.append((ks.relation(name, ""), far.keys.relation(far_name, "")))
    return out


def far_links(mapper: Mapper[Any], ks: KeySpace) -> list[tuple[str, str, Mapper[Any]]]:
    """The many-to-many relationships whose far side may live under another hash tag
    (sharded, or another registry's): the prefix of this side's link zsets in `ks`, the
    name of the far side's, and its mapper. The sweep script reports their members; the
    far entries are removed by `FINISH_SCRIPT` or, on a cluster, by plain `ZREM`s."""
    out = []
    for name, far_name, far in _links_of(mapper):
        if not (far.shard_key is None and far.keys.tag == ks.tag):
            out.append((ks.relation(name, ""), far_name, far))
    return out


def sweep_command(
    mapper: Mapper[Any], ks: KeySpace, now: int, limit: int, *, load: bool, waiting: bool = True
) -> Command:
    """One sweep invocation (EVAL with the body when the server may not know it)."""
    head: tuple[Any, ...] = ("EVAL", SWEEP_SCRIPT) if load else ("EVALSHA", SWEEP_SHA)
    return (*head, *sweep_args(mapper, ks, now, limit, waiting=waiting))


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def finish_steps(
    waiting: Sequence[tuple[Mapper[Any], KeySpace, Sequence[Any]]], *, one_server: bool
) -> Steps[int]:
    """The second step of the sweep: remove the ids the sweep script reported waiting
    from the far side's link zsets, then end them (their own link zsets and their
    `#dl` entry go). On one server every far entry is removed inside `FINISH_SCRIPT`,
    atomically with the check that the id still waits; on a cluster a script cannot
    write another slot, so entries under another hash tag are removed first by plain
    `ZREM`s (one round trip), and the script then ends the ids. Idempotent: an id left
    waiting by an interruption is reported again by the next sweep. Returns how many
    ids it ended."""
    plain: list[Command] = []
    scripts: list[Command] = []
    for mapper, ks, reported in waiting:
        links = far_links(mapper, ks)
        head = ("EVAL", FINISH_SCRIPT, 1, ks.deadlines(), len(links), *(p for p, _, _ in links))
        args: list[Any] = []
        for item in reported:
            seg = _text(item[0])
            far_keys: list[str] = []
            for j in range(1, len(item), 2):
                own, far_name, far = links[int(item[j]) - 1]
                for member in item[j + 1]:
                    try:
                        fks = far.keys_for_pk(far.pk_from_segment(member))
                    except RedmapError as exc:
                        raise RedmapError(
                            f"the sweep of {mapper.name} found {member!r} in {own}{seg}, which "
                            f"is no {far.name} id ({exc}); run `redmap audit`"
                        ) from exc
                    key = fks.relation(far_name, _text(member))
                    if one_server or fks.tag == ks.tag:
                        far_keys.append(key)
                    else:
                        plain.append(("ZREM", key, seg))
            step = _FINISH_KEYS
            chunks = [far_keys[k : k + step] for k in range(0, len(far_keys), step)] or [[]]
            for n, chunk in enumerate(chunks):
                if args and len(args) + len(chunk) > step:
                    scripts.append((*head, *args))
                    args = []
                args.extend((seg, "1" if n == len(chunks) - 1 else "0", len(chunk), *chunk))
        if args:
            scripts.append((*head, *args))
    ended = 0
    for commands in (plain, scripts):
        if not commands:
            continue
        replies = yield Read(commands)
        for cmd, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                key = cmd[1] if cmd[0] == "ZREM" else cmd[3]
                raise RedmapError(
                    f"the sweep could not remove links of purged objects ({key!r}): {reply}; "
                    f"run `redmap audit`, then the sweep again"
                )
            if cmd[0] == "EVAL":
                ended += int(reply)
    return ended


class _Loaded:
    """Whether this process saw the sweep script run (EVALSHA then, else EVAL)."""

    sweep = False


def piggyback(spaces: Sequence[tuple[Mapper[Any], KeySpace]], now: int) -> list[Command]:
    """The bounded sweeps a flush queues in its MULTI for the tracked models it writes
    (their keyspaces under its hash tag): at most `PIGGYBACK_LIMIT` ids each."""
    load = not _Loaded.sweep
    # A model whose objects have children is left to `Engine.sweep`, which detaches the
    # children through a unit of work before purging their parent. Ids waiting for their
    # links under another hash tag are passed over (`WAITING`): removing those takes
    # writes under other tags, which `Engine.sweep` makes.
    return [
        sweep_command(m, ks, now, PIGGYBACK_LIMIT, load=load, waiting=False)
        for m, ks in spaces
        if not child_relationships(m)
    ]


def piggyback_replies(replies: Sequence[Any]) -> None:
    """Note what the piggy-backed sweeps answered: once one ran, later ones use EVALSHA;
    a NOSCRIPT (restart, failover) makes the next flush send the body again. Their
    failures never fail the flush: a sweep only removes what is gone already."""
    for r in replies:
        if isinstance(r, Exception):
            _Loaded.sweep = False
            return
    if replies:
        _Loaded.sweep = True


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


def registry_mappers(registry: Any) -> list[Mapper[Any]]:
    """The configured mappers of a `registry` (what `Engine.sweep` walks)."""
    from .registry import registry as registry_class

    if not isinstance(registry, registry_class):
        raise RedmapError(
            f"sweep() takes the models' registry (redmap.registry), not {registry!r}"
        )
    registry.configure()
    return list(registry.mappers.values())


def child_relationships(mapper: Mapper[Any]) -> list[Any]:
    """The one-to-many relationships whose children point at `mapper`'s objects by a
    foreign key: those children must be detached (or deleted, with a delete cascade)
    before the sweep purges their parent, as a flush does for a deleted parent."""
    return [p for p in mapper.relationships.values() if p.direction is Direction.ONETOMANY]


# Set by `redmap.orm.session` when it is imported (the sweep runs below the Session, which
# imports the engine): the steps that detach or delete, through a unit of work, the
# children of the objects whose deadline passed. Arguments: the engine running the
# steps, the mappers swept, the moment. Returns how many children it changed.
detach_children: Callable[[Any, Sequence[Mapper[Any]], int], Steps[int]] | None = None


def sweep_all_steps(
    engine: Any, mappers: Sequence[Mapper[Any]], *, batch: int = SWEEP_BATCH
) -> Steps[int]:
    """What `Engine.sweep` runs: the children of the gone objects first (a unit of work
    through `detach_children`, for models with one-to-many relationships), then the
    purge, both as of one moment. Run again after a failure, it redoes what is left."""
    now = now_ms()
    if detach_children is not None and any(
        m.expiry.tracked and child_relationships(m) for m in mappers
    ):
        yield from detach_children(engine, mappers, now)
    one_server = not getattr(getattr(engine, "dialect", None), "supports_cluster", True)
    return (yield from sweep_steps(mappers, batch=batch, now=now, one_server=one_server))


def sweep_steps(
    mappers: Sequence[Mapper[Any]],
    *,
    batch: int = SWEEP_BATCH,
    now: int | None = None,
    one_server: bool = False,
) -> Steps[int]:
    """Purge every object of `mappers` whose deadline passed: one script invocation per
    keyspace and batch (one round trip for all keyspaces per batch), until none is left;
    objects linked to objects under another hash tag then take `finish_steps` (one round
    trip more per batch, two on a cluster: `one_server` False). Returns how many objects
    were purged. Time linear in what is purged and in their links; no SCAN."""
    if now is None:
        now = now_ms()
    todo = [(m, ks) for m in mappers if m.expiry.tracked for ks in m.all_keyspaces()]
    purged = 0
    while todo:
        replies = yield Read([sweep_command(m, ks, now, batch, load=True) for m, ks in todo])
        left = []
        waiting = []
        for (m, ks), reply in zip(todo, replies, strict=True):
            if isinstance(reply, Exception):
                raise RedmapError(
                    f"the sweep of {m.name} failed on {ks.deadlines()!r}: {reply}; run "
                    f"`redmap audit` to see what holds a wrong type"
                )
            purged += int(reply[0])
            reported = reply[3]
            if reported:
                waiting.append((m, ks, reported))
            # Still to purge, and waiting ids this invocation did not report (it reports
            # at most `batch`): `finish_steps` ends every one it reported.
            if int(reply[1]) + int(reply[2]) - len(reported) > 0:
                left.append((m, ks))
        if waiting:
            yield from finish_steps(waiting, one_server=one_server)
        todo = left
    _Loaded.sweep = True
    return purged
