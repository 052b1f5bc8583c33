"""`InstrumentedList`: the list behind one-to-many and many-to-many attributes.

Every add and remove is reported to `redmap.orm.relationship_events`, which keeps the
other side (`back_populates`) and the foreign key in step at once, before any flush,
and records what the flush must write. Loading fills the list without events.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex, TypeVar, overload

if TYPE_CHECKING:
    from .relationships import RelationshipProperty

__all__ = ["InstrumentedList"]

T = TypeVar("T")


class InstrumentedList(list[T]):
    """A list that tells its owner's relationship about every object added or removed."""

    def __init__(self, owner: Any, prop: RelationshipProperty, items: Iterable[T] = ()):
        super().__init__(items)
        self._owner = owner
        self._prop = prop

    # Events are fired after the list itself changed, so handlers see the new contents.

    def _added(self, item: Any) -> None:
        from .relationship_events import collection_added

        collection_added(self._owner, self._prop, item)

    def _removed(self, item: Any) -> None:
        from .relationship_events import collection_removed

        collection_removed(self._owner, self._prop, item)

    def _contains(self, item: Any) -> bool:
        return any(x is item for x in self)

    def _append_quiet(self, item: Any) -> None:
        """Add without events (the other side of back_populates is already updating)."""
        if not self._contains(item):
            super().append(item)

    def _remove_quiet(self, item: Any) -> None:
        for i, x in enumerate(self):
            if x is item:
                super().__delitem__(i)
                return

    def append(self, item: T) -> None:
        if self._contains(item):
            return  # a relationship holds an object once
        super().append(item)
        self._added(item)

    def extend(self, items: Iterable[T]) -> None:
        for item in list(items):
            self.append(item)

    def __iadd__(self, items: Iterable[T]) -> InstrumentedList[T]:  # type: ignore[override,misc]
        self.extend(items)
        return self

    def insert(self, index: SupportsIndex, item: T) -> None:
        if self._contains(item):
            return
        super().insert(index, item)
        self._added(item)

    def remove(self, item: T) -> None:
        for i, x in enumerate(self):
            if x is item:
                super().__delitem__(i)
                self._removed(item)
                return
        raise ValueError(f"{item!r} is not in the relationship")

    def pop(self, index: SupportsIndex = -1) -> T:
        item = super().pop(index)
        self._removed(item)
        return item

    def clear(self) -> None:
        items = list(self)
        super().clear()
        for item in items:
            self._removed(item)

    @overload
    def __setitem__(self, index: SupportsIndex, value: T) -> None: ...

    @overload
    def __setitem__(self, index: slice, value: Iterable[T]) -> None: ...

    def __setitem__(self, index: Any, value: Any) -> None:
        old = self[index] if isinstance(index, slice) else [self[index]]
        new = list(value) if isinstance(index, slice) else [value]
        super().__setitem__(index, value)
        for item in old:
            if not self._contains(item):
                self._removed(item)
        for item in new:
            if not any(o is item for o in old):
                self._added(item)

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        old = self[index] if isinstance(index, slice) else [self[index]]
        super().__delitem__(index)
        for item in old:
            self._removed(item)

    def __reduce_ex__(self, protocol: SupportsIndex) -> Any:
        # Copies (deepcopy, dataclasses.asdict) become plain lists, detached from events.
        return (list, (list(self),))
