"""`redmap.inspect`: read-only views of a mapped object's state and of a mapped class.

`inspect(obj)` answers what SQLAlchemy's `InstanceState` does (lifecycle, identity,
session, per-attribute history) from redmap's `redmap.orm.state.InstanceState`;
`inspect(Model)` lists what the mapper compiled (fields, indexes, relationships,
primary key) and the Redis keys they live in, each built by `redmap.orm.keys`. The
views read the live state on every access and never do I/O.
"""

from __future__ import annotations

import builtins
import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, NamedTuple, TypeVar, overload

from .exc import NoInspectionAvailable, ValidationError
from .orm import keys
from .orm.attributes import state_of
from .orm.base import NO_VALUE, ObjectStatus
from .orm.mapper import ColumnProperty, Mapper, mapper_of
from .orm.relationships import Direction, RelationshipProperty
from .orm.state import InstanceState

__all__ = [
    "AttributeStateView",
    "ColumnInfo",
    "History",
    "IndexInfo",
    "InstanceStateView",
    "MapperView",
    "RelationshipInfo",
    "inspect",
]

M = TypeVar("M")

IndexKind = Literal["indexed", "unique", "sorted", "foreign_key", "text", "suffix"]

# Placeholders in key patterns; "<" is never produced by escaping, so a pattern cannot be
# mistaken for a real key.
_ID = "<id>"
_VALUE = "<value>"


# A class is an object too, so the first two signatures overlap; the first one, which
# answers for classes, is the one that applies to them (as at run time).
@overload
def inspect(  # type: ignore[overload-overlap]
    subject: type[M], raiseerr: Literal[True] = True
) -> MapperView[M]: ...
@overload
def inspect(subject: M, raiseerr: Literal[True] = True) -> InstanceStateView[M]: ...
@overload
def inspect(subject: Any, raiseerr: bool) -> MapperView[Any] | InstanceStateView[Any] | None: ...
def inspect(subject: Any, raiseerr: bool = True) -> MapperView[Any] | InstanceStateView[Any] | None:
    """A view of a mapped class (`MapperView`) or of an instance of one
    (`InstanceStateView`), as SQLAlchemy's `inspect()`.

    Anything else raises `redmap.exc.NoInspectionAvailable`, or returns None with
    `raiseerr=False`.
    """
    if isinstance(subject, type):
        if "__redmap_mapper__" in subject.__dict__:
            return MapperView(mapper_of(subject))
    elif "__redmap_mapper__" in type(subject).__dict__:
        return InstanceStateView(subject)
    if not raiseerr:
        return None
    raise NoInspectionAvailable(subject)


# -- instances -------------------------------------------------------------------------------


class History(NamedTuple):
    """What changed in one attribute since it was loaded, as SQLAlchemy's `History`.

    A loaded value not changed since is `unchanged=[value]`; a value assigned since is
    `added=[new]` with `deleted=[old]` (for a persistent object; a new one has no old
    value). Empty parts are `()`, non-empty ones lists, as in SQLAlchemy.
    """

    added: Sequence[Any]
    unchanged: Sequence[Any]
    deleted: Sequence[Any]

    def empty(self) -> bool:
        """No value at all (not loaded, or never set)."""
        return not (self.added or self.unchanged or self.deleted)

    def has_changes(self) -> bool:
        return bool(self.added or self.deleted)

    def sum(self) -> Sequence[Any]:
        return [*self.added, *self.unchanged, *self.deleted]

    def non_deleted(self) -> Sequence[Any]:
        return [*self.added, *self.unchanged]

    def non_added(self) -> Sequence[Any]:
        return [*self.unchanged, *self.deleted]


_EMPTY = History((), (), ())


