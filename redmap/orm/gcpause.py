"""`paused_gc`: the cyclic garbage collector paused during one CPU-bound phase of a large
flush; used by the unit of work and the flush protocol.

A flush of N new objects allocates several containers per object (its task, the field
maps, the commands, the snapshot it records), all of which survive. CPython's collector
runs a young-generation pass every 700 net allocations and promotes survivors, so a flush
of 10,000 objects paid for some 150 passes that found nothing to free: a quarter of its
time, measured (200 ms with the collector, 150 ms without, `benchmarks/
test_bench_asyncio.py`). Pausing it for the phase (never across I/O: each use wraps
plain code between two requests of the steps) replaces them with the one pass the
allocations trigger once it is enabled again. Phases of fewer than `THRESHOLD` objects
are left alone, as is a collector the application disabled itself.
"""

from __future__ import annotations

import contextlib
import gc

__all__ = ["THRESHOLD", "paused_gc"]

#: Objects (tasks, commands) below which a phase runs with the collector as it is.
THRESHOLD = 1000


_UNPAUSED: contextlib.nullcontext[None] = contextlib.nullcontext()


class _Paused:
    """The collector disabled from `__enter__` to `__exit__`."""

    __slots__ = ()

    def __enter__(self) -> None:
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        gc.enable()


_PAUSED = _Paused()


def paused_gc(size: int) -> contextlib.AbstractContextManager[None]:
    """Pause the cyclic collector inside the block when `size` reaches THRESHOLD.

    A plain function returning a shared context manager: a flush of one object (a
    counter's commit) enters several phases, and a generator-based context manager
    cost microseconds each."""
    if size < THRESHOLD or not gc.isenabled():
        return _UNPAUSED
    return _PAUSED
