"""Owns throwaway redis-server processes and clusters for tests; called by `tests/conftest.py`.

Built on `redmap.dialects._server.ServerProcess`. Servers are started on free loopback
ports with no persistence, are stopped at interpreter exit if nobody stopped them, and
(on Linux) receive SIGTERM when the process that started them dies, so even a killed test
run leaves no servers behind.

`test_server_url()` honours `REDMAP_TEST_REDIS` (the URL of an existing server to use
instead; tests FLUSHALL it, so never point it at data you want to keep).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from redis.cluster import ClusterNode, RedisCluster

from redmap.dialects._server import ConfigValue, ServerProcess
from redmap.exc import RedmapConnectionError

__all__ = [
    "CLUSTER_SLOTS",
    "TEST_REDIS_ENV",
    "ClusterProcesses",
    "start_cluster",
    "start_standalone",
    "test_server_url",
]

TEST_REDIS_ENV = "REDMAP_TEST_REDIS"
"""Environment variable holding the URL of an existing server the tests should use."""

CLUSTER_SLOTS = 16384


def start_standalone(**config: ConfigValue) -> ServerProcess:
    """Start a private, non-persistent server on a free loopback port; the caller stops it.

    Keyword arguments are redis-server settings (`maxmemory="10mb"`,
    `maxmemory_policy="allkeys-lru"`; underscores become dashes).
    """
    server = ServerProcess(config=config, die_with_parent=True)
    try:
        return server.start()
    except BaseException:
        server.stop()  # removes the temporary data folder
        raise


@dataclass
class ClusterProcesses:
    """A running local Redis Cluster: one master per node, slots split evenly."""

    nodes: list[ServerProcess]
    _stopped: bool = field(default=False, repr=False)

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """`(host, port)` of every node, for `RedisCluster(startup_nodes=...)`."""
        return [(node.host, _port(node)) for node in self.nodes]

    @property
    def url(self) -> str:
        """The redmap URL of the cluster: `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...`."""
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    def client(self, **kwargs: Any) -> RedisCluster:
        """A redis-py cluster client; the caller closes it."""
        node_type = cast(Any, ClusterNode)  # its constructor is not annotated
        nodes = [node_type(h, p) for h, p in self.startup_nodes]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        self._stopped = True
        for node in self.nodes:
            node.stop()


def _port(node: ServerProcess) -> int:
    if node.port is None:
        raise RedmapConnectionError("cluster nodes listen on TCP ports")
    return node.port


def _slot_ranges(n: int) -> list[tuple[int, int]]:
    bounds = [CLUSTER_SLOTS * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(n)]


def start_cluster(n: int = 3, *, timeout: float = 30.0, **config: ConfigValue) -> ClusterProcesses:
    """Start `n` cluster-enabled nodes, assign slots, join them and wait for `cluster_state:ok`.

    Slots are assigned with CLUSTER ADDSLOTSRANGE (7.0+) or ADDSLOTS, each node gets a
    distinct config epoch (as redis-cli does) so they agree on ownership at once, then
    CLUSTER MEET joins them; no redis-cli is needed. On failure every node is stopped.
    """
    if n < 1:
        raise ValueError("a cluster needs at least one node")
    settings: dict[str, ConfigValue] = {
        "cluster-enabled": "yes",
        "cluster-config-file": "nodes.conf",
        "cluster-node-timeout": 5000,
        **config,
    }
    nodes: list[ServerProcess] = []
    cluster = ClusterProcesses(nodes)
    try:
        for _ in range(n):
            nodes.append(ServerProcess(config=settings, die_with_parent=True))
            nodes[-1].start()
        clients = [node.client(decode_responses=True) for node in nodes]
        try:
            _form_cluster(nodes, clients, timeout)
        finally:
            for client in clients:
                client.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _command(client: redis.Redis, *args: str | int) -> Any:
    """`execute_command`, which redis-py leaves unannotated."""
    return cast(Any, client).execute_command(*args)


def _form_cluster(
    nodes: Sequence[ServerProcess], clients: Sequence[redis.Redis], timeout: float
) -> None:
    for epoch, (node, client, (first, last)) in enumerate(
        zip(nodes, clients, _slot_ranges(len(nodes)), strict=True), start=1
    ):
        if node.version >= (7, 0, 0):
            _command(client, "CLUSTER", "ADDSLOTSRANGE", first, last)
        else:
            _command(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
        _command(client, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
    for node in nodes[1:]:
        _command(clients[0], "CLUSTER", "MEET", node.host, _port(node))
    deadline = time.monotonic() + timeout
    while True:
        infos = [_cluster_info(c) for c in clients]
        if all(
            info.get("cluster_state") == "ok"
            and info.get("cluster_known_nodes") == str(len(nodes))
            and info.get("cluster_slots_ok") == str(CLUSTER_SLOTS)
            for info in infos
        ):
            return
        if time.monotonic() > deadline:
            raise RedmapConnectionError(
                f"local cluster did not reach cluster_state:ok within {timeout:g}s: {infos}"
            )
        time.sleep(0.05)


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    raw = _command(client, "CLUSTER", "INFO")
    text = raw if isinstance(raw, str) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


_shared: ServerProcess | None = None
_shared_lock = threading.Lock()


def test_server_url() -> str:
    """The URL of a server for tests: `$REDMAP_TEST_REDIS`, else one private shared server.

    The private server is started on first use and stopped at interpreter exit; it is for
    scripts (benchmarks) outside pytest, whose fixtures manage their own server.
    """
    global _shared
    url = os.environ.get(TEST_REDIS_ENV)
    if url:
        return url
    with _shared_lock:
        if _shared is None or not _shared.running:
            _shared = start_standalone()
        return _shared.url


test_server_url.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
