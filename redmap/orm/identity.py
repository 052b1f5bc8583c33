"""`IdentityMap`: one state per (model, primary key), plus the set of modified states.

Owned by the session; keeping `modified` beside the map makes finding dirty
objects cost nothing at flush time (only objects with mutable JSON fields are
compared by value, see `unitofwork`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .state import Identity, InstanceState

__all__ = ["IdentityMap", "IdentitySet"]


class IdentityMap:
    """Persistent (and deleted-but-not-flushed) states of one session by identity."""

    def __init__(self) -> None:
        self._states: dict[Identity, InstanceState] = {}
        self.modified: set[InstanceState] = set()
        # The states of models with mutable (JSON) fields, by id: a flush compares them
        # all (in-place changes bypass the descriptors), and only them, so a session
        # holding many other objects does not visit those at each flush.
        self.mutable: dict[int, InstanceState] = {}

    def get(self, identity: Identity) -> InstanceState | None:
        return self._states.get(identity)

    def add(self, state: InstanceState) -> None:
        assert state.identity is not None
        old = self._states.get(state.identity)
        if old is not None and old is not state:
            self.mutable.pop(id(old), None)
        self._states[state.identity] = state
        if state.mapper.mutable_columns:
            self.mutable[id(state)] = state

    def discard(self, state: InstanceState) -> None:
        if state.identity is not None and self._states.get(state.identity) is state:
            del self._states[state.identity]
            self.mutable.pop(id(state), None)
        self.modified.discard(state)

    def states(self) -> list[InstanceState]:
        return list(self._states.values())

    def clear(self) -> None:
        self._states.clear()
        self.modified.clear()
        self.mutable.clear()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, identity: object) -> bool:
        return identity in self._states


class IdentitySet:
    """A read-only collection whose `in` compares by identity, not dataclass equality.

    Mapped dataclasses compare by value and are usually unhashable, so
    `session.new`/`dirty`/`deleted` cannot be plain sets.
    """

    def __init__(self, objects: Iterable[Any] = ()):
        self._objs: dict[int, Any] = {id(o): o for o in objects}

    def __contains__(self, obj: object) -> bool:
        return id(obj) in self._objs and self._objs[id(obj)] is obj

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._objs.values()))

    def __len__(self) -> int:
        return len(self._objs)

    def __bool__(self) -> bool:
        return bool(self._objs)

    def __repr__(self) -> str:
        return f"IdentitySet({list(self._objs.values())!r})"
