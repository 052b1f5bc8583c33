"""The standalone dialect: `redis://`, `rediss://` and `unix://` URLs on one Redis server.

URL parsing, TLS options, connection pooling and read retries are redis-py's
(`redis.Redis.from_url`); the flush transaction is `Dialect.execute_flush`.
"""

from __future__ import annotations

from typing import Any

from .base import Dialect, build_standalone_client

__all__ = ["StandaloneDialect"]


class StandaloneDialect(Dialect):
    """One Redis server reached through redis-py's connection pool."""

    name = "standalone"

    def create_client(self, url: str, **options: Any) -> Any:
        return build_standalone_client(url, **options)
