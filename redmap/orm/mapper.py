"""`Mapper`: the per-class facts (fields, primary key, indexes, relationships, keys).

Built by `registry.mapped` at decoration time (declaration errors surface there) and
completed by `registry.configure()`; read by the session, persistence, loading and
queries. Flush and load never inspect annotations: everything is compiled here once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import uuid
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Generic, TypeVar, Union

from ..exc import DecodeError, MappingError, ValidationError
from . import keys
from .relationships import RELATIONSHIP_KEY, Direction, RelationshipProperty
from .schema import (
    CreatedAt,
    ExpiresAt,
    ForeignKey,
    Indexed,
    Marker,
    PrimaryKey,
    Sorted,
    Suffix,
    Text,
    Unique,
    UpdatedAt,
)
from .textindex import is_string_type
from .types import Codec, compile_codec

if TYPE_CHECKING:
    from .registry import registry as _Registry  # noqa: N812 - the class is lowercase

__all__ = ["ColumnProperty", "Mapper", "mapper_of"]

M = TypeVar("M")

_PK_TYPES = (int, str, uuid.UUID)
# Name of the hash field holding an object's version; "#" cannot start a Python field name.
VERSION_FIELD = "#v"
# Name of the hash field holding an object's incarnation: a random token written by the
# insert that created the hash (and by an update of a hash found without `#v`), never
# changed by other updates. Versions count per incarnation, so a hash deleted and
# inserted again (starting at `#v` 1 again) never passes for the one a session loaded.
INCARNATION_FIELD = "#i"


class _UnresolvedError(Exception):
    """An annotation naming a class that is not defined yet; retried at configure."""


@dataclasses.dataclass
class ColumnProperty:
    """One stored field: its codec and the indexes it takes part in."""

    key: str
    annotation: Any
    codec: Codec | None = None
    primary_key: bool = False
    indexed: bool = False
    unique: bool = False
    sorted: bool = False
    # String indexes (`textindex`): `Sorted()` on a str/Enum field sets `lexical`, not
    # `sorted` (which stays the numeric score index); `Text()` and `Suffix()`.
    lexical: bool = False
    text: bool = False
    suffix: bool = False
    foreign_key: ForeignKey | None = None
    # An int primary key that is None at flush gets its value from the model's counter.
    generated: bool = False
    # True for the `id` attribute redmap adds to a model with no PrimaryKey field.
    implicit: bool = False
    # A foreign key's per-parent zset is scored by this Sorted field of the same model
    # (set by a one-to-many relationship's order_by); None scores by primary key.
    order_column: str | None = None
    # "expires", "created" or "updated": an ExpiresAt/CreatedAt/UpdatedAt field
    # (`redmap.orm.expiry`).
    role: str | None = None

    @property
    def has_index(self) -> bool:
        return (
            self.indexed
            or self.unique
            or self.sorted
            or self.foreign_key is not None
            or self.has_string_index
        )

    @property
    def required(self) -> bool:
        """Whether None is refused (the annotation is not Optional): such a foreign key
        cannot be cleared to detach a child."""
        return self.codec is not None and not self.codec.nullable

    @property
    def has_string_index(self) -> bool:
        return self.lexical or self.text or self.suffix

    @property
    def index_kinds(self) -> list[str]:
        """The migration index kinds of this field (`op.create_index(..., kind=)`); an
        ordered string is "sorted", like a numeric one."""
        kinds = [k for k in ("indexed", "unique") if getattr(self, k)]
        if self.sorted or self.lexical:
            kinds.append("sorted")
        return kinds + [k for k in ("text", "suffix") if getattr(self, k)]


class Mapper(Generic[M]):
    """Everything redmap knows about one mapped class."""

    def __init__(self, class_: type[M], reg: _Registry, keyspace: str):
        self.class_ = class_
        self.registry = reg
        self.name = class_.__name__
        self.keyspace = keyspace
        # The registry-wide keys (and, for an unsharded model, every key of it).
        self.keys = keys.KeySpace(reg.prefix, keyspace)
        # `__shard_key__`: the field whose value picks the shard (hash tag) of an object,
        # its indexes and its links; None keeps every key under the registry's tag.
        shard_key = class_.__dict__.get("__shard_key__")
        self.shard_key: str | None = shard_key
        self.shards: int = reg.shards
        self.shard_keys: tuple[keys.KeySpace, ...] = (
            tuple(keys.KeySpace(reg.prefix, keyspace, b) for b in range(reg.shards))
            if shard_key is not None
            else ()
        )
        self.columns: dict[str, ColumnProperty] = {}
        self.relationships: dict[str, RelationshipProperty] = {}
        # Many-to-many relationships of other models that point here without a
        # back_populates side: deleting an object here must still unlink it there.
        self.hidden_links: list[RelationshipProperty] = []
        self.pk: ColumnProperty
        self.configured = False
        # Filled at configure time; kept as tuples so the hot path only iterates.
        self.mutable_columns: tuple[ColumnProperty, ...] = ()
        self.indexed_columns: tuple[ColumnProperty, ...] = ()
        self.decode_plan: tuple[tuple[str, bytes, Codec], ...] = ()
        self._stored_columns: tuple[ColumnProperty, ...] | None = None
        # ExpiresAt / CreatedAt / UpdatedAt fields, `__ttl__`, `__soft_delete__`
        # (`redmap.orm.expiry`); set at configure.
        self.expiry: ExpiryInfo = ExpiryInfo()
        # The `@validates` methods by attribute name (`attributes.instrument_class`).
        self.validators: dict[str, Callable[[Any, str, Any], Any]] = {}

    def __repr__(self) -> str:
        return f"<Mapper {self.name} keyspace={self.keyspace!r}>"

    # -- declaration -------------------------------------------------------------

    def _declare(self) -> None:
        cls = self.class_
        pk_fields: list[str] = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            prop = f.metadata.get(RELATIONSHIP_KEY)
            if isinstance(prop, RelationshipProperty):
                prop.key = f.name
                prop.parent = self
                prop.annotation = f.type
                self.relationships[f.name] = prop
                continue
            col = ColumnProperty(key=f.name, annotation=f.type)
            self.columns[f.name] = col
            try:
                self._compile_column(col)
            except _UnresolvedError:
                pass  # a forward reference: compiled by configure()
            if col.primary_key:
                pk_fields.append(f.name)
        if len(pk_fields) > 1:
            raise MappingError(
                f"more than one PrimaryKey() field: {', '.join(pk_fields)}", model=self.name
            )
        if pk_fields:
            self.pk = self.columns[pk_fields[0]]
        else:
            if "id" in self.columns or "id" in self.relationships:
                raise MappingError(
                    "a field named 'id' exists but is not marked PrimaryKey(); mark it "
                    "or rename it (redmap adds an 'id' primary key to models without one)",
                    model=self.name,
                    field="id",
                )
            col = ColumnProperty(
                key="id",
                annotation=int | None,
                primary_key=True,
                generated=True,
                implicit=True,
            )
            col.codec = compile_codec(int | None, model=self.name, field="id")
            self.columns["id"] = col
            self.pk = col

    def _check_shard_key(self) -> None:
        """A shard key names an int, str or UUID field; unique values must be per shard."""
        if self.shard_key is None:
            return
        col = self.columns.get(self.shard_key)
        if col is None:
            raise MappingError(
                f"__shard_key__ = {self.shard_key!r} names no stored field", model=self.name
            )
        inner = _strip_optional(self._resolve(col.key, col.annotation))
        base, _ = _split_markers(inner, model=self.name, field=col.key)
        if _strip_optional(base) not in _PK_TYPES:
            raise MappingError(
                "a shard key must be an int, str or uuid.UUID field",
                model=self.name,
                field=col.key,
            )
        for other in self.columns.values():
            if other.unique and other.key != self.shard_key:
                raise MappingError(
                    "Unique() on a sharded model would only hold within one shard; shard by "
                    "that field or drop the constraint",
                    model=self.name,
                    field=other.key,
                )
        if self.pk is not col and not (
            self.pk.codec is not None and "int" in self.pk.codec.expected
        ):
            raise MappingError(
                "a model sharded by another field needs an int primary key (its value "
                "carries the shard)",
                model=self.name,
                field=self.pk.key,
            )

    # -- shards ----------------------------------------------------------------------

    def shard_of_value(self, value: Any) -> int:
        """The shard a shard-key value belongs to: ints by remainder, others by CRC32."""
        if isinstance(value, int) and not isinstance(value, bool):
            return value % self.shards
        codec = self.columns[self.shard_key or self.pk.key].codec
        assert codec is not None
        return zlib.crc32(codec.encode(value)) % self.shards

    def shard_of_pk(self, pk: Any) -> int | None:
        """The shard of the object with this primary key (None: the model is not sharded).

        A model sharded by its own key takes the shard of that value; one sharded by
        another field gets ids whose remainder is the shard (see `shard_id`).
        """
        if self.shard_key is None:
            return None
        if self.shard_key == self.pk.key:
            return self.shard_of_value(pk)
        return int(pk) % self.shards

    def shard_id(self, counter: int, shard: int) -> int:
        """A generated id that lands in `shard` (ids of sharded models carry their shard)."""
        return counter * self.shards + shard

    def keys_for_shard(self, shard: int | None) -> keys.KeySpace:
        return self.keys if shard is None else self.shard_keys[shard]

    def keys_for_pk(self, pk: Any) -> keys.KeySpace:
        """The keys of the object with this primary key (its shard's, if sharded)."""
        return self.keys_for_shard(self.shard_of_pk(pk))

    def all_keyspaces(self) -> tuple[keys.KeySpace, ...]:
        """Every keyspace holding objects of the model: one, or one per shard."""
        return self.shard_keys or (self.keys,)

    def _compile_column(self, col: ColumnProperty) -> None:
        tp = self._resolve(col.key, col.annotation)
        base, markers = _split_markers(tp, model=self.name, field=col.key)
        for m in markers:
            if isinstance(m, PrimaryKey):
                col.primary_key = True
            elif isinstance(m, Indexed):
                col.indexed = True
            elif isinstance(m, Unique):
                col.unique = True
            elif isinstance(m, Sorted):
                col.sorted = True
            elif isinstance(m, ForeignKey):
                col.foreign_key = m
            elif isinstance(m, ExpiresAt | CreatedAt | UpdatedAt):
                col.role = _ROLES[type(m)]
            elif isinstance(m, Text):
                col.text = True
            elif isinstance(m, Suffix):
                col.suffix = True
        codec = compile_codec(base, model=self.name, field=col.key)
        inner = _strip_optional(base)
        if col.sorted and is_string_type(inner):
            col.sorted, col.lexical = False, True
        if (col.text or col.suffix) and inner is not str:
            marker = "Text()" if col.text else "Suffix()"
            raise MappingError(
                f"{marker} needs a str field, not {codec.expected}",
                model=self.name,
                field=col.key,
            )
        col.codec = codec
        if col.role is not None and (_strip_optional(base) is not datetime or not codec.nullable):
            raise MappingError(
                f"a field marked {_MARKER_NAMES[col.role]}() must be Optional[datetime] "
                f"(it is None until set), not {codec.expected}",
                model=self.name,
                field=col.key,
            )
        if col.primary_key:
            inner = _strip_optional(base)
            if inner not in _PK_TYPES:
                raise MappingError(
                    f"a primary key must be int, str or uuid.UUID, not {codec.expected}",
                    model=self.name,
                    field=col.key,
                )
            if col.has_index:
                raise MappingError(
                    "a primary key needs no Indexed/Unique/Sorted marker",
                    model=self.name,
                    field=col.key,
                )
            col.generated = inner is int and codec.nullable
        if (col.indexed or col.unique) and codec.mutable:
            raise MappingError(
                f"{codec.expected} values are stored as JSON and cannot be indexed",
                model=self.name,
                field=col.key,
            )
        if col.sorted and not codec.sortable:
            raise MappingError(
                f"Sorted() needs an int, float, Decimal, bool, date, datetime, str or Enum field, "
                f"not {codec.expected}",
                model=self.name,
                field=col.key,
            )

    def _resolve(self, name: str, annotation: Any) -> Any:
        if not isinstance(annotation, str):
            return annotation
        # get_type_hints on a one-field holder class resolves a single string
        # annotation in the model's module, with the registry's classes in scope.
        holder = type(
            "_RedmapAnnotation",
            (),
            {"__annotations__": {name: annotation}, "__module__": self.class_.__module__},
        )
        localns = dict(self.registry._class_names)
        localns.setdefault(self.class_.__name__, self.class_)
        try:
            return typing.get_type_hints(holder, localns=localns, include_extras=True)[name]
        except NameError as exc:
            raise _UnresolvedError(str(exc)) from exc

    # -- configure -----------------------------------------------------------------

    def _configure(self) -> None:
        for col in self.columns.values():
            if col.codec is None:
                try:
                    self._compile_column(col)
                except _UnresolvedError as exc:
                    raise MappingError(
                        f"cannot resolve the annotation {col.annotation!r}: {exc}",
                        model=self.name,
                        field=col.key,
                    ) from None
        for col in self.columns.values():
            if col.foreign_key is not None:
                col.foreign_key = ForeignKey(self._foreign_target(col))
        self._check_shard_key()
        self.mutable_columns = tuple(c for c in self.columns.values() if self._codec(c).mutable)
        self.indexed_columns = tuple(c for c in self.columns.values() if c.has_index)
        self._stored_columns = tuple(c for c in self.columns.values() if not c.primary_key)
        # (name, hash field as bytes, codec) per stored field, for the load hot path.
        self.decode_plan = tuple(
            (c.key, c.key.encode(), self._codec(c)) for c in self.stored_columns()
        )
        self.expiry = ExpiryInfo.of(self)
        self.configured = True

    def _foreign_target(self, col: ColumnProperty) -> type[Any]:
        """The class a `ForeignKey` refers to: a class, its name, or "Name.pk" as a
        SQLAlchemy user writes it ("table.column"), where the field must be the model's
        primary key (a foreign key holds the target's key: no other field can be one)."""
        assert col.foreign_key is not None
        target = col.foreign_key.target
        field = None
        if isinstance(target, str) and "." in target:
            target, _, field = target.partition(".")
        cls = self.registry._lookup(target, model=self.name, field=col.key)
        if field is not None:
            pk = mapper_of_configured(cls).pk.key
            if field != pk:
                raise MappingError(
                    f"ForeignKey({col.foreign_key.target!r}) names {field!r}, but a foreign "
                    f"key holds the primary key of {target}: write ForeignKey({target!r}) "
                    f"or ForeignKey('{target}.{pk}')",
                    model=self.name,
                    field=col.key,
                )
        return cls

    # -- primary keys ----------------------------------------------------------------

    @staticmethod
    def _codec(col: ColumnProperty) -> Codec:
        assert col.codec is not None, "mapper not configured"
        return col.codec

    def validate_pk(self, pk: Any) -> None:
        """Refuse a primary key of the wrong type before it reaches a key string."""
        if pk is None:
            raise ValidationError(
                model=self.name,
                field=self.pk.key,
                expected=self._codec(self.pk).expected,
                actual="None",
                detail="a primary key is required",
            )
        self._codec(self.pk).validate(pk, model=self.name, field=self.pk.key)

    def pk_segment(self, pk: Any) -> str:
        """The escaped key segment for a (validated) primary key."""
        return keys.escape(self._codec(self.pk).encode(pk))

    def pk_from_segment(self, segment: str | bytes, key: str | None = None) -> Any:
        """The primary key an escaped segment stands for (index members, relation sets).

        Takes the member as Redis returned it (bytes) or as text, and `key`, the key it
        was read from, when the caller knows it. Anything `escape` cannot have produced
        (non-ASCII bytes included), and anything the key's codec rejects (b"" or "x" for
        an int or UUID key), is a DecodeError naming the model, its primary key field and
        `key` (else where to look): a bare "cannot decode" would leave a corrupt member
        to be hunted for by hand.
        """
        raw = segment if isinstance(segment, bytes) else segment.encode()
        codec = self._codec(self.pk)
        try:
            text = segment.decode("ascii") if isinstance(segment, bytes) else segment
            return codec.decode(keys.unescape(text))
        except DecodeError as exc:
            detail = exc.detail or "rejected"
        except ValueError as exc:  # UnicodeDecodeError included
            detail = str(exc)
        where = "a member of one of its keys" if key is None else "a member of this key"
        raise DecodeError(
            expected=codec.expected,
            raw=raw,
            model=self.name,
            field=self.pk.key,
            key=key,
            detail=f"{detail}; {where}: remove it, `redmap audit` lists such members",
        ) from None

    def object_key(self, pk: Any) -> str:
        return self.keys_for_pk(pk).object(self.pk_segment(pk))

    def check_soft_delete_cascades(self) -> None:
        """A soft-delete model's delete cascade soft-deletes the children, so their model
        must be restorable too (raised at configure, naming what to add)."""
        if self.expiry.soft_delete_ms is None:
            return
        for prop in self.relationships.values():
            if prop.direction is not Direction.ONETOMANY or "delete" not in prop.cascade:
                continue
            target = mapper_of(prop.target)
            if _duration(target, "__soft_delete__") is None:
                raise MappingError(
                    f"{self.name}.{prop.key} cascades deletes to {target.name}, which has no "
                    f"__soft_delete__: a soft-deleted {self.name} soft-deletes its children, "
                    f"so give {target.name} a __soft_delete__ grace period too",
                    model=self.name,
                    field=prop.key,
                )

    def stored_columns(self) -> tuple[ColumnProperty, ...]:
        """Columns written as hash fields: every column but the primary key (a tuple
        kept from configure time: the flush asks for it several times per object)."""
        if self._stored_columns is not None:
            return self._stored_columns
        return tuple(c for c in self.columns.values() if not c.primary_key)


_ROLES: dict[type[Marker], str] = {
    ExpiresAt: "expires",
    CreatedAt: "created",
    UpdatedAt: "updated",
}
_MARKER_NAMES = {role: marker.__name__ for marker, role in _ROLES.items()}


@dataclasses.dataclass(frozen=True)
class ExpiryInfo:
    """The time-related facts of a model, compiled at configure (`redmap.orm.expiry`)."""

    expires: str | None = None  # the ExpiresAt field
    created: str | None = None
    updated: str | None = None
    ttl_ms: int | None = None  # `__ttl__`: default lifetime of new objects
    soft_delete_ms: int | None = None  # `__soft_delete__`: grace period of a delete

    @property
    def tracked(self) -> bool:
        """Whether objects of the model can have a deadline (expiry or soft delete):
        then the flush keeps the deadline zset and the sweep data."""
        return self.expires is not None or self.soft_delete_ms is not None

    @property
    def stamped(self) -> bool:
        return self.created is not None or self.updated is not None

    @classmethod
    def of(cls, mapper: Mapper[Any]) -> ExpiryInfo:
        roles: dict[str, str] = {}
        for col in mapper.columns.values():
            if col.role is None:
                continue
            if col.role in roles:
                raise MappingError(
                    f"two {col.role} fields: {roles[col.role]} and {col.key}; keep one",
                    model=mapper.name,
                    field=col.key,
                )
            roles[col.role] = col.key
        ttl = _duration(mapper, "__ttl__")
        soft = _duration(mapper, "__soft_delete__")
        if ttl is not None and "expires" not in roles:
            raise MappingError(
                "__ttl__ needs a field marked ExpiresAt() to hold each object's deadline",
                model=mapper.name,
            )
        return cls(
            roles.get("expires"), roles.get("created"), roles.get("updated"), ttl, soft
        )


def _duration(mapper: Mapper[Any], name: str) -> int | None:
    """`__ttl__` / `__soft_delete__` as milliseconds, refused unless a positive timedelta."""
    value = getattr(mapper.class_, name, None)
    if value is None:
        return None
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise MappingError(
            f"{name} must be a positive datetime.timedelta, not {value!r}", model=mapper.name
        )
    return int(value / timedelta(milliseconds=1))


def mapper_of_configured(cls: type[M]) -> Mapper[M]:
    """The mapper of a mapped class, without triggering configuration (configure itself)."""
    mapper: Mapper[M] = cls.__dict__["__redmap_mapper__"]
    return mapper


def mapper_of(cls: type[M]) -> Mapper[M]:
    """The mapper of a mapped class; configures its registry on first use."""
    mapper: Mapper[M] | None = cls.__dict__.get("__redmap_mapper__")
    if mapper is None:
        from ..exc import InvalidRequestError

        raise InvalidRequestError(f"{cls.__name__} is not a mapped class (use @registry.mapped)")
    if not mapper.configured:
        mapper.registry.configure()
    return mapper


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _split_markers(tp: Any, *, model: str, field: str) -> tuple[Any, list[Marker]]:
    """Separate redmap markers from the type, looking inside Optional[Annotated[...]] too."""
    markers: list[Marker] = []
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        markers.extend(_markers_of(meta, model=model, field=field))
        return base, markers
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = list(typing.get_args(tp))
        changed = False
        for i, arg in enumerate(args):
            if typing.get_origin(arg) is Annotated:
                inner, *meta = typing.get_args(arg)
                markers.extend(_markers_of(meta, model=model, field=field))
                args[i] = inner
                changed = True
        if changed:
            return Union[tuple(args)], markers  # noqa: UP007 - rebuilding a runtime Union
    return tp, markers


def _markers_of(meta: list[Any], *, model: str, field: str) -> list[Marker]:
    out: list[Marker] = []
    for m in meta:
        if isinstance(m, type) and issubclass(m, Marker):
            raise MappingError(
                f"use {m.__name__}() with parentheses, not the class {m.__name__}",
                model=model,
                field=field,
            )
        if isinstance(m, Marker):
            out.append(m)
    return out
