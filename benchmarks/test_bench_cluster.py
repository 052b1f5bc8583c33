"""Throughput of commits on one node and on a 3-master cluster, with 1, 2 and 4 processes.

Each process commits units of work on a sharded model (a board, then its 10 cards in
the board's shard) for a fixed time; the figure is commits per second over all
processes. Run: `pytest benchmarks/test_bench_cluster.py -p no:cacheprovider -s`.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator

import pytest

from redmap.dialects._server import ServerProcess
from redmap.testing.servers import ClusterProcesses, start_cluster

SECONDS = 3.0


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    nodes: ClusterProcesses = start_cluster(3)
    try:
        yield nodes.url
    finally:
        nodes.stop()


def _throughput(url: str, processes: int) -> float:
    from benchmarks.bench_cluster_worker import work

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    procs = [ctx.Process(target=work, args=(url, SECONDS, barrier, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return total / SECONDS


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_commit_throughput(
    processes: int, bench_server: ServerProcess, cluster_url: str, note: Callable[[str], None]
) -> None:
    """Commits/s on a single node and on the cluster with the same client processes."""
    single = _throughput(bench_server.url, processes)
    clustered = _throughput(cluster_url, processes)
    note(
        f"cluster throughput: {processes} process(es): single node {single:,.0f} commits/s, "
        f"3-master cluster {clustered:,.0f} commits/s"
    )
    assert single > 0 and clustered > 0
