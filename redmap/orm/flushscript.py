"""A flush plan as one server-side script inside MULTI: checks and writes at the commit point.

`WATCH` of N keys costs O(N^2) inside Redis (REDIS-FACTS 1.1), so a flush that watches
every key it checks is quadratic in its size. A scripted flush sends
`WATCH token, MULTI, EVALSHA ..., EXEC` instead: the script reads every precondition of
the plan (the same `Check`s the classic flush reads after its WATCH) and, only if all of
them hold, applies every write; Redis runs it without interleaving any other client, so
the checks hold at the commit point by construction (docs/design/flush-concurrency.md).
One round trip, no pre-read, linear time.

This module only translates: a `FlushPlan` into script invocations (`encode`), and the
invocations' replies into an outcome (`outcome`). No I/O, no redis import; the flush
protocol (`flushprotocol`) sends what this builds.

**Why several invocations.** Redis refuses a command of more than 1,048,576 arguments
(Redis 6.2, `invalid multibulk length`), and Lua's `unpack` stops near 8,000 values. A
large plan is therefore cut into invocations of at most `MAX_ARGS` arguments, all queued
in the same MULTI (so still one atomic step), and each command into pieces of at most
`MAX_WORDS` words (only commands whose arguments commute: member lists, field lists).
The invocations share one state through the flush token: the first records "ok" or
"refused" in it, each later one adds its checks' verdict, and writes run only while it
says "ok"; the last sets it to "applied" (what settling a lost reply reads) or deletes
it. Every check comes before every write in the stream, so no write runs before the
last check. Under `maxmemory`, Redis refuses a script's writes only until its first
write; a later invocation therefore starts with a write that needs no memory
(`PEXPIRE` of the token), so it cannot be stopped half-way.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..commands import Command
from ..exc import FlushError
from .flushplan import ZADD_INCREMENTED, Check, FlushPlan, summarise_errors

__all__ = [
    "MAX_ARGS",
    "MAX_WORDS",
    "SCRIPT",
    "SCRIPT_SHA",
    "Invocation",
    "ScriptOutcome",
    "encode",
    "outcome",
]

# Arguments of one EVALSHA (Redis refuses more than 1,048,576 per command).
MAX_ARGS = 20_000
# Words of one command the script runs (Lua's `unpack` fails near 8,000 values).
MAX_WORDS = 4_000

SCRIPT = r"""
-- redmap flush (redmap/orm/flushscript.py): check every precondition, then write.
-- KEYS[1] the flush token; ARGV[1] flags ('f' first invocation, 'l' last),
-- ARGV[2] number of checks, ARGV[3] token TTL in ms, then the checks, then the writes
-- (each: its number of words, negative when its reply is wanted, then the words).
local a = ARGV
local tok = KEYS[1]
local first = string.find(a[1], 'f', 1, true) ~= nil
local last = string.find(a[1], 'l', 1, true) ~= nil
local nchecks = tonumber(a[2])
local ttl = a[3]
local state = 'ok'
if first then
  if redis.call('EXISTS', tok) == 1 then return {'taken'} end
else
  state = redis.call('GET', tok)
  if state ~= 'ok' and state ~= 'refused' then return {'skip'} end
  -- Needs no memory: from here on maxmemory cannot refuse this invocation's writes.
  redis.call('PEXPIRE', tok, ttl)
end

local function err(r) return type(r) == 'table' and r.err ~= nil end

