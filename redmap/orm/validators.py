"""`@validates`: marks a method of a mapped dataclass as the validator of some attributes.

The decorator only records the names on the function; `attributes.instrument_class`
(at `@registry.mapped`) finds the marked methods and installs each as its
attributes' validator (`events.SetHooks`), so it runs on every assignment, the
dataclass `__init__`'s included, and never on loading (which fills `__dict__`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["VALIDATES_ATTR", "validates"]

F = TypeVar("F", bound=Callable[..., Any])

# The attribute of a validator function naming the attributes it validates.
VALIDATES_ATTR = "__redmap_validates__"


def validates(*names: str) -> Callable[[F], F]:
    """Make the decorated method the validator of the attributes `names`.

    The method is called as `method(self, key, value)` on every assignment (the
    dataclass constructor's included) and returns the value to store; an exception it
    raises propagates and leaves the attribute unchanged. Values loaded from Redis
    are not validated again. A stored field or a many-to-one relationship can be
    validated; naming anything else is a `MappingError` at `@registry.mapped`.

    >>> @validates("email")
    ... def check_email(self, key, value):
    ...     return value.lower()
    """
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError("@validates takes the names of the attributes to validate")

    def decorate(fn: F) -> F:
        setattr(fn, VALIDATES_ATTR, names)
        return fn

    return decorate
