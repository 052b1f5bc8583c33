"""`InstanceState`: the per-object facts the session keeps; owned by attributes and the session.

A state knows its identity (class and primary key), the encoded snapshot of what
Redis held at the version it was loaded at, which attributes changed since, and
where it stands in its life (transient, pending, persistent, deleted, detached).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..exc import DetachedInstanceError
from .base import ObjectStatus

if TYPE_CHECKING:
    from .context import SessionContext
    from .mapper import Mapper

__all__ = ["InstanceState"]

Identity = tuple[type[Any], Any]


class InstanceState:
    """What the ORM knows about one mapped object."""

    __slots__ = (
        "blind",
        "deleted",
        "_in_doubt",
        "identity",
        "incarnation",
        "key",
        "load_options",
        "loaded",
        "mapper",
        "modified",
        "obj",
        "reload",
        "session",
        "soft_deleted",
        "version",
        "__weakref__",
    )

    def __init__(self, obj: Any, mapper: Mapper[Any]):
        self.obj = obj
        self.mapper = mapper
        # The context of the session holding the object (`redmap.orm.context`), not the
        # Session itself: the layers below the session know only its context.
        self.session: SessionContext | None = None
        # (class, primary key) once the object is persistent.
        self.identity: Identity | None = None
        # The object's Redis key, set together with identity.
        self.key: str | None = None
        # Encoded stored fields as Redis held them at `version` (None = field absent).
        self.loaded: dict[str, bytes | None] = {}
        # Attributes assigned since the snapshot; compared with it at flush.
        self.modified: set[str] = set()
        # Of those, the ones assigned while not loaded (expired): what Redis holds for
        # them is unknown to the session, so they are written even when the value equals
        # the old snapshot (the flush's version check then says whether Redis still
        # held it). Compared with the snapshot, such an assignment was lost when another
        # writer had changed the field meanwhile.
        self.blind: set[str] = set()
        self.version: int | None = None
        # The hash's `#i` at `version` (None: the hash had none, data written before
        # incarnations existed). Checked with the version; never an attribute.
        self.incarnation: bytes | None = None
        # Set by a rollback after a flush refused this object as stale, or left its
        # outcome unknown: the session no longer trusts the version it loaded (the user
        # was told it is stale, and redoes the change). The next load replaces the
        # snapshot, and the next flush loads the object first if nothing did, so that a
        # retry applies to what Redis holds (`loading.reload_states`) instead of being
        # refused for the same stale version again and again.
        self.reload = False
        # The hash carried `#d` at `version`: a soft-deleted object, read with
        # `get(..., include_deleted=True)` (no other read returns one). It is there to be
        # read or restored: a flush that would change it and `Session.delete` refuse it,
        # since a write would put it back in the indexes while it stays hidden.
        self.soft_deleted = False
        # Marked for deletion by Session.delete(), until the flush or a rollback.
        self.deleted = False
        # The last flush's outcome is unknown for this object (lost EXEC reply).
        self._in_doubt = False
        # Loader options of the statement that returned this object, by relationship
        # name (`strategy_options.LoadNode`), for its unloaded relationships: a later
        # lazy load follows them (raiseload, sub-options). None: the mapped `lazy=`.
        self.load_options: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<InstanceState {self.mapper.name} {self.status.value} key={self.key!r}>"

    @property
    def in_doubt(self) -> bool:
        """The last flush's outcome is unknown for this object (a lost EXEC reply not
        settled): the session refuses to flush until a rollback reloads it."""
        return self._in_doubt

    @in_doubt.setter
    def in_doubt(self, value: bool) -> None:
        # The session finds its doubtful objects in `doubt`, not by visiting every
        # object it holds at each flush (the cost of a flush follows its work).
        self._in_doubt = value
        if value and self.session is not None:
            self.session.doubt.add(self)

    @property
    def status(self) -> ObjectStatus:
        if self.session is None:
            return ObjectStatus.TRANSIENT if self.identity is None else ObjectStatus.DETACHED
        if self.identity is None:
            return ObjectStatus.PENDING
        return ObjectStatus.DELETED if self.deleted else ObjectStatus.PERSISTENT

    @property
    def pk(self) -> Any:
        return None if self.identity is None else self.identity[1]

    def modified_attribute(self, key: str) -> None:
        """Record an assignment to a persistent object's attribute."""
        self.modified.add(key)
        if self.session is not None:
            self.session.identity_map.modified.add(self)

    def unloaded(self) -> list[str]:
        """Stored attributes with no value in the instance (expired or never loaded)."""
        d = self.obj.__dict__
        return [c.key for c in self.mapper.stored_columns() if c.key not in d]

    def load_unloaded(self, key: str) -> None:
        """Load expired attributes on first access, through the owning session (the
        loader its Session installed in the context: blocking, or refused under an
        AsyncSession)."""
        if self.session is None:
            raise DetachedInstanceError(
                f"{self.mapper.name} object with key {self.key!r} is detached; attribute "
                f"{key!r} is not loaded and there is no session to load it from"
            )
        self.session.load_unloaded(self, key)

    def load_relationship(self, prop: Any) -> None:
        """Load a relationship attribute on first access, as its `lazy` option says."""
        if self.session is None:
            raise DetachedInstanceError(
                f"{self.mapper.name} object with key {self.key!r} is detached; relationship "
                f"{prop.key!r} is not loaded and there is no session to load it from"
            )
        self.session.load_relationship(self, prop)

    def expire(self, attribute_names: list[str] | None = None) -> None:
        """Drop attribute values so they reload on next access; pending changes to them go."""
        d = self.obj.__dict__
        names = (
            [c.key for c in self.mapper.stored_columns()]
            if attribute_names is None
            else attribute_names
        )
        for name in names:
            d.pop(name, None)
            self.modified.discard(name)
            self.blind.discard(name)
        if attribute_names is None:
            for rel in self.mapper.relationships:
                d.pop(rel, None)
