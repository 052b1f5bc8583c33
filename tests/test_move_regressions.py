"""Moving a child between two delete-orphan lists, and the errors around relationship keys.

Found by mutation testing (issue 11 context): `old.players.remove(p)` then
`new.players.append(p)` lazy-loaded `new.players`, whose autoflush deleted `p` as an
orphan for good (a flush is a Redis transaction of its own: no rollback undoes it);
the append then brought the deleted object back and the commit raised StaleDataError,
which `run_in_transaction` retries. Each move below ends with what a fresh session
reads from Redis and a clean `redmap.audit`. The models are those of the
configuration machine (`tests/reliability/_models.py`), one registry per key kind.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
import redis

from redmap import Session, select
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import DecodeError, InvalidRequestError
from tests.reliability._models import config_models

KEY_KINDS = ("gen_int", "int", "str", "gen_uuid", "uuid")
_counter = itertools.count(1)
_MODELS: dict[str, tuple[Any, type[Any], type[Any]]] = {
    kind: config_models(f"mv{kind}", pk=kind, unique=False, sharded=False, orphans=True)
    for kind in KEY_KINDS
}


def _key(kind: str) -> Any:
    """An explicit primary key of `kind` (None for the generated kinds)."""
    n = next(_counter)
    if kind == "int":
        return 1000 + n
    if kind == "str":
        return f"k:{n}"
    if kind == "uuid":
        return uuid.uuid4()
    return None


def _seed(engine: Engine, kind: str) -> tuple[Any, Any, Any, Any]:
    """Teams `old` (with players p and q) and `new` (empty); returns their keys."""
    _, team, player = _MODELS[kind]
    with Session(engine) as s:
        p = player(name="p", id=_key(kind))
        q = player(name="q", id=_key(kind))
        old = team(name="old", players=[p, q], id=_key(kind))
        new = team(name="new", id=_key(kind))
        s.add_all([old, new])
        s.commit()
        return old.id, new.id, p.id, q.id


def _stored(engine: Engine, kind: str) -> tuple[dict[Any, Any], dict[Any, list[str]]]:
    """Every stored player's team key, and every stored team's player names (fresh session)."""
    _, team, player = _MODELS[kind]
    with Session(engine) as s:
        players = {pl.id: pl.team_id for pl in s.scalars(select(player)).all()}
        teams = {t.id: sorted(pl.name for pl in t.players) for t in s.scalars(select(team)).all()}
    return players, teams


def _clean(client: redis.Redis, kind: str) -> None:
    report = audit(client, _MODELS[kind][0])
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


MOVES = [
    pytest.param(order, m2o, old_list, new_list, autoflush, id="-".join(ids))
    for order, m2o, old_list, new_list, autoflush, ids in (
        (o, m, ol, nl, af, (o, f"m2o_{m}", f"old_{ol}", f"new_{nl}", f"af_{af}"))
        for o in ("remove_append", "append_first")
        for m in ("loaded", "unloaded")
        for ol in ("loaded", "unloaded")
        for nl in ("loaded", "unloaded")
        for af in ("on", "off")
    )
]


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize(("order", "m2o", "old_list", "new_list", "autoflush"), MOVES)
def test_move_between_delete_orphan_lists(
    engine: Engine,
    redis_client: redis.Redis,
    kind: str,
    order: str,
    m2o: str,
    old_list: str,
    new_list: str,
    autoflush: str,
) -> None:
    """A child moved from one delete-orphan list to another survives, under its new
    parent, whatever was loaded before the move and whichever list changed first (it
    raised StaleDataError after an autoflush had deleted it)."""
    _, team, player = _MODELS[kind]
    old_id, new_id, p_id, q_id = _seed(engine, kind)
    with Session(engine, autoflush=autoflush == "on") as s:
        old, new = s.get(team, old_id), s.get(team, new_id)
        p = s.get(player, p_id)
        assert old is not None and new is not None and p is not None
        if old_list == "loaded":
            assert len(old.players) == 2
        if new_list == "loaded":
            assert new.players == []
        if m2o == "loaded":
            assert p.team is old
        if order == "remove_append":
            old.players.remove(p)
            new.players.append(p)
        else:
            new.players.append(p)
            if old_list == "loaded" or autoflush == "on":
                assert p not in old.players  # the back-reference took it out
            else:
                # Loaded from Redis after the move, autoflush off: it still lists p.
                assert p in old.players
                old.players.remove(p)
        assert p.team is new
        s.commit()
    assert _stored(engine, kind) == (
        {p_id: new_id, q_id: old_id},
        {old_id: ["q"], new_id: ["p"]},
    )
    _clean(redis_client, kind)


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize("new_list", ["loaded", "unloaded"])
def test_move_then_delete_old_parent(
    engine: Engine, redis_client: redis.Redis, kind: str, new_list: str
) -> None:
    """Moving a child away, then deleting its old parent in the same flush, deletes the
    old parent and the child left behind, and keeps the moved one under its new parent."""
    _, team, player = _MODELS[kind]
    old_id, new_id, p_id, _ = _seed(engine, kind)
    with Session(engine) as s:
        old, new = s.get(team, old_id), s.get(team, new_id)
        p = s.get(player, p_id)
        assert old is not None and new is not None and p is not None
        if new_list == "loaded":
            assert new.players == []
        old.players.remove(p)
        new.players.append(p)
        s.delete(old)
        s.commit()
    assert _stored(engine, kind) == ({p_id: new_id}, {new_id: ["p"]})
    _clean(redis_client, kind)


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize("order", ["remove_append", "append_first", "assign"])
def test_move_to_a_new_parent(
    engine: Engine, redis_client: redis.Redis, kind: str, order: str
) -> None:
    """A child moved to a parent that is not written yet (its key maybe generated at
    flush) ends up under it; the old parent keeps its other child."""
    _, team, player = _MODELS[kind]
    old_id, _, p_id, q_id = _seed(engine, kind)
    with Session(engine) as s:
        old = s.get(team, old_id)
        p = s.get(player, p_id)
        assert old is not None and p is not None
        fresh = team(name="fresh", id=_key(kind))
        s.add(fresh)
        if order == "remove_append":
            old.players.remove(p)
            fresh.players.append(p)
        elif order == "append_first":
            fresh.players.append(p)
        else:
            p.team = fresh
        s.commit()
        fresh_id = fresh.id
    assert fresh_id is not None
    players, teams = _stored(engine, kind)
    assert players == {p_id: fresh_id, q_id: old_id}
    assert teams[fresh_id] == ["p"] and teams[old_id] == ["q"]
    _clean(redis_client, kind)


@pytest.mark.parametrize("kind", ["gen_int", "str"])
def test_removed_orphan_without_new_parent_is_still_deleted(
    engine: Engine, redis_client: redis.Redis, kind: str
) -> None:
    """An autoflush between the removal and the commit no longer deletes the orphan, but
    the commit still does when nothing gave it a parent again; the autoflush meanwhile
    wrote it without a parent (the lazy load after it does not list it)."""
    _, team, player = _MODELS[kind]
    old_id, new_id, p_id, q_id = _seed(engine, kind)
    with Session(engine) as s:
        old, new = s.get(team, old_id), s.get(team, new_id)
        assert old is not None and new is not None
        p = s.get(player, p_id)
        old.players.remove(p)
        assert new.players == []  # lazy load: autoflush
        assert [pl.id for pl in s.scalars(select(player)).all() if pl.team_id is None] == [p_id]
        s.commit()
    assert _stored(engine, kind) == ({q_id: old_id}, {old_id: ["q"], new_id: []})
    _clean(redis_client, kind)


# -- corrupt id members and relationship keys: errors that name where -----------------


def _dump(client: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type and content, to show that nothing was written."""
    out: dict[bytes, Any] = {}
    for k in client.keys("*"):
        kind = client.type(k)
        if kind == b"hash":
            out[k] = client.hgetall(k)
        elif kind == b"zset":
            out[k] = client.zrange(k, 0, -1, withscores=True)
        elif kind == b"set":
            out[k] = client.smembers(k)
        else:
            out[k] = client.get(k)
    return out


