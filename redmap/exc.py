"""Every error redmap raises; owns the exception tree, raised from all modules.

```
RedmapError
├── MappingError              a class declaration redmap cannot map
├── ValidationError           a value of the wrong type, caught before anything is sent
├── DecodeError               a stored value that cannot be decoded (corrupt or foreign data)
├── StaleDataError            an object changed by someone else since it was loaded
├── IntegrityError            a unique value or primary key already taken
├── NoResultFound             .one() found nothing
├── MultipleResultsFound      .one() / .one_or_none() found more than one
├── InvalidRequestError       the session was used in a way it does not allow
│   ├── DetachedInstanceError an unloaded attribute of an object with no session
│   ├── ObjectDeletedError    an expired object that Redis no longer holds
│   ├── NoInspectionAvailable `redmap.inspect()` of something that is not mapped
│   └── CrossSlotError        a cluster flush whose keys fall in several hash slots
├── QueryError                a query redmap cannot answer without scanning
├── MigrationError            a migration that cannot run or failed
├── FlushError                a flush that Redis refused part-way (a runtime error inside EXEC)
│   └── PartialCommitError    a cross-slot flush of which some parts were applied, not all
└── RedmapConnectionError     the server could not be reached or the connection broke
    └── OutcomeUnknownError   a flush whose EXEC may or may not have been applied
```

Each error carries the facts that produced it as attributes (`model`, `field`,
`expected`, `actual`, `key`, ...) so programs can react without parsing messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "CrossSlotError",
    "DecodeError",
    "DetachedInstanceError",
    "FlushError",
    "IntegrityError",
    "InvalidRequestError",
    "MappingError",
    "MigrationError",
    "MultipleResultsFound",
    "NoInspectionAvailable",
    "NoResultFound",
    "ObjectDeletedError",
    "OutcomeUnknownError",
    "PartialCommitError",
    "QueryError",
    "RedmapConnectionError",
    "RedmapError",
    "StaleDataError",
    "ValidationError",
]


class RedmapError(Exception):
    """The root of every error redmap raises on purpose."""


class MappingError(RedmapError):
    """Raised at decoration or configure time for a declaration redmap cannot map.

    Raised when: the class is not a dataclass, declares two primary keys, uses an
    unsupported field type, misuses a marker, names an unknown related model, or
    its keyspace contains characters a key cannot hold.
    """

    def __init__(self, message: str, *, model: str | None = None, field: str | None = None):
        self.model = model
        self.field = field
        where = _where(model, field)
        super().__init__(f"{message} — at {where}" if where else message)


class ValidationError(RedmapError):
    """Raised before anything is sent when a value does not fit its field.

    Raised when: a field holds a value of the wrong type (at flush, or at `add`),
    a primary key is of the wrong type, or a value cannot be encoded (a string with
    lone surrogates, an integer too large for a sorted index).
    """

    def __init__(
        self,
        *,
        model: str | None,
        field: str | None,
        expected: str,
        actual: str,
        detail: str | None = None,
    ):
        self.model = model
        self.field = field
        self.expected = expected
        self.actual = actual
        self.detail = detail
        msg = f"expected {expected}, got {actual}"
        if detail:
            msg += f" ({detail})"
        where = _where(model, field)
        super().__init__(f"{msg} — at {where}" if where else msg)


class DecodeError(RedmapError):
    """Raised on load when a stored value cannot be decoded into its field's type.

    Raised when: a hash field holds bytes the field's codec rejects (corrupt data,
    data written by another program, or a layout change without a migration), or a
    required field is missing from the stored object.
    """

    def __init__(
        self,
        *,
        expected: str,
        raw: bytes | None,
        model: str | None = None,
        field: str | None = None,
        key: str | None = None,
        detail: str | None = None,
    ):
        self.model = model
        self.field = field
        self.expected = expected
        self.raw = raw
        self.key = key
        self.detail = detail
        if raw is None and detail:
            msg = f"cannot decode stored value as {expected}: {detail}"
        else:
            shown = "nothing (field missing)" if raw is None else _preview(raw)
            msg = f"cannot decode stored value as {expected}: got {shown}"
            if detail:
                msg += f" ({detail})"
        where = _where(model, field)
        if where:
            msg += f" — at {where}"
        if key is not None:
            msg += f" in key {key!r}"
        if key is not None and field is not None:
            # Read from Redis: most often the model changed and the data did not.
            msg += (
                ". If the model changed since this object was written, migrate the data: "
                "redmap migrate revision --autogenerate -m '...', then redmap migrate upgrade"
            )
        super().__init__(msg)

    def with_location(self, *, model: str, field: str, key: str) -> DecodeError:
        """A copy of this error that also names where the value was read from."""
        return DecodeError(
            expected=self.expected,
            raw=self.raw,
            model=model,
            field=field,
            key=key,
            detail=self.detail,
        )


class StaleDataError(RedmapError):
    """Raised by a flush when an object was changed by someone else since it was loaded.

    Nothing of the flush was written. `objects` lists the stale instances, `keys`
    their Redis keys. `run_in_transaction` retries on this error.
    """

    def __init__(self, message: str, *, objects: Sequence[Any] = (), keys: Sequence[str] = ()):
        self.objects = list(objects)
        self.keys = list(keys)
        super().__init__(message)


class IntegrityError(RedmapError):
    """Raised by a flush when a unique value or a primary key is already taken.

    Nothing of the flush was written. `model`, `field` and `value` say which
    constraint; `key` is the Redis key holding the conflicting entry.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        field: str | None = None,
        value: Any = None,
        key: str | None = None,
    ):
        self.model = model
        self.field = field
        self.value = value
        self.key = key
        super().__init__(message)


