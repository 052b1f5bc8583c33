"""`relationship()` and `RelationshipProperty`; declared on mapped classes, configured by the registry.

`relationship()` returns a `dataclasses.Field` (default None) carrying its
`RelationshipProperty` in the field's metadata, so a plain `@dataclass` accepts it;
list-valued sides turn None into an empty list when the object is built.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .exc import MappingError

if TYPE_CHECKING:
    from .mapper import Mapper

__all__ = ["RELATIONSHIP_KEY", "RelationshipProperty", "relationship"]

RELATIONSHIP_KEY = "redmap.relationship"

_LAZY = frozenset({"select", "selectin", "raise"})
_CASCADES = frozenset({"save-update", "merge", "delete", "delete-orphan", "all", "expunge"})


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
        self.parent: Mapper | None = None
        self.annotation: Any = None
        self.uselist: bool = False
        self.target: Any = None

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
    """Resolve each relationship's target class and whether it holds a list."""
    import typing

    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            ann = prop.annotation
            target = prop.argument
            uselist = False
            if isinstance(ann, str):
                stripped = ann.replace(" ", "")
                uselist = stripped.startswith(("list[", "List[", "typing.List["))
            else:
                uselist = typing.get_origin(ann) is list
            if target is None:
                target = _target_from_annotation(ann)
            prop.uselist = uselist
            prop.target = reg._lookup(target, model=mapper.name, field=prop.key)


def _target_from_annotation(ann: Any) -> Any:
    import re
    import typing

    if isinstance(ann, str):
        names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", ann)
        candidates = [n for n in names if n not in {"list", "List", "Optional", "None", "typing"}]
        return candidates[-1] if candidates else ann
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    inner = args[0] if args else ann
    if isinstance(inner, typing.ForwardRef):
        return inner.__forward_arg__
    return inner
