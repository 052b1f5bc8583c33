"""The dialect registry: URL scheme -> dialect class, imported lazily; used by `create_engine`.

Third parties add schemes through the `redmap.dialects` entry-point group
(`name = "package.module:Class"`, the name being the URL scheme) or at run time
with `register("scheme", "package.module:Class")`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from ..exc import RedmapConnectionError

if TYPE_CHECKING:
    from .base import Dialect

__all__ = ["load", "register", "scheme_of"]

_REGISTRY: dict[str, str] = {
    "redis": "redmap.dialects.standalone:StandaloneDialect",
    "rediss": "redmap.dialects.standalone:StandaloneDialect",
    "unix": "redmap.dialects.standalone:StandaloneDialect",
    "redis+embedded": "redmap.dialects.embedded:EmbeddedDialect",
    "redis+cluster": "redmap.dialects.cluster:ClusterDialect",
}


def register(scheme: str, target: str) -> None:
    """Map a URL scheme to `"module:Class"`, replacing any earlier entry."""
    _REGISTRY[scheme] = target


def scheme_of(url: str) -> str:
    """The scheme of a URL; only the scheme is read here, the rest is redis-py's to parse."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise RedmapConnectionError(f"not a URL (expected scheme://...): {url.split('@')[-1]!r}")
    return scheme.lower()


def load(url: str) -> type[Dialect]:
    """The dialect class for `url`, importing its module on first use."""
    scheme = scheme_of(url)
    target = _REGISTRY.get(scheme)
    if target is None:
        for ep in entry_points(group="redmap.dialects"):
            if ep.name == scheme:
                target = ep.value
                _REGISTRY[scheme] = target
                break
    if target is None:
        raise RedmapConnectionError(
            f"no dialect for URL scheme {scheme!r} (known: {', '.join(sorted(_REGISTRY))})"
        )
    module_name, _, class_name = target.partition(":")
    cls: type[Dialect] = getattr(importlib.import_module(module_name), class_name)
    return cls
