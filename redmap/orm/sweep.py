"""The sweep: objects whose deadline passed are purged, found without a SCAN; no I/O.

A gone object (its `ExpiresAt` moment or its soft delete's grace period passed) is gone
for every read at once (`redmap.orm.expiry`); its memory comes back here. The sweep walks
each model's deadline zset `#dl` up to now and, per id, removes what the sweep data
`#dv` lists (index, unique, foreign-key and link entries) with the hash itself, in one
script per batch (`SWEEP_SCRIPT`). Links under another hash tag take a second step
(`finish_steps`, `FINISH_SCRIPT`); children of gone parents are detached or deleted
first (`detach_children`, filled by the session): live ones through a unit of work,
soft-deleted ones (found by the parents' `#fk` zsets) by a version-checked plan that
detaches them or ends their grace period at the sweep's moment, so the purge takes them.

`Engine.sweep` runs `sweep_all_steps`; a flush carries a bounded sweep (`piggyback`).
docs/expiry.md describes the behaviour, docs/design/flush-concurrency.md argues it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..commands import Command, Read, Steps
from ..exc import RedmapError
from .expiry import PIGGYBACK_LIMIT, SWEEP_BATCH, now_ms
from .keys import KeySpace
from .mapper import mapper_of
from .relationships import Direction

if TYPE_CHECKING:
    from .mapper import Mapper

__all__ = [
    "FINISH_SCRIPT",
    "SWEEP_SCRIPT",
    "SWEEP_SHA",
    "WAITING",
    "child_relationships",
    "detach_children",
    "far_links",
    "finish_steps",
    "piggyback",
    "piggyback_replies",
    "registry_mappers",
    "sweep_all_steps",
    "sweep_command",
    "sweep_steps",
]

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
