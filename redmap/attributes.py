"""Descriptors installed on mapped classes; they record changes into the `InstanceState`.

Values live in the instance `__dict__` under the field's name; a missing entry
means "not loaded" (expired), and reading it asks the state to load it.
Class-level access (`Author.age`) returns the descriptor, whose operators build
query expressions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .expression import ColumnOperators

if TYPE_CHECKING:
    from .mapper import ColumnProperty, Mapper
    from .relationships import RelationshipProperty
    from .state import InstanceState

__all__ = ["STATE_ATTR", "FieldAttribute", "instrument_class", "state_of"]

# The instance __dict__ entry holding the InstanceState; not a valid field name clash
# because dataclass fields cannot start with "_redmap_" by convention and we refuse it.
STATE_ATTR = "_redmap_state"


def state_of(obj: object) -> InstanceState | None:
    """The state of `obj`, or None when it never met a session.

    A state copied along with `__dict__` (copy.copy) belongs to the original object,
    so it is ignored here.
    """
    st: InstanceState | None = obj.__dict__.get(STATE_ATTR)
    if st is not None and st.obj is obj:
        return st
    return None


class FieldAttribute(ColumnOperators):
    """A stored field: plain reads and writes, with change tracking when persistent."""

    __slots__ = ("column", "key", "mapper")

    def __init__(self, mapper: Mapper[Any], column: ColumnProperty):
        self.mapper = mapper
        self.column = column
        self.key = column.key

    def __repr__(self) -> str:
        return f"{self.mapper.name}.{self.key}"

    def __get__(self, obj: object | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        try:
            return d[self.key]
        except KeyError:
            pass
        st = state_of(obj)
        if st is not None and st.identity is not None:
            st.load_unloaded(self.key)
            return d[self.key]
        if self.column.implicit:
            return None
        raise AttributeError(f"{self.mapper.name!s} object has no value for {self.key!r}")

    def __set__(self, obj: object, value: Any) -> None:
        st = state_of(obj)
        if st is not None and st.identity is not None:
            st.modified_attribute(self.key)
        obj.__dict__[self.key] = value


class RelationshipAttribute:
    """A relationship attribute; lists default to an empty list."""

    __slots__ = ("key", "prop")

    def __init__(self, prop: RelationshipProperty):
        self.prop = prop
        self.key = prop.key

    def __repr__(self) -> str:
        owner = self.prop.parent.name if self.prop.parent else "?"
        return f"{owner}.{self.key}"

    def __get__(self, obj: object | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        if self.key not in d:
            d[self.key] = [] if self.prop.uselist else None
        return d[self.key]

    def __set__(self, obj: object, value: Any) -> None:
        if value is None and self._uselist_hint():
            value = []
        obj.__dict__[self.key] = value

    def _uselist_hint(self) -> bool:
        ann = self.prop.annotation
        if isinstance(ann, str):
            return ann.replace(" ", "").startswith(("list[", "List["))
        return getattr(ann, "__origin__", None) is list


def instrument_class(mapper: Mapper[Any]) -> None:
    """Install one descriptor per field and relationship on the mapped class."""
    cls = mapper.class_
    for col in mapper.columns.values():
        setattr(cls, col.key, FieldAttribute(mapper, col))
    for prop in mapper.relationships.values():
        setattr(cls, prop.key, RelationshipAttribute(prop))
