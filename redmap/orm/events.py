"""Listener tables behind `redmap.event`; read by the session, the unit of work and attributes.

`redmap.event.listen` records listeners here; the `Session` asks for its session
events, `UOWTransaction` for the mapper events of each flushed object, and an
attribute descriptor runs its `SetHooks` (validator, then "set" listeners) on
assignment. Nothing here imports the session or the mapping layer, so every layer
can read the tables; each check is a test of an empty table first, so that with no
listener an event point costs one dict test per flush, not one per object.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "ATTRIBUTE_EVENTS",
    "MAPPER_EVENTS",
    "SESSION_EVENTS",
    "Listener",
    "SetHooks",
    "add_mapper_listener",
    "add_session_listener",
    "has_mapper_listener",
    "has_session_listener",
    "mapper_events_enabled",
    "mapper_listeners",
    "remove_mapper_listener",
    "remove_session_listener",
    "session_events_enabled",
    "session_listeners",
]

# Called with the object, once per object of a flush (`UOWTransaction`).
MAPPER_EVENTS = frozenset(
    {
        "before_insert",
        "after_insert",
        "before_update",
        "after_update",
        "before_delete",
        "after_delete",
    }
)
# Called with the `Session` (an AsyncSession's listeners get its `sync_session`).
SESSION_EVENTS = frozenset(
    {"before_flush", "after_flush", "before_commit", "after_commit", "after_rollback"}
)
# Called with (target, value, oldvalue, initiator) on assignment.
ATTRIBUTE_EVENTS = frozenset({"set"})

# Registration order across every target, so that listeners found through several
# keys (a class and its base, a session and its sessionmaker) run in the order they
# were registered; `insert=True` takes negative numbers (before everything so far).
_order = itertools.count(1)
_first = itertools.count(-1, -1)


class Listener:
    """One registered listener: the function as given and how to call it."""

    __slots__ = ("call", "fn", "propagate", "retval", "seq")

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        retval: bool = False,
        propagate: bool = False,
        once: bool = False,
        insert: bool = False,
    ) -> None:
        # `fn` is what `remove` and `contains` compare; `call` is what runs (`once`
        # wraps it so that only the first event calls it).
        self.fn = fn
        self.call = _once(fn) if once else fn
        self.retval = retval
        self.propagate = propagate
        self.seq = next(_first) if insert else next(_order)

    def __repr__(self) -> str:
        return f"<Listener {getattr(self.fn, '__qualname__', self.fn)!r}>"


def _once(fn: Callable[..., Any]) -> Callable[..., Any]:
    fired = False

    def call(*args: Any) -> Any:
        nonlocal fired
        if fired:
            return args[1] if len(args) > 1 else None  # a "set" listener keeps the value
        fired = True
        return fn(*args)

    return call


# -- attribute events and validators ----------------------------------------------------


class SetHooks:
    """What runs when a value is assigned to one attribute, before it is stored.

    Installed on a descriptor (`FieldAttribute.hooks`, `RelationshipAttribute.hooks`)
    only when there is something to run: the `@validates` method, then the "set"
    listeners in registration order, each `retval=True` one replacing the value. A
    descriptor without hooks stores the value with no extra call.
    """

    __slots__ = ("key", "listeners", "validator")

    def __init__(self, key: str, validator: Callable[[Any, str, Any], Any] | None = None):
        self.key = key
        self.validator = validator
        self.listeners: list[Listener] = []

    def __bool__(self) -> bool:
        return self.validator is not None or bool(self.listeners)

    def run(self, obj: Any, value: Any, oldvalue: Any, initiator: Any) -> Any:
        """The value to store; an exception raised here leaves the attribute as it was."""
        if self.validator is not None:
            value = self.validator(obj, self.key, value)
        for listener in self.listeners:
            result = listener.call(obj, value, oldvalue, initiator)
            if listener.retval:
                value = result
        return value

    def add(self, listener: Listener) -> None:
        self.listeners.append(listener)
        self.listeners.sort(key=lambda lst: lst.seq)


# -- mapper events ----------------------------------------------------------------------

# Listeners by the class they were registered on, then by event name.
_mapper: dict[type[Any], dict[str, list[Listener]]] = {}
# (class, event) -> its listeners, own and propagated from bases; cleared on any change.
_mapper_cache: dict[tuple[type[Any], str], tuple[Listener, ...]] = {}


def mapper_events_enabled() -> bool:
    """Whether any mapper listener exists (a flush skips every mapper event when not)."""
    return bool(_mapper)


def add_mapper_listener(cls: type[Any], name: str, listener: Listener) -> None:
    _mapper.setdefault(cls, {}).setdefault(name, []).append(listener)
    _mapper_cache.clear()


def remove_mapper_listener(cls: type[Any], name: str, fn: Callable[..., Any]) -> bool:
    """Remove the listener of `fn`; False when there was none."""
    found = _remove(_mapper.get(cls, {}), name, fn)
    if found:
        if not any(_mapper[cls].values()):
            del _mapper[cls]
        _mapper_cache.clear()
    return found


def has_mapper_listener(cls: type[Any], name: str, fn: Callable[..., Any]) -> bool:
    return any(lst.fn is fn for lst in _mapper.get(cls, {}).get(name, ()))


def mapper_listeners(cls: type[Any], name: str) -> tuple[Listener, ...]:
    """The listeners of event `name` for objects of `cls`: those registered on `cls`,
    and those registered with `propagate=True` on one of its bases."""
    if not _mapper:
        return ()
    key = (cls, name)
    found = _mapper_cache.get(key)
    if found is None:
        out = [
            lst
            for klass in cls.__mro__
            for lst in _mapper.get(klass, {}).get(name, ())
            if klass is cls or lst.propagate
        ]
        found = _mapper_cache[key] = tuple(sorted(out, key=lambda lst: lst.seq))
    return found


# -- session events ---------------------------------------------------------------------

# Listeners by target (a session class, a session, a sessionmaker, an AsyncSession or
# its class, an async_sessionmaker), then by event name. Weak keys: a session or a
# sessionmaker that goes away takes its listeners with it.
_session: weakref.WeakKeyDictionary[Any, dict[str, list[Listener]]] = weakref.WeakKeyDictionary()


def session_events_enabled() -> bool:
    """Whether any session listener exists (the session fires no event when not)."""
    return len(_session) > 0


def add_session_listener(target: Any, name: str, listener: Listener) -> None:
    table = _session.get(target)
    if table is None:
        table = _session[target] = {}
    table.setdefault(name, []).append(listener)


def remove_session_listener(target: Any, name: str, fn: Callable[..., Any]) -> bool:
    """Remove the listener of `fn`; False when there was none."""
    table = _session.get(target)
    if table is None or not _remove(table, name, fn):
        return False
    if not any(table.values()):
        del _session[target]
    return True


def has_session_listener(target: Any, name: str, fn: Callable[..., Any]) -> bool:
    table = _session.get(target)
    return table is not None and any(lst.fn is fn for lst in table.get(name, ()))


def session_listeners(name: str, session: Any, owners: Iterable[Any] = ()) -> list[Listener]:
    """The listeners of event `name` for `session`: registered on the session, on its
    class or a base class, or on one of `owners` (what made or wraps the session: a
    sessionmaker, an AsyncSession, an async_sessionmaker) or their classes."""
    if not _session:
        return []
    seen: set[int] = set()
    out: list[Listener] = []
    for owner in (session, *owners):
        for key in (owner, *type(owner).__mro__):
            if id(key) in seen:
                continue
            seen.add(id(key))
            try:
                table = _session.get(key)
            except TypeError:  # an unhashable or non-weakrefable owner holds nothing
                continue
            if table is not None:
                out.extend(table.get(name, ()))
    out.sort(key=lambda lst: lst.seq)
    return out


def _remove(table: dict[str, list[Listener]], name: str, fn: Callable[..., Any]) -> bool:
    listeners = table.get(name, [])
    for i, lst in enumerate(listeners):
        if lst.fn is fn:
            del listeners[i]
            if not listeners:
                del table[name]
            return True
    return False
