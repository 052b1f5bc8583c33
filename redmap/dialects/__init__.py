"""The dialect registry: URL scheme -> dialect class, imported lazily; used by
`create_engine` (`load`) and `create_async_engine` (`load_async`).

Third parties add schemes through the `redmap.dialects` entry-point group
(`name = "package.module:Class"`, the name being the URL scheme) or at run time
with `register("scheme", "package.module:Class")`; asyncio dialects likewise through
the `redmap.async_dialects` group or `register_async`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from ..exc import RedmapConnectionError

if TYPE_CHECKING:
    from .asyncio_base import AsyncDialect
    from .base import Dialect

__all__ = ["load", "load_async", "register", "register_async", "scheme_of"]

_REGISTRY: dict[str, str] = {
    "redis": "redmap.dialects.standalone:StandaloneDialect",
    "rediss": "redmap.dialects.standalone:StandaloneDialect",
    "unix": "redmap.dialects.standalone:StandaloneDialect",
    "redis+embedded": "redmap.dialects.embedded:EmbeddedDialect",
    "redis+cluster": "redmap.dialects.cluster:ClusterDialect",
}

# The same schemes on redis.asyncio.
_ASYNC_REGISTRY: dict[str, str] = {
    "redis": "redmap.dialects.asyncio_standalone:AsyncStandaloneDialect",
    "rediss": "redmap.dialects.asyncio_standalone:AsyncStandaloneDialect",
    "unix": "redmap.dialects.asyncio_standalone:AsyncStandaloneDialect",
    "redis+embedded": "redmap.dialects.asyncio_embedded:AsyncEmbeddedDialect",
    "redis+cluster": "redmap.dialects.asyncio_cluster:AsyncClusterDialect",
}


def register(scheme: str, target: str) -> None:
    """Map a URL scheme to `"module:Class"`, replacing any earlier entry."""
    _REGISTRY[scheme] = target


def register_async(scheme: str, target: str) -> None:
    """Map a URL scheme to an asyncio dialect `"module:Class"`, replacing any earlier entry."""
    _ASYNC_REGISTRY[scheme] = target


def scheme_of(url: str) -> str:
    """The scheme of a URL; only the scheme is read here, the rest is redis-py's to parse."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise RedmapConnectionError(f"not a URL (expected scheme://...): {url.split('@')[-1]!r}")
    return scheme.lower()


def load(url: str) -> type[Dialect]:
    """The dialect class for `url`, importing its module on first use."""
    cls: type[Dialect] = _load(url, _REGISTRY, "redmap.dialects")
    return cls


def load_async(url: str) -> type[AsyncDialect]:
    """The asyncio dialect class for `url`, importing its module on first use."""
    cls: type[AsyncDialect] = _load(url, _ASYNC_REGISTRY, "redmap.async_dialects")
    return cls


def _load(url: str, registry: dict[str, str], group: str) -> Any:
    scheme = scheme_of(url)
    target = registry.get(scheme)
    if target is None:
        for ep in entry_points(group=group):
            if ep.name == scheme:
                target = ep.value
                registry[scheme] = target
                break
    if target is None:
        raise RedmapConnectionError(
            f"no dialect for URL scheme {scheme!r} (known: {', '.join(sorted(registry))})"
        )
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
