"""redmap: an object mapper for Redis in the style of SQLAlchemy's ORM.

Public names only; everything is defined in its own module.
"""

from __future__ import annotations

from . import event as event
from .engine import Engine as Engine
from .engine import configure as configure
from .engine import create_engine as create_engine
from .inspection import inspect as inspect
from .orm.registry import registry as registry
from .orm.relationships import relationship as relationship
from .orm.schema import CreatedAt as CreatedAt
from .orm.schema import ExpiresAt as ExpiresAt
from .orm.schema import ForeignKey as ForeignKey
from .orm.schema import Indexed as Indexed
from .orm.schema import PrimaryKey as PrimaryKey
from .orm.schema import Sorted as Sorted
from .orm.schema import Suffix as Suffix
from .orm.schema import Text as Text
from .orm.schema import Unique as Unique
from .orm.schema import UpdatedAt as UpdatedAt
from .orm.session import Session as Session
from .orm.session import run_in_transaction as run_in_transaction
from .orm.session import sessionmaker as sessionmaker
from .orm.strategy_options import Load as Load
from .orm.strategy_options import defaultload as defaultload
from .orm.strategy_options import lazyload as lazyload
from .orm.strategy_options import raiseload as raiseload
from .orm.strategy_options import selectinload as selectinload
from .orm.validators import validates as validates
from .query.dml import delete as delete
from .query.dml import update as update
from .query.expression import and_ as and_
from .query.expression import asc as asc
from .query.expression import col as col
from .query.expression import desc as desc
from .query.expression import or_ as or_
from .query.select import Select as Select
from .query.select import select as select

__version__ = "0.1.0"

__all__ = [
    "CreatedAt",
    "Engine",
    "ExpiresAt",
    "ForeignKey",
    "Indexed",
    "Load",
    "PrimaryKey",
    "Select",
    "Session",
    "Sorted",
    "Suffix",
    "Text",
    "Unique",
    "UpdatedAt",
    "and_",
    "asc",
    "col",
    "configure",
    "create_engine",
    "delete",
    "defaultload",
    "desc",
    "inspect",
    "lazyload",
    "or_",
    "raiseload",
    "registry",
    "relationship",
    "run_in_transaction",
    "select",
    "selectinload",
    "sessionmaker",
    "update",
    "validates",
]
