"""Queries over models with an ExpiresAt field: expired ids left out server-side, exactly.

An object whose deadline passed stays in its indexes until the sweep removes it, so a
query must leave it out itself, before paging: counts, `limit` and `offset` are exact
whether or not a sweep ran. Inside the query's MULTI (`query.select`):

1. `ZRANGESTORE E #dl -inf <now> BYSCORE`: the ids whose deadline passed (k of them,
   few when sweeps run; O(log N + k)).
2. `ZINTERSTORE G 2 S E WEIGHTS 1 0`: those among the query's matches S, with S's scores
   (Redis walks the smaller input: O(k)).
3. `ZRANGE G 0 -1 WITHSCORES` and `ZRANGE S start stop+guess WITHSCORES`: the expired
   matches and a window of S widened by `guess` members.

The page is then cut from the window here: the expired matches ranked before the
window's first member (j of them) shift it, so the page starts at the j-th live member
of the window. The window holds the page whenever guess >= k; otherwise the query runs
again with guess = k (one more round trip, and the guess is remembered per model). The
cost over the same query on a model without deadlines is O(log N + k) and k more
members read: nothing grows with the model. Counts subtract ZCARD G. Queries ordered by
several terms read whole tie groups by score (`_read_score_span`), from S minus E
(`ZDIFFSTORE`, linear in the matches, as the intersection that built S).

"Now" is the client clock (`redmap.orm.expiry.now_ms`), as for every other decision
about deadlines (docs/expiry.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..orm.mapper import Mapper
    from .select import _Compiler

__all__ = ["exclude", "guess", "note", "page", "widen", "without_expired"]

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


def guess(mapper: Mapper[Any]) -> int:
    """How many expired matches the window allows for (the last count seen, at least 8)."""
    return _guesses.get(mapper.keyspace, _GUESS)


def note(mapper: Mapper[Any], seen: int) -> int:
    """Remember `seen` expired matches for the next query of the model; the new guess."""
    value = max(_GUESS, seen)
    _guesses[mapper.keyspace] = value
    return value


def widen(stop: int, allowance: int) -> int:
    """The last position of the window read for a page ending at `stop` (-1: the end)."""
    return -1 if stop == -1 else stop + allowance


def page(
    expired: Sequence[tuple[bytes, Any]],
    window: Sequence[tuple[bytes, Any]],
    start: int,
    stop: int,
    desc: bool,
    allowance: int,
) -> list[tuple[bytes, Any]] | None:
    """The live members at positions `start..stop` (-1: to the end) of the query's order,
    cut from `window` (its members from position `start` on, `allowance` more than the
    page), or None when more members expired than the window allows for."""
    if stop != -1 and len(expired) > allowance:
        return None
    if not window:
        return []
    gone = {m for m, _ in expired}
    first = (float(window[0][1]), window[0][0])
    if desc:
        j = sum(1 for m, s in expired if (float(s), m) > first)
    else:
        j = sum(1 for m, s in expired if (float(s), m) < first)
    live = [w for w in window if w[0] not in gone]
    if stop == -1:
        return live[j:]
    return live[j : j + stop - start + 1]
