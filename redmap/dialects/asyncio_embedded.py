"""The asyncio embedded dialect: `redis+embedded:///path/to/datadir` through
`redis.asyncio`; the twin of `embedded.EmbeddedDialect`.

Starting (or joining) the folder's redis-server blocks for as long as the server takes
to start, so it is not done when the dialect is created but on first use, in a worker
thread (`asyncio.to_thread`), once; from then on this is the standalone dialect on the
server's URL. The server stops as the sync one does (`_server.release_embedded`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..commands import RoundTripHook
from ._server import acquire_embedded
from .asyncio_base import build_async_standalone_client
from .asyncio_standalone import AsyncStandaloneDialect
from .embedded import datadir_of

__all__ = ["AsyncEmbeddedDialect"]


def _acquire(url: str) -> str:
    # Path.resolve() reads the file system: in the worker thread with the start-up.
    return acquire_embedded(datadir_of(url).resolve())


class AsyncEmbeddedDialect(AsyncStandaloneDialect):
    """A redis-server that redmap starts itself (on first use), reached over a unix socket."""

    name = "embedded"
    supports_embedded_server = True

    def __init__(self, url: str, *, hook: RoundTripHook, **client_options: Any):
        self._options = client_options
        # The redis-py URL of the started server (with this process's client name).
        self.server_url: str | None = None
        # Tasks that use the dialect before the server is up wait for one start-up.
        self._starting = asyncio.Lock()
        super().__init__(url, hook=hook, **client_options)

    def create_client(self, url: str, **options: Any) -> Any:
        return None  # the server's URL is known once it runs: see ready_client

    async def ready_client(self) -> Any:
        """The client of the folder's server, started (or joined) on first use."""
        if self.client is None:
            async with self._starting:
                if self.client is None:
                    self.server_url = await asyncio.to_thread(_acquire, self.url)
                    self.client = build_async_standalone_client(self.server_url, **self._options)
        return self.client
