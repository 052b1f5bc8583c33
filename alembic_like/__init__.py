"""alembic_like: a generic migration engine in Alembic's layering; imports nothing from redmap.

`revision` is the pure revision graph, `script` the files, `operations` the `op`
object, `runtime` the runner over a host's `VersionStore`, `command` and `cli` the
commands, `config` the pyproject table and `messaging` the only printer.
"""

from __future__ import annotations

from alembic_like.config import Config as Config
from alembic_like.config import add_table as add_table
from alembic_like.environment import Environment as Environment
from alembic_like.environment import HostFactory as HostFactory
from alembic_like.exc import AlembicLikeError as AlembicLikeError
from alembic_like.exc import CommandError as CommandError
from alembic_like.exc import CycleDetected as CycleDetected
from alembic_like.exc import DependencyError as DependencyError
from alembic_like.exc import IrreversibleError as IrreversibleError
from alembic_like.exc import LockError as LockError
from alembic_like.exc import MultipleHeads as MultipleHeads
from alembic_like.exc import ResolutionError as ResolutionError
from alembic_like.exc import RevisionError as RevisionError
from alembic_like.messaging import Messaging as Messaging
from alembic_like.messaging import Progress as Progress
from alembic_like.messaging import obfuscate_url_pw as obfuscate_url_pw
from alembic_like.operations import MigrateOperation as MigrateOperation
from alembic_like.operations import Operations as Operations
from alembic_like.revision import Direction as Direction
from alembic_like.revision import MigrationStep as MigrationStep
from alembic_like.revision import Revision as Revision
from alembic_like.revision import RevisionMap as RevisionMap
from alembic_like.runtime import MemoryVersionStore as MemoryVersionStore
from alembic_like.runtime import MigrationContext as MigrationContext
from alembic_like.runtime import VersionStore as VersionStore
from alembic_like.script import ScriptDirectory as ScriptDirectory

__all__ = [
    "AlembicLikeError",
    "CommandError",
    "Config",
    "CycleDetected",
    "DependencyError",
    "Direction",
    "Environment",
    "HostFactory",
    "IrreversibleError",
    "LockError",
    "MemoryVersionStore",
    "Messaging",
    "MigrateOperation",
    "MigrationContext",
    "MigrationStep",
    "MultipleHeads",
    "Operations",
    "Progress",
    "ResolutionError",
    "Revision",
    "RevisionError",
    "RevisionMap",
    "ScriptDirectory",
    "VersionStore",
    "add_table",
    "obfuscate_url_pw",
]
