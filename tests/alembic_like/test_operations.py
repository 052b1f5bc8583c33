"""Tests for `alembic_like.operations`."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from alembic_like.exc import CommandError, IrreversibleError
from alembic_like.operations import MigrateOperation, Operations


class Ops(Operations):
    """Operations of this module only, so registrations do not leak elsewhere."""


class OtherOps(Ops):
    """A subclass with an implementation of its own."""


@Ops.register_operation("put")
@dataclass
class Put(MigrateOperation):
    """Put a value."""

    key: str
    value: int = 0

    def reverse(self) -> MigrateOperation:
        return Remove(self.key)


@Ops.register_operation("remove")
@dataclass
class Remove(MigrateOperation):
    """Remove a value; no reverse."""

    key: str


@Ops.implementation_for(Put)
def _put(operations: Operations, op: Put) -> str:
    operations.context.append(("put", op.key, op.value))
    return f"put {op.key}"


@Ops.implementation_for(Remove)
def _remove(operations: Operations, op: Remove) -> None:
    operations.context.append(("remove", op.key))


@OtherOps.implementation_for(Put)
def _other_put(operations: Operations, op: Put) -> str:
    return "other"


def test_registered_method_builds_and_invokes() -> None:
    """op.put(...) builds a Put and returns its implementation's result."""
    log: list[tuple[object, ...]] = []
    assert Ops(log).put("k", value=3) == "put k"
    assert log == [("put", "k", 3)]
    assert Ops.put.__doc__ == "Put a value."  # type: ignore[attr-defined]


def test_registrations_stay_on_their_class() -> None:
    """A method registered on a subclass does not appear on the base Operations."""
    assert not hasattr(Operations, "put")


def test_subclass_implementation_wins() -> None:
    """A subclass's implementation replaces the parent's for its instances."""
    assert OtherOps([]).put("k") == "other"
    assert Ops([]).put("k") == "put k"


def test_missing_implementation() -> None:
    """Invoking an operation with no implementation raises CommandError."""

    @dataclass
    class Lonely(MigrateOperation):
        """Nobody implements me."""

    with pytest.raises(CommandError, match="No implementation of Lonely"):
        Ops([]).invoke(Lonely())


def test_name_clash_is_refused() -> None:
    """An operation cannot take the name of a real method."""
    with pytest.raises(CommandError, match="already has it"):
        Ops.register_operation("collect")(Put)


def test_collect_records_without_running() -> None:
    """collect() returns the operations a function invokes, running none."""
    log: list[tuple[object, ...]] = []
    ops = Ops(log)
    seen: list[object] = []

    def upgrade(op: Operations) -> None:
        seen.append(op.collecting)
        seen.append(op.put("a"))  # type: ignore[attr-defined]
        op.remove("b")  # type: ignore[attr-defined]

    assert ops.collect(upgrade) == [Put("a"), Remove("b")]
    assert log == [] and seen == [True, None] and not ops.collecting


def test_reverse_of_runs_reverses_last_first() -> None:
    """reverse_of() invokes the reverse of each operation, in reverse order."""
    log: list[tuple[object, ...]] = []

    def upgrade(op: Operations) -> None:
        op.put("a")  # type: ignore[attr-defined]
        op.put("b")  # type: ignore[attr-defined]

    Ops(log).reverse_of(upgrade)
    assert log == [("remove", "b"), ("remove", "a")]


def test_reverse_of_irreversible_runs_nothing() -> None:
    """One irreversible operation makes reverse_of raise before any reverse runs."""
    log: list[tuple[object, ...]] = []

    def upgrade(op: Operations) -> None:
        op.remove("x")  # type: ignore[attr-defined]
        op.put("a")  # type: ignore[attr-defined]

    with pytest.raises(IrreversibleError) as info:
        Ops(log).reverse_of(upgrade)
    assert log == [] and info.value.operation == "Remove"


def test_is_reversible_and_describe() -> None:
    """is_reversible reflects reverse(); describe() defaults to the repr."""
    assert Put("a").is_reversible and not Remove("a").is_reversible
    assert Put("a").reverse() == Remove("a")
    assert Put("a").describe() == "Put(key='a', value=0)"
