"""Turns Redis replies into mapped objects through the session's identity map.

Called by `Session.get/get_many/refresh`, attribute loading, relationship loading
(`strategies`), the flush's relationship work (`dependency`) and queries, with the
session's `SessionContext`. An object already in the session keeps its identity and
its pending changes: only its unloaded (expired) attributes are filled in, unless a
refresh is asked for. The reads are core steps (`redmap.commands`): one round trip
each, driven by whichever engine runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..commands import FetchHashes, Read, Steps
from ..exc import DecodeError, ObjectDeletedError, RedmapError
from . import expiry
from .attributes import STATE_ATTR
from .mapper import INCARNATION_FIELD, VERSION_FIELD, Mapper
from .state import InstanceState

if TYPE_CHECKING:
    from .context import SessionContext

__all__ = [
    "decode_hash",
    "ensure_loaded",
    "load_instance",
    "load_many",
    "load_unloaded_steps",
    "unloaded_pks",
]

_VERSION = VERSION_FIELD.encode()
_INCARNATION = INCARNATION_FIELD.encode()


# An object hash as read: (field values, their stored form, version `#v`, incarnation
# `#i`); the session keeps the last two apart from the fields. A plain tuple: one is
# built per object loaded.
Decoded = tuple[dict[str, Any], dict[str, bytes | None], int | None, bytes | None]


def decode_hash(mapper: Mapper[Any], key: str, data: Any) -> Decoded | None:
    """Decode an HGETALL reply: (values, encoded snapshot, version, incarnation), or None
    if the hash is absent."""
    if isinstance(data, Exception):
        if "WRONGTYPE" in str(data):
            raise DecodeError(
                expected="a hash",
                raw=None,
                model=mapper.name,
                key=key,
                detail="the key holds another Redis type",
            )
        raise RedmapError(f"Redis refused to read {key!r}: {data}")
    if not data:
        return None
    values: dict[str, Any] = {}
    loaded: dict[str, bytes | None] = {}
    get = data.get
    for name, name_bytes, codec in mapper.decode_plan:
        raw = get(name_bytes)
        loaded[name] = raw
        if raw is None:
            if not codec.nullable:
                raise DecodeError(
                    expected=codec.expected, raw=None, model=mapper.name, field=name, key=key
                )
            values[name] = None
            continue
        try:
            values[name] = codec.decode(raw)
        except DecodeError as exc:
            raise exc.with_location(model=mapper.name, field=name, key=key) from None
    raw_version = data.get(_VERSION)
    version: int | None = None
    if raw_version is not None:
        # Decimal digits only: int() would also take " 1", "+1" and "1_0", which the
        # flush's version check (a number compare of digits) would then never match.
        # Leading zeros ("01") are accepted: the check compares numbers, and the next
        # write stores the canonical text.
        if not (isinstance(raw_version, bytes) and raw_version.isdigit()):
            raise DecodeError(
                expected="a version of decimal digits",
                raw=raw_version,
                model=mapper.name,
                field=VERSION_FIELD,
                key=key,
            )
        version = int(raw_version)
    return values, loaded, version, data.get(_INCARNATION)


def load_instance(
    session: SessionContext,
    mapper: Mapper[Any],
    pk: Any,
    key: str,
    data: Any,
    *,
    refresh: bool = False,
    include_deleted: bool = False,
    now: int | None = None,
) -> Any:
    """The session's object for `pk` populated from `data`, or None when the hash is absent
    (or stands for no object: expired, or soft-deleted unless `include_deleted`)."""
    if (
        mapper.expiry.tracked
        and data
        and isinstance(data, dict)
        and expiry.hidden(
            mapper, data, expiry.now_ms() if now is None else now, deleted=include_deleted
        )
    ):
        return None
    decoded = decode_hash(mapper, key, data)
    if decoded is None:
        return None
    values, loaded, version, incarnation = decoded
    st = session.identity_map.get((mapper.class_, pk))
    if st is not None:
        d = st.obj.__dict__
        if refresh:
            d.update(values)
            st.modified.clear()
            st.blind.clear()
            session.identity_map.modified.discard(st)
        else:
            unloaded = st.unloaded()
            if not unloaded and not st.reload:
                return st.obj
            for name in unloaded:
                d[name] = values[name]
            # A state marked to reload (a rollback after a refusal) loaded nothing since:
            # what it holds are assignments made after the rollback, none read at the
            # old version, so the snapshot is replaced whole.
            if (
                not st.reload
                and (version, incarnation) != (st.version, st.incarnation)
                and len(unloaded) < len(loaded)
            ):
                # Some attributes were loaded at the earlier version (pending changes, or
                # values this session flushed while the rest was expired): keep that
                # version (and incarnation: the hash may be another object inserted under
                # the same key) so the object never passes for current while it shows
                # older values, and a flush still detects the concurrent change.
                for name in unloaded:
                    st.loaded[name] = loaded[name]
                return st.obj
        st.loaded = loaded
        st.version = version
        st.incarnation = incarnation
        st.soft_deleted = include_deleted and expiry.SOFT_FIELD_BYTES in data
        st.in_doubt = False
        st.reload = False
        return st.obj
    cls: Any = mapper.class_
    obj = cls.__new__(cls)
    d = obj.__dict__
    d.update(values)
    d[mapper.pk.key] = pk
    st = InstanceState(obj, mapper)
    d[STATE_ATTR] = st
    st.loaded = loaded
    st.version = version
    st.incarnation = incarnation
    st.soft_deleted = include_deleted and expiry.SOFT_FIELD_BYTES in data
    session.make_persistent(st, pk, key)
    return obj


def _put_back(st: InstanceState, old: tuple[Any, ...], unloaded: list[str]) -> None:
    """Undo a reload of `st`: its snapshot, version, incarnation and mark as `old`, and
    the attributes the load filled (`unloaded` before it) unloaded again."""
    st.loaded, st.version, st.incarnation, st.reload = old
    d = st.obj.__dict__
    for name in unloaded:
        d.pop(name, None)


class Reloaded:
    """What `reload_states` replaced, to put back when the flush it prepared fails (a
    failed flush leaves the session as it was: the marks too, so a retry after the next
    rollback loads again)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        # (state, what it had, the names the load filled, the snapshot and version it
        # loaded: a flush that wrote the state since replaced or changed them)
        self.entries: list[tuple[InstanceState, tuple[Any, ...], list[str], Any, Any]] = []

    def undo(self) -> None:
        """Put back each state the flush did not write since (its snapshot still the one
        loaded here)."""
        for st, old, unloaded, loaded, version in self.entries:
            if st.loaded is not loaded or st.version != version:
                continue  # (written by the flush since: what it recorded stands)
            _put_back(st, old, unloaded)
            if st.reload and st.session is not None:
                st.session.reload.add(st)