-- Integers as decimal text, compared exactly (ids may exceed a double's precision).
local function icmp(x, y)
  local nx, ny = string.sub(x, 1, 1) == '-', string.sub(y, 1, 1) == '-'
  if nx ~= ny then if nx then return -1 else return 1 end end
  if nx then x = string.sub(x, 2); y = string.sub(y, 2) end
  x = string.gsub(x, '^0+', ''); y = string.gsub(y, '^0+', '')
  local c = 0
  if #x ~= #y then
    if #x < #y then c = -1 else c = 1 end
  elseif x ~= y then
    if x < y then c = -1 else c = 1 end
  end
  if nx then return -c end
  return c
end

local i = 4
local bad = false
local replies = {}
local extra = {}
for c = 1, nchecks do
  local kind = a[i]
  local key = a[i + 1]
  local r
  local good
  if kind == 'v' then
    -- version: the (#v, #i) the session loaded; #v compared as a number.
    r = redis.pcall('HMGET', key, '#v', '#i')
    if err(r) then good = false else
      local v, inc = r[1], r[2]
      if a[i + 3] == '1' then good = (inc == a[i + 4]) else good = (inc == false) end
      if good then
        if a[i + 2] == '' then good = (v == false)
        else good = (v ~= false and string.match(v, '^%d+$') ~= nil and icmp(v, a[i + 2]) == 0) end
      end
    end
    i = i + 5
  elseif kind == 'n' then
    -- incarnation: the object is still the one loaded (an increment needs no version).
    r = redis.pcall('HGET', key, '#i')
    good = (not err(r)) and r == a[i + 2]
    i = i + 3
  elseif kind == 'e' or kind == 'a' then
    r = redis.pcall('EXISTS', key)
    if err(r) then good = false
    elseif kind == 'e' then good = (r == 1) else good = (r == 0) end
    i = i + 2
  elseif kind == 'f' then
    -- fresh: none of the generated ids' keys exists.
    local n = tonumber(key)
    r = 0
    local j = i + 2
    local stop = i + 1 + n
    while j <= stop do
      local k = math.min(j + 3999, stop)
      r = r + redis.call('EXISTS', unpack(a, j, k))
      j = k + 1
    end
    good = (r == 0)
    i = stop + 1
  elseif kind == 'u' or kind == 'm' then
    -- unique: the claim is absent or held by an allowed segment;
    -- members: the zset holds exactly the listed members.
    local n = tonumber(a[i + 2])
    local set = {}
    for j = i + 3, i + 2 + n do set[a[j]] = true end
    if kind == 'u' then
      r = redis.pcall('GET', key)
      good = (not err(r)) and (r == false or set[r] == true)
    else
      r = redis.pcall('ZRANGE', key, 0, -1)
      if err(r) or #r ~= n then good = false else
        good = true
        for _, m in ipairs(r) do if not set[m] then good = false end end
      end
    end
    i = i + 3 + n
  elseif kind == 'U' then
    -- unique on a model with deadlines: a holder whose deadline (ms) is at or before
    -- now (ARGV) is gone, and its value is taken over (the claim's SET follows).
    local n = tonumber(a[i + 4])
    local set = {}
    for j = i + 5, i + 4 + n do set[a[j]] = true end
    r = redis.pcall('GET', key)
    if err(r) then good = false
    elseif r == false or set[r] == true then good = true
    else
      local sc = redis.pcall('ZSCORE', a[i + 2], r)
      if (not err(sc)) and sc and tonumber(sc) <= tonumber(a[i + 3]) then
        good = true
        r = false
      else
        good = false
      end
    end
    i = i + 5 + n
  elseif kind == 'x' then
    -- unswept: an explicit id must not wait in the deadline zset for the sweep.
    r = redis.pcall('ZSCORE', key, a[i + 2])
    good = (not err(r)) and r == false
    i = i + 3
  elseif kind == 't' then
    r = redis.pcall('TYPE', key)
    if err(r) then good = false else
      local t = r.ok or r
      good = (t == 'none' or t == a[i + 2])
    end
    i = i + 3
  elseif kind == 's' then
    -- seqmax: an explicit id raises the counter past it, or writes the id guard.
    r = redis.pcall('GET', key)
    if err(r) or (r ~= false and string.match(r, '^%d+$') == nil) then good = false else
      good = true
      local cur = r or '0'
      if icmp(cur, a[i + 2]) < 0 then extra[#extra + 1] = {'SET', key, a[i + 2]} end
      if a[i + 4] ~= '' and icmp(a[i + 3], cur) <= 0 then
        extra[#extra + 1] = {'SET', a[i + 4], '1', 'PX', ttl}
      end
    end
    i = i + 5
  else
    return redis.error_reply('redmap flush script: unknown check ' .. tostring(kind))
  end
  if r == nil then r = false end
  replies[c] = r
  if not good then bad = true end
end

if bad or state == 'refused' then
  if last then
    if not first then redis.call('DEL', tok) end
  elseif state ~= 'refused' then
    redis.call('SET', tok, 'refused', 'PX', ttl)
  end
  if bad then return {0, replies} end
  return {3}
end

local wrote = 0
local wanted = {}
-- Increments come first; while nothing else was written, a refused one (a value that
-- is not a number, an overflow) is undone by restoring the values they replaced.
local undo = {}
local function fail(r)
  if wrote == #undo then
    for j = #undo, 1, -1 do
      local u = undo[j]
      if u[3] then redis.call('HSET', u[1], u[2], u[3]) else redis.call('HDEL', u[1], u[2]) end
    end
    wrote = 0
  end
  if wrote > 0 or not first then redis.pcall('SET', tok, 'failed', 'PX', ttl) end
  return {2, wrote, r}
end
for _, cmd in ipairs(extra) do
  local r = redis.pcall(unpack(cmd))
  if err(r) then return fail(r) end
  wrote = wrote + 1
end
local n = #a
while i <= n do
  if a[i] == 'z' then
    -- a Sorted score following an increment: the value Redis computed for it.
    local r = redis.pcall('ZADD', a[i + 1], wanted[tonumber(a[i + 3])], a[i + 2])
    if err(r) then return fail(r) end
    wrote = wrote + 1
    i = i + 4
  else
    local w = tonumber(a[i])
    local want = w < 0
    local before = nil
    if want then
      -- an increment: HINCRBY/HINCRBYFLOAT key field delta
      w = -w
      if wrote == #undo then
        before = {a[i + 2], a[i + 3], redis.call('HGET', a[i + 2], a[i + 3])}
      end
    end
    local r = redis.pcall(unpack(a, i + 1, i + w))
    if err(r) then return fail(r) end
    wrote = wrote + 1
    if before then undo[#undo + 1] = before end
    if want then wanted[#wanted + 1] = r end
    i = i + w + 1
  end
end
local r
if last then
  r = redis.pcall('SET', tok, 'applied', 'PX', ttl)
elseif first then
  r = redis.pcall('SET', tok, 'ok', 'PX', ttl)
end
if err(r) then return fail(r) end
return {1, wanted}
"""

SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

# Commands a piece of which is the same command on fewer arguments: prefix length and
# the width of one item (a ZADD item is a score and a member).
_SPLITTABLE = {
    "SADD": (2, 1),
    "SREM": (2, 1),
    "ZREM": (2, 1),
    "HDEL": (2, 1),
    "ZADD": (2, 2),
    "HSET": (2, 2),
    "DEL": (1, 1),
    "UNLINK": (1, 1),
}


@dataclasses.dataclass
class Invocation:
    """One EVALSHA of the script: its arguments after the key, and which checks it runs."""

    args: list[Any]
    checks: list[Check]
    # How many writes of the plan it runs (for reporting a write refused).
    writes: int


def _check_words(check: Check) -> list[Any]:
    kind = check.kind
    if kind == "version":
        version, incarnation = check.expected
        return [
            "v",
            check.key,
            "" if version is None else str(version),
            "0" if incarnation is None else "1",
            b"" if incarnation is None else incarnation,
        ]
    if kind in ("exists", "target"):
        return ["e", check.key]
    if kind == "incarnation":
        return ["n", check.key, check.expected]
    if kind == "absent":
        return ["a", check.key]
    if kind == "fresh":
        keys = list(check.command[1:])
        return ["f", len(keys), *keys]
    if kind == "unique" and check.takeover is not None:
        items = list(check.expected)
        deadlines, now = check.takeover
        return ["U", check.key, deadlines, now, len(items), *items]
    if kind == "unswept":
        return ["x", check.command[1], check.command[2]]
    if kind in ("unique", "members"):
        items = list(check.expected)
        return ["u" if kind == "unique" else "m", check.key, len(items), *items]
    if kind == "type":
        return ["t", check.key, check.expected]
    if kind == "seqmax":
        return ["s", check.key, check.value, check.expected, check.guard or ""]
    raise AssertionError(f"no script form for a {kind!r} check")


def _pieces(cmd: Command) -> Iterator[Command]:
    """`cmd`, or pieces of it of at most `MAX_WORDS` words when it is longer."""
    if len(cmd) <= MAX_WORDS:
        yield cmd
        return
    split = _SPLITTABLE.get(str(cmd[0]).upper())
    if split is None:
        raise FlushError(
            f"the flush has a {cmd[0]} command of {len(cmd)} words, which the flush script "
            f"cannot split; nothing was written"
        )
    prefix, width = split
    head, items = cmd[:prefix], cmd[prefix:]
    step = (MAX_WORDS - prefix) // width * width
    for start in range(0, len(items), step):
        yield (*head, *items[start : start + step])


def encode(plan: FlushPlan) -> list[Invocation]:
    """The invocations that run `plan`: its checks (those reading counters last, so that
    their writes wait for every other check), then its writes, cut at `MAX_ARGS`.

    `plan.writes` ends with the token's SET, which the script does itself. The plan's
    first writes are its increments, whose replies come back (`ScriptOutcome.wanted`).
    """
    token_set = plan.writes[-1]
    assert token_set[0] == "SET" and token_set[1] == plan.token_key
    checks = plan.checks
    if any(c.kind == "seqmax" for c in checks):
        checks = sorted(checks, key=lambda c: c.kind == "seqmax")
    # The first writes are the increments, whose replies are wanted.
    wanted = len(plan.incremented)
    invocations: list[Invocation] = []
    current = Invocation([], [], 0)
    args = current.args
    size = 0

    def cut() -> None:
        nonlocal current, args, size
        invocations.append(current)
        current = Invocation([], [], 0)
        args = current.args
        size = 0

    for check in checks:
        words = _check_words(check)
        if size and size + len(words) > MAX_ARGS:
            cut()
        args.extend(words)
        current.checks.append(check)
        size += len(words)
    for index, cmd in enumerate(plan.writes[:-1]):
        if cmd[0] == ZADD_INCREMENTED:
            _, zset, nth, member = cmd
            if size and size + 4 > MAX_ARGS:
                cut()
            args.extend(("z", zset, member, nth + 1))
            current.writes += 1
            size += 4
            continue
        # A command of at most MAX_WORDS words (nearly all) goes as it is.
        for piece in (cmd,) if len(cmd) <= MAX_WORDS else _pieces(cmd):
            if size and size + len(piece) + 1 > MAX_ARGS:
                cut()
            args.append(-len(piece) if index < wanted else len(piece))
            args.extend(piece)
            current.writes += 1
            size += len(piece) + 1
    invocations.append(current)
    last = len(invocations) - 1
    for n, inv in enumerate(invocations):
        flags = ("f" if n == 0 else "") + ("l" if n == last else "")
        inv.args[:0] = [flags or "-", len(inv.checks), plan.token_ttl_ms]
    return invocations


@dataclasses.dataclass
class ScriptOutcome:
    """What the invocations' replies say: `error` (nothing written unless `partial`), or
    the replies of the wanted writes."""

    error: Exception | None = None
    partial: bool = False
    # Refused by its checks (a stale object, a taken value): its ids may go back.
    by_checks: bool = False
    wanted: list[Any] = dataclasses.field(default_factory=list)


def outcome(
    plan: FlushPlan, invocations: Sequence[Invocation], replies: Sequence[Any]
) -> ScriptOutcome:
    """Turn the EXEC reply of a scripted flush into its outcome.

    A refusal is worded by `FlushPlan.evaluate` from the replies of the checks that
    failed (with the rest of their invocation): checks that held add nothing to a
    refusal, so the error is the one the classic flush raises for the same state.
    """
    failed: list[tuple[Check, Any]] = []
    wanted: list[Any] = []
    written = 0  # writes run by the invocations before this one
    for inv, reply in zip(invocations, replies, strict=True):
        if isinstance(reply, Exception):
            summary, distinct = summarise_errors([str(reply)])
            return ScriptOutcome(
                FlushError(
                    f"Redis refused the flush script ({summary}); nothing was written",
                    errors=distinct,
                )
            )
        code = reply[0]
        if code in (b"taken", "taken"):
            return ScriptOutcome(
                FlushError(
                    f"the flush token {plan.token_key!r} already exists (the flush was "
                    f"settled as lost); nothing was written",
                    key=plan.token_key,
                )
            )
        if code == 0:
            failed.extend(zip(inv.checks, reply[1], strict=True))
        elif code == 1:
            wanted.extend(reply[1])
            written += inv.writes
        elif code == 2:
            nothing = written == 0 and reply[1] == 0
            error = reply[2]
            summary, distinct = summarise_errors([str(error)])
            if nothing:
                return ScriptOutcome(
                    FlushError(
                        f"Redis refused the flush's first write ({summary}); nothing was "
                        f"written{plan.counters_note()}",
                        errors=distinct,
                    )
                )
            return ScriptOutcome(
                FlushError(
                    f"Redis rejected a command of the flush script ({summary}) after "
                    f"other commands were applied: roll the session back so the objects "
                    f"reload from what Redis holds",
                    errors=distinct,
                ),
                partial=True,
            )
        # 3 (refused by an earlier invocation) and 'skip' add nothing.
    if failed:
        error = plan.evaluate_pairs(failed)
        if error is None:
            error = FlushError(
                "the flush script refused the flush but its checks read as passing; "
                "nothing was written"
            )
        return ScriptOutcome(error, by_checks=True)
    return ScriptOutcome(wanted=wanted)
