"""The migration runner; owns the `VersionStore` protocol and `MigrationContext`.

Called by `command` (upgrade, downgrade, stamp, current). Hosts implement
`VersionStore` on their database (redmap keeps heads and the lock in Redis);
`MemoryVersionStore` is the reference implementation, used by tests.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from alembic_like.exc import CommandError, LockError
from alembic_like.messaging import Messaging
from alembic_like.operations import MigrateOperation, Operations
from alembic_like.revision import Direction, MigrationStep, RevisionMap

__all__ = [
    "MemoryVersionStore",
    "MigrationContext",
    "OperationsFactory",
    "RevisionSource",
    "VersionStore",
    "default_owner",
]

#: Builds the `op` object for one step; hosts bind their client and messaging here.
OperationsFactory = Callable[[MigrationStep], Operations]


class VersionStore(Protocol):
    """Where a database keeps its applied heads and the migration lock.

    - `get_heads()`: the applied head revision ids; `()` means base.
    - `set_heads(heads)`: replace them; called after every completed step, so an
      interrupted run restarts from the last step that finished.
    - `lock(owner)`: a context manager held for a whole run; raises `LockError`
      (naming the holder) at once when someone else holds it.
    - `record_step(revision, direction)`: told after each step's `set_heads`;
      for a history log, or nothing.
    """

    def get_heads(self) -> tuple[str, ...]: ...

    def set_heads(self, heads: tuple[str, ...]) -> None: ...

    def lock(self, owner: str) -> AbstractContextManager[None]: ...

    def record_step(self, revision: str, direction: Direction) -> None: ...


class RevisionSource(Protocol):
    """Anything with a revision map whose revisions carry their modules (a `ScriptDirectory`)."""

    @property
    def revision_map(self) -> RevisionMap: ...


class MemoryVersionStore:
    """A `VersionStore` in a Python object: heads, a lock holder and a step log."""

    def __init__(self, heads: tuple[str, ...] = ()) -> None:
        self.heads = heads
        self.locked_by: str | None = None
        self.steps: list[tuple[str, Direction]] = []

    def get_heads(self) -> tuple[str, ...]:
        """The stored heads."""
        return self.heads

    def set_heads(self, heads: tuple[str, ...]) -> None:
        """Replace the stored heads."""
        self.heads = tuple(heads)

    @contextmanager
    def lock(self, owner: str) -> Iterator[None]:
        """Hold the lock for `owner`; raises `LockError` when it is held already."""
        if self.locked_by is not None:
            raise LockError(
                f"Migrations are locked by {self.locked_by}; wait for that run to finish",
                owner=self.locked_by,
            )
        self.locked_by = owner
        try:
            yield
        finally:
            self.locked_by = None

    def record_step(self, revision: str, direction: Direction) -> None:
        """Append the step to `steps`."""
        self.steps.append((revision, direction))


def default_owner() -> str:
    """`host:pid`, naming this process as a lock holder."""
    return f"{socket.gethostname()}:{os.getpid()}"


class MigrationContext:
    """Runs plans from the revision map against one `VersionStore`.

    Every run holds the store's lock, reads the heads under it, and writes the new
    heads after each step. A step that raises stops the run with a `CommandError`
    (the cause chained) and the heads of the last completed step stored, so running
    the same command again continues from there.
    """

    def __init__(
        self,
        script: RevisionSource,
        store: VersionStore,
        operations_factory: OperationsFactory,
        messaging: Messaging | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        self.script = script
        self.store = store
        self.operations_factory = operations_factory
        self.messaging = messaging if messaging is not None else Messaging()
        self.owner = owner if owner is not None else default_owner()

    @property
    def revision_map(self) -> RevisionMap:
        """The graph the plans come from."""
        return self.script.revision_map

    def current(self) -> tuple[str, ...]:
        """The heads the store holds, as stored (unknown ids included)."""
        return tuple(self.store.get_heads())

    def upgrade(self, target: str = "head", *, dry_run: bool = False) -> list[MigrationStep]:
        """Run every step up to `target`; returns the steps run (or, dry, that would run)."""
        return self._run(lambda heads: self.revision_map.upgrade_plan(heads, target), dry_run)

    def downgrade(self, target: str, *, dry_run: bool = False) -> list[MigrationStep]:
        """Undo every step down to `target`, after checking each one can be undone.

        All downgrade functions are first collected without running; an
        irreversible operation raises `IrreversibleError` before any step runs.
        """
        return self._run(lambda heads: self.revision_map.downgrade_plan(heads, target), dry_run)

    def stamp(self, target: str, *, purge: bool = False) -> tuple[str, ...]:
        """Set the heads as if `target` had been reached, running nothing; returns them."""
        with self.store.lock(self.owner):
            heads = self.revision_map.stamp_heads(self.store.get_heads(), target, purge=purge)
            self.store.set_heads(heads)
        self.messaging.msg(f"Stamped {', '.join(heads) or '<base>'}")
        return heads

    def collect(self, step: MigrationStep) -> list[MigrateOperation]:
        """The operations `step` would invoke, recorded without running any."""
        return self.operations_factory(step).collect(self._function(step))

    def _run(
        self, plan_for: Callable[[tuple[str, ...]], list[MigrationStep]], dry_run: bool
    ) -> list[MigrationStep]:
        if dry_run:
            plan = plan_for(self.current())
            for step in plan:
                self.messaging.msg(f"Would run {step}")
                for operation in self.collect(step):
                    self.messaging.msg(f"    {operation.describe()}")
            return plan
        with self.store.lock(self.owner):
            heads = self.current()
            plan = plan_for(heads)
            for step in plan:
                if step.direction is Direction.DOWN:
                    self.collect(step)
            for step in plan:
                self.messaging.msg(f"Running {step}")
                fn, operations = self._function(step), self.operations_factory(step)
                try:
                    fn(operations)
                except Exception as exc:
                    raise CommandError(
                        f"Running {step.direction.value} {step.revision.revision} failed: "
                        f"{type(exc).__name__}: {exc}. Heads are still at "
                        f"{', '.join(heads) or '<base>'}; fix the cause and run it again"
                    ) from exc
                heads = self.revision_map.apply_step(heads, step)
                self.store.set_heads(heads)
                self.store.record_step(step.revision.revision, step.direction)
        return plan

    @staticmethod
    def _function(step: MigrationStep) -> Callable[[Operations], object]:
        module = step.revision.module
        fn: Callable[[Operations], object] | None = getattr(module, step.direction.value, None)
        if not callable(fn):
            raise CommandError(
                f"Revision {step.revision.revision} has no {step.direction.value}(op) function"
            )
        return fn
