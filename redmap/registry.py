"""`registry`: records mapped classes and resolves names between them.

`@reg.mapped` only records and checks the declaration; `configure()` (run lazily on
first use of a mapped class by a session or query) resolves forward references
like `"Book"` through the registry's name table and finishes every mapper.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, TypeVar

from . import keys
from .attributes import instrument_class
from .exc import MappingError
from .mapper import Mapper
from .relationships import configure_relationships

__all__ = ["registry"]

T = TypeVar("T")

DEFAULT_PREFIX = "redmap"


class registry:  # noqa: N801 - lowercase like SQLAlchemy's registry
    """A set of mapped classes that share a key prefix and can refer to each other by name.

    `registry(prefix="app")` puts every key under the hash tag `{app}`.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, shards: int = 16):
        if not keys.valid_name(prefix):
            raise MappingError(f"registry prefix {prefix!r} may only hold [A-Za-z0-9_.-]")
        if not 1 <= shards <= 16384:
            raise MappingError(f"shards must be between 1 and 16384, got {shards}")
        self.prefix = prefix
        # Models with __shard_key__ spread over this many hash tags ({P|0} ... {P|n-1}).
        self.shards = shards
        self.mappers: dict[type[Any], Mapper[Any]] = {}
        self._class_names: dict[str, type[Any]] = {}
        self._keyspaces: dict[str, type[Any]] = {}
        self._configured = False
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<registry prefix={self.prefix!r} models={sorted(self._class_names)}>"

    def mapped(self, cls: type[T]) -> type[T]:
        """Map a dataclass; apply on top of `@dataclass`."""
        name = getattr(cls, "__name__", repr(cls))
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise MappingError(
                "@registry.mapped must be applied on top of @dataclass (the class is not a "
                "dataclass)",
                model=name,
            )
        if "__slots__" in cls.__dict__:
            raise MappingError(
                "slots dataclasses are not supported: redmap keeps per-object state in "
                "the instance __dict__",
                model=name,
            )
        if "__redmap_mapper__" in cls.__dict__:
            raise MappingError("class is already mapped", model=name)
        keyspace = cls.__dict__.get("__keyspace__", name.lower())
        if not isinstance(keyspace, str) or not keys.valid_name(keyspace):
            raise MappingError(
                f"__keyspace__ {keyspace!r} may only hold [A-Za-z0-9_.-]", model=name
            )
        with self._lock:
            if keyspace in self._keyspaces:
                other = self._keyspaces[keyspace].__name__
                raise MappingError(
                    f"keyspace {keyspace!r} is already used by {other}; set __keyspace__",
                    model=name,
                )
            mapper: Mapper[T] = Mapper(cls, self, keyspace)
            mapper._declare()
            instrument_class(mapper)
            cls.__redmap_mapper__ = mapper  # type: ignore[attr-defined]
            self.mappers[cls] = mapper
            self._class_names[name] = cls
            self._keyspaces[keyspace] = cls
            self._configured = False
        return cls

    def configure(self) -> None:
        """Resolve names and finish every mapper; called lazily, safe to call again."""
        if self._configured:
            return
        with self._lock:
            if self._configured:
                return
            for mapper in self.mappers.values():
                mapper._configure()
            configure_relationships(self)
            self._configured = True

    def _lookup(self, target: Any, *, model: str, field: str) -> type[Any]:
        """The mapped class a name or class refers to, or a MappingError naming it."""
        if isinstance(target, type):
            if target in self.mappers:
                return target
            raise MappingError(
                f"{target.__name__} is not mapped by this registry", model=model, field=field
            )
        if isinstance(target, str):
            cls = self._class_names.get(target)
            if cls is not None:
                return cls
            raise MappingError(
                f"no mapped class named {target!r} in this registry "
                f"(known: {', '.join(sorted(self._class_names)) or 'none'})",
                model=model,
                field=field,
            )
        raise MappingError(f"cannot refer to a model by {target!r}", model=model, field=field)
