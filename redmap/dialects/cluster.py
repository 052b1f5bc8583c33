"""The cluster dialect: `redis+cluster://host:port[,host:port...]` on redis-py's `RedisCluster`.

Routing, MOVED/ASK handling for reads and topology discovery are redis-py's. The
flush is not: redis-py's cluster transaction re-sends MULTI...EXEC without the WATCH
after a reconnect, which can lose a concurrent update. redmap runs its own
WATCH / checks / MULTI / EXEC on one connection to the node owning the flush's slot:
the same flush protocol as every deployment (`redmap.orm.flushprotocol`, driven by
`Dialect.execute_flush`). This dialect only says where the flush's slot lives
(`_flush_pool`), refuses plans spanning slots (`check_plan`) and learns the topology
again when the protocol reports a redirect (`refresh_topology`); the protocol starts
the flush again, which is safe because a redirected flush has written nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from ..exc import CrossSlotError, RedmapConnectionError
from .base import Command, Dialect, default_client_options, translate_errors

if TYPE_CHECKING:
    from redis.connection import ConnectionPool

    from ..orm.flushplan import FlushPlan

__all__ = ["ClusterDialect", "check_single_slot", "parse_cluster_url"]


def _first_key(commands: Sequence[Command]) -> bytes:
    """The key that places a group (every key of a query transaction shares its tag)."""
    key = commands[0][1]
    return key if isinstance(key, bytes) else str(key).encode()


def parse_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """Split `redis+cluster://[user:pw@]h1:p1,h2:p2[/db][?q]` into a one-host redis:// URL
    (credentials and options, for redis-py's `from_url`) and the list of seed nodes."""
    rest = url.partition("://")[2]
    netloc, sep, tail = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise RedmapConnectionError(f"bad cluster node {part!r} in a redis+cluster:// URL")
        nodes.append((host, int(port)))
    first = f"{nodes[0][0]}:{nodes[0][1]}"
    single = f"redis://{creds}{at}{first}{sep}{tail}"
    urlsplit(single)  # fail early on anything urllib cannot read
    return single, nodes


def check_single_slot(plan: FlushPlan) -> None:
    """Refuse, before any I/O, a flush whose keys fall in more than one hash slot: one
    transaction can hold one. The `check_plan` of both cluster dialects (sync and asyncio)."""
    slots: dict[int, list[str]] = {}
    keys = [*plan.watch, *(c.key for c in plan.checks), *(str(w[1]) for w in plan.writes)]
    for key in keys:
        if key:  # "" stands for an object whose generated id is not handed out yet
            slots.setdefault(key_slot(key.encode()), []).append(key)
    if len(slots) > 1:
        groups = "; ".join(
            f"slot {slot}: {', '.join(sorted(set(ks))[:3])}" for slot, ks in sorted(slots.items())
        )
        advice = (
            "allow_cross_slot=True splits a flush by hash tag, and these keys share "
            "no tag with their part; keep objects that change together under one "
            "registry prefix"
            if plan.cross_slot_allowed
            else "Keep objects that change together under one registry prefix, or "
            "open the session with allow_cross_slot=True"
        )
        raise CrossSlotError(
            f"this flush spans {len(slots)} hash slots and one transaction can hold one; "
            f"nothing was written ({groups}). {advice}",
            slots=sorted(slots),
        )


class ClusterDialect(Dialect):
    """A Redis Cluster; every flush runs on the node owning its hash slot."""

    name = "cluster"
    supports_cluster = True
    # One transaction can only touch keys of one hash slot.
    supports_multi_key_transactions = False

    def create_client(self, url: str, **options: Any) -> Any:
        single, nodes = parse_cluster_url(url)
        opts = default_client_options()
        opts.update(options)
        startup = [ClusterNode(h, p) for h, p in nodes]  # type: ignore[no-untyped-call]
        with translate_errors(url):
            return RedisCluster.from_url(single, startup_nodes=startup, **opts)

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """One round trip per node: the groups (each within one hash tag) that a node owns
        go to it as MULTI/EXEC blocks in one pipeline. A block redirected because its slot
        moved ran nothing and is run again alone, through redis-py's routing."""
        if len(groups) <= 1:
            return [self.execute_transaction(g) for g in groups]
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, g in enumerate(groups):
            node = self.client.nodes_manager.get_node_from_slot(key_slot(_first_key(g)))
            by_node.setdefault(node.name, (node, []))[1].append(i)
        out: list[list[Any] | None] = [None] * len(groups)
        for node, indices in by_node.values():
            client = self.client.get_redis_connection(node)
            replies = self._pipelined_transactions(client, [groups[i] for i in indices])
            for i, reply in zip(indices, replies, strict=True):
                out[i] = reply if reply is not None else self.execute_transaction(groups[i])
        return [r for r in out if r is not None]

    def _flush_pool(self, route: str) -> ConnectionPool:
        slot = key_slot(route.encode())
        node = self.client.nodes_manager.get_node_from_slot(slot)
        pool: ConnectionPool = self.client.get_redis_connection(node).connection_pool
        return pool

    def refresh_topology(self) -> None:
        """After a redirect (the slot moved, or is migrating): learn the new owner."""
        self.client.nodes_manager.initialize()

    def check_plan(self, plan: FlushPlan) -> None:
        """Refuse, before any I/O, a flush whose keys fall in more than one hash slot."""
        check_single_slot(plan)