def reload_states(session: SessionContext, states: Sequence[InstanceState]) -> Steps[Reloaded]:
    """Load `states` (marked to reload: `InstanceState.reload`) as Redis holds them now,
    in one round trip, keeping every value assigned since: their snapshot, version and
    incarnation become what Redis holds, so the flush that follows checks and writes
    against that. A state Redis no longer holds as an object (deleted, expired,
    soft-deleted) keeps its old snapshot and mark: the flush refuses it as stale.
    Returns what to put back if that flush fails (`Reloaded.undo`)."""
    keyed = [(st, st.key) for st in states if st.key is not None]
    replies = yield FetchHashes([key for _, key in keyed])
    now = expiry.now_ms()
    done = Reloaded()
    for (st, key), data in zip(keyed, replies, strict=True):
        if isinstance(data, Exception):
            continue  # (the flush's own checks report what is wrong with the key)
        old = (st.loaded, st.version, st.incarnation, st.reload)
        unloaded = st.unloaded()
        try:
            load_instance(session, st.mapper, st.pk, key, data, now=now)
        except DecodeError:
            # A stored value this model cannot read: the object keeps what the session
            # had (a write may be what repairs the value; the flush checks as before).
            _put_back(st, old, unloaded)
            continue
        if st.loaded is not old[0]:
            done.entries.append((st, old, unloaded, st.loaded, st.version))
    return done


def unloaded_pks(session: SessionContext, mapper: Mapper[Any], pks: Iterable[Any]) -> list[Any]:
    """The keys among `pks` with no fully loaded object in the session, once each."""
    out: dict[Any, None] = {}
    for pk in pks:
        st = session.identity_map.get((mapper.class_, pk))
        if st is None or st.unloaded():
            out[pk] = None
    return list(out)


def ensure_loaded(session: SessionContext, mapper: Mapper[Any], pks: Iterable[Any]) -> Steps[None]:
    """Load, in one round trip, the objects among `pks` the session lacks (0 if none)."""
    missing = unloaded_pks(session, mapper, pks)
    if missing:
        yield from load_many(session, mapper, missing)


def load_many(session: SessionContext, mapper: Mapper[Any], pks: Iterable[Any]) -> Steps[list[Any]]:
    """Load objects by primary key in one round trip; absent ones give None."""
    pks = list(pks)
    keys = [mapper.object_key(pk) for pk in pks]
    replies = yield FetchHashes(keys)
    now = expiry.now_ms() if mapper.expiry.tracked else None  # one moment for the batch
    return [
        load_instance(session, mapper, pk, key, data, now=now)
        for pk, key, data in zip(pks, keys, replies, strict=True)
    ]


def load_unloaded_steps(session: SessionContext, st: InstanceState) -> Steps[None]:
    """Load the expired attributes of a persistent `st` (one HGETALL); ObjectDeletedError
    when Redis no longer holds it."""
    assert st.key is not None
    (data,) = yield Read([("HGETALL", st.key)])
    if load_instance(session, st.mapper, st.pk, st.key, data) is None:
        raise ObjectDeletedError(
            f"{st.mapper.name} with primary key {st.pk!r} no longer exists"
        )
