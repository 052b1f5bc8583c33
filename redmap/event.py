"""Event listeners, SQLAlchemy-style: `listen`, `listens_for`, `remove`, `contains`.

Three kinds of target, told apart by what is passed (see docs/events.md):

- a mapped class: the mapper events `before_insert`, `after_insert`, `before_update`,
  `after_update`, `before_delete`, `after_delete`, called as `fn(obj)` once per object
  of a flush (SQLAlchemy passes `(mapper, connection, target)`; redmap has no
  connection to give, so the listener gets the object alone, API.md section 12).
  `propagate=True` extends them to mapped subclasses (and lets an unmapped base or
  mixin be the target);
- `Session`, a session, a `sessionmaker`, `AsyncSession`, an AsyncSession or an
  `async_sessionmaker`: the session events `before_flush`, `after_flush`,
  `before_commit`, `after_commit`, `after_rollback`, called as `fn(session)` with the
  `Session` (an AsyncSession's `sync_session`);
- an attribute, `Model.field` or a many-to-one `Model.relationship`: the `set` event,
  called as `fn(target, value, oldvalue, initiator)` on every assignment (the
  constructor's included, loading excluded); with `retval=True` the listener returns
  the value to store.

The tables live in `redmap.orm.events`, read by the session, the unit of work and the
attribute descriptors; this module only checks and files registrations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .exc import InvalidRequestError
from .orm import events as _events
from .orm.attributes import FieldAttribute, RelationshipAttribute
from .orm.base import NO_VALUE as NO_VALUE
from .orm.events import SetHooks

__all__ = ["NO_VALUE", "contains", "listen", "listens_for", "remove"]

F = TypeVar("F", bound=Callable[..., Any])


def listen(
    target: Any,
    identifier: str,
    fn: Callable[..., Any],
    *,
    propagate: bool = False,
    retval: bool = False,
    once: bool = False,
    insert: bool = False,
) -> None:
    """Register `fn` for event `identifier` of `target`.

    - `propagate`: mapper events of a class apply to its mapped subclasses too.
    - `retval`: a "set" listener returns the value to store (ignored elsewhere:
      SQLAlchemy allows it only where a return value means something).
    - `once`: `fn` runs for the first event only.
    - `insert`: `fn` runs before the listeners registered so far.

    Raises InvalidRequestError for an event the target does not have, or a target
    that has no events. Registering is not thread-safe: do it at import time.
    """
    kind = _kind(target, identifier)
    if retval and kind != "attribute":
        raise InvalidRequestError(f"retval=True applies to 'set' events, not {identifier!r}")
    listener = _events.Listener(fn, retval=retval, propagate=propagate, once=once, insert=insert)
    if kind == "mapper":
        _check_mapped(target, propagate)
        _events.add_mapper_listener(target, identifier, listener)
    elif kind == "session":
        _events.add_session_listener(target, identifier, listener)
    else:
        if target.hooks is None:
            target.hooks = SetHooks(target.key)
        target.hooks.add(listener)


def listens_for(
    target: Any,
    identifier: str,
    *,
    propagate: bool = False,
    retval: bool = False,
    once: bool = False,
    insert: bool = False,
) -> Callable[[F], F]:
    """Decorate a function to `listen` with it; the function is returned unchanged.

    >>> @event.listens_for(Author, "before_insert")
    ... def stamp(author):
    ...     author.created = datetime.now()
    """

    def decorate(fn: F) -> F:
        listen(target, identifier, fn, propagate=propagate, retval=retval, once=once, insert=insert)
        return fn

    return decorate


def remove(target: Any, identifier: str, fn: Callable[..., Any]) -> None:
    """Unregister `fn` (the same target and identifier it was registered with).

    Raises InvalidRequestError when `fn` is not registered there.
    """
    kind = _kind(target, identifier)
    if kind == "mapper":
        found = _events.remove_mapper_listener(target, identifier, fn)
    elif kind == "session":
        found = _events.remove_session_listener(target, identifier, fn)
    else:
        found = _remove_attribute_listener(target, fn)
    if not found:
        raise InvalidRequestError(f"no listener {fn!r} for {identifier!r} on {target!r}")


def contains(target: Any, identifier: str, fn: Callable[..., Any]) -> bool:
    """Whether `fn` is registered for event `identifier` of `target`."""
    kind = _kind(target, identifier)
    if kind == "mapper":
        return _events.has_mapper_listener(target, identifier, fn)
    if kind == "session":
        return _events.has_session_listener(target, identifier, fn)
    hooks: SetHooks | None = target.hooks
    return hooks is not None and any(lst.fn is fn for lst in hooks.listeners)


def _remove_attribute_listener(target: FieldAttribute | RelationshipAttribute, fn: Any) -> bool:
    hooks = target.hooks
    if hooks is None:
        return False
    for i, lst in enumerate(hooks.listeners):
        if lst.fn is fn:
            del hooks.listeners[i]
            if not hooks:
                target.hooks = None  # no validator, no listener: back to the plain path
            return True
    return False


def _kind(target: Any, identifier: str) -> str:
    """Which events `target` has ("mapper", "session" or "attribute"), `identifier`
    being one of them; InvalidRequestError otherwise."""
    if isinstance(target, (FieldAttribute, RelationshipAttribute)):
        kind, names = "attribute", _events.ATTRIBUTE_EVENTS
    elif getattr(target, "__redmap_events__", None) == "session":
        kind, names = "session", _events.SESSION_EVENTS
    elif isinstance(target, type):
        kind, names = "mapper", _events.MAPPER_EVENTS
    else:
        raise InvalidRequestError(
            f"{target!r} has no events: listen on a mapped class, an attribute such as "
            f"Model.field, Session, a session, a sessionmaker or their asyncio versions"
        )
    if identifier not in names:
        raise InvalidRequestError(
            f"no such event {identifier!r} for {target!r}; its events are: "
            f"{', '.join(sorted(names))}"
        )
    return kind


def _check_mapped(target: type[Any], propagate: bool) -> None:
    """A mapper event target is a mapped class, or any class with `propagate=True`."""
    if "__redmap_mapper__" not in target.__dict__ and not propagate:
        raise InvalidRequestError(
            f"{target.__name__} is not a mapped class; map it with @registry.mapped, or "
            f"pass propagate=True to listen on the mapped classes deriving from it"
        )