class AttributeStateView:
    """One attribute of an inspected object (`inspect(obj).attrs[name]`)."""

    __slots__ = ("_view", "key")

    def __init__(self, view: InstanceStateView[Any], key: str) -> None:
        self._view = view
        self.key = key

    def __repr__(self) -> str:
        return f"<AttributeStateView {self.key}>"

    @property
    def value(self) -> Any:
        """The attribute's value, as `getattr(obj, key)` (which may load it)."""
        return getattr(self._view.object, self.key)

    @property
    def loaded_value(self) -> Any:
        """The value held now, or `NO_VALUE` when not loaded; never loads."""
        return self._view.object.__dict__.get(self.key, NO_VALUE)

    @property
    def history(self) -> History:
        """What changed since the object was loaded (see `History`); never loads.

        For a relationship of a persistent object the loaded members are reported as
        `unchanged`: redmap records relationship changes per link, not per attribute
        (a many-to-one change shows in its foreign key's history).
        """
        view = self._view
        d = view.object.__dict__
        if self.key not in d:
            return _EMPTY
        current = d[self.key]
        st = view.state
        mapper = view.mapper_
        new = st is None or st.identity is None
        col = mapper.columns.get(self.key)
        if col is None:  # a relationship
            members = list(current) if isinstance(current, list) else [current]
            members = [m for m in members if m is not None]
            if not members:
                return _EMPTY
            return History(members, (), ()) if new else History((), members, ())
        if new:
            return History([current], (), ())
        assert st is not None
        if col.primary_key or self.key not in st.loaded:
            return History((), [current], ())
        codec = col.codec
        assert codec is not None
        loaded = st.loaded[self.key]
        try:
            same = codec.encode_valid(current, model=mapper.name, field=self.key) == loaded
        except ValidationError:
            same = False  # a value the next flush will refuse: a change all the same
        if same:
            return History((), [current], ())
        return History([current], (), [None if loaded is None else codec.decode(loaded)])


class InstanceStateView(Generic[M]):
    """The state of one mapped object, as SQLAlchemy's `InstanceState` presents it.

    Lifecycle (exactly one is true): `transient` (never in a session), `pending`
    (added, not yet flushed), `persistent` (in a session, stored in Redis), `deleted`
    (marked for deletion by `Session.delete`, not yet flushed: a redmap flush commits,
    so there is no "flushed but not committed" stage), `detached` (stored, in no
    session). Live: every property reads the object's current state.
    """

    __slots__ = ("object",)

    def __init__(self, obj: M) -> None:
        self.object = obj

    def __repr__(self) -> str:
        return f"<InstanceStateView {type(self.object).__name__} {self.status.value}>"

    @property
    def state(self) -> InstanceState | None:
        """redmap's own state of the object (None while it never met a session)."""
        return state_of(self.object)

    @property
    def mapper_(self) -> Mapper[M]:
        return mapper_of(type(self.object))

    @property
    def mapper(self) -> MapperView[M]:
        return MapperView(self.mapper_)

    @property
    def status(self) -> ObjectStatus:
        st = self.state
        return ObjectStatus.TRANSIENT if st is None else st.status

    @property
    def transient(self) -> bool:
        return self.status is ObjectStatus.TRANSIENT

    @property
    def pending(self) -> bool:
        return self.status is ObjectStatus.PENDING

    @property
    def persistent(self) -> bool:
        return self.status is ObjectStatus.PERSISTENT

    @property
    def deleted(self) -> bool:
        return self.status is ObjectStatus.DELETED

    @property
    def detached(self) -> bool:
        return self.status is ObjectStatus.DETACHED

    @property
    def has_identity(self) -> bool:
        st = self.state
        return st is not None and st.identity is not None

    @property
    def identity(self) -> tuple[Any, ...] | None:
        """The primary key as a tuple, `(pk,)`, once stored; None before."""
        st = self.state
        return None if st is None or st.identity is None else (st.pk,)

    @property
    def identity_key(self) -> tuple[builtins.type[Any], tuple[Any, ...], None] | None:
        """`(class, (pk,), None)`, SQLAlchemy's identity key (the last part is its
        identity token, unused here)."""
        identity = self.identity
        return None if identity is None else (type(self.object), identity, None)

    @property
    def key(self) -> tuple[type[Any], tuple[Any, ...], None] | None:
        """The identity key, as SQLAlchemy's `InstanceState.key` (the Redis key is
        `redis_key`)."""
        return self.identity_key

    @property
    def redis_key(self) -> str | None:
        """The key of the object's hash in Redis, once stored."""
        st = self.state
        return None if st is None else st.key

    @property
    def version(self) -> int | None:
        """The version (`#v`) the session last saw; None before the object is stored."""
        st = self.state
        return None if st is None else st.version

    @property
    def in_doubt(self) -> bool:
        """The last flush's outcome is unknown for this object (a lost reply)."""
        st = self.state
        return st is not None and st.in_doubt

    @property
    def session(self) -> Any:
        """The `Session` holding the object (an AsyncSession's `sync_session`), or None."""
        st = self.state
        return None if st is None or st.session is None else st.session.owner

    @property
    def modified(self) -> bool:
        """Whether the object has changes a flush would write: always for a new one;
        for a stored one, an attribute assigned since it was loaded, or a JSON field
        changed in place."""
        st = self.state
        if st is None or st.identity is None:
            return True
        if st.modified:
            return True
        return any(
            self.attrs[c.key].history.has_changes()
            for c in st.mapper.mutable_columns
            if c.key in self.object.__dict__
        )

    @property
    def unloaded(self) -> frozenset[str]:
        """Fields and relationships holding no value (expired, or not loaded yet)."""
        d = self.object.__dict__
        mapper = self.mapper_
        names = [*mapper.columns, *mapper.relationships]
        return frozenset(n for n in names if n not in d)

    @property
    def attrs(self) -> Mapping[str, AttributeStateView]:
        """Every field and relationship by name (fields first, in declaration order)."""
        mapper = self.mapper_
        return types.MappingProxyType(
            {n: AttributeStateView(self, n) for n in [*mapper.columns, *mapper.relationships]}
        )


