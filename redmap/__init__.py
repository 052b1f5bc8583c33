"""redmap: an object mapper for Redis in the style of SQLAlchemy's ORM.

Public names only; everything is defined in its own module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .expression import and_ as and_
from .expression import asc as asc
from .expression import col as col
from .expression import desc as desc
from .expression import or_ as or_
from .query import Select as Select
from .query import select as select
from .registry import registry as registry
from .relationships import relationship as relationship
from .schema import ForeignKey as ForeignKey
from .schema import Indexed as Indexed
from .schema import PrimaryKey as PrimaryKey
from .schema import Sorted as Sorted
from .schema import Unique as Unique

if TYPE_CHECKING:
    from .engine import Engine as Engine
    from .engine import configure as configure
    from .engine import create_engine as create_engine
    from .session import Session as Session
    from .session import run_in_transaction as run_in_transaction
    from .session import sessionmaker as sessionmaker

# Names whose modules import the driver (redis-py): loaded on first use, so that the
# I/O-free core (`redmap.persistence`, `redmap.flushplan`, `redmap.flushprotocol`)
# imports without redis-py (docs/design/layers.md).
_DRIVER_NAMES = {
    "Engine": "engine",
    "configure": "engine",
    "create_engine": "engine",
    "Session": "session",
    "run_in_transaction": "session",
    "sessionmaker": "session",
}


def __getattr__(name: str) -> Any:
    module = _DRIVER_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'redmap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_DRIVER_NAMES})

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "ForeignKey",
    "Indexed",
    "PrimaryKey",
    "Select",
    "Session",
    "Sorted",
    "Unique",
    "and_",
    "asc",
    "col",
    "configure",
    "create_engine",
    "desc",
    "or_",
    "registry",
    "relationship",
    "run_in_transaction",
    "select",
    "sessionmaker",
]
