"""Condition and ordering nodes built from class attributes (`Author.age >= 18`); read by `query`.

These are plain data: building them touches no server and checks nothing; the
query planner decides which index answers each node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attributes import FieldAttribute

__all__ = [
    "BinaryExpression",
    "BooleanClauseList",
    "ColumnOperators",
    "Ordering",
    "and_",
    "asc",
    "desc",
    "or_",
]


class ColumnOperators:
    """Comparison operators of a mapped field, producing expression nodes."""

    __slots__ = ()

    def _expr(self, op: str, value: Any) -> BinaryExpression:
        return BinaryExpression(self, op, value)  # type: ignore[arg-type]

    def __eq__(self, other: Any) -> BinaryExpression:  # type: ignore[override]
        return self._expr("==", other)

    def __ne__(self, other: Any) -> BinaryExpression:  # type: ignore[override]
        return self._expr("!=", other)

    def __lt__(self, other: Any) -> BinaryExpression:
        return self._expr("<", other)

    def __le__(self, other: Any) -> BinaryExpression:
        return self._expr("<=", other)

    def __gt__(self, other: Any) -> BinaryExpression:
        return self._expr(">", other)

    def __ge__(self, other: Any) -> BinaryExpression:
        return self._expr(">=", other)

    def in_(self, values: Iterable[Any]) -> BinaryExpression:
        """Equal to any of `values` (a union of equality-index sets)."""
        return self._expr("in", tuple(values))

    def between(self, low: Any, high: Any) -> BinaryExpression:
        """Within `[low, high]`, both ends included, as in SQL."""
        return self._expr("between", (low, high))

    def desc(self) -> Ordering:
        return Ordering(self, descending=True)  # type: ignore[arg-type]

    def asc(self) -> Ordering:
        return Ordering(self, descending=False)  # type: ignore[arg-type]

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=False)
class BinaryExpression:
    """`attribute <op> value`."""

    attribute: FieldAttribute
    op: str
    value: Any

    def __bool__(self) -> bool:
        # `Author.name == "x"` in an `if` would always be true; refuse like SQLAlchemy.
        raise TypeError("Boolean value of a redmap condition is undefined; use it in where()")

    def __repr__(self) -> str:
        return f"<{self.attribute!r} {self.op} {self.value!r}>"


@dataclass(frozen=True, eq=False)
class BooleanClauseList:
    """Several conditions joined by "and" or "or"."""

    operator: str
    clauses: tuple[Any, ...]

    def __bool__(self) -> bool:
        raise TypeError("Boolean value of a redmap condition is undefined; use it in where()")


@dataclass(frozen=True, eq=False)
class Ordering:
    """One `order_by` term."""

    attribute: FieldAttribute
    descending: bool = False


def desc(attribute: Any) -> Ordering:
    """`order_by(desc(Model.field))`: descending order (same as `Model.field.desc()`)."""
    return Ordering(attribute, descending=True)


def asc(attribute: Any) -> Ordering:
    """`order_by(asc(Model.field))`: ascending order, the default."""
    return Ordering(attribute, descending=False)


def and_(*clauses: Any) -> BooleanClauseList:
    """All of `clauses` (what several `where()` arguments mean already)."""
    return BooleanClauseList("and", tuple(clauses))


def or_(*clauses: Any) -> BooleanClauseList:
    """Any of `clauses`; executed as a union of index sets."""
    return BooleanClauseList("or", tuple(clauses))
