"""The standalone dialect: `redis://`, `rediss://` and `unix://` URLs on one Redis server.

URL parsing, TLS options, connection pooling and read retries are redis-py's
(`redis.Redis.from_url`); the flush transaction is `Dialect.execute_flush`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..exc import RedmapError
from .base import Command, Dialect, build_standalone_client, translate_errors

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
        flat: list[Command] = []
        for g in groups:
            flat.extend([("MULTI",), *g, ("EXEC",)])
        self._hook(flat)
        with translate_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            for cmd in flat:
                pipe.execute_command(*cmd)
            replies = pipe.execute(raise_on_error=False)
        out: list[list[Any]] = []
        at = 0
        for g in groups:
            at += len(g) + 2
            exec_reply = replies[at - 1]
            if isinstance(exec_reply, Exception) or exec_reply is None:
                errors = [r for r in replies[at - len(g) - 2 : at] if isinstance(r, Exception)]
                raise RedmapError(
                    f"Redis refused a transaction: {errors[0] if errors else exec_reply}"
                )
            for r in exec_reply:
                if isinstance(r, Exception):
                    raise RedmapError(f"Redis refused a command: {r}")
            out.append(list(exec_reply))
        return out
