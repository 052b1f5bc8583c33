"""redmap's half of migrations: the Redis operations, their implementations and the environment.

The generic engine (revision graph, script files, runner, commands) is `alembic_like`;
this package plugs Redis into it. Revisions receive a `RedisOperations` as `op`.
Importing the package registers every operation's implementation (`impl`).
"""

from __future__ import annotations

from . import impl as impl  # registers the implementations on RedisOperations
from .batch import MigrationRun as MigrationRun
from .env import RedisEnvironment as RedisEnvironment
from .ops import MISSING as MISSING
from .ops import AddField as AddField
from .ops import CreateIndex as CreateIndex
from .ops import DropField as DropField
from .ops import DropIndex as DropIndex
from .ops import Execute as Execute
from .ops import RedisOperation as RedisOperation
from .ops import RedisOperations as RedisOperations
from .ops import RenameField as RenameField
from .ops import RenameModel as RenameModel
from .ops import Transform as Transform
from .versioning import RedisVersionStore as RedisVersionStore

__all__ = [
    "MISSING",
    "AddField",
    "CreateIndex",
    "DropField",
    "DropIndex",
    "Execute",
    "MigrationRun",
    "RedisEnvironment",
    "RedisOperation",
    "RedisOperations",
    "RedisVersionStore",
    "RenameField",
    "RenameModel",
    "Transform",
]