class NoResultFound(RedmapError):
    """Raised by `.one()` when the query returned no object."""


class MultipleResultsFound(RedmapError):
    """Raised by `.one()` or `.one_or_none()` when the query returned several objects."""


class InvalidRequestError(RedmapError):
    """Raised when the session is asked to do something its state does not allow.

    Raised when: an object already belongs to another session, an object that is not
    in the session is refreshed or expunged, a mapped class is used before its
    registry is configured, a session is used after an unknown flush outcome
    without a rollback, a relationship that is `lazy="raise"` (or `raiseload()` by the
    statement that returned its object) is accessed unloaded, or a loader option's
    path does not follow the mapping.
    """


class DetachedInstanceError(InvalidRequestError):
    """Raised when an unloaded attribute is read on an object with no session.

    Loaded attributes stay readable after `close()` or `expunge()`; expired ones and
    unloaded relationships need a session to load from.
    """


class NoInspectionAvailable(InvalidRequestError):
    """Raised by `redmap.inspect(subject)` when `subject` is neither a mapped class nor
    an instance of one (SQLAlchemy's name). `subject` holds what was passed."""

    def __init__(self, subject: Any):
        self.subject = subject
        what = subject.__name__ if isinstance(subject, type) else type(subject).__name__
        kind = "class" if isinstance(subject, type) else "object of type"
        super().__init__(
            f"no inspection is available for {kind} {what}: redmap.inspect() takes a "
            f"mapped class or an instance of one"
        )


class CrossSlotError(InvalidRequestError):
    """Raised before any I/O when a flush on Redis Cluster would span several hash slots.

    One WATCH/MULTI/EXEC can only touch keys of one slot. `slots` lists the slots
    involved. Open the session with `allow_cross_slot=True` to commit slot by slot
    instead (each part atomic, the whole not).
    """

    def __init__(self, message: str, *, slots: Sequence[int] = ()):
        self.slots = list(slots)
        super().__init__(message)


class ObjectDeletedError(InvalidRequestError):
    """Raised when an expired object is accessed or refreshed and Redis no longer holds it."""


class QueryError(RedmapError):
    """Raised when a query cannot be answered from an index.

    redmap never scans the keyspace, so a condition or ordering on a field without
    the index it needs is refused; the message names the field and the marker.
    """

    def __init__(self, message: str, *, model: str | None = None, field: str | None = None):
        self.model = model
        self.field = field
        super().__init__(message)


class MigrationError(RedmapError):
    """Raised by `redmap migrate` when a migration cannot start or fails."""


class FlushError(RedmapError):
    """Raised when Redis rejected a command inside EXEC.

    redmap checks key types and values before MULTI so this should not happen; if
    another program changes a key's type in between, the commands that ran were
    applied (Redis has no rollback). `key` names the offending key; the objects of
    the flush are expired so they reload from what Redis holds.
    """

    def __init__(self, message: str, *, key: str | None = None, errors: Sequence[str] = ()):
        self.key = key
        self.errors = list(errors)
        super().__init__(message)


class PartialCommitError(FlushError):
    """Raised when a flush committed part by part (`allow_cross_slot=True` on Redis
    Cluster, one transaction per hash tag) was applied in part.

    The parts before the failing one were applied; the failing part and the ones after
    it were not (or, for `unknown`, may or may not have been). `written` lists the
    objects whose changes were applied: they are persistent and clean in the session.
    `not_written` lists those whose changes were not: they keep their pending changes,
    so a later flush writes just them. `unknown` lists the objects of a part whose
    outcome is unknown (its EXEC reply was lost); roll back before going on. `cause`
    (also `__cause__`) is the error that stopped the flush. `run_in_transaction` never
    retries this error: running the same work again would apply the written part twice.
    """

    def __init__(
        self,
        message: str,
        *,
        written: Sequence[Any] = (),
        not_written: Sequence[Any] = (),
        unknown: Sequence[Any] = (),
        cause: BaseException | None = None,
    ):
        self.written = list(written)
        self.not_written = list(not_written)
        self.unknown = list(unknown)
        self.cause = cause
        super().__init__(message)


class RedmapConnectionError(RedmapError):
    """Raised when the Redis server cannot be reached or a connection breaks.

    The message names the URL with any password removed.
    """

    def __init__(self, message: str, *, url: str | None = None):
        self.url = url
        super().__init__(f"{message} (url: {url})" if url else message)


class OutcomeUnknownError(RedmapConnectionError):
    """Raised when a flush's EXEC was sent but whether it applied could not be settled.

    redmap first tries to settle the outcome by reading back the flush's token; this
    error means the server could not be reached for that. The objects of the flush are
    listed in `objects` and marked as in doubt: the session must be rolled back, after
    which they reload from whatever Redis holds.
    """

    def __init__(self, message: str, *, url: str | None = None, objects: Sequence[Any] = ()):
        self.objects = list(objects)
        super().__init__(message, url=url)


def _where(model: str | None, field: str | None) -> str:
    if model and field:
        return f"{model}.{field}"
    return model or field or ""


def _preview(raw: bytes, limit: int = 40) -> str:
    shown = raw[:limit]
    suffix = "..." if len(raw) > limit else ""
    return f"{shown!r}{suffix}"
