"""The operations of redmap revisions as data, and `RedisOperations`, the `op` they receive.

Called by revision files (`op.add_field(...)`), by `impl` (which registers how each
operation runs) and by `autogenerate` (which writes them). Every operation names its
model by class name or keyspace (see `RedisOperations`) and knows its own reverse, so
`op.reverse_of(upgrade)` is a free downgrade.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from alembic_like.exc import IrreversibleError
from alembic_like.operations import MigrateOperation, Operations

from ..exc import MigrationError
from ..orm import keys

__all__ = [
    "INDEX_KINDS",
    "MISSING",
    "AddField",
    "CreateIndex",
    "DropField",
    "DropIndex",
    "Execute",
    "IndexKind",
    "RedisOperation",
    "RedisOperations",
    "RenameField",
    "RenameModel",
    "Transform",
]

IndexKind = Literal["indexed", "unique", "sorted", "text", "suffix"]
INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)

#: What `op.transform` functions receive and return: the stored hash fields, raw.
Fields = dict[str, bytes]
TransformFn = Callable[[Fields], "dict[str, bytes | str] | None"]
ExecuteFn = Callable[[Any], object]


class _Missing(enum.Enum):
    # drop_field() given no default: its reverse cannot give objects a value back.
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing.MISSING


class Estimator(Protocol):
    """What a dry run binds to collected operations: counts measured on the database."""

    def estimate(self, operation: RedisOperation) -> str: ...


class RedisOperation(MigrateOperation):
    """Base of redmap's operations: a one-line `summary()`, plus dry-run counts in `describe()`."""

    _estimator: Estimator | None = None

    def summary(self) -> str:
        """One line saying what the operation does, without touching Redis."""
        return repr(self)

    def bind(self, estimator: Estimator) -> None:
        """Make `describe()` append what `estimator` measures (dry runs only)."""
        self._estimator = estimator

    def describe(self) -> str:
        """The summary, followed in dry runs by what would change, with counts."""
        text = self.summary()
        if self._estimator is not None:
            text += f": {self._estimator.estimate(self)}"
        return text


def _check_kind(kind: str) -> None:
    if kind not in INDEX_KINDS:
        raise MigrationError(f"index kind must be one of {', '.join(INDEX_KINDS)}, not {kind!r}")


def _fn_name(fn: Callable[..., Any] | None) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


@dataclass
class AddField(RedisOperation):
    """Give every object that lacks field `name` the value `default` (None: nothing stored)."""

    model: str
    name: str
    default: Any = None

    def reverse(self) -> MigrateOperation:
        return DropField(self.model, self.name, default=self.default)

    def summary(self) -> str:
        return f"add_field {self.model}.{self.name} (default={self.default!r})"


@dataclass
class DropField(RedisOperation):
    """Remove field `name` from every object; `default` is what the reverse gives them back."""

    model: str
    name: str
    default: Any = MISSING

    def reverse(self) -> MigrateOperation:
        if self.default is MISSING:
            raise IrreversibleError(
                f"drop_field({self.model!r}, {self.name!r}) cannot be reversed: the dropped "
                f"values are gone. Pass default=... (the value objects get back on downgrade) "
                f"or write downgrade() by hand",
                operation="drop_field",
            )
        return AddField(self.model, self.name, self.default)

    def summary(self) -> str:
        return f"drop_field {self.model}.{self.name}"


@dataclass
class RenameField(RedisOperation):
    """Move field `old` to `new` in every object that has `old`, with its index keys."""

    model: str
    old: str
    new: str

    def reverse(self) -> MigrateOperation:
        return RenameField(self.model, self.new, self.old)

    def summary(self) -> str:
        return f"rename_field {self.model}.{self.old} -> {self.new}"


@dataclass
class CreateIndex(RedisOperation):
    """Build an index of `field` from the stored objects (a backfill)."""

    model: str
    field: str
    kind: IndexKind = "indexed"

    def __post_init__(self) -> None:
        _check_kind(self.kind)

    def reverse(self) -> MigrateOperation:
        return DropIndex(self.model, self.field, self.kind)

    def summary(self) -> str:
        return f"create_index {self.model}.{self.field} ({self.kind})"


@dataclass
class DropIndex(RedisOperation):
    """Delete the index keys of `field`; the objects are left as they are."""

    model: str
    field: str
    kind: IndexKind = "indexed"

    def __post_init__(self) -> None:
        _check_kind(self.kind)

    def reverse(self) -> MigrateOperation:
        return CreateIndex(self.model, self.field, self.kind)

    def summary(self) -> str:
        return f"drop_index {self.model}.{self.field} ({self.kind})"


