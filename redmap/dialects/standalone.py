"""The standalone dialect: `redis://`, `rediss://` and `unix://` URLs on one Redis server.

URL parsing, TLS options, connection pooling and read retries are redis-py's
(`redis.Redis.from_url`); the flush transaction is `Dialect.execute_flush`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Command, Dialect, build_standalone_client, send_and_read, translate_errors

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

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """HGETALL of each key on one pooled connection (`send_and_read`, hiredis packing),
        without redis-py's pipeline machinery: its per-command bookkeeping and reply
        callbacks cost as much as decoding the objects. Sent again like every read
        (`Dialect.read_retry`) when the connection is cut or the server is loading.
        """
        if not keys:
            return []
        commands = [("HGETALL", k) for k in keys]
        pool = self.client.connection_pool

        def attempt() -> list[Any]:
            self._hook(commands)
            conn = pool.get_connection()
            try:
                return send_and_read(conn, commands)
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse it as is
                raise
            finally:
                pool.release(conn)

        with translate_errors(self.url):
            replies = self.read_retry.call(attempt, url=self.safe_url)
        return [_as_dict(r) for r in replies]


def _as_dict(reply: Any) -> Any:
    """A RESP2 HGETALL reply (a flat list) as the dict redis-py's callback would make."""
    if type(reply) is list:
        return dict(zip(reply[::2], reply[1::2], strict=True))
    return reply
