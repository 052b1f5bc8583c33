"""Descriptors installed on mapped classes; they record changes into the `InstanceState`.

Values live in the instance `__dict__` under the field's name; a missing entry
means "not loaded" (expired), and reading it asks the state to load it.
Class-level access (`Author.age`) returns the descriptor, whose operators build
query expressions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..query.expression import ColumnOperators

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


class FieldAttribute(ColumnOperators[Any]):
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
    """A relationship attribute: loads on first access (per `lazy`), reports changes."""

    __slots__ = ("key", "prop")

    def __init__(self, prop: RelationshipProperty):
        self.prop = prop
        self.key = prop.key

    def __repr__(self) -> str:
        owner = self.prop.parent.name if self.prop.parent else "?"
        return f"{owner}.{self.key}"

    def _empty(self, obj: object) -> Any:
        from .collections import InstrumentedList

        return InstrumentedList(obj, self.prop) if self._uselist() else None

    def _uselist(self) -> bool:
        if self.prop.target is not None:
            return self.prop.uselist
        ann = self.prop.annotation
        if isinstance(ann, str):
            return ann.replace(" ", "").startswith(("list[", "List[", "typing.List["))
        return getattr(ann, "__origin__", None) is list

    def __get__(self, obj: object | None, owner: type[Any] | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        try:
            return d[self.key]
        except KeyError:
            pass
        st = state_of(obj)
        if st is None or st.identity is None:
            d[self.key] = self._empty(obj)
            return d[self.key]
        st.load_relationship(self.prop)
        return d[self.key]

    def __set__(self, obj: object, value: Any) -> None:
        from .collections import InstrumentedList
        from .relationship_events import collection_added, collection_removed, scalar_set

        d = obj.__dict__
        if self._uselist():
            if value is None:
                value = []
            st = state_of(obj)
            if self.key not in d and st is not None and st.identity is not None:
                st.load_relationship(self.prop)  # replacing needs the old members
            old = list(d.get(self.key) or [])
            new: InstrumentedList[Any] = InstrumentedList(obj, self.prop)
            list.extend(new, _unique(value))
            d[self.key] = new
            if not _configured(self.prop):
                return
            for item in old:
                if not any(x is item for x in new):
                    collection_removed(obj, self.prop, item)
            for item in new:
                if not any(x is item for x in old):
                    collection_added(obj, self.prop, item)
            return
        old_value = d.get(self.key)
        # A persistent object whose many-to-one is not loaded but whose stored foreign key
        # points somewhere: setting None must still clear the key (and make an orphan),
        # even if the target is not in the session. (Not for a new object, whose
        # constructor sets the relationship's None default after an explicit key.)
        st = state_of(obj)
        points = (
            self.key not in d
            and st is not None
            and st.identity is not None
            and d.get(self.prop.fk_column or "") is not None
        )
        if self.key not in d:
            if st is not None and st.session is not None and self.prop.target is not None:
                old_value = st.session.peek_many_to_one(st, self.prop)
        d[self.key] = value
        if (value is not None or old_value is not None or points) and _configured(self.prop):
            scalar_set(obj, self.prop, old_value, value)


def _configured(prop: RelationshipProperty) -> bool:
    """Configure the registry on first use; False while its classes are still being defined."""
    if prop.target is None and prop.parent is not None:
        from ..exc import MappingError

        try:
            prop.parent.registry.configure()
        except MappingError:
            return False
    return prop.target is not None


def _unique(items: Any) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if not any(x is item for x in out):
            out.append(item)
    return out


def instrument_class(mapper: Mapper[Any]) -> None:
    """Install one descriptor per field and relationship on the mapped class."""
    cls = mapper.class_
    for col in mapper.columns.values():
        setattr(cls, col.key, FieldAttribute(mapper, col))
    for prop in mapper.relationships.values():
        setattr(cls, prop.key, RelationshipAttribute(prop))