@pytest.mark.parametrize(
    ("kind", "member"),
    [(k, m) for k in ("gen_int", "gen_uuid") for m in (b"", b"x-y", b"zz\xff")]
    + [("str", b"zz\xff")],  # b"" and "x-y" are valid str keys
)
def test_undecodable_all_member_names_model_field_and_key(
    engine: Engine, redis_client: redis.Redis, kind: str, member: bytes
) -> None:
    """An id member of `#all` that no primary key escapes to (b"" or "x-y" for an int or
    UUID key, non-ASCII for any) is a DecodeError naming the model, its key field and the
    key it was read from (the codec's own error named none of them); the audit lists it."""
    reg, team, _ = _MODELS[kind]
    _seed(engine, kind)
    all_key = f"{{mv{kind}}}:team:#all"
    redis_client.zadd(all_key, {member: 0})
    with Session(engine) as s, pytest.raises(DecodeError) as info:
        s.scalars(select(team)).all()
    err = info.value
    assert (err.model, err.field, err.key) == ("Team", "id", all_key)
    assert f"in key {all_key!r}" in str(err) and "Team.id" in str(err)
    assert not audit(redis_client, reg).ok


@pytest.mark.parametrize("loaded", [False, True])
def test_undecodable_child_list_member_names_the_key(
    engine: Engine, redis_client: redis.Redis, loaded: bool
) -> None:
    """A corrupt member of a one-to-many's key, read by a lazy load or by the delete of
    the parent (which re-reads the list), is a DecodeError naming the child model, its
    key field and the list's key; the delete writes nothing."""
    _, team, _ = _MODELS["gen_int"]
    old_id, _, _, _ = _seed(engine, "gen_int")
    fk_key = f"{{mvgen_int}}:player:#fk:team_id:{old_id}"
    with Session(engine) as s:
        old = s.get(team, old_id)
        assert old is not None
        if loaded:
            assert len(old.players) == 2
        redis_client.zadd(fk_key, {b"oops": 0})
        before = _dump(redis_client)
        with pytest.raises(DecodeError) as info:
            if loaded:
                s.delete(old)
                s.commit()
            else:
                _ = old.players
        assert (info.value.model, info.value.field, info.value.key) == ("Player", "id", fk_key)
    assert _dump(redis_client) == before


