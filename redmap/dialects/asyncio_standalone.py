"""The asyncio standalone dialect: `redis://`, `rediss://` and `unix://` URLs on one Redis
server, through `redis.asyncio`; the twin of `standalone.StandaloneDialect`.

URL parsing, TLS options and pooling are redis-py's (`redis.asyncio.Redis.from_url`,
with redmap's default options); the flush is `AsyncDialect.execute_flush`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..commands import Command
from .asyncio_base import AsyncDialect, build_async_standalone_client, send_and_read
from .base import translate_errors
from .standalone import _as_dict

__all__ = ["AsyncStandaloneDialect"]


class AsyncStandaloneDialect(AsyncDialect):
    """One Redis server reached through a redis.asyncio connection pool."""

    name = "standalone"

    def create_client(self, url: str, **options: Any) -> Any:
        return build_async_standalone_client(url, **options)

    async def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Every group in one round trip: MULTI/EXEC blocks in one pipeline (one server)."""
        if len(groups) <= 1:
            return [await self.execute_transaction(g) for g in groups]
        client = await self.ready_client()
        replies = await self._pipelined_transactions(client, groups)
        return [r for r in replies if r is not None]

    async def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """HGETALL of each key on one pooled connection (`send_and_read`, hiredis packing),
        without redis-py's pipeline machinery, as `StandaloneDialect.fetch_hashes` does
        and for the same reason (its per-command bookkeeping costs as much as decoding
        the objects). Sent again like every read when the connection is cut or the
        server is loading."""
        if not keys:
            return []
        commands = [("HGETALL", k) for k in keys]

        async def attempt() -> list[Any]:
            client = await self.ready_client()
            pool = client.connection_pool
            self._hook(commands)
            conn = await pool.get_connection()
            try:
                return await send_and_read(conn, commands)
            except BaseException:
                # Replies may be left unread (a cut, a cancellation): never reuse it as is.
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)

        with translate_errors(self.url):
            replies = await self.read_retry.acall(attempt, url=self.safe_url)
        return [_as_dict(r) for r in replies]
