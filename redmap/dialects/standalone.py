"""The standalone dialect: `redis://`, `rediss://` and `unix://` URLs on one Redis server.

URL parsing, TLS options, connection pooling and read retries are redis-py's
(`redis.Redis.from_url`); the flush transaction is `Dialect.execute_flush`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Command, Dialect, build_standalone_client

__all__ = ["StandaloneDialect"]


class StandaloneDialect(Dialect):
    """One Redis server reached through redis-py's connection pool."""

    name = "standalone"

    def create_client(self, url: str, **options: Any) -> Any:
        return build_standalone_client(url, **options)

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Every group in one round trip: MULTI/EXEC blocks in one pipeline (one server)."""
        if len(groups) <= 1:
            return [self.execute_transaction(g) for g in groups]
        replies = self._pipelined_transactions(self.client, groups)
        return [r for r in replies if r is not None]
