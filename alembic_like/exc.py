"""Every error alembic_like raises; owns the exception tree, raised from all its modules.

```
AlembicLikeError
├── CommandError          a command that cannot run as asked (missing file, bad target, failed step)
│   ├── LockError         another migrator holds the version store's lock
│   └── IrreversibleError an operation with no reverse, found before any downgrade step runs
└── RevisionError         the revision graph, or a reference to a revision in it, is wrong
    ├── MultipleHeads     "head" (or a relative step) asked for where there are several heads
    ├── ResolutionError   an identifier that names no revision, or several
    ├── CycleDetected     down_revision links that loop back on themselves
    └── DependencyError   a down_revision naming a revision that does not exist
```

Each error keeps the facts that produced it as attributes, so a host (redmap maps
these to its `MigrationError` in one place) can react without parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlembicLikeError",
    "CommandError",
    "CycleDetected",
    "DependencyError",
    "IrreversibleError",
    "LockError",
    "MultipleHeads",
    "ResolutionError",
    "RevisionError",
]


class AlembicLikeError(Exception):
    """The root of every error alembic_like raises on purpose."""


class CommandError(AlembicLikeError):
    """A command that cannot run as asked.

    Raised when: the migrations directory or a revision file is missing or broken,
    a target is not valid for the command, or a migration step failed (the original
    exception is chained as `__cause__`).
    """


class LockError(CommandError):
    """Raised by a `VersionStore.lock()` when another migrator already holds the lock."""

    def __init__(self, message: str, *, owner: str | None = None) -> None:
        self.owner = owner
        super().__init__(message)


class IrreversibleError(CommandError):
    """Raised by `MigrateOperation.reverse()` for an operation that has no reverse.

    Downgrades check every step for this before the first one runs, so nothing
    is half-undone.
    """

    def __init__(self, message: str, *, operation: str | None = None) -> None:
        self.operation = operation
        super().__init__(message)


class RevisionError(AlembicLikeError):
    """The revision graph, or a reference into it, is wrong."""


class MultipleHeads(RevisionError):  # Alembic's name, kept on purpose
    """Raised when a single head is needed (`head`, `head-1`, `+1`) but there are several."""

    def __init__(self, heads: Sequence[str], argument: str) -> None:
        self.heads = tuple(heads)
        self.argument = argument
        super().__init__(
            f"Multiple head revisions are present for given argument {argument!r}: "
            f"{', '.join(self.heads)}; name one revision, or use 'heads' for all of them"
        )


class ResolutionError(RevisionError):
    """Raised when an identifier matches no revision, several revisions, or walks off the graph."""

    def __init__(self, message: str, *, argument: str, candidates: Sequence[str] = ()) -> None:
        self.argument = argument
        self.candidates = tuple(candidates)
        super().__init__(message)


class CycleDetected(RevisionError):  # Alembic's name, kept on purpose
    """Raised when building a revision map whose down_revision links form a loop."""

    def __init__(self, revisions: Sequence[str]) -> None:
        self.revisions = tuple(revisions)
        super().__init__(f"Cycle is detected in revisions ({', '.join(self.revisions)})")


class DependencyError(RevisionError):
    """Raised when a revision's down_revision names a revision that is not in the map."""

    def __init__(self, revision: str, missing: str) -> None:
        self.revision = revision
        self.missing = missing
        super().__init__(
            f"Revision {revision} refers to down_revision {missing}, which is not present"
        )
