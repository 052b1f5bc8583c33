"""Queries over models with an ExpiresAt field: expired ids left out server-side, exactly.

An object whose deadline passed stays in its indexes until the sweep removes it, so a
query must leave it out itself, before paging: counts, `limit` and `offset` are exact
whether or not a sweep ran. Inside the query's MULTI (`query.select`):

**Pages** (`live_window`): the query's order is read into a window W of its first
`stop + 1 + allowance` members (`ZRANGESTORE`, from the ordering zset directly for a
lone range, else from the query's result zset S); `ZINTERSTORE X 2 W #dl WEIGHTS 0 1`
gives the window's members that have a deadline, scored by it; `ZREMRANGEBYSCORE X
(now +inf` keeps the expired ones; `ZDIFFSTORE L 2 W X` leaves the live ones, and the
page is `ZRANGE L start stop`. Every step is linear in the window, never in the model:
O(log N + offset + limit + allowance), against O(log N + limit) without deadlines. When
the window was full and held fewer live members than the page needs (more than
`allowance` of them had expired), the query runs again with a larger allowance (one
more round trip; the allowance is remembered per model).

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..orm.mapper import Mapper
    from .select import _Compiler

__all__ = ["exclude", "guess", "live_window", "note", "short", "without_expired"]

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


def live_window(
    c: _Compiler, window: tuple[Any, ...], now: int
) -> tuple[str, list[tuple[Any, ...]]]:
    """Commands storing the query's window (`ZRANGESTORE <dst> *window`) without its
    expired members; returns the key of the live members and the tail whose replies
    `short` reads (the window's size, its expired members' count)."""
    w, x, live = c.temp(), c.temp(), c.temp()
    c.commands.append(("ZRANGESTORE", w, *window))
    c.commands.append(("ZINTERSTORE", x, 2, w, c.ks.deadlines(), "WEIGHTS", 0, 1))
    c.commands.append(("ZREMRANGEBYSCORE", x, f"({now}", "+inf"))
    c.commands.append(("ZDIFFSTORE", live, 2, w, x))
    return live, [("ZCARD", w), ("ZCARD", x)]


def short(replies: Sequence[Any], size: int, stop: int) -> bool:
    """Whether a window (its ZCARD, and its expired members' ZCARD) came up short: full,
    yet with fewer live members than the page needs."""
    held, expired = int(replies[0]), int(replies[1])
    return stop != -1 and held == size and held - expired < stop + 1


def guess(mapper: Mapper[Any]) -> int:
    """How many expired members a window allows for (as many as last needed, at least 8)."""
    return _guesses.get(mapper.keyspace, _GUESS)


def note(mapper: Mapper[Any], allowance: int) -> int:
    """A window of `mapper` came up short with `allowance`: the next, doubled, is kept."""
    value = 2 * allowance
    _guesses[mapper.keyspace] = value
    return value