# -- mapped classes -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexInfo:
    """One index redmap keeps for a field: its kind and the keys it is stored in."""

    field: str
    kind: IndexKind
    keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ColumnInfo:
    """One stored field (or the primary key) of a mapped class."""

    key: str
    type: str  # the type the field's codec expects ("int", "Optional[str]", ...)
    primary_key: bool
    nullable: bool
    generated: bool  # an int primary key handed out by the model's counter
    foreign_key: builtins.type[Any] | None
    indexes: tuple[IndexInfo, ...]


@dataclasses.dataclass(frozen=True)
class RelationshipInfo:
    """One relationship of a mapped class, as resolved at configure time."""

    key: str
    target: type[Any]
    direction: Direction
    uselist: bool
    lazy: str
    cascade: frozenset[str]
    back_populates: str | None
    secondary: str | None
    foreign_key: str | None  # the ForeignKey field (on this class or on the target)
    order_by: str | None  # the Sorted field ordering a one-to-many list
    keys: tuple[str, ...]  # where the links live in Redis


class MapperView(Generic[M]):
    """What redmap knows of a mapped class: `inspect(Model)`."""

    __slots__ = ("_mapper",)

    def __init__(self, mapper: Mapper[M]) -> None:
        self._mapper = mapper

    def __repr__(self) -> str:
        return f"<MapperView {self._mapper.name} keyspace={self._mapper.keyspace!r}>"

    @property
    def class_(self) -> type[M]:
        return self._mapper.class_

    @property
    def keyspace(self) -> str:
        return self._mapper.keyspace

    @property
    def prefix(self) -> str:
        """The registry prefix: the hash tag every key of the model carries."""
        return self._mapper.registry.prefix

    @property
    def shard_key(self) -> str | None:
        """The field choosing an object's shard (`__shard_key__`), or None."""
        return self._mapper.shard_key

    @property
    def columns(self) -> Mapping[str, ColumnInfo]:
        """Every field, the primary key included, in declaration order."""
        return types.MappingProxyType(
            {c.key: self._column(c) for c in self._mapper.columns.values()}
        )

    @property
    def primary_key(self) -> tuple[ColumnInfo, ...]:
        """The primary key field, as a one-element tuple like SQLAlchemy's."""
        return (self._column(self._mapper.pk),)

    @property
    def indexes(self) -> tuple[IndexInfo, ...]:
        """Every index of every field, in field order."""
        return tuple(ix for c in self._mapper.columns.values() for ix in self._indexes(c))

    @property
    def relationships(self) -> Mapping[str, RelationshipInfo]:
        return types.MappingProxyType(
            {p.key: self._relationship(p) for p in self._mapper.relationships.values()}
        )

    @property
    def validators(self) -> Mapping[str, Callable[[Any, str, Any], Any]]:
        """The `@validates` methods by the attribute they validate."""
        return types.MappingProxyType(dict(self._mapper.validators))

    @property
    def key_layout(self) -> Mapping[str, str]:
        """The patterns of the model's own keys (docs/key-layout.md): `object` (the
        hash of one object), `all` (every id), `seq` (the id counter, for generated
        ids); the index and link keys are in `indexes` and `relationships`."""
        ks = self._space()
        out = {"object": self._pattern(ks.object(_ID)), "all": self._pattern(ks.all())}
        if self._mapper.pk.generated:
            out["seq"] = self._pattern(ks.seq())
        return types.MappingProxyType(out)

    # -- building the infos -----------------------------------------------------------

    def _space(self) -> keys.KeySpace:
        m = self._mapper
        return m.shard_keys[0] if m.shard_keys else m.keys

    def _pattern(self, key: str) -> str:
        """A key of the model's keyspace, with a sharded model's tag as `{P|<shard>}`."""
        if not self._mapper.shard_keys:
            return key
        tag = self._mapper.shard_keys[0].tag
        return "{" + self._mapper.registry.prefix + "|<shard>}" + key[len(tag) :]

    def _indexes(self, col: ColumnProperty) -> list[IndexInfo]:
        ks = self._space()
        out: list[IndexInfo] = []
        if col.unique:
            out.append(
                IndexInfo(
                    col.key,
                    "unique",
                    (
                        self._pattern(ks.unique(col.key, _VALUE)),
                        self._pattern(ks.index(col.key, _VALUE)),
                    ),
                )
            )
        elif col.indexed:
            out.append(IndexInfo(col.key, "indexed", (self._pattern(ks.index(col.key, _VALUE)),)))
        if col.sorted:
            out.append(IndexInfo(col.key, "sorted", (self._pattern(ks.sorted(col.key)),)))
        if col.lexical:  # an ordered str/Enum field (`orm.textindex`)
            out.append(IndexInfo(col.key, "sorted", (self._pattern(ks.lexical(col.key)),)))
        if col.text:
            word = self._pattern(ks.word(col.key, "<word>"))
            out.append(IndexInfo(col.key, "text", (word,)))
        if col.suffix:
            out.append(IndexInfo(col.key, "suffix", (self._pattern(ks.suffix(col.key)),)))
        if col.foreign_key is not None:
            parent = "<" + mapper_of(col.foreign_key.target).pk.key + ">"
            out.append(
                IndexInfo(col.key, "foreign_key", (self._pattern(ks.foreign(col.key, parent)),))
            )
        return out

    def _column(self, col: ColumnProperty) -> ColumnInfo:
        codec = col.codec
        assert codec is not None
        fk = col.foreign_key
        return ColumnInfo(
            key=col.key,
            type=codec.expected,
            primary_key=col.primary_key,
            nullable=codec.nullable,
            generated=col.generated,
            foreign_key=None if fk is None else fk.target,
            indexes=tuple(self._indexes(col)),
        )

    def _relationship(self, prop: RelationshipProperty) -> RelationshipInfo:
        where: tuple[str, ...]
        if prop.direction is Direction.MANYTOMANY:
            where = (self._pattern(self._space().relation(prop.link_name, _ID)),)
        elif prop.direction is Direction.ONETOMANY:
            target = mapper_of(prop.target)
            child = MapperView(target)
            where = (child._pattern(child._space().foreign(prop.fk_column, _ID)),)
        else:
            where = ()  # the foreign key field of the object's own hash
        return RelationshipInfo(
            key=prop.key,
            target=prop.target,
            direction=prop.direction,
            uselist=prop.uselist,
            lazy=prop.lazy,
            cascade=prop.cascade,
            back_populates=prop.back_populates,
            secondary=prop.secondary,
            foreign_key=prop.fk_column or None,
            order_by=prop.order_column,
            keys=where,
        )
