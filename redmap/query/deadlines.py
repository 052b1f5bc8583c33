"""Queries over models with an ExpiresAt field: expired ids left out server-side, exactly.

An object whose deadline passed stays in its indexes until the sweep removes it, so a
query must leave it out itself, before paging: counts, `limit` and `offset` are exact
whether or not a sweep ran, in the round trip the query makes anyway (`query.select`):

**Pages** (`page_command`, one read-only script, `PAGE_SCRIPT`): the query's order is
read as a window of its first `stop + 1 + allowance` members (`ZRANGE ... BYSCORE LIMIT`,
from the ordering zset directly for a lone range or no condition, else from the query's
result zset S built in the same MULTI), `ZMSCORE #dl` gives the window's deadlines, and
the members whose deadline is at or before now are dropped before the page is cut.
Every step is linear in the window, never in the model: O(log N + offset + limit +
allowance), against O(log N + limit) without deadlines. When the window was full and
held fewer live members than the page needs (more than `allowance` of them had
expired), the query runs again with a doubled allowance (one more round trip; the
allowance is remembered per model).

**Pages, the cheap path** (`pipelined`, `cut`): a lone range (the common `between()
.order_by().limit()`) whose page starts near the beginning of its order, on a model with
at most `CAP` expired ids waiting for the sweep, is read with two plain commands in one
round trip: the window from position 0, and the expired ids themselves (`ZRANGE #dl
-inf now BYSCORE LIMIT 0 CAP+1`); the page is cut here. No script, no temporary key: the
cost over the same query without deadlines is one O(log N + CAP) command.

**Queries without a limit** read every match anyway: the expired ones are found as for
counts (below) and dropped here.

**Counts** (`exclude`): `ZRANGESTORE E #dl -inf now BYSCORE` (the k expired ids,
O(log N + k)), `ZINTERSTORE G 2 S E` (those among the matches: Redis walks the smaller
input, O(k)), and the count is ZCARD S - ZCARD G (ZCOUNT for a lone range). k is small
when sweeps run; it is the whole unswept backlog otherwise.

Queries ordered by several terms read whole tie groups by score (`_read_score_span`),
from S minus E (`without_expired`, linear in the matches, as the intersection that
built S).

"Now" is the client clock (`redmap.orm.expiry.now_ms`), as for every other decision
about deadlines (docs/expiry.md).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..orm.mapper import Mapper
    from .select import _Compiler

__all__ = [
    "PAGE_SCRIPT",
    "exclude",
    "forget_hints",
    "guess",
    "note",
    "page_command",
    "no_script",
    "read_page",
    "without_expired",
]

_GUESS = 8
_guesses: dict[str, int] = {}


def _expired(c: _Compiler, now: int) -> str:
    temp = c.temp()
    c.commands.append(("ZRANGESTORE", temp, c.ks.deadlines(), "-inf", now, "BYSCORE"))
    return temp


def exclude(c: _Compiler, source: str, now: int) -> str:
    """A temporary zset of the members of `source` whose deadline passed (with their
    scores in `source`)."""
    expired = _expired(c, now)
    out = c.temp()
    c.commands.append(("ZINTERSTORE", out, 2, source, expired, "WEIGHTS", 1, 0))
    return out


def without_expired(c: _Compiler, source: str, now: int) -> str:
    """A temporary copy of `source` without the members whose deadline passed."""
    expired = _expired(c, now)
    out = c.temp()
    c.commands.append(("ZDIFFSTORE", out, 2, source, expired))
    return out


PAGE_SCRIPT = r"""
-- redmap query page (redmap/query/deadlines.py): the live members of a window.
-- KEYS[1] the query's ordering (a sorted index, the id zset, or the query's result zset),
-- KEYS[2] the model's deadline zset. ARGV: min, max (BYSCORE bounds), '1' for descending,
-- start, stop (-1: to the end) of the page among the live members, allowance, now (ms),
-- '1' to return scores. Reply: {page (members, with scores when asked), window size,
-- expired members in the window}.
local zs, dl = KEYS[1], KEYS[2]
local a = ARGV
local rev = a[3] == '1'
local start, stop, allow = tonumber(a[4]), tonumber(a[5]), tonumber(a[6])
local now, scored = tonumber(a[7]), a[8] == '1'
local size = -1
if stop >= 0 then size = stop + 1 + allow end
local w
if rev then
  w = redis.call('ZRANGE', zs, a[2], a[1], 'BYSCORE', 'REV', 'LIMIT', 0, size, 'WITHSCORES')
else
  w = redis.call('ZRANGE', zs, a[1], a[2], 'BYSCORE', 'LIMIT', 0, size, 'WITHSCORES')
