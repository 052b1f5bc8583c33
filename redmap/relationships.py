"""`relationship()` and `RelationshipProperty`; declared on mapped classes, configured by registry.

`relationship()` returns a `dataclasses.Field` (default None) carrying its
`RelationshipProperty` in the field's metadata, so a plain `@dataclass` accepts it;
list-valued sides turn None into an empty list when the object is built.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from typing import TYPE_CHECKING, Any

from .exc import MappingError

if TYPE_CHECKING:
    from .mapper import Mapper

__all__ = [
    "RELATIONSHIP_KEY",
    "Direction",
    "RelationshipProperty",
    "configure_relationships",
    "relationship",
]

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


def configure_relationships(reg: Any) -> None:
    """Resolve targets, directions, foreign keys, back_populates pairs and ordering."""
    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            _resolve_target(reg, mapper, prop)
    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            _resolve_direction(mapper, prop)
    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            _resolve_reverse(mapper, prop)
            _resolve_order(mapper, prop)


def _resolve_target(reg: Any, mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    ann = prop.annotation
    if isinstance(ann, str):
        prop.uselist = ann.replace(" ", "").startswith(("list[", "List[", "typing.List["))
    else:
        prop.uselist = typing.get_origin(ann) is list
    target = prop.argument if prop.argument is not None else _target_from_annotation(ann)
    prop.target = reg._lookup(target, model=mapper.name, field=prop.key)


def _fk_columns(mapper: Mapper[Any], target: type[Any]) -> list[str]:
    return [
        c.key
        for c in mapper.columns.values()
        if c.foreign_key is not None and c.foreign_key.target is target
    ]


def _resolve_direction(mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    from .mapper import mapper_of_configured

    target_mapper = mapper_of_configured(prop.target)
    if prop.secondary is not None:
        if not prop.uselist:
            raise MappingError(
                "a many-to-many relationship (secondary=...) must be annotated list[...]",
                model=mapper.name,
                field=prop.key,
            )
        prop.direction = Direction.MANYTOMANY
        prop.link_name = prop.key
        return
    if prop.uselist:
        fks = _fk_columns(target_mapper, mapper.class_)
        where = f"{target_mapper.name} needs a ForeignKey({mapper.name!r}) field"
        prop.direction = Direction.ONETOMANY
    else:
        fks = _fk_columns(mapper, prop.target)
        where = f"{mapper.name} needs a ForeignKey({target_mapper.name!r}) field"
        prop.direction = Direction.MANYTOONE
    if prop.back_populates and len(fks) > 1:
        # Several foreign keys to the same model: the reverse side may name one.
        other = target_mapper.relationships.get(prop.back_populates)
        if other is not None and other.fk_column in fks:
            fks = [other.fk_column]
    if len(fks) != 1:
        raise MappingError(
            f"cannot tell which foreign key links {mapper.name}.{prop.key}: {where}"
            + (f" (found {', '.join(fks)})" if fks else ""),
            model=mapper.name,
            field=prop.key,
        )
    prop.fk_column = fks[0]


def _resolve_reverse(mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    from .mapper import mapper_of_configured

    target_mapper = mapper_of_configured(prop.target)
    if prop.back_populates is None:
        if prop.direction is Direction.MANYTOMANY:
            prop.reverse_link_name = f"~{mapper.keyspace}.{prop.key}"
            if prop not in target_mapper.hidden_links:
                target_mapper.hidden_links.append(prop)
        return
    other = target_mapper.relationships.get(prop.back_populates)
    if other is None:
        raise MappingError(
            f"back_populates={prop.back_populates!r}: {target_mapper.name} has no such "
            f"relationship",
            model=mapper.name,
            field=prop.key,
        )
    if other.target is not mapper.class_:
        raise MappingError(
            f"back_populates={prop.back_populates!r} points at a relationship to "
            f"{other.target.__name__}, not {mapper.name}",
            model=mapper.name,
            field=prop.key,
        )
    pairs = {
        (Direction.MANYTOONE, Direction.ONETOMANY),
        (Direction.ONETOMANY, Direction.MANYTOONE),
        (Direction.MANYTOMANY, Direction.MANYTOMANY),
    }
    if (prop.direction, other.direction) not in pairs:
        raise MappingError(
            f"back_populates pairs a {prop.direction.value} with a {other.direction.value}",
            model=mapper.name,
            field=prop.key,
        )
    if prop.direction is Direction.MANYTOMANY and prop.secondary != other.secondary:
        raise MappingError(
            f"both sides of a many-to-many need the same secondary "
            f"({prop.secondary!r} vs {other.secondary!r})",
            model=mapper.name,
            field=prop.key,
        )
    prop.reverse = other
    if prop.direction is Direction.MANYTOMANY:
        prop.reverse_link_name = other.key


def _resolve_order(mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    from .mapper import mapper_of_configured

    if prop.order_by is None:
        return
    target_mapper = mapper_of_configured(prop.target)
    if prop.direction is not Direction.ONETOMANY:
        raise MappingError(
            "order_by is supported on one-to-many relationships (many-to-many "
            "collections are ordered by primary key)",
            model=mapper.name,
            field=prop.key,
        )
    spec = prop.order_by
    name = spec.rpartition(".")[2] if isinstance(spec, str) else getattr(spec, "key", None)
    col = target_mapper.columns.get(name or "")
    if col is None or not (col.sorted or col.primary_key):
        raise MappingError(
            f"order_by={spec!r} must name a Sorted() field of {target_mapper.name}",
            model=mapper.name,
            field=prop.key,
        )
    fk = target_mapper.columns[prop.fk_column]
    if fk.order_column not in (None, col.key):
        raise MappingError(
            f"{target_mapper.name}.{prop.fk_column} already orders by {fk.order_column}",
            model=mapper.name,
            field=prop.key,
        )
    fk.order_column = None if col.primary_key else col.key
    prop.order_column = fk.order_column


def _target_from_annotation(ann: Any) -> Any:
    if isinstance(ann, str):
        names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", ann)
        skip = {"list", "List", "Optional", "None", "typing"}
        candidates = [n for n in names if n not in skip]
        return candidates[-1] if candidates else ann
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    inner = args[0] if args else ann
    if isinstance(inner, typing.ForwardRef):
        return inner.__forward_arg__
    return inner