@pytest.mark.parametrize("loaded", [False, True])
def test_wrong_type_child_list_names_the_key(
    engine: Engine, redis_client: redis.Redis, loaded: bool
) -> None:
    """Deleting a parent whose children's key holds another Redis type (or lazy loading
    that list) raises InvalidRequestError naming the key and what to do, not Redis's bare
    WRONGTYPE reply; nothing is written."""
    _, team, _ = _MODELS["gen_int"]
    old_id, _, _, _ = _seed(engine, "gen_int")
    fk_key = f"{{mvgen_int}}:player:#fk:team_id:{old_id}"
    with Session(engine) as s:
        old = s.get(team, old_id)
        assert old is not None
        if loaded:
            assert len(old.players) == 2
        redis_client.delete(fk_key)
        redis_client.set(fk_key, "not a zset")
        before = _dump(redis_client)
        if not loaded:
            with pytest.raises(InvalidRequestError) as lazy:
                _ = old.players
            assert repr(fk_key) in str(lazy.value) and "redmap audit" in str(lazy.value)
        s.delete(old)
        with pytest.raises(InvalidRequestError) as info:
            s.commit()
    message = str(info.value)
    assert f"cannot read {fk_key!r}" in message
    assert "WRONGTYPE" in message and "redmap audit" in message
    assert _dump(redis_client) == before
