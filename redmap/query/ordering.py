"""The terms after the first of `order_by(a, b, ...)`: checked, read and sorted in Python.

Used by `query.select`, which pages through the first term's zset in Redis and hands
the members sharing a first-term score (a tie group) here to be ordered by the other
terms. Pure functions: no I/O, no commands.

Order of values, the same for every term:
- a `Sorted()`-able type (int, float, Decimal, datetime, date, bool) compares by its
  index score, as the first term does (a naive datetime counts as UTC);
- str by code point, bytes by byte, UUID by its 128-bit value, timedelta by length,
  the primary key by its value;
- None is smaller than any value: first in ascending order, last in descending
  (the first term's `Sorted()` index keeps None at -inf, so every term agrees);
- the last tie-break is the primary key's value, ascending, so pages are stable.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exc import DecodeError, QueryError
from ..orm.attributes import FieldAttribute

if TYPE_CHECKING:
    from ..orm.mapper import ColumnProperty, Mapper
    from .expression import Ordering

__all__ = ["Candidate", "Term", "secondary_terms", "sort_candidates"]

# Types compared by value (sortable types compare by score); each has a total order.
_BY_VALUE = (str, bytes, uuid.UUID, dt.timedelta)


@dataclass(frozen=True)
class Term:
    """One term after the first: the field, its direction, and how values compare."""

    column: ColumnProperty
    descending: bool
    by_score: bool

    @property
    def stored(self) -> bool:
        """Whether the value is read from the object's hash (the key is in the member)."""
        return not self.column.primary_key


@dataclass
class Candidate:
    """A member of a tie group: its id member, first-term score, primary key, and the
    values of the other terms once read."""

    member: bytes
    score: float
    pk: Any
    values: list[Any]


def secondary_terms(mapper: Mapper[Any], terms: Sequence[Ordering]) -> list[Term]:
    """Check the terms after the first: fields of `mapper` whose values have an order.

    Any stored field works, indexed or not (the values are read with HMGET for the
    members of a tie group only); JSON fields, enums and `time` have no order redmap
    will promise and raise `QueryError` naming the field.
    """
    out = []
    for term in terms:
        attr = term.attribute
        if not isinstance(attr, FieldAttribute):
            raise QueryError(f"{attr!r} is not a mapped field")
        if attr.mapper is not mapper:
            raise QueryError(
                f"{attr!r} belongs to {attr.mapper.name}, not {mapper.name}",
                model=mapper.name,
                field=attr.key,
            )
        col = attr.column
        codec = col.codec
        assert codec is not None
        if col.primary_key:
            out.append(Term(col, term.descending, by_score=False))
            continue
        kinds = getattr(codec, "_types", None)
        by_value = isinstance(kinds, type) and issubclass(kinds, _BY_VALUE)
        by_value = by_value or isinstance(kinds, tuple) and kinds == (bytes, bytearray)
        if not (codec.sortable or by_value):
            raise QueryError(
                f"order_by {mapper.name}.{col.key}: a {codec.expected} field has no order "
                "redmap can sort by; order by a number, date, datetime, str, bytes, UUID or "
                "timedelta field",
                model=mapper.name,
                field=col.key,
            )
        out.append(Term(col, term.descending, by_score=codec.sortable))
    return out


def decode_values(
    mapper: Mapper[Any], terms: Sequence[Term], key: str, raw: Sequence[bytes | None]
) -> list[Any]:
    """The comparable values of the stored terms from one HMGET reply (None for an
    absent field, or for an object deleted since its id was read)."""
    out: list[Any] = []
    stored = iter(raw)
    for term in terms:
        if not term.stored:
            out.append(None)  # filled from the primary key by the caller
            continue
        value = next(stored)
        if value is None:
            out.append(None)
            continue
        codec = term.column.codec
        assert codec is not None
        try:
            decoded = codec.decode(value)
        except DecodeError as exc:
            raise exc.with_location(model=mapper.name, field=term.column.key, key=key) from None
        out.append(codec.to_score(decoded) if term.by_score else decoded)
    return out


def _none_first(index: int) -> Callable[[Candidate], tuple[int, Any]]:
    def key(c: Candidate) -> tuple[int, Any]:
        value = c.values[index]
        return (0, 0) if value is None else (1, value)

    return key


def sort_candidates(
    candidates: list[Candidate], first_descending: bool, terms: Sequence[Term]
) -> list[Candidate]:
    """Candidates in the statement's order: first-term score, then each term, then the
    primary key ascending. Stable sorts from the last key to the first, so each term
    keeps its own direction (a reversed sort stays stable in Python)."""
    for c in candidates:
        for i, term in enumerate(terms):
            if not term.stored:
                c.values[i] = c.pk
    out = sorted(candidates, key=lambda c: c.pk)
    for i in range(len(terms) - 1, -1, -1):
        out.sort(key=_none_first(i), reverse=terms[i].descending)
    out.sort(key=lambda c: c.score, reverse=first_descending)
    return out


def score_text(score: float, exclusive: bool = False) -> str:
    """A score as a ZRANGE/ZCOUNT bound that Redis parses back to the same double."""
    if score == float("inf"):
        text = "+inf"
    elif score == float("-inf"):
        text = "-inf"
    else:
        text = repr(score)
    return "(" + text if exclusive else text
