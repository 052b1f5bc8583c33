"""The asyncio cluster dialect: `redis+cluster://host:port[,host:port...]` on
`redis.asyncio.cluster.RedisCluster`; the twin of `cluster.ClusterDialect`.

As in the sync dialect, routing and redirects of reads are redis-py's, and the flush
runs redmap's own protocol on one connection to the node owning its slot. The async
cluster client differs in two ways handled here: it learns the topology only when
awaited (`ready_client` awaits `initialize()`; building the client is also left to
first use, since naming a node `localhost` makes redis-py resolve it, a blocking call),
and it keeps connections per node with no pool object (`ClusterNode.acquire_connection`
/ `release`, plain methods), so the flush connection is taken from the node and connected
here, and MULTI/EXEC blocks go through a `redis.asyncio.Redis` client per node
(`_node_client`), as the sync dialect uses redis-py's per-node `Redis` (never through
the async cluster's transaction pipeline: see `execute_transaction`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from ..commands import Command, RoundTripHook
from ..exc import RedmapConnectionError
from .asyncio_base import AsyncDialect, FlushConnection
from .base import default_client_options, translate_errors
from .cluster import _first_key, check_single_slot, parse_cluster_url

if TYPE_CHECKING:
    from ..orm.flushplan import FlushPlan

__all__ = ["AsyncClusterDialect"]

# How many times a redirected MULTI/EXEC block is sent again (pausing 10 ms more each
# time, at most 0.5 s) before RedmapConnectionError.
_TRANSACTION_REDIRECTS = 16


class AsyncClusterDialect(AsyncDialect):
    """A Redis Cluster from asyncio; every flush runs on the node owning its hash slot."""

    name = "cluster"
    supports_cluster = True
    # One transaction can only touch keys of one hash slot.
    supports_multi_key_transactions = False

    def __init__(self, url: str, *, hook: RoundTripHook, **client_options: Any):
        # Parsed now, so that a malformed URL fails at once (no I/O in parsing).
        self._single, self._nodes = parse_cluster_url(url)
        self._options = client_options
        # One redis.asyncio client per node name, for pipelined MULTI/EXEC blocks.
        self._node_clients: dict[str, Any] = {}
        super().__init__(url, hook=hook, **client_options)

    def create_client(self, url: str, **options: Any) -> Any:
        return None  # built by ready_client: see the module docstring

    async def ready_client(self) -> Any:
        """The cluster client, knowing the topology (learned on first use, and again
        after `dispose`); once known, `initialize()` returns at once."""
        if self.client is None:
            opts = default_client_options()
            opts.update(self._options)
            startup = [ClusterNode(h, p) for h, p in self._nodes]
            self.client = RedisCluster.from_url(self._single, startup_nodes=startup, **opts)
        await self.client.initialize()
        return self.client

    async def dispose(self) -> None:
        """Close every connection: the cluster client's and the per-node clients'."""
        clients, self._node_clients = list(self._node_clients.values()), {}
        for client in clients:
            await _close_quietly(client)
        await super().dispose()

    # -- reads ----------------------------------------------------------------------

    async def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """One round trip per node: the groups (each within one hash tag) that a node owns
        go to it as MULTI/EXEC blocks in one pipeline. A block redirected because its slot
        moved ran nothing and is run again alone, through redis-py's routing."""
        if len(groups) <= 1:
            return [await self.execute_transaction(g) for g in groups]
        with translate_errors(self.url):
            client = await self.ready_client()
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, g in enumerate(groups):
            node = client.nodes_manager.get_node_from_slot(key_slot(_first_key(g)))
            by_node.setdefault(node.name, (node, []))[1].append(i)
        out: list[list[Any] | None] = [None] * len(groups)
        for node, indices in by_node.values():
            node_client = self._node_client(node)
            replies = await self._pipelined_transactions(node_client, [groups[i] for i in indices])
            for i, reply in zip(indices, replies, strict=True):
                out[i] = reply if reply is not None else await self.execute_transaction(groups[i])
        return [r for r in out if r is not None]

    async def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """One MULTI/EXEC block on the node owning the commands' slot (every key of a
        query transaction shares its hash tag), through that node's client; a command
        error raises. Sent again like reads.

        Not through redis.asyncio's cluster transaction pipeline: it queues each command
        by running a private event loop in a worker thread and joining it, which blocks
        this loop meanwhile (and on redis-py 6.3 can leave node connections bound to
        that other loop). A block the cluster redirected (the slot moved or is
        migrating) ran nothing: the topology is learned again and the block sent again,
        as redis-py's pipeline does.
        """
        if not commands:
            self._hook([("MULTI",), ("EXEC",)])
            return []
        for attempt in range(_TRANSACTION_REDIRECTS):
            with translate_errors(self.url):
                client = await self.ready_client()
            node = client.nodes_manager.get_node_from_slot(key_slot(_first_key(commands)))
            [reply] = await self._pipelined_transactions(self._node_client(node), [commands])
            if reply is not None:
                return reply
            await asyncio.sleep(min(0.5, 0.01 * (attempt + 1)))
            with translate_errors(self.url):
                await self.refresh_topology()
        raise RedmapConnectionError(
            "the cluster kept redirecting a transaction (slot migration?); it ran nothing",
            url=self.safe_url,
        )

    def _node_client(self, node: Any) -> Any:
        """A redis.asyncio client of one node, with the node's connection options (the
        async cluster client has none of its own to lend, unlike the sync one)."""
        client = self._node_clients.get(node.name)
        if client is None:
            pool = redis.asyncio.ConnectionPool(
                connection_class=node.connection_class, **node.connection_kwargs
            )
            client = redis.asyncio.Redis.from_pool(pool)  # its aclose() closes the pool
            self._node_clients[node.name] = client
        return client

    # -- the flush ----------------------------------------------------------------------

    async def _node(self, route: str) -> Any:
        client = await self.ready_client()
        return client.nodes_manager.get_node_from_slot(key_slot(route.encode()))

    async def _checkout(self, route: str) -> FlushConnection:
        """A connection of the node owning `route`'s slot, connected: a node hands out
        connections that may not be (it connects them on first send)."""
        node = await self._node(route)
        conn = node.acquire_connection()
        try:
            # redis-py >= 8 closes connections marked for reconnect (maintenance events)
            # as they are acquired; 6.3 has no such mark.
            disconnect_if_needed = getattr(node, "disconnect_if_needed", None)
            if disconnect_if_needed is not None:
                await disconnect_if_needed(conn)
            if not conn.is_connected:
                await conn.connect()
        except BaseException:
            node.release(conn)
            raise

        async def give_back(c: Any) -> None:
            node.release(c)

        return FlushConnection(conn, give_back)

    async def _fresh_connection(self, route: str) -> Any:
        node = await self._node(route)
        return node.connection_class(**node.connection_kwargs)

    async def refresh_topology(self) -> None:
        """After a redirect (the slot moved, or is migrating): learn the new owner."""
        client = await self.ready_client()
        await client.nodes_manager.initialize()

    def check_plan(self, plan: FlushPlan) -> None:
        """Refuse, before any I/O, a flush whose keys fall in more than one hash slot."""
        check_single_slot(plan)


async def _close_quietly(client: Any) -> None:
    try:
        await client.aclose()
    except Exception:  # closing is best effort, as in `Dialect.dispose`
        return
