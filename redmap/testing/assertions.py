"""Assertions on what an engine sends, as SQLAlchemy's `assert_sql_count`; used by tests.

```python
with count_round_trips(engine) as rt:
    session.commit()
assert rt.round_trips == 2
```
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ..engine import EngineBase

__all__ = ["RoundTripCounter", "assert_round_trips", "count_round_trips", "dump_keys"]


class RoundTripCounter:
    """Round trips and commands seen by an engine while it is attached."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[Any, ...]]] = []

    def __call__(self, commands: Sequence[tuple[Any, ...]]) -> None:
        self.batches.append([tuple(c) for c in commands])

    @property
    def round_trips(self) -> int:
        return len(self.batches)

    @property
    def commands(self) -> list[tuple[Any, ...]]:
        return [c for batch in self.batches for c in batch]

    @property
    def command_names(self) -> list[str]:
        return [str(c[0]).upper() for c in self.commands]


@contextlib.contextmanager
def count_round_trips(engine: EngineBase) -> Iterator[RoundTripCounter]:
    """Record every round trip `engine` makes inside the block."""
    counter = RoundTripCounter()
    engine.add_listener(counter)
    try:
        yield counter
    finally:
        engine.remove_listener(counter)


@contextlib.contextmanager
def assert_round_trips(engine: EngineBase, expected: int) -> Iterator[RoundTripCounter]:
    """Fail unless the block makes exactly `expected` round trips."""
    with count_round_trips(engine) as counter:
        yield counter
    assert counter.round_trips == expected, (
        f"expected {expected} round trips, got {counter.round_trips}: "
        f"{[[c[0] for c in b] for b in counter.batches]}"
    )


def dump_keys(client: Any, match: str = "*") -> dict[bytes, bytes | None]:
    """Every key with its DUMP serialization: compare two dumps to prove nothing changed.

    Uses SCAN, so it is for tests and audits only, never for the hot path.
    """
    out: dict[bytes, bytes | None] = {}
    for key in client.scan_iter(match=match, count=1000):
        k = key if isinstance(key, bytes) else str(key).encode()
        if b"#flush:" in k:
            continue  # flush tokens are bookkeeping with a TTL, not data
        out[k] = client.dump(key)
    return out
