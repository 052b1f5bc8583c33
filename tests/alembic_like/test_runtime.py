"""Tests for `alembic_like.runtime`."""

from __future__ import annotations

import io
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from alembic_like.exc import CommandError, IrreversibleError, LockError
from alembic_like.messaging import Messaging
from alembic_like.revision import Direction, Revision, RevisionMap
from alembic_like.runtime import MemoryVersionStore, MigrationContext

Fn = Callable[[Any], object]


class RecordingStore(MemoryVersionStore):
    """A MemoryVersionStore that remembers every set_heads call."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[tuple[str, ...]] = []

    def set_heads(self, heads: tuple[str, ...]) -> None:
        super().set_heads(heads)
        self.history.append(heads)


def rev(
    rid: str, down: str | tuple[str, ...] | None, up: Fn, down_fn: Fn | None = None
) -> Revision:
    """A revision whose module runs `up`, and `down_fn` or the reverse of `up`."""
    module = ModuleType(f"rev_{rid}")
    module.upgrade = up  # type: ignore[attr-defined]
    module.downgrade = down_fn or (lambda op: op.reverse_of(up))  # type: ignore[attr-defined]
    return Revision(rid, down, message=f"step {rid}", module=module)


def source(*revisions: Revision) -> SimpleNamespace:
    """A stand-in for a ScriptDirectory holding `revisions`."""
    return SimpleNamespace(revision_map=RevisionMap(revisions))


def chain() -> SimpleNamespace:
    """r1 adds a, r2 (flaky) adds b, r3 adds c."""

    def up2(op: Any) -> None:
        op.flaky("b")
        op.add_thing("b")

    return source(
        rev("r1", None, lambda op: op.add_thing("a")),
        rev("r2", "r1", up2),
        rev("r3", "r2", lambda op: op.add_thing("c")),
    )


@pytest.fixture
def store() -> RecordingStore:
    """An empty in-memory version store."""
    return RecordingStore()


def context(
    src: SimpleNamespace, store: MemoryVersionStore, host: Any, out: Any = None
) -> MigrationContext:
    """A MigrationContext on the fake host, printing to `out` (or nowhere)."""
    messaging = Messaging(stream=out) if out is not None else Messaging(quiet=True)
    return MigrationContext(src, store, host.operations, messaging, owner="test")


class TestUpgradeDowngrade:
    def test_upgrade_runs_every_step_and_records_heads(
        self, host: Any, store: RecordingStore
    ) -> None:
        """Upgrade to head runs each revision once and stores heads after each step."""
        steps = context(chain(), store, host).upgrade("head")
        assert [s.revision.revision for s in steps] == ["r1", "r2", "r3"]
        assert host.things == {"a", "b", "c"}
        assert store.history == [("r1",), ("r2",), ("r3",)]
        assert store.steps == [("r1", Direction.UP), ("r2", Direction.UP), ("r3", Direction.UP)]
        assert store.locked_by is None

    def test_upgrade_again_does_nothing(self, host: Any, store: RecordingStore) -> None:
        """A second upgrade to head has no steps and touches nothing."""
        ctx = context(chain(), store, host)
        ctx.upgrade("head")
        host.log.clear()
        assert ctx.upgrade("head") == [] and host.log == []

    def test_downgrade_reverses_operations(self, host: Any, store: RecordingStore) -> None:
        """Downgrade to base runs the reverse operations newest first and clears heads."""
        ctx = context(chain(), store, host)
        ctx.upgrade("head")
        host.log.clear()
        ctx.downgrade("base")
        assert host.log == ["drop c", "drop b", "flaky b", "drop a"]
        assert host.things == set() and store.heads == ()
        assert store.history[-3:] == [("r2",), ("r1",), ()]

    def test_relative_steps(self, host: Any, store: RecordingStore) -> None:
        """+1 and -1 move one step from the stored head."""
        ctx = context(chain(), store, host)
        ctx.upgrade("+2")
        assert ctx.current() == ("r2",)
        ctx.downgrade("-1")
        assert ctx.current() == ("r1",)

    def test_merge_joins_heads(self, host: Any, store: RecordingStore) -> None:
        """Upgrading through a merge stores two heads, then the merge alone."""
        src = source(
            rev("a", None, lambda op: op.add_thing("a")),
            rev("b1", "a", lambda op: op.add_thing("b1")),
            rev("b2", "a", lambda op: op.add_thing("b2")),
            rev("m", ("b1", "b2"), lambda op: None),
        )
        ctx = context(src, store, host)
        ctx.upgrade("head")
        assert ("b1", "b2") in store.history and store.heads == ("m",)
        ctx.downgrade("a")
        assert store.heads == ("a",) and host.things == {"a"}


class TestInterruption:
    def test_failed_step_keeps_last_completed_heads(self, host: Any, store: RecordingStore) -> None:
        """A raising step stops the run with heads at the previous step; a rerun finishes."""
        host.failures = 1
        ctx = context(chain(), store, host)
        with pytest.raises(CommandError, match="upgrade r2 failed") as info:
            ctx.upgrade("head")
        assert isinstance(info.value.__cause__, RuntimeError)
        assert store.heads == ("r1",) and host.things == {"a"}
        assert store.locked_by is None
        ctx.upgrade("head")
        assert store.heads == ("r3",) and host.things == {"a", "b", "c"}
        assert host.log.count("add a") == 1

    def test_locked_store_refuses(self, host: Any, store: RecordingStore) -> None:
        """A run while another owner holds the lock raises LockError and runs nothing."""
        ctx = context(chain(), store, host)
        with store.lock("other-host:42"), pytest.raises(LockError, match="other-host:42") as info:
            ctx.upgrade("head")
        assert info.value.owner == "other-host:42"
        assert host.log == [] and store.heads == ()


class TestReversibility:
    def test_irreversible_fails_before_any_step(self, host: Any, store: RecordingStore) -> None:
        """An irreversible operation anywhere in the plan stops the downgrade before step one."""
        src = source(
            rev("r1", None, lambda op: op.destroy("x")),
            rev("r2", "r1", lambda op: op.add_thing("b")),
        )
        ctx = context(src, store, host)
        ctx.upgrade("head")
        host.log.clear()
        with pytest.raises(IrreversibleError, match="Destroy cannot be reversed"):
            ctx.downgrade("base")
        assert host.log == [] and store.heads == ("r2",)
        ctx.downgrade("r1")
        assert host.log == ["drop b"] and store.heads == ("r1",)

    def test_hand_written_downgrade_is_used(self, host: Any, store: RecordingStore) -> None:
        """A downgrade written by hand runs instead of a reverse."""
        src = source(rev("r1", None, lambda op: op.destroy("x"), lambda op: op.add_thing("x")))
        ctx = context(src, store, host)
        ctx.upgrade("head")
        ctx.downgrade("base")
        assert host.log == ["destroy x", "add x"]


class TestDryRunAndStamp:
    def test_dry_run_prints_and_changes_nothing(self, host: Any, store: RecordingStore) -> None:
        """A dry run lists steps and operations without running or storing anything."""
        out = io.StringIO()
        steps = context(chain(), store, host, out).upgrade("head", dry_run=True)
        assert len(steps) == 3 and host.log == [] and store.history == []
        text = out.getvalue()
        assert "Would run upgrade <base> -> r1, step r1" in text
        assert "AddThing(name='c')" in text

    def test_dry_run_downgrade_checks_reversibility(self, host: Any, store: RecordingStore) -> None:
        """A dry-run downgrade reports an irreversible step too."""
        src = source(rev("r1", None, lambda op: op.destroy("x")))
        store.set_heads(("r1",))
        with pytest.raises(IrreversibleError):
            context(src, store, host).downgrade("base", dry_run=True)

    def test_stamp_runs_nothing(self, host: Any, store: RecordingStore) -> None:
        """Stamp stores the target's heads without running any step."""
        ctx = context(chain(), store, host)
        assert ctx.stamp("r2") == ("r2",)
        assert store.heads == ("r2",) and host.log == []
        ctx.upgrade("head")
        assert host.log == ["add c"]
        assert ctx.stamp("base") == ()

    def test_missing_function_is_reported(self, host: Any, store: RecordingStore) -> None:
        """A revision without a module cannot run and says so."""
        src = SimpleNamespace(revision_map=RevisionMap([Revision("r1")]))
        with pytest.raises(CommandError, match="no upgrade"):
            context(src, store, host).upgrade("head")
