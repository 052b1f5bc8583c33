"""`relationship()` and `RelationshipProperty`; declared on mapped classes, configured by registry.

What a relationship means once every class is known (target, direction, foreign key,
reverse side, ordering) is resolved by `registry.configure()` (`redmap.orm.registry`), which
alone knows the classes by name.

`relationship()` returns a `dataclasses.Field` (default None) carrying its
`RelationshipProperty` in the field's metadata, so a plain `@dataclass` accepts it;
list-valued sides turn None into an empty list when the object is built.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

from ..exc import MappingError

if TYPE_CHECKING:
    from .mapper import Mapper

__all__ = ["RELATIONSHIP_KEY", "Direction", "RelationshipProperty", "relationship"]

RELATIONSHIP_KEY = "redmap.relationship"

_LAZY = frozenset({"select", "selectin", "raise"})
_CASCADES = frozenset({"save-update", "merge", "delete", "delete-orphan", "all", "expunge"})


class Direction(enum.Enum):
    """Which side holds the link, as in SQLAlchemy."""

    # This object holds a foreign key to the target (Book.author).
    MANYTOONE = "many-to-one"
    # The targets hold a foreign key to this object (Author.books).
    ONETOMANY = "one-to-many"
    # Links live in a pair of sets, one per side (Book.tags / Tag.books).
    MANYTOMANY = "many-to-many"


class RelationshipProperty:
    """What one relationship attribute means; direction and target are set at configure."""

    def __init__(
        self,
        argument: Any = None,
        *,
        back_populates: str | None = None,
        secondary: str | None = None,
        lazy: str = "select",
        cascade: str = "save-update, merge",
        order_by: Any = None,
    ):
        if lazy not in _LAZY:
            raise MappingError(f"lazy must be one of {sorted(_LAZY)}, got {lazy!r}")
        parts = {p.strip() for p in cascade.split(",") if p.strip()}
        unknown = parts - _CASCADES
        if unknown:
            raise MappingError(f"unknown cascade option(s) {sorted(unknown)} in {cascade!r}")
        if "all" in parts:
            parts |= {"save-update", "merge", "delete", "expunge"}
        self.argument = argument
        self.back_populates = back_populates
        self.secondary = secondary
        self.lazy = lazy
        self.cascade = frozenset(parts)
        self.order_by = order_by
        # Filled in by the mapper and by configure().
        self.key: str = ""
        self.parent: Mapper[Any] | None = None
        self.annotation: Any = None
        self.uselist: bool = False
        self.target: Any = None
        self.direction: Direction = Direction.MANYTOONE
        # The foreign-key column: on this model (many-to-one) or on the target (one-to-many).
        self.fk_column: str = ""
        # The relationship on the target that mirrors this one, if back_populates names it.
        self.reverse: RelationshipProperty | None = None
        # one-to-many: the Sorted field of the target ordering the collection, if any.
        self.order_column: str | None = None
        # many-to-many: the name of this side's link sets (the attribute name, or a hidden
        # one for the far side of a relationship without back_populates).
        self.link_name: str = ""
        self.reverse_link_name: str = ""

    def __repr__(self) -> str:
        owner = self.parent.class_.__name__ if self.parent else "?"
        return f"<RelationshipProperty {owner}.{self.key}>"


def relationship(
    argument: Any = None,
    *,
    back_populates: str | None = None,
    secondary: str | None = None,
    lazy: str = "select",
    cascade: str = "save-update, merge",
    order_by: Any = None,
) -> Any:
    """Declare a relationship to another mapped model.

    The target comes from the annotation (`list["Book"]`, `Optional[Author]`) unless
    given as `argument`. Returns a dataclass field so that plain `@dataclass` accepts it.
    """
    prop = RelationshipProperty(
        argument,
        back_populates=back_populates,
        secondary=secondary,
        lazy=lazy,
        cascade=cascade,
        order_by=order_by,
    )
    return dataclasses.field(default=None, metadata={RELATIONSHIP_KEY: prop})
