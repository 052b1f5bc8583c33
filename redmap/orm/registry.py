"""`registry`: records mapped classes and resolves names between them.

`@reg.mapped` only records and checks the declaration; `configure()` (run lazily on
first use of a mapped class by a session or query) resolves forward references
like `"Book"` through the registry's name table, finishes every mapper, then
resolves every relationship (target, direction, foreign key, `back_populates` pair,
ordering): only the registry knows the classes by name.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import typing
from typing import Any, TypeVar

from ..exc import MappingError
from . import keys
from .attributes import instrument_class
from .mapper import Mapper, mapper_of_configured
from .relationships import Direction, RelationshipProperty

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
            _configure_relationships(self)
            for mapper in self.mappers.values():
                mapper.check_soft_delete_cascades()
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


# -- relationships, resolved at configure() ---------------------------------------------


def _configure_relationships(reg: registry) -> None:
    """Resolve targets, directions, foreign keys, back_populates pairs and ordering."""
    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            _resolve_target(reg, mapper, prop)
    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            _resolve_direction(mapper, prop)
    for mapper in reg.mappers.values():
        for prop in mapper.relationships.values():
            _resolve_reverse(mapper, prop)
            _resolve_order(mapper, prop)


def _resolve_target(reg: registry, mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    ann = prop.annotation
    if isinstance(ann, str):
        prop.uselist = ann.replace(" ", "").startswith(("list[", "List[", "typing.List["))
    else:
        prop.uselist = typing.get_origin(ann) is list
    target = prop.argument if prop.argument is not None else _target_from_annotation(ann)
    prop.target = reg._lookup(target, model=mapper.name, field=prop.key)


def _fk_columns(mapper: Mapper[Any], target: type[Any]) -> list[str]:
    return [
        c.key
        for c in mapper.columns.values()
        if c.foreign_key is not None and c.foreign_key.target is target
    ]


def _resolve_direction(mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    target_mapper = mapper_of_configured(prop.target)
    if prop.secondary is not None:
        if not prop.uselist:
            raise MappingError(
                "a many-to-many relationship (secondary=...) must be annotated list[...]",
                model=mapper.name,
                field=prop.key,
            )
        prop.direction = Direction.MANYTOMANY
        prop.link_name = prop.key
        return
    if prop.uselist:
        fks = _fk_columns(target_mapper, mapper.class_)
        where = f"{target_mapper.name} needs a ForeignKey({mapper.name!r}) field"
        prop.direction = Direction.ONETOMANY
    else:
        fks = _fk_columns(mapper, prop.target)
        where = f"{mapper.name} needs a ForeignKey({target_mapper.name!r}) field"
        prop.direction = Direction.MANYTOONE
    if prop.back_populates and len(fks) > 1:
        # Several foreign keys to the same model: the reverse side may name one.
        other = target_mapper.relationships.get(prop.back_populates)
        if other is not None and other.fk_column in fks:
            fks = [other.fk_column]
    if len(fks) != 1:
        raise MappingError(
            f"cannot tell which foreign key links {mapper.name}.{prop.key}: {where}"
            + (f" (found {', '.join(fks)})" if fks else ""),
            model=mapper.name,
            field=prop.key,
        )
    prop.fk_column = fks[0]


def _resolve_reverse(mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    target_mapper = mapper_of_configured(prop.target)
    if prop.back_populates is None:
        if prop.direction is Direction.MANYTOMANY:
            prop.reverse_link_name = f"~{mapper.keyspace}.{prop.key}"
            if prop not in target_mapper.hidden_links:
                target_mapper.hidden_links.append(prop)
        return
    other = target_mapper.relationships.get(prop.back_populates)
    if other is None:
        raise MappingError(
            f"back_populates={prop.back_populates!r}: {target_mapper.name} has no such "
            f"relationship",
            model=mapper.name,
            field=prop.key,
        )
    if other.target is not mapper.class_:
        raise MappingError(
            f"back_populates={prop.back_populates!r} points at a relationship to "
            f"{other.target.__name__}, not {mapper.name}",
            model=mapper.name,
            field=prop.key,
        )
    pairs = {
        (Direction.MANYTOONE, Direction.ONETOMANY),
        (Direction.ONETOMANY, Direction.MANYTOONE),
        (Direction.MANYTOMANY, Direction.MANYTOMANY),
    }
    if (prop.direction, other.direction) not in pairs:
        raise MappingError(
            f"back_populates pairs a {prop.direction.value} with a {other.direction.value}",
            model=mapper.name,
            field=prop.key,
        )
    if prop.direction is Direction.MANYTOMANY and prop.secondary != other.secondary:
        raise MappingError(
            f"both sides of a many-to-many need the same secondary "
            f"({prop.secondary!r} vs {other.secondary!r})",
            model=mapper.name,
            field=prop.key,
        )
    prop.reverse = other
    if prop.direction is Direction.MANYTOMANY:
        prop.reverse_link_name = other.key


def _resolve_order(mapper: Mapper[Any], prop: RelationshipProperty) -> None:
    if prop.order_by is None:
        return
    target_mapper = mapper_of_configured(prop.target)
    if prop.direction is not Direction.ONETOMANY:
        raise MappingError(
            "order_by is supported on one-to-many relationships (many-to-many "
            "collections are ordered by primary key)",
            model=mapper.name,
            field=prop.key,
        )
    spec = prop.order_by
    name = spec.rpartition(".")[2] if isinstance(spec, str) else getattr(spec, "key", None)
    col = target_mapper.columns.get(name or "")
    if col is None or not (col.sorted or col.primary_key):
        raise MappingError(
            f"order_by={spec!r} must name a Sorted() field of {target_mapper.name}",
            model=mapper.name,
            field=prop.key,
        )
    fk = target_mapper.columns[prop.fk_column]
    if fk.order_column not in (None, col.key):
        raise MappingError(
            f"{target_mapper.name}.{prop.fk_column} already orders by {fk.order_column}",
            model=mapper.name,
            field=prop.key,
        )
    fk.order_column = None if col.primary_key else col.key
    prop.order_column = fk.order_column


def _target_from_annotation(ann: Any) -> Any:
    if isinstance(ann, str):
        names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", ann)
        skip = {"list", "List", "Optional", "None", "typing"}
        candidates = [n for n in names if n not in skip]
        return candidates[-1] if candidates else ann
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    inner = args[0] if args else ann
    if isinstance(inner, typing.ForwardRef):
        return inner.__forward_arg__
    return inner
