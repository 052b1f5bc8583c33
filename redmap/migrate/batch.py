"""Batched, resumable rewrites of a model's keys; owns `MigrationRun` and `rewrite`.

Called by `impl` (each operation is a plan given to `rewrite`, `move_keys` or
`delete_keys`) and built per step by `env`. How a rewrite goes:

1. SCAN with MATCH on the model's key prefix (glob characters escaped), keeping
   object hashes (keys whose id segment does not start with `#`), in batches.
   Work a small Lua script can do alone (`rewrite_by_script`: add, drop or rename a
   field) is then one pipelined EVALSHA per object, checking and writing atomically
   on the server. Work that needs Python (`rewrite`) goes on:
2. One pipelined read of the batch (HMGET of the fields the plan needs and `#v`, or
   HGETALL), then the plan decides each object's change (None: nothing to do).
3. One pipelined EVALSHA of `_APPLY` per changed object: it applies the change only
   if the object still holds what was read (the version and every field read), bumps
   `#v` so that sessions holding the old version get StaleDataError, and may mark a
   checkpoint in the same atomic step. Objects that changed in between are read
   again and retried; so a concurrent writer loses nothing and nothing is applied
   twice. Plans only change objects that still need it, so a rerun after an
   interruption finishes the work.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions as rex

from alembic_like.messaging import Messaging, Progress

from ..exc import MigrationError
from ..orm import keys
from ..orm.mapper import INCARNATION_FIELD, VERSION_FIELD, ColumnProperty, Mapper
from ..orm.registry import registry as Registry  # noqa: N812 - a class named like SQLAlchemy's
from . import layout as layout_mod
from .ops import RedisOperation
from .versioning import RedisVersionStore

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Change",
    "MigrationRun",
    "Target",
    "delete_keys",
    "field_bytes",
    "glob_escape",
    "move_keys",
    "rewrite",
    "rewrite_by_script",
    "scan_rows",
]

DEFAULT_BATCH_SIZE = 500
# Rounds of re-reading objects that changed between read and write before giving up.
MAX_ATTEMPTS = 50
_SCAN_COUNT = 1000
_SHOWN = 10  # conflicts listed in an error message

# Applies one object's change if the object is still as it was read.
# KEYS[1]: the object hash; KEYS[2]: the checkpoint set (KEYS[1] again when unused).
# ARGV: version field, bump ('1'/'0'), expected HLEN ('' = not checked), checkpoint
#   member ('' = none), incarnation field, a fresh incarnation (written with `#v` 1 when
#   the bump finds no `#v`, as a flush does), N, then N x (field, present '1'/'0',
#   value), C, then
#   C x (unique key, member) that must be free or already the member's, then the
#   commands, each as (argc, argv...).
# Returns 1 applied (or already checkpointed), 2 object gone, 0 changed since read,
# or the list of unique keys held by other objects (nothing applied).
# Redis keeps what a failing script did before the failure, so everything that can
# fail (the version's HINCRBY, index commands on keys of the wrong type) runs before
# the object's own writes, and the checkpoint mark comes last with them.
_APPLY = """
local a = ARGV
local mark = a[4]
if mark ~= '' and redis.call('SISMEMBER', KEYS[2], mark) == 1 then return 1 end
if redis.call('EXISTS', KEYS[1]) == 0 then return 2 end
if a[3] ~= '' and redis.call('HLEN', KEYS[1]) ~= tonumber(a[3]) then return 0 end
local i = 8
for _ = 1, tonumber(a[7]) do
  local cur = redis.call('HGET', KEYS[1], a[i])
  if a[i + 1] == '0' then
    if cur then return 0 end
  elseif cur ~= a[i + 2] then
    return 0
  end
  i = i + 3
