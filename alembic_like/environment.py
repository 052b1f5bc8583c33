"""What a host plugs into the commands; owns the `Environment` protocol.

Implemented by hosts (redmap implements it on Redis); consumed by `command` and
built per CLI run by the `HostFactory` given to `cli.main`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from alembic_like.config import Config
from alembic_like.operations import Operations
from alembic_like.revision import MigrationStep
from alembic_like.runtime import VersionStore

__all__ = ["Environment", "HostFactory"]


class Environment(Protocol):
    """The database side of the commands.

    - `version_store()`: where heads and the lock live.
    - `operations(step)`: the `op` object for one step (an `Operations` subclass
      carrying the host's client); also used, collecting only, for dry runs.
    - `compare()`: autogenerate; the upgrade body (one line per operation, e.g.
      `op.add_field("Author", "bio", default=None)`) that takes the schema recorded
      at head to the current models, or `[]` when they match.
    - `render_imports()`: import lines the `compare()` body needs.
    - `record_snapshot(heads)`: called after an upgrade that ran steps and after a
      stamp, so the next `compare()` diffs against what was just reached.

    Building the host must be cheap and must not connect: `revision` receives one
    even when it does not autogenerate.
    """

    def version_store(self) -> VersionStore: ...

    def operations(self, step: MigrationStep) -> Operations: ...

    def compare(self) -> list[str]: ...

    def render_imports(self) -> list[str]: ...

    def record_snapshot(self, heads: tuple[str, ...]) -> None: ...


#: Builds the host from the loaded configuration (url, models, messaging).
HostFactory = Callable[[Config], Environment]
