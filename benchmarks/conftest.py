"""Fixtures and the paired-measurement helper for redmap's benchmarks.

Run with `pytest benchmarks -p no:cacheprovider --benchmark-only` (see README.md).

Every benchmark times one redmap operation with `benchmark.pedantic` and the same
work done by raw pipelined redis-py (the physical floor) with the same number of
rounds and the same per-round setup. Round trips and commands are counted in one
extra, untimed run (so the counting listener never slows the timed rounds) and are
attached to `benchmark.extra_info` beside the raw mean and the ratio redmap/raw.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

try:
    import redmap
except ModuleNotFoundError:  # plain `pytest` from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import redmap

from redmap.dialects._server import ServerProcess
from redmap.engine import EngineBase
from redmap.testing.assertions import count_round_trips
from redmap.testing.servers import start_standalone

ROUNDS = 5

# One line per benchmark, printed again at the end of the run.
_SUMMARY: list[str] = []


# --- server, engine, raw client ---------------------------------------------------


@pytest.fixture(scope="session")
def bench_server() -> Iterator[ServerProcess]:
    """A private, non-persistent redis-server for the whole run."""
    server = start_standalone()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def engine(bench_server: ServerProcess) -> Iterator[redmap.Engine]:
    eng = redmap.create_engine(bench_server.url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture(scope="session")
def raw(bench_server: ServerProcess) -> Iterator[redis.Redis]:
    """A raw redis-py client on the same server (the physical floor)."""
    client = redis.Redis.from_url(bench_server.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _flushall(raw: redis.Redis) -> None:
    """Every benchmark starts on an empty server."""
    raw.flushall()


# --- measurement ----------------------------------------------------------------------


@dataclass
class Result:
    name: str
    n: int
    round_trips: int
    commands: int
    mean: float
    raw_mean: float | None
    raw_round_trips: int | None
    raw_commands: int | None

    @property
    def ratio(self) -> float | None:
        if self.raw_mean is None or self.raw_mean <= 0:
            return None
        return self.mean / self.raw_mean

    def line(self) -> str:
        text = (
            f"{self.name}: N={self.n}, round trips={self.round_trips}, "
            f"commands={self.commands}, mean={self.mean * 1e3:.2f} ms"
        )
        if self.raw_mean is not None:
            text += f", raw mean={self.raw_mean * 1e3:.2f} ms, ratio={self.ratio:.2f}"
        return text


Setup = Callable[[], tuple[Any, ...]]
# A raw operation returns (round trips, commands) it sent: len() of a pipeline is free.
RawCost = tuple[int, int]


def _measure(
    benchmark: Any,
    engine: EngineBase,
    *,
    name: str,
    n: int,
    op: Callable[..., Any],
    setup: Setup,
    raw_op: Callable[..., RawCost] | None = None,
    raw_setup: Setup | None = None,
    rounds: int = ROUNDS,
) -> Result:
    """Time `op(*setup())` with pytest-benchmark and `raw_op(*raw_setup())` by hand.

    `setup`/`raw_setup` run before every round, outside the timing, and return the
    positional arguments of the operation; they must bring the server to a known state.
    One untimed run of each side first counts round trips and commands and warms up.
    """

    def prepared(make: Setup) -> tuple[Any, ...]:
        # Garbage from earlier rounds is collected outside the timing, on both sides.
        made = make()
        gc.collect()
        return made

    args = prepared(setup)
    with count_round_trips(engine) as rt:
        op(*args)
    del args
    round_trips, commands = rt.round_trips, len(rt.commands)

    benchmark.pedantic(op, setup=lambda: (prepared(setup), {}), rounds=rounds, iterations=1)
    stats = getattr(benchmark, "stats", None)
    mean = float(stats.stats.mean) if stats is not None else float("nan")
    best = float(stats.stats.min) if stats is not None else float("nan")

    raw_mean = raw_min = raw_rt = raw_cmds = None
    if raw_op is not None:
        make_raw = raw_setup or (lambda: ())
        raw_rt, raw_cmds = raw_op(*prepared(make_raw))
        times = []
        for _ in range(rounds):
            raw_args = prepared(make_raw)
            t0 = time.perf_counter()
            raw_op(*raw_args)
            times.append(time.perf_counter() - t0)
            del raw_args
        raw_mean = statistics.fmean(times)
        raw_min = min(times)

    result = Result(name, n, round_trips, commands, mean, raw_mean, raw_rt, raw_cmds)
    benchmark.extra_info.update(
        {
            "n": n,
            "round_trips": round_trips,
            "commands": commands,
            "raw_round_trips": raw_rt,
            "raw_commands": raw_cmds,
            "raw_mean_ms": None if raw_mean is None else round(raw_mean * 1e3, 3),
            "ratio": None if result.ratio is None else round(result.ratio, 3),
            "min_ms": round(best * 1e3, 3),
            "raw_min_ms": None if raw_min is None else round(raw_min * 1e3, 3),
            "min_ratio": None if not raw_min else round(best / raw_min, 3),
        }
    )
    line = result.line()
    print(line)
    _SUMMARY.append(line)
    return result


@pytest.fixture
def measure(benchmark: Any, engine: redmap.Engine) -> Callable[..., Result]:
    """`measure(name=..., n=..., op=..., setup=..., raw_op=..., raw_setup=...)`: see `_measure`."""

    def run(**kwargs: Any) -> Result:
        return _measure(benchmark, engine, **kwargs)

    return run


@pytest.fixture
def note() -> Callable[[str], None]:
    """Print a free-form summary line (for measurements that are not redmap operations)."""

    def add(line: str) -> None:
        print(line)
        _SUMMARY.append(line)

    return add


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SUMMARY:
        terminalreporter.section("redmap vs raw redis-py (per operation)")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
