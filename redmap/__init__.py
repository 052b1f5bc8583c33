"""redmap: an object mapper for Redis in the style of SQLAlchemy's ORM.

Public names only; everything is defined in its own module.
"""

from __future__ import annotations

from .engine import Engine as Engine
from .engine import configure as configure
from .engine import create_engine as create_engine
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
from .session import Session as Session
from .session import run_in_transaction as run_in_transaction
from .session import sessionmaker as sessionmaker

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
