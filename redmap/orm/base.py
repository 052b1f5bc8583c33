"""Enums and sentinels shared by the ORM modules; imported everywhere, importing nothing."""

from __future__ import annotations

import enum

__all__ = ["NO_VALUE", "NoValue", "ObjectStatus"]


class NoValue(enum.Enum):
    """The sentinel type for an attribute that has no value loaded."""

    # Distinct from None, which is a real stored value ("field absent in the hash").
    NO_VALUE = "NO_VALUE"


NO_VALUE = NoValue.NO_VALUE


class ObjectStatus(enum.Enum):
    """Where an object stands in its life, in SQLAlchemy's words."""

    # Not in any session and never saved.
    TRANSIENT = "transient"
    # Added to a session, not yet flushed.
    PENDING = "pending"
    # In a session's identity map, backed by a hash in Redis.
    PERSISTENT = "persistent"
    # Marked for deletion (flushed or not) and not yet committed.
    DELETED = "deleted"
    # Was persistent, no longer in a session.
    DETACHED = "detached"