@dataclass
class RenameModel(RedisOperation):
    """Move every key of one keyspace (objects, indexes, counter, links) to another."""

    old_keyspace: str
    new_keyspace: str

    def __post_init__(self) -> None:
        for name in (self.old_keyspace, self.new_keyspace):
            if not keys.valid_name(name):
                raise MigrationError(f"a keyspace may only hold [A-Za-z0-9_.-], not {name!r}")
        if self.old_keyspace == self.new_keyspace:
            raise MigrationError(f"rename_model: both keyspaces are {self.old_keyspace!r}")

    def reverse(self) -> MigrateOperation:
        return RenameModel(self.new_keyspace, self.old_keyspace)

    def summary(self) -> str:
        return f"rename_model {self.old_keyspace} -> {self.new_keyspace}"


@dataclass
class Transform(RedisOperation):
    """Rewrite every object through `fn(fields)`, exactly once each, even across interruptions."""

    model: str
    fn: TransformFn
    reverse_fn: TransformFn | None = None

    def reverse(self) -> MigrateOperation:
        if self.reverse_fn is None:
            return super().reverse()
        return Transform(self.model, self.reverse_fn, self.fn)

    def summary(self) -> str:
        return f"transform {self.model} with {_fn_name(self.fn)}"


@dataclass
class Execute(RedisOperation):
    """Call `fn(client)` with the raw redis-py client."""

    fn: ExecuteFn
    reverse_fn: ExecuteFn | None = None

    def reverse(self) -> MigrateOperation:
        if self.reverse_fn is None:
            return super().reverse()
        return Execute(self.reverse_fn, self.fn)

    def summary(self) -> str:
        return f"execute {_fn_name(self.fn)}"


class RedisOperations(Operations):
    """The `op` passed to a redmap revision's `upgrade(op)` and `downgrade(op)`.

    `model` is the model's class name (`"Author"`, what autogenerate writes) or its
    keyspace (`"author"`). A class name is looked up in the configured registry, then in
    the layout recorded at the last upgrade (so revisions keep working after the class
    is renamed or removed); anything else is taken as a keyspace.

    Each method builds the operation and runs it at once (`impl` holds how), or only
    records it during a dry run or a reversibility check. `position` counts the
    operations run so far in the step; it names their checkpoints.
    """

    def __init__(self, context: Any = None) -> None:
        super().__init__(context)
        self.position = 0

    def invoke(self, operation: MigrateOperation) -> Any:
        """Run `operation`; while collecting for a dry run, bind the counts to report.

        An operation on a sharded model runs once per shard, each visit seeing that
        shard's keys (a registry's shards are separate hash tags).
        """
        if not self.collecting:
            self.position += 1
        elif isinstance(operation, RedisOperation) and getattr(self.context, "dry_run", False):
            operation.bind(self.context)
        run = self.context
        model = getattr(operation, "model", None)
        mapper = run.sharded_mapper(model) if model and hasattr(run, "sharded_mapper") else None
        if mapper is None or self.collecting:
            return super().invoke(operation)
        result = None
        try:
            for shard in range(mapper.shards):
                run.shard = shard
                result = super().invoke(operation)
        finally:
            run.shard = None
        return result

    def add_field(self, model: str, name: str, default: Any = None) -> None:
        """Store `default` in field `name` of every object lacking it (None stores nothing)."""
        self.invoke(AddField(model, name, default))

    def drop_field(self, model: str, name: str, default: Any = MISSING) -> None:
        """Remove field `name`; reversible (as add_field(default)) only when `default` is given."""
        self.invoke(DropField(model, name, default))

    def rename_field(self, model: str, old: str, new: str) -> None:
        """Move field `old` to `new` in every object, and rename its index keys."""
        self.invoke(RenameField(model, old, new))

    def create_index(self, model: str, field: str, kind: IndexKind = "indexed") -> None:
        """Build the `kind` index of `field` from stored values (unique: refuses duplicates)."""
        self.invoke(CreateIndex(model, field, kind))

    def drop_index(self, model: str, field: str, kind: IndexKind = "indexed") -> None:
        """Delete the `kind` index keys of `field`."""
        self.invoke(DropIndex(model, field, kind))

    def rename_model(self, old_keyspace: str, new_keyspace: str) -> None:
        """Move every key of a model from one keyspace to another."""
        self.invoke(RenameModel(old_keyspace, new_keyspace))

    def transform(self, model: str, fn: TransformFn, reverse_fn: TransformFn | None = None) -> None:
        """Rewrite each object's raw fields with `fn`; reversible when `reverse_fn` is given."""
        self.invoke(Transform(model, fn, reverse_fn))

    def execute(self, fn: ExecuteFn, reverse_fn: ExecuteFn | None = None) -> None:
        """Call `fn(client)` with the raw redis-py client; reversible with `reverse_fn`."""
        self.invoke(Execute(fn, reverse_fn))
