"""Fixtures for the alembic_like tests: an in-memory host with a few fake operations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from alembic_like.config import Config
from alembic_like.messaging import Messaging
from alembic_like.operations import MigrateOperation, Operations
from alembic_like.revision import MigrationStep
from alembic_like.runtime import MemoryVersionStore


class FakeOperations(Operations):
    """The `op` of the fake host; its context is the `FakeHost`."""


@FakeOperations.register_operation("add_thing")
@dataclass
class AddThing(MigrateOperation):
    """Add a thing to the host."""

    name: str

    def reverse(self) -> MigrateOperation:
        return DropThing(self.name)


@FakeOperations.register_operation("drop_thing")
@dataclass
class DropThing(MigrateOperation):
    """Remove a thing from the host."""

    name: str

    def reverse(self) -> MigrateOperation:
        return AddThing(self.name)


@FakeOperations.register_operation("destroy")
@dataclass
class Destroy(MigrateOperation):
    """Remove a thing for good: no reverse."""

    name: str


@FakeOperations.register_operation("flaky")
@dataclass
class Flaky(MigrateOperation):
    """Fail while the host has failures left, then succeed."""

    name: str

    def reverse(self) -> MigrateOperation:
        return self


@FakeOperations.register_operation("backfill")
@dataclass
class Backfill(MigrateOperation):
    """Touch `count` objects, reporting progress."""

    count: int

    def reverse(self) -> MigrateOperation:
        return self


class FakeHost:
    """An `Environment` keeping everything in memory; one instance serves many CLI runs."""

    def __init__(self) -> None:
        self.config: Config | None = None
        self.store = MemoryVersionStore()
        self.things: set[str] = set()
        self.log: list[str] = []
        self.pending: list[str] = []
        self.snapshots: list[tuple[str, ...]] = []
        self.failures = 0

    @property
    def messaging(self) -> Messaging:
        return self.config.messaging if self.config is not None else Messaging(quiet=True)

    def bind(self, config: Config) -> FakeHost:
        self.config = config
        return self

    def version_store(self) -> MemoryVersionStore:
        return self.store

    def operations(self, step: MigrationStep) -> FakeOperations:
        return FakeOperations(self)

    def compare(self) -> list[str]:
        return list(self.pending)

    def render_imports(self) -> list[str]:
        return ["import os  # needed by the host's operations"]

    def record_snapshot(self, heads: tuple[str, ...]) -> None:
        self.snapshots.append(heads)


def _host(operations: Operations) -> FakeHost:
    host = operations.context
    assert isinstance(host, FakeHost)
    return host


@FakeOperations.implementation_for(AddThing)
def _add_thing(operations: Operations, op: AddThing) -> None:
    _host(operations).things.add(op.name)
    _host(operations).log.append(f"add {op.name}")


@FakeOperations.implementation_for(DropThing)
def _drop_thing(operations: Operations, op: DropThing) -> None:
    _host(operations).things.discard(op.name)
    _host(operations).log.append(f"drop {op.name}")


@FakeOperations.implementation_for(Destroy)
def _destroy(operations: Operations, op: Destroy) -> None:
    _host(operations).things.discard(op.name)
    _host(operations).log.append(f"destroy {op.name}")


@FakeOperations.implementation_for(Flaky)
def _flaky(operations: Operations, op: Flaky) -> None:
    host = _host(operations)
    if host.failures:
        host.failures -= 1
        raise RuntimeError(f"{op.name} failed")
    host.log.append(f"flaky {op.name}")


@FakeOperations.implementation_for(Backfill)
def _backfill(operations: Operations, op: Backfill) -> None:
    host = _host(operations)
    with host.messaging.progress(op.count, "backfill") as progress:
        for _ in range(op.count):
            progress.advance()
    host.log.append(f"backfill {op.count}")


@pytest.fixture
def host() -> FakeHost:
    """A fresh in-memory host."""
    return FakeHost()


@pytest.fixture
def host_factory(host: FakeHost) -> Callable[[Config], FakeHost]:
    """A host factory for `cli.main` that always hands out the same `host`."""
    return host.bind