end
local n = #w / 2
local out = {}
local live, expired = 0, 0
local i = 1
while i <= n do
  local j = math.min(i + 3999, n)
  local members = {}
  for k = i, j do members[#members + 1] = w[2 * k - 1] end
  local deadlines = redis.call('ZMSCORE', dl, unpack(members))
  for k = i, j do
    local d = deadlines[k - i + 1]
    if d and tonumber(d) <= now then
      expired = expired + 1
    else
      if live >= start and (stop < 0 or live <= stop) then
        out[#out + 1] = w[2 * k - 1]
        if scored then out[#out + 1] = w[2 * k] end
      end
      live = live + 1
    end
  end
  i = j + 1
end
return {out, n, expired}
"""

PAGE_SHA = hashlib.sha1(PAGE_SCRIPT.encode()).hexdigest()


def page_command(
    key: str,
    deadlines: str,
    bounds: tuple[Any, Any],
    desc: bool,
    start: int,
    stop: int,
    allowance: int,
    now: int,
    scored: bool,
    *,
    load: bool = False,
) -> tuple[Any, ...]:
    """The EVALSHA (EVAL until this process saw the script run) reading one page of the
    live members of `key` (in BYSCORE `bounds`); with `load`, always EVAL (inside a
    MULTI, where a NOSCRIPT would fail the whole query)."""
    low, high = bounds
    head = ("EVALSHA", PAGE_SHA) if _Loaded.page and not load else ("EVAL", PAGE_SCRIPT)
    return (
        *head,
        2,
        key,
        deadlines,
        low,
        high,
        "1" if desc else "0",
        start,
        stop,
        allowance,
        now,
        "1" if scored else "0",
    )


# A lone range whose page starts this close to the beginning of its order, on a model
# with at most `CAP` expired ids waiting for the sweep, is read with plain commands: the
# window from position 0 and the expired ids (`ZRANGE #dl -inf now BYSCORE LIMIT 0
# CAP+1`), filtered here. Otherwise (and for the next `BACKOFF` such queries of the
# model once more than CAP were found) the page script reads it.
PIPELINE_MAX_START = 256
CAP = 64
BACKOFF = 100
_backlog: dict[str, int] = {}
BACKLOG: Any = object()


def pipelined(mapper: Mapper[Any], start: int, now: int) -> bool:
    """Whether a lone-range page of `mapper` starting at `start` is read with plain
    commands (see `PIPELINE_MAX_START`)."""
    if start > PIPELINE_MAX_START:
        return False
    left = _backlog.get(mapper.keyspace, 0)
    if left > 0:
        _backlog[mapper.keyspace] = left - 1
        return False
    return True


def forget_hints() -> None:
    """Drop what earlier queries taught (allowances, backlogs): for a process that
    emptied or replaced its data set (tests, benchmarks)."""
    _backlog.clear()
    _guesses.clear()


def expired_ids(ks: Any, now: int) -> tuple[Any, ...]:
    """The ids of `ks` whose deadline passed, at most CAP + 1 of them."""
    return ("ZRANGE", ks.deadlines(), "-inf", now, "BYSCORE", "LIMIT", 0, CAP + 1)


def cut(
    mapper: Mapper[Any],
    window: Any,
    expired: Any,
    start: int,
    stop: int,
    size: int,
    scored: bool,
    now: int,
) -> list[Any] | None:
    """The page from a window read from position 0 (with scores) and the expired ids;
    None when the window came up short; BACKLOG when more than CAP ids had expired."""
    if len(expired) > CAP:
        _backlog[mapper.keyspace] = BACKOFF
        return BACKLOG  # type: ignore[no-any-return]
    dropped = set(expired)
    live = [(m, float(s)) for m, s in window if m not in dropped]
    if stop != -1 and len(window) == size and len(live) < stop + 1:
        return None
    page = live[start:] if stop == -1 else live[start : stop + 1]
    return page if scored else [m for m, _ in page]


class _Loaded:
    """Whether this process saw the page script run (then EVALSHA is sent)."""

    page = False


def no_script(reply: Any) -> bool:
    """Whether a reply says the server does not know the script (restart, failover):
    the query is sent again with the script's body."""
    if isinstance(reply, Exception) and "NOSCRIPT" in (type(reply).__name__ + str(reply)):
        _Loaded.page = False
        return True
    if isinstance(reply, Exception) and type(reply).__name__ == "NoScriptError":
        _Loaded.page = False
        return True
    return False


def read_page(reply: Any, stop: int, allowance: int, scored: bool) -> list[Any] | None:
    """The page a `page_command` answered (members, or (member, score) pairs), or None
    when its window came up short: full, yet holding fewer live members than the page
    needs (more than `allowance` of them had expired)."""
    _Loaded.page = True
    page, held, expired = reply[0], int(reply[1]), int(reply[2])
    if stop != -1 and held == stop + 1 + allowance and held - expired < stop + 1:
        return None
    if not scored:
        return list(page)
    return [(page[i], float(page[i + 1])) for i in range(0, len(page), 2)]


def guess(mapper: Mapper[Any]) -> int:
    """How many expired members a window allows for (as many as last needed, at least 8)."""
    return _guesses.get(mapper.keyspace, _GUESS)


def note(mapper: Mapper[Any], allowance: int) -> int:
    """A window of `mapper` came up short with `allowance`: the next, doubled, is kept."""
    value = 2 * allowance
    _guesses[mapper.keyspace] = value
    return value