end
local n = tonumber(a[i])
i = i + 1
local taken = {}
for _ = 1, n do
  local owner = redis.call('GET', a[i])
  if owner and owner ~= a[i + 1] then taken[#taken + 1] = a[i] end
  i = i + 2
end
if #taken > 0 then return taken end
if a[2] == '1' and redis.call('HINCRBY', KEYS[1], a[1], 1) == 1 then
  redis.call('HSET', KEYS[1], a[5], a[6])
end
while i <= #a do
  local argc = tonumber(a[i])
  redis.call(unpack(a, i + 1, i + argc))
  i = i + argc + 1
end
if mark ~= '' then redis.call('SADD', KEYS[2], mark) end
return 1
"""

# Moves KEYS[1] to KEYS[2]; when both exist, merges sets and zsets, keeps the larger of
# two counters (ARGV[1] == 'max'), accepts equal strings, and refuses anything else.
# Returns 1 moved, 0 no source (moved already), -1 conflict (nothing changed).
_MOVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= redis.call('TYPE', KEYS[2]).ok then return -1 end
if kind == 'set' then
  redis.call('SUNIONSTORE', KEYS[2], KEYS[1], KEYS[2])
elseif kind == 'zset' then
  redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[1], KEYS[2], 'AGGREGATE', 'MAX')
elseif kind == 'string' and ARGV[1] == 'max' then
  local a, b = tonumber(redis.call('GET', KEYS[1])), tonumber(redis.call('GET', KEYS[2]))
  if not a or not b then return -1 end
  if a > b then redis.call('SET', KEYS[2], a) end
elseif kind ~= 'string' or redis.call('GET', KEYS[1]) ~= redis.call('GET', KEYS[2]) then
  return -1
end
redis.call('DEL', KEYS[1])
return 1
"""

_GLOB = frozenset("*?[]\\")


def glob_escape(text: str) -> str:
    """`text` with the glob characters of SCAN MATCH (`* ? [ ] \\`) escaped by a backslash."""
    return "".join("\\" + ch if ch in _GLOB else ch for ch in text)


Command = tuple[Any, ...]
#: The fields an object holds, as read (decoded names, raw values; `#v` included).
Row = dict[str, bytes]


@dataclass
class Change:
    """What one object needs: commands run atomically if it is still as read.

    Index commands come first and the object's own writes (HSET/HDEL on its hash,
    which cannot fail) last: a script failing half-way leaves the object untouched.
    """

    commands: list[Command]
    # (unique key, member): each key must be free or already hold the member.
    claims: list[tuple[str, str]] = field(default_factory=list)
    # Bump `#v`: the object's stored fields change (not for index-only work).
    bump: bool = True


#: Decides one object's change from its key, id segment and row; None: nothing to do.
Plan = Callable[[str, str, Row], "Change | None"]


@dataclass
class Target:
    """A model as an operation names it: its keys, and its mapper when the registry maps it."""

    name: str
    keys: keys.KeySpace
    mapper: Mapper[Any] | None = None

    def column(self, name: str) -> ColumnProperty | None:
        """The mapped column `name`, if the registry maps this model and field."""
        if self.mapper is None:
            return None
        return self.mapper.columns.get(name)

    def show_id(self, segment: str) -> str:
        """An id segment as a user would write the primary key."""
        if self.mapper is not None:
            with contextlib.suppress(Exception):
                return repr(self.mapper.pk_from_segment(segment))
        with contextlib.suppress(ValueError):
            return repr(keys.unescape(segment).decode("utf-8"))
        return segment


class MigrationRun:
    """What operations need while a step runs: client, registry, batch size, lock, output.

    One per step (the `context` of `RedisOperations`). With `dry_run`, operations are
    only collected, and `estimate()` measures what each would change, reading only.
    """

    def __init__(
        self,
        client: Any,
        *,
        url: str,
        prefix: str,
        messaging: Messaging | None = None,
        registry: Registry | None = None,
        store: RedisVersionStore | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        dry_run: bool = False,
    ) -> None:
        if batch_size < 1:
            raise MigrationError(f"batch size must be at least 1, not {batch_size}")
        self.client = client
        self.url = url
        self.prefix = prefix
        self.messaging = messaging if messaging is not None else Messaging(quiet=True)
        self.registry = registry
        self.store = store
        self.batch_size = batch_size
        self.dry_run = dry_run
        self._recorded: dict[str, str] | None = None
        self._generation: int | None = None
        # The shard an operation on a sharded model is visiting (see RedisOperations.invoke).
        self.shard: int | None = None
        # Redis Cluster: keys of different hash tags cannot meet in one script.
        self.clustered = False
        self._shas: dict[str, str] = {}

    # -- models ------------------------------------------------------------------------

    def resolve(self, model: str) -> Target:
        """The model an operation names: class name, then keyspace, then recorded class name."""
        if self.registry is not None:
            self.registry.configure()
            by_keyspace = None
            for mapper in self.registry.mappers.values():
                if mapper.name == model:
                    return Target(model, self._keys_of(mapper), mapper)
                if mapper.keyspace == model:
                    by_keyspace = mapper
            if by_keyspace is not None:
                return Target(model, self._keys_of(by_keyspace), by_keyspace)
        keyspace = self.recorded_keyspaces().get(model, model)
        if not keys.valid_name(keyspace):
            raise MigrationError(f"no model or keyspace named {model!r}")
        return Target(model, keys.KeySpace(self.prefix, keyspace))

    def sharded_mapper(self, model: str) -> Mapper[Any] | None:
        """The registry's mapper for `model` when that model has a shard key."""
        if self.registry is None:
            return None
        self.registry.configure()
        for mapper in self.registry.mappers.values():
            if model in (mapper.name, mapper.keyspace) and mapper.shard_key is not None:
                return mapper
        return None

    def _keys_of(self, mapper: Mapper[Any]) -> keys.KeySpace:
        if mapper.shard_key is None:
            return mapper.keys
        if self.shard is None:
            raise MigrationError(f"{mapper.name} is sharded: operations visit one shard at a time")
        return mapper.keys_for_shard(self.shard)

    def recorded_keyspaces(self) -> dict[str, str]:
        """Class name -> keyspace of the models in the layout recorded at the last upgrade."""
        if self._recorded is None:
            recorded = layout_mod.load(self.client, self.prefix, url=self.url) or {}
            models = recorded.get("models", {})
            self._recorded = {name: m["keyspace"] for name, m in models.items()}
        return self._recorded

    # -- progress, lock, checkpoints -----------------------------------------------------

    def progress(self, target: Target, label: str) -> Progress:
        """A progress report sized by the model's `#all` zset (unknown when it is empty)."""
        total = int(self.client.zcard(target.keys.all()))
        return self.messaging.progress(total or None, label)

    def heartbeat(self) -> None:
        """Between batches: stop if the migration lock was lost."""
        if self.store is not None:
            self.store.check_lock()

    @contextlib.contextmanager
    def checkpoint(self, position: int) -> Iterator[tuple[str, str]]:
        """(set key, member prefix) marking the objects done by operation `position`.

        The set belongs to the step in progress (`RedisVersionStore.checkpoint_key`) and is
        dropped when the step completes; without a store it lives for the block only.
        """
        if self.store is None:
            key = keys.meta_key(self.prefix, f"migrate:done:adhoc:{uuid.uuid4().hex}")
            try:
                yield key, f"{position}:"
            finally:
                self.client.delete(key)
            return
        if self._generation is None:
            self._generation = self.store.generation()
        yield self.store.checkpoint_key(self._generation, self.shard), f"{position}:"

    def estimate(self, operation: RedisOperation) -> str:
        """What `operation` would change, measured now (dry runs; see `impl.estimate`)."""
        from .impl import estimate

        return estimate(self, operation)

    # -- scanning ----------------------------------------------------------------------

    def scan(self, prefix: str) -> Iterator[list[str]]:
        """Keys starting with `prefix` (SCAN MATCH with the prefix escaped), in batches.

        SCAN may return a key twice; every caller's work is idempotent or checkpointed.
        Keys that are not ASCII are not redmap's and are skipped.
        """
        match = glob_escape(prefix) + "*"
        batch: list[str] = []
        for raw in self.client.scan_iter(match=match, count=_SCAN_COUNT):
            try:
                batch.append(raw.decode("ascii") if isinstance(raw, bytes) else raw)
            except UnicodeDecodeError:
                continue
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def object_batches(self, target: Target) -> Iterator[list[str]]:
        """Batches of the model's object keys (id segments never start with `#`)."""
        ks = target.keys
        pending: list[str] = []
        for found in self.scan(ks.object_prefix):
            pending.extend(k for k in found if ks.is_object_key(k))
            while len(pending) >= self.batch_size:
                yield pending[: self.batch_size]
                pending = pending[self.batch_size :]
        if pending:
            yield pending

    # -- scripts -----------------------------------------------------------------------

    def sha(self, script: str, *, reload: bool = False) -> str:
        """The SHA1 of `script`, loaded into the server once per run (again after NOSCRIPT)."""
        if reload or script not in self._shas:
            self._shas[script] = str(self.client.script_load(script))
        return self._shas[script]


def _read(
    run: MigrationRun,
    batch: Sequence[str],
    fields: Sequence[str] | None,
    mark: str | None,
    checkpoint_key: str,
    ks: keys.KeySpace,
) -> list[Row | None]:
    """Each object's fields as read; None for objects gone or already checkpointed."""
    pipe = run.client.pipeline(transaction=False)
    for key in batch:
        if mark is not None:
            pipe.sismember(checkpoint_key, mark + ks.id_segment_of(key))
        if fields is None:
            pipe.hgetall(key)
        else:
            pipe.hmget(key, [*fields, VERSION_FIELD])
    replies = pipe.execute(raise_on_error=False)
    rows: list[Row | None] = []
    step = 2 if mark is not None else 1
    names = [*(fields or ()), VERSION_FIELD]
    for i, key in enumerate(batch):
        if mark is not None and replies[i * step]:
            rows.append(None)
            continue
        reply = replies[i * step + step - 1]
        if isinstance(reply, Exception):
            raise MigrationError(
                f"{key} is under the model's keyspace but is not an object hash ({reply}); "
                f"move it out of the keyspace"
            )
        if fields is None:
            row = {k.decode("utf-8", "surrogateescape"): v for k, v in reply.items()}
            rows.append(row or None)
        else:
            rows.append({n: v for n, v in zip(names, reply, strict=True) if v is not None})
    return rows


def scan_rows(
    run: MigrationRun, target: Target, fields: Sequence[str], label: str | None = None
) -> Iterator[tuple[str, Row]]:
    """(id segment, row) of every object, reading `fields` and `#v` only; writes nothing.

    With `label`, progress is reported. SCAN may yield an object twice.
    """
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(run.progress(target, label)) if label else None
        for batch in run.object_batches(target):
            rows = _read(run, batch, fields, None, "", target.keys)
            for key, row in zip(batch, rows, strict=True):
                yield target.keys.id_segment_of(key), row or {}
            if progress is not None:
                progress.advance(len(batch))


def field_bytes(name: str) -> bytes:
    """A hash field name as sent: names read from Redis round-trip byte for byte."""
    return name.encode("utf-8", "surrogateescape")


def _apply_args(
    change: Change,
    checks: Iterable[tuple[str, bytes | None]],
    hlen: int | None,
    mark: str,
    incarnation: str,
) -> list[Any]:
    check_list = list(checks)
    args: list[Any] = [
        VERSION_FIELD,
        "1" if change.bump else "0",
        "" if hlen is None else str(hlen),
        mark,
        INCARNATION_FIELD,
        incarnation,
        str(len(check_list)),
    ]
    for name, value in check_list:
        args.extend(
            (field_bytes(name), "0", "") if value is None else (field_bytes(name), "1", value)
        )
    args.append(str(len(change.claims)))
    for claim in change.claims:
        args.extend(claim)
    for command in change.commands:
        args.append(str(len(command)))
        args.extend(command)
    return args


@dataclass
class RewriteResult:
    """What a rewrite did: objects visited and changed, and unique values it could not claim."""

    visited: int = 0
    changed: int = 0
    taken: dict[str, str] = field(default_factory=dict)  # unique key -> object key


def rewrite(
    run: MigrationRun,
    target: Target,
    label: str,
    plan: Plan,
    *,
    fields: Sequence[str] | None = None,
    position: int | None = None,
) -> RewriteResult:
    """Apply `plan` to every object of `target`, atomically per object, in batches.

    `fields` are the fields `plan` reads (None: all of them, compared with HLEN too).
    With `position`, each object is marked done in the step's checkpoint set in the
    same atomic step, and marked objects are skipped: exactly once per object, even
    when SCAN repeats a key or the run is interrupted and started again.
    """
    result = RewriteResult()
    with contextlib.ExitStack() as stack:
        checkpoint_key, mark = "", None
        if position is not None:
            checkpoint_key, mark = stack.enter_context(run.checkpoint(position))
        progress = stack.enter_context(run.progress(target, label))
        for batch in run.object_batches(target):
            run.heartbeat()
            _rewrite_batch(run, target, batch, plan, fields, mark, checkpoint_key, result)
            result.visited += len(batch)
            progress.advance(len(batch))
    return result


def rewrite_by_script(
    run: MigrationRun, target: Target, label: str, script: str, args: Sequence[Any]
) -> RewriteResult:
    """EVALSHA `script` on every object of `target` (KEYS[1], then `args`), in batches.

    The script must check and write atomically, be idempotent, and return 1 when it
    changed the object (0 otherwise); so SCAN repeats and reruns are harmless.
    """
    result = RewriteResult()
    with run.progress(target, label) as progress:
        for batch in run.object_batches(target):
            run.heartbeat()
            replies = _evalsha_each(run, script, [((key,), args) for key in batch])
            result.changed += sum(1 for r in replies if r == 1)
            result.visited += len(batch)
            progress.advance(len(batch))
    return result


def _evalsha_each(
    run: MigrationRun, script: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    """One pipeline of EVALSHA `script` per (keys, args); the whole pipeline is sent again
    after NOSCRIPT (a server that lost its script cache), so scripts must be idempotent."""
    if not calls:
        return []
    for reload in (False, True):
        sha = run.sha(script, reload=reload)
        pipe = run.client.pipeline(transaction=False)
        for call_keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(call_keys), *call_keys, *args)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        if not any(isinstance(r, rex.NoScriptError) for r in replies):
            break
    for (call_keys, _), reply in zip(calls, replies, strict=True):
        if isinstance(reply, Exception):
            raise MigrationError(f"Redis refused a migration write on {call_keys[0]}: {reply}")
    return replies


def _rewrite_batch(
    run: MigrationRun,
    target: Target,
    batch: list[str],
    plan: Plan,
    fields: Sequence[str] | None,
    mark: str | None,
    checkpoint_key: str,
    result: RewriteResult,
) -> None:
    pending = batch
    # One per batch: each object is written at most once by it.
    incarnation = secrets.token_hex(8)
    for attempt in range(MAX_ATTEMPTS):
        rows = _read(run, pending, fields, mark, checkpoint_key, target.keys)
        calls: list[tuple[str, list[Any]]] = []
        for key, row in zip(pending, rows, strict=True):
            if row is None:
                continue
            segment = target.keys.id_segment_of(key)
            change = plan(key, segment, row)
            if change is None:
                continue
            if fields is None:
                checks: Iterable[tuple[str, bytes | None]] = row.items()
                hlen: int | None = len(row)
            else:
                checks = [(n, row.get(n)) for n in (*fields, VERSION_FIELD)]
                hlen = None
            member = "" if mark is None else mark + segment
            calls.append((key, _apply_args(change, checks, hlen, member, incarnation)))
        replies = _evalsha_each(
            run, _APPLY, [((key, checkpoint_key or key), args) for key, args in calls]
        )
        pending = []
        for (key, _), reply in zip(calls, replies, strict=True):
            if isinstance(reply, list):
                for taken in reply:
                    result.taken[taken.decode() if isinstance(taken, bytes) else taken] = key
            elif reply == 1:
                result.changed += 1
            elif reply == 0:
                pending.append(key)
        if not pending:
            return
        if attempt >= 3:
            time.sleep(min(0.05, 0.001 * attempt))
    raise MigrationError(
        f"{len(pending)} objects kept changing while being migrated "
        f"({', '.join(pending[:_SHOWN])}); run the command again"
    )


def move_keys(
    run: MigrationRun, moves: Sequence[tuple[str, str]], *, counters: Iterable[str] = ()
) -> list[str]:
    """Move each (source, destination) pair (see `_MOVE`); returns the sources in conflict.

    Sources already moved are skipped, so a rerun finishes an interrupted move.
    `counters` are sources holding integer counters, merged by keeping the larger.
    """
    maxed = set(counters)
    calls = [((src, dst), ("max" if src in maxed else "",)) for src, dst in moves]
    replies = _evalsha_each(run, _MOVE, calls)
    return [src for (src, _), reply in zip(moves, replies, strict=True) if reply == -1]


def delete_keys(run: MigrationRun, found: Sequence[str]) -> int:
    """UNLINK `found` in one pipeline; returns how many existed."""
    if not found:
        return 0
    pipe = run.client.pipeline(transaction=False)
    for key in found:
        pipe.unlink(key)
    return sum(int(r) for r in pipe.execute())


def shown(items: Sequence[str], total: int | None = None) -> str:
    """The first few `items` joined, with how many more there are."""
    count = len(items) if total is None else total
    text = ", ".join(items[:_SHOWN])
    return text + (f" and {count - _SHOWN} more" if count > _SHOWN else "")
