"""Condition and ordering nodes built from class attributes (`Author.age >= 18`); read by `query`.

These are plain data: building them touches no server and checks nothing; the
query planner decides which index answers each node. `col()` is the typed way in:
type checkers see `Player.score` as an `int`, `col(Player.score)` as a
`ColumnOperators[int]` whose operators build conditions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar, overload

from ..exc import QueryError

if TYPE_CHECKING:
    from ..orm.attributes import FieldAttribute

__all__ = [
    "BinaryExpression",
    "BooleanClauseList",
    "ColumnElement",
    "ColumnOperators",
    "Increment",
    "Ordering",
    "and_",
    "asc",
    "col",
    "desc",
    "or_",
]

T = TypeVar("T")

_NO_TRUTH = (
    "a redmap condition has no truth value: `and`, `or`, `not` and `if` cannot combine "
    "conditions; write and_(a, b) or or_(a, b), or pass several conditions to where() "
    "separated by commas"
)


class ColumnOperators(Generic[T]):
    """Comparison operators of a mapped field, producing expression nodes.

    `T` is the field's Python type, so `col(Todo.due) < date(2026, 1, 1)` type-checks
    for a `date | None` field and `col(Todo.due) < "soon"` does not.
    """

    __slots__ = ()

    def _expr(self, op: str, value: Any) -> BinaryExpression:
        return BinaryExpression(self, op, value)  # type: ignore[arg-type]

    def __eq__(self, other: T | None) -> BinaryExpression:  # type: ignore[override]
        return self._expr("==", other)

    def __ne__(self, other: T | None) -> BinaryExpression:  # type: ignore[override]
        return self._expr("!=", other)

    def __lt__(self, other: T) -> BinaryExpression:
        return self._expr("<", other)

    def __le__(self, other: T) -> BinaryExpression:
        return self._expr("<=", other)

    def __gt__(self, other: T) -> BinaryExpression:
        return self._expr(">", other)

    def __ge__(self, other: T) -> BinaryExpression:
        return self._expr(">=", other)

    def in_(self, values: Iterable[T]) -> BinaryExpression:
        """Equal to any of `values` (a union of equality-index sets)."""
        return self._expr("in", tuple(values))

    def between(self, low: T, high: T) -> BinaryExpression:
        """Within `[low, high]`, both ends included, as in SQL."""
        return self._expr("between", (low, high))

    def startswith(self, prefix: str) -> BinaryExpression:
        """Starts with `prefix` (code points; "" matches every non-None value): a
        `Sorted()` str field, read as one lexicographic range."""
        return self._expr("startswith", prefix)

    def endswith(self, suffix: str) -> BinaryExpression:
        """Ends with `suffix`: a `Suffix()` field, read as one range of its reversed index."""
        return self._expr("endswith", suffix)

    def match(self, query: str) -> BinaryExpression:
        """Contains every word of `query` (Unicode words, casefolded; `orm.textindex`):
        a `Text()` field, read as an intersection of word sets."""
        return self._expr("match", query)

    def __add__(self, delta: T) -> Increment:
        """`Player.score + 5`: assigned to `p.score` (or given to `update().values()`),
        the field is incremented in Redis at flush, atomically (API.md section 9)."""
        return Increment(self, delta)  # type: ignore[arg-type]

    def __sub__(self, delta: T) -> Increment:
        """`Player.score - 5`: a decrement, as `+`."""
        try:
            negated = -delta  # type: ignore[operator]
        except TypeError:
            raise QueryError(
                f"{self!r} - {delta!r}: an increment needs a number, not "
                f"{type(delta).__name__}"
            ) from None
        return Increment(self, negated)  # type: ignore[arg-type]

    def desc(self) -> Ordering:
        """This field, largest first (an `order_by` term)."""
        return Ordering(self, descending=True)  # type: ignore[arg-type]

    def asc(self) -> Ordering:
        """This field, smallest first (the default order)."""
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
        raise TypeError(_NO_TRUTH)

    def __repr__(self) -> str:
        return f"<{self.attribute!r} {self.op} {self.value!r}>"


@dataclass(frozen=True, eq=False)
class BooleanClauseList:
    """Several conditions joined by "and" or "or"."""

    operator: str
    clauses: tuple[Any, ...]

    def __bool__(self) -> bool:
        raise TypeError(_NO_TRUTH)


@dataclass(frozen=True, eq=False)
class Increment:
    """`attribute + delta`: a change applied by Redis at flush (HINCRBY, HINCRBYFLOAT),
    so increments from many sessions commute and none is lost or stale."""

    attribute: FieldAttribute
    delta: Any

    def __bool__(self) -> bool:
        raise TypeError(
            "an increment (`Model.field + n`) has no truth value: assign it to the field "
            "of a stored object, or pass it to update().values()"
        )

    def __repr__(self) -> str:
        return f"<{self.attribute!r} + {self.delta!r}>"


@dataclass(frozen=True, eq=False)
class Ordering:
    """One `order_by` term."""

    attribute: FieldAttribute
    descending: bool = False


#: What `where()`, `and_()` and `or_()` accept.
ColumnElement: TypeAlias = BinaryExpression | BooleanClauseList


@overload
def col(field: T, /) -> ColumnOperators[T]: ...
@overload
def col(model: type[Any], name: str, /) -> ColumnOperators[Any]: ...
def col(field: Any, name: str | None = None, /) -> ColumnOperators[Any]:
    """A mapped field as type checkers should see it in a query.

    `col(Player.score) > 3` and `col(Player.score).desc()` type-check under mypy and
    pyright, which see `Player.score` itself as an `int`. mypy refuses to read a
    dataclass field without a default from the class (`Tag.name`): there, write
    `col(Tag, "name")`. At run time `col` returns the field's class attribute, so
    both spellings build the same condition as the bare `Player.score > 3`.
    """
    from ..orm.attributes import FieldAttribute

    if name is not None:
        attr = getattr(field, name, None) if isinstance(field, type) else None
        if not isinstance(attr, FieldAttribute):
            owner = getattr(field, "__name__", repr(field))
            raise QueryError(
                f"col({owner}, {name!r}): {owner} has no mapped field {name!r}; "
                "col() takes a mapped class and one of its field names"
            )
        return attr
    if not isinstance(field, FieldAttribute):
        raise QueryError(
            f"col() takes a mapped field read from its class, like col(Player.score); "
            f"got {field!r}"
        )
    return field


def desc(attribute: ColumnOperators[Any]) -> Ordering:
    """`order_by(desc(col(Model.field)))`: descending order (same as `.desc()`)."""
    return Ordering(attribute, descending=True)  # type: ignore[arg-type]


def asc(attribute: ColumnOperators[Any]) -> Ordering:
    """`order_by(asc(col(Model.field)))`: ascending order, the default."""
    return Ordering(attribute, descending=False)  # type: ignore[arg-type]


def and_(*clauses: ColumnElement) -> BooleanClauseList:
    """All of `clauses` (what several `where()` arguments mean already)."""
    return BooleanClauseList("and", tuple(clauses))


def or_(*clauses: ColumnElement) -> BooleanClauseList:
    """Any of `clauses`; executed as a union of index sets."""
    return BooleanClauseList("or", tuple(clauses))
