"""Descriptors installed on mapped classes; they record changes into the `InstanceState`.

Values live in the instance `__dict__` under the field's name; a missing entry
means "not loaded" (expired), and reading it asks the state to load it.
Class-level access (`Author.age`) returns the descriptor, whose operators build
query expressions.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..exc import InvalidRequestError, ValidationError
from ..query.expression import ColumnOperators, Increment
from .base import NO_VALUE
from .events import SetHooks
from .types import increment_command
from .validators import VALIDATES_ATTR

if TYPE_CHECKING:
    from .mapper import ColumnProperty, Mapper
    from .relationships import RelationshipProperty
    from .state import InstanceState

__all__ = ["STATE_ATTR", "FieldAttribute", "instrument_class", "set_quietly", "state_of"]

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


_NUMBERS = (int, float, decimal.Decimal)
_INEXACT = (float, decimal.Decimal)


class FieldAttribute(ColumnOperators[Any]):
    """A stored field: plain reads and writes, with change tracking when persistent."""

    __slots__ = ("column", "hooks", "key", "mapper")

    def __init__(self, mapper: Mapper[Any], column: ColumnProperty):
        self.mapper = mapper
        self.column = column
        self.key = column.key
        # The validator and "set" listeners (`redmap.orm.events.SetHooks`); None when
        # there are none, so a plain assignment makes no extra call.
        self.hooks: SetHooks | None = None

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
        if type(value) is Increment:
            # Applied by Redis at flush: validators and "set" listeners see values, and
            # this is not one (its result is known after the flush).
            self._check_increment(obj, value)
            self.set_tracked(obj, value)
            return
        hooks = self.hooks
        if hooks is not None:
            value = hooks.run(obj, value, obj.__dict__.get(self.key, NO_VALUE), self)
        self.set_tracked(obj, value)

    def _check_increment(self, obj: object, inc: Increment) -> None:
        """Refuse an increment that the flush could not apply, at assignment. (A
        counter's commit runs this each time: the message is built only to raise.)"""
        other = inc.attribute
        if other is not self and (
            other.key != self.key or not issubclass(self.mapper.class_, other.mapper.class_)
        ):
            where = f"{self.mapper.name}.{self.key}"
            raise InvalidRequestError(
                f"{where} = {other!r} + ...: an increment adds to the field it is assigned "
                f"to; write {where} + n"
            )
        col = self.column
        command = None if col.codec is None else increment_command(col.codec)
        if command is None:
            raise InvalidRequestError(
                f"{self.mapper.name}.{self.key} cannot be incremented: increments apply "
                f"to int, float and Decimal fields"
            )
        if col.primary_key or col.indexed or col.unique or col.foreign_key is not None:
            where = f"{self.mapper.name}.{self.key}"
            raise InvalidRequestError(
                f"{where} cannot be incremented: it is a primary key, a foreign key or "
                f"Indexed/Unique, whose index entries need the new value before Redis "
                f"computes it; assign the new value instead (Sorted() fields can be "
                f"incremented)"
            )
        delta = inc.delta
        whole = command == "HINCRBY"
        if type(delta) is int:
            pass  # the usual delta, valid for every incrementable field
        elif (
            not isinstance(delta, int if whole else _NUMBERS)
            or isinstance(delta, bool)
            or (isinstance(delta, _INEXACT) and not math.isfinite(delta))
        ):
            raise ValidationError(
                model=self.mapper.name,
                field=self.key,
                expected=f"a finite {'int' if whole else 'number'} to add",
                actual=repr(delta),
                detail="the delta of an increment",
            )
        st = state_of(obj)
        if st is None or st.identity is None:
            raise InvalidRequestError(
                f"{self.mapper.name}.{self.key} + n is applied by Redis to a stored object; this "
                f"{self.mapper.name} is not stored yet: assign it a value"
            )

    def set_tracked(self, obj: object, value: Any) -> None:
        """Store `value` with change tracking and without the hooks: the ORM's own
        assignments (foreign keys kept in step with relationships), which SQLAlchemy
        makes without events too."""
        st = state_of(obj)
        if st is not None and st.identity is not None:
            if self.key not in obj.__dict__ and type(value) is not Increment:
                st.blind.add(self.key)  # assigned while expired: see InstanceState.blind
            st.modified_attribute(self.key)
        obj.__dict__[self.key] = value


class RelationshipAttribute:
    """A relationship attribute: loads on first access (per `lazy`), reports changes."""

    __slots__ = ("hooks", "key", "prop")

    def __init__(self, prop: RelationshipProperty):
        self.prop = prop
        self.key = prop.key
        # The validator (many-to-one only) and "set" listeners, as on `FieldAttribute`.
        self.hooks: SetHooks | None = None

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
        hooks = self.hooks
        if hooks is not None:
            value = hooks.run(obj, value, d.get(self.key, NO_VALUE), self)
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


def set_quietly(obj: object, name: str, value: Any) -> None:
    """Assign a stored field as the ORM does: tracked as a change, but without the
    validator and "set" listeners (`FieldAttribute.set_tracked`)."""
    attr = getattr(type(obj), name)
    if isinstance(attr, FieldAttribute):
        attr.set_tracked(obj, value)
    else:
        setattr(obj, name, value)


def instrument_class(mapper: Mapper[Any]) -> None:
    """Install one descriptor per field and relationship on the mapped class, with the
    class's `@validates` methods as their validators."""
    cls = mapper.class_
    validators = _validators(mapper)
    for col in mapper.columns.values():
        attr = FieldAttribute(mapper, col)
        if col.key in validators:
            attr.hooks = SetHooks(col.key, validators[col.key])
        setattr(cls, col.key, attr)
    for prop in mapper.relationships.values():
        rel = RelationshipAttribute(prop)
        if prop.key in validators:
            if rel._uselist():
                from ..exc import MappingError

                raise MappingError(
                    "@validates supports stored fields and many-to-one relationships; "
                    "a list relationship's members are not validated one by one",
                    model=mapper.name,
                    field=prop.key,
                )
            rel.hooks = SetHooks(prop.key, validators[prop.key])
        setattr(cls, prop.key, rel)
    mapper.validators = validators


def _validators(mapper: Mapper[Any]) -> dict[str, Callable[[Any, str, Any], Any]]:
    """The `@validates` methods of the class and its bases, by the name they validate."""
    from ..exc import MappingError

    found: dict[str, Callable[[Any, str, Any], Any]] = {}
    owners: dict[str, tuple[type[Any], str]] = {}
    for klass in mapper.class_.__mro__:
        for attr_name, fn in vars(klass).items():
            names = getattr(fn, VALIDATES_ATTR, None)
            if names is None or not callable(fn):
                continue
            for name in names:
                if name not in mapper.columns and name not in mapper.relationships:
                    raise MappingError(
                        f"@validates names {name!r}, which is neither a field nor a "
                        f"relationship",
                        model=mapper.name,
                        field=attr_name,
                    )
                if name in owners:
                    owner, other = owners[name]
                    if owner is klass:
                        raise MappingError(
                            f"two @validates methods for {name!r}: {other} and {attr_name}",
                            model=mapper.name,
                            field=name,
                        )
                    continue  # a base's validator, overridden by a subclass's own
                owners[name] = (klass, attr_name)
                found[name] = fn
    return found
