"""Relationship loading: lazy "select" on first access, batched "selectin", and "raise".

Which of them applies is the relationship's `lazy=` unless the statement that
returned the object overrode it (`strategy_options`: selectinload, lazyload, raiseload).

Called (with the session's `SessionContext`) by the lazy loader the Session
installs in its context, by `Session.refresh`, by the flush's relationship work and
after every batch load (get_many, queries). Costs, never a scan:
- many-to-one: the target by primary key (0 round trips when already in the session).
- one-to-many / many-to-many: one ZRANGE of the parent's link zset, then one
  pipelined HGETALL for the targets not yet in the session: 2 round trips.
- selectin for N parents: the same two round trips for all N parents together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..commands import Read, Steps
from ..exc import InvalidRequestError
from . import expiry
from .collections import InstrumentedList
from .loading import ensure_loaded, load_unloaded_steps
from .mapper import mapper_of
from .relationships import Direction

if TYPE_CHECKING:
    from .context import SessionContext
    from .relationships import RelationshipProperty
    from .state import InstanceState
    from .strategy_options import LoadNode, LoadTree

__all__ = ["link_keys", "load_relationship_steps", "selectin_for", "selectin_load"]


def link_keys(state: InstanceState, prop: RelationshipProperty) -> list[str]:
    """The zsets listing the targets of a list relationship of one persistent object.

    One key, except for a one-to-many whose children are sharded by another field:
    each shard then holds the part of the list that lives there.
    """
    seg = state.mapper.pk_segment(state.pk)
    if prop.direction is Direction.ONETOMANY:
        child = mapper_of(prop.target)
        if child.shard_key is None:
            return [child.keys.foreign(prop.fk_column, seg)]
        if child.shard_key == prop.fk_column:
            ks = child.keys_for_shard(child.shard_of_value(state.pk))
            return [ks.foreign(prop.fk_column, seg)]
        return [ks.foreign(prop.fk_column, seg) for ks in child.all_keyspaces()]
    return [state.mapper.keys_for_pk(state.pk).relation(prop.link_name, seg)]


def unreadable(key: str, reply: Exception, what: str) -> InvalidRequestError:
    """The error for a relationship key Redis refused to read (most often WRONGTYPE: the
    key holds another type), naming the key and what to do rather than Redis's bare
    reply, which says neither."""
    return InvalidRequestError(
        f"cannot read {key!r} ({what}): {reply}; the key is damaged (`redmap audit` "
        f"reports it): delete it or restore it, then retry"
    )


def _what(prop: RelationshipProperty) -> str:
    owner = prop.parent.class_.__name__ if prop.parent is not None else "?"
    return f"the ids of {owner}.{prop.key}"


def _ids(target_mapper: Any, reply: Any, key: str, prop: RelationshipProperty) -> list[Any]:
    if isinstance(reply, Exception):
        raise unreadable(key, reply, _what(prop))
    return [target_mapper.pk_from_segment(i, key) for i in reply]


def load_relationship_steps(
    session: SessionContext, state: InstanceState, prop: RelationshipProperty
) -> Steps[None]:
    """Fill one unloaded relationship attribute of a persistent object (core steps).

    The loader is the one the statement that returned the object asked for
    (`state.load_options`), else the mapped `lazy=`; a lazy load then applies that
    statement's sub-options to the objects it loads.
    """
    node: LoadNode | None = (state.load_options or {}).get(prop.key)
    strategy = prop.lazy if node is None or node.strategy is None else node.strategy
    if strategy == "raise":
        if (
            node is not None
            and node.sql_only
            and prop.direction is Direction.MANYTOONE
            and _target_in_session(session, state, prop)
        ):
            return
        raise _raise_error(state, prop, node)
    if not (prop.direction is Direction.MANYTOONE and _target_in_session(session, state, prop)):
        yield from session.autoflush()
        yield from selectin_load(session, [state], prop)
    if node is not None and node.children:
        yield from selectin_for(session, _values(state, prop), node.children)


def _raise_error(
    state: InstanceState, prop: RelationshipProperty, node: LoadNode | None
) -> InvalidRequestError:
    name = f"{state.mapper.name}.{prop.key}"
    ways = (
        f"load it in the statement with `.options(selectinload({name}))`, or afterwards "
        f"with `session.refresh(obj, [{prop.key!r}])`"
    )
    if node is None:
        return InvalidRequestError(f"{name} is lazy='raise' and not loaded; {ways}")
    return InvalidRequestError(
        f"{name} is not loaded and the statement that loaded this {state.mapper.name} "
        f"asked raiseload({name}): it raises instead of loading; {ways}"
    )


def _values(state: InstanceState, prop: RelationshipProperty) -> list[Any]:
    """The objects a loaded relationship attribute holds (none when it is unloaded)."""
    value = state.obj.__dict__.get(prop.key)
    if isinstance(value, list):
        return list(value)
    return [] if value is None else [value]


def _target_in_session(
    session: SessionContext, state: InstanceState, prop: RelationshipProperty
) -> bool:
    """Fill a many-to-one from the identity map when its target is loaded there.

    No I/O is needed, so no autoflush either (as SQLAlchemy's lazy loader): an
    autoflush compares every JSON field of every object in the session, which made
    walking N objects' many-to-one attributes cost N squared.
    """
    d = state.obj.__dict__
    if prop.fk_column not in d:
        return False
    fk = d[prop.fk_column]
    if fk is None:
        d[prop.key] = None
        return True
    target = session.identity_map.get((prop.target, fk))
    if target is None or target.unloaded():
        return False
    d[prop.key] = None if target.deleted or expiry.gone(target) else target.obj
    return True


def selectin_load(
    session: SessionContext, states: list[InstanceState], prop: RelationshipProperty
) -> Steps[None]:
    """Load `prop` for every state in `states` in at most two round trips."""
    states = [s for s in states if s.identity is not None and prop.key not in s.obj.__dict__]
    if not states:
        return
    target_mapper = mapper_of(prop.target)
    if prop.direction is Direction.MANYTOONE:
        wanted: dict[Any, None] = {}
        for st in states:
            if prop.fk_column not in st.obj.__dict__:
                yield from load_unloaded_steps(session, st)
            fk = st.obj.__dict__.get(prop.fk_column)
            if fk is not None:
                wanted[fk] = None
        yield from ensure_loaded(session, target_mapper, wanted)
        for st in states:
            fk = st.obj.__dict__.get(prop.fk_column)
            target = None
            if fk is not None:
                tst = session.identity_map.get((prop.target, fk))
                target = None if tst is None or tst.deleted or expiry.gone(tst) else tst.obj
            st.obj.__dict__[prop.key] = target
        return
    keys_per_state = [link_keys(st, prop) for st in states]
    fanned = any(len(k) > 1 for k in keys_per_state)
    cmds: list[tuple[Any, ...]] = [
        ("ZRANGE", k, 0, -1, *(("WITHSCORES",) if fanned else ()))
        for keys_ in keys_per_state
        for k in keys_
    ]
    replies = iter((yield Read(cmds)))
    per_state = []
    for keys_ in keys_per_state:
        if not fanned:
            per_state.append(_ids(target_mapper, next(replies), keys_[0], prop))
            continue
        merged: list[tuple[float, bytes, str]] = []
        for k in keys_:
            reply = next(replies)
            if isinstance(reply, Exception):
                raise unreadable(k, reply, _what(prop))
            merged.extend((float(score), member, k) for member, score in reply)
        merged.sort()
        per_state.append([target_mapper.pk_from_segment(m, k) for _, m, k in merged])
    wanted_all: dict[Any, None] = {}
    for ids in per_state:
        wanted_all.update(dict.fromkeys(ids))
    yield from ensure_loaded(session, target_mapper, wanted_all)
    for st, ids in zip(states, per_state, strict=True):
        items = []
        for pk in ids:
            tst = session.identity_map.get((prop.target, pk))
            if tst is not None and not tst.deleted and not expiry.gone(tst):
                items.append(tst.obj)
        st.obj.__dict__[prop.key] = InstrumentedList(st.obj, prop, items)


def selectin_for(
    session: SessionContext,
    objects: list[Any],
    options: LoadTree | None = None,
    *,
    reset: bool = False,
    depth: int = 0,
) -> Steps[None]:
    """Load, for a batch of objects just returned, every relationship whose loader is
    "selectin": the statement's option for it, else its mapped `lazy=`.

    - `options` (`strategy_options.build_tree`) name relationships; each named one that
      is unloaded remembers its option in `state.load_options`, so a later lazy load
      follows it (raiseload raises; sub-options apply to what it loads). A relationship
      already loaded is kept as it is, but the options below it still apply to the
      objects it holds.
    - `reset` (queries): an unloaded relationship the options do not name forgets what an
      earlier statement asked for it, so its mapped `lazy=` applies again, as SQLAlchemy
      resets the loaders of the unloaded attributes of the objects a query returns.

    Cost: 2 round trips per relationship and level for the whole batch (0 when nothing
    is left to load), whatever the number of objects.
    """
    if not objects or depth > 8:
        return
    by_mapper: dict[Any, list[InstanceState]] = {}
    for obj in objects:
        st = obj.__dict__.get("_redmap_state")
        if st is not None:
            by_mapper.setdefault(st.mapper, []).append(st)
    tree: LoadTree = options or {}
    for mapper, states in by_mapper.items():
        for prop in mapper.relationships.values():
            node = tree.get(prop)
            strategy = prop.lazy if node is None or node.strategy is None else node.strategy
            pending = [s for s in states if prop.key not in s.obj.__dict__]
            if node is not None or reset:
                for st in pending:
                    _remember(st, prop, node)
            if strategy == "selectin":
                yield from selectin_load(session, pending, prop)
            if node is not None and node.children:
                reached = [o for st in states for o in _values(st, prop)]
                yield from selectin_for(
                    session, reached, node.children, reset=reset, depth=depth + 1
                )
            elif strategy == "selectin":
                reached = [o for st in pending for o in _values(st, prop)]
                yield from selectin_for(
                    session, reached, {} if options is not None else None, reset=reset,
                    depth=depth + 1,
                )


def _remember(state: InstanceState, prop: RelationshipProperty, node: LoadNode | None) -> None:
    """Record (or, with None, forget) the statement's option for an unloaded relationship."""
    if node is None:
        if state.load_options is not None:
            state.load_options.pop(prop.key, None)
        return
    if state.load_options is None:
        state.load_options = {}
    state.load_options[prop.key] = node
