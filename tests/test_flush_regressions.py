"""Regressions of issue 11's flush items (1, 2, 6, 8, 9, 10, 12, 16), against a real server.

Each test reproduces one reported defect from outside, as a user or a concurrent writer
would, and checks what Redis holds afterwards. The concurrency argument these tests
probe is written down in `docs/design/flush-concurrency.md`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import ForeignKey, PrimaryKey, Session, Unique, registry, relationship
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import (
    DecodeError,
    FlushError,
    IntegrityError,
    RedmapConnectionError,
    StaleDataError,
)
from redmap.orm.mapper import mapper_of
from redmap.orm.session import run_in_transaction
from redmap.testing.assertions import assert_round_trips, count_round_trips, dump_keys
from tests.proxy import LoopbackProxy
from tests.reliability._family import Kid, Tag

reg = registry(prefix="fr")


@reg.mapped
@dataclass
class Account:
    name: Annotated[str, Unique()]
    balance: int = 0
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Note:
    body: str = ""
    id: Annotated[int | None, PrimaryKey()] = None


# One family per primary-key kind: a team with a one-to-many list of players.


@reg.mapped
@dataclass
class UTeam:
    name: str
    players: list[UPlayer] = relationship(back_populates="team")
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class UPlayer:
    name: str
    team_id: Annotated[uuid.UUID | None, ForeignKey("UTeam")] = None
    team: UTeam | None = relationship(back_populates="players")
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Fan:
    """An int-keyed child of a UUID-keyed parent."""

    name: str
    team_id: Annotated[uuid.UUID | None, ForeignKey("UTeam")] = None
    team: UTeam | None = relationship()
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class STeam:
    code: Annotated[str, PrimaryKey()]
    players: list[SPlayer] = relationship(back_populates="team")


@reg.mapped
@dataclass
class SPlayer:
    name: Annotated[str, PrimaryKey()]
    team_id: Annotated[str | None, ForeignKey("STeam")] = None
    team: STeam | None = relationship(back_populates="players")


@reg.mapped
@dataclass
class ITeam:
    name: str
    players: list[IPlayer] = relationship(back_populates="team")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class IPlayer:
    name: str
    team_id: Annotated[int | None, ForeignKey("ITeam")] = None
    team: ITeam | None = relationship(back_populates="players")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Captain:
    """At most one captain per team: a `Unique` foreign key."""

    name: str
    team_id: Annotated[int | None, ForeignKey("ITeam"), Unique()] = None
    team: ITeam | None = relationship()
    id: Annotated[int | None, PrimaryKey()] = None


def _clean(client: redis.Redis) -> None:
    report = audit(client, reg)
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


@pytest.fixture
def other(redis_url: str, clean_redis: None) -> Iterator[Engine]:
    """A second engine on the same server: a concurrent writer with its own connections."""
    eng = redmap.create_engine(redis_url)
    try:
        yield eng
    finally:
        eng.dispose()


def _fire_once(engine: Engine, when: str, action: Any, *, after_incr: bool) -> list[int]:
    """Run `action()` once, just before the first round trip of `engine` that sends
    `when` (with `after_incr`, the first one after the INCRBY round trip: the ids are
    then handed out and not yet written)."""
    state = {"incr": False, "done": False}
    fired: list[int] = []

    def listener(commands: Sequence[tuple[Any, ...]]) -> None:
        names = {str(c[0]).upper() for c in commands}
        if state["done"] or (after_incr and not state["incr"]):
            state["incr"] = state["incr"] or "INCRBY" in names
            return
        if when in names:
            state["done"] = True
            fired.append(1)
            action()

    engine.add_listener(listener)
    return fired


# -- item 1: an explicit id never overwritten by a generated insert --------------------


def _insert_explicit(other: Engine, raw: redis.Redis, model: type[Any], ahead: int) -> Any:
    """An insert, in another engine, of the id the model's counter holds plus `ahead`."""
    seq = mapper_of(model).keys.seq()

    def action() -> None:
        pk = int(raw.get(seq) or 0) + ahead
        with Session(other) as s:
            s.add(model(name="explicit", id=pk))
            s.commit()

    return action


@pytest.mark.parametrize(
    ("when", "after_incr", "ahead"),
    [
        ("INCRBY", False, 1),  # checks done, ids not handed out: the next id is taken
        ("MULTI", True, 0),  # ids handed out after the checks, not written
    ],
)
def test_explicit_id_handed_out_but_unwritten_is_not_overwritten(
    engine: Engine,
    other: Engine,
    redis_client: redis.Redis,
    when: str,
    after_incr: bool,
    ahead: int,
) -> None:
    """An explicit insert of an id the counter is about to hand, or just handed, to a
    flush of generated ids keeps its object: the generated flush takes other ids."""
    raw = redis_client
    with Session(engine) as s:
        s.add(Account(name="first"))
        s.commit()
    action = _insert_explicit(other, raw, Account, ahead)
    fired = _fire_once(engine, when, action, after_incr=after_incr)
    with Session(engine) as s:
        made = [Account(name=f"gen{i}", balance=i) for i in range(3)]
        s.add_all(made)
        s.commit()
        ids = [a.id for a in made]
    assert fired == [1]
    taken = 2 if ahead else 4  # the id the explicit insert took
    with Session(other) as s:
        kept = s.get(Account, taken)
        assert kept is not None and kept.name == "explicit"
    assert taken not in ids and len(set(ids)) == 3 and None not in ids
    claim = mapper_of(Account).keys.unique("name", "explicit")
    assert raw.get(claim) == str(taken).encode()
    for i, pk in enumerate(ids):
        assert raw.get(mapper_of(Account).keys.unique("name", f"gen{i}")) == str(pk).encode()
        assert raw.hget(mapper_of(Account).object_key(pk), "name") == f"gen{i}".encode()
    _clean(raw)


@pytest.mark.parametrize("when", ["WATCH", "MULTI"])
def test_explicit_id_taken_from_a_flush_with_ids_first_is_not_overwritten(
    engine: Engine, other: Engine, redis_client: redis.Redis, when: str
) -> None:
    """A flush that hands out ids before its checks (a new team with its players) and
    loses one of them to an explicit insert, before its checks or after them, takes
    another id: the explicit team keeps its object, the players follow the new one."""
    raw = redis_client
    fired = _fire_once(engine, when, _insert_explicit(other, raw, ITeam, 0), after_incr=True)
    with Session(engine) as s:
        team = ITeam(name="ours", players=[IPlayer(name="a"), IPlayer(name="b")])
        s.add(team)
        s.commit()
        team_pk = team.id
    assert fired == [1]
    assert team_pk is not None and team_pk != 1
    assert raw.hget(mapper_of(ITeam).object_key(1), "name") == b"explicit"
    assert _reload_players(engine, ITeam, team_pk) == ["a", "b"]
    assert _reload_players(engine, ITeam, 1) == []
    _clean(raw)


def test_explicit_and_generated_inserters_racing_overwrite_nothing(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Two threads inserting generated-id batches and one inserting `id = counter` for
    about two seconds: every acknowledged object holds what its writer wrote, and every
    unique claim points at its own object."""
    raw = redis_client
    seq = mapper_of(Account).keys.seq()
    acked: dict[int, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    stop = time.monotonic() + 2.0
    explicit_ok = [0]
    gave_up = [0]

    def generated(tid: int) -> None:
        eng = redmap.create_engine(redis_url)
        n = 0
        try:
            while time.monotonic() < stop:
                names = [f"g{tid}-{n}-{i}" for i in range(20)]
                n += 1
                with Session(eng) as s:
                    objs = [Account(name=name) for name in names]
                    s.add_all(objs)
                    try:
                        s.commit()
                    except StaleDataError:
                        # Explicit inserts took its ids on every attempt: retryable,
                        # and nothing was written.
                        gave_up[0] += 1
                        continue
                    pks = [a.id for a in objs]
                with lock:
                    for pk, name in zip(pks, names, strict=True):
                        assert pk is not None and pk not in acked, f"id {pk} acknowledged twice"
                        acked[pk] = name
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            eng.dispose()

    def explicit() -> None:
        eng = redmap.create_engine(redis_url)
        n = 0
        try:
            while time.monotonic() < stop:
                pk = int(raw.get(seq) or 0)
                name = f"x-{n}"
                n += 1
                try:
                    with Session(eng) as s:
                        s.add(Account(name=name, id=pk))
                        s.commit()
                except (IntegrityError, StaleDataError):
                    continue  # the generated side wrote it first: refused, fine
                explicit_ok[0] += 1
                with lock:
                    assert pk not in acked, f"id {pk} acknowledged twice"
                    acked[pk] = name
        except BaseException as exc:
            errors.append(exc)
        finally:
            eng.dispose()

    threads = [threading.Thread(target=generated, args=(t,)) for t in range(2)]
    threads.append(threading.Thread(target=explicit))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors[:3]
    assert explicit_ok[0] > 0 and len(acked) > explicit_ok[0]
    keys = mapper_of(Account).keys
    pipe = raw.pipeline(transaction=False)
    for pk, name in acked.items():
        pipe.hget(keys.object(str(pk)), "name")
        pipe.get(keys.unique("name", name))
    replies = pipe.execute()
    for (pk, name), stored, claim in zip(acked.items(), replies[::2], replies[1::2], strict=True):
        assert stored == name.encode(), f"object {pk} written as {name!r} holds {stored!r}"
        assert claim == str(pk).encode(), f"claim of {name!r} points at {claim!r}, not {pk}"
    # Refused batches wrote nothing: every stored object is an acknowledged one.
    assert raw.zcard(keys.all()) == len(acked)
    print(
        f"\nrace: {len(acked)} objects acknowledged, {explicit_ok[0]} explicit, "
        f"{gave_up[0]} generated batches refused as stale; none overwritten"
    )
    _clean(raw)


# -- item 2: foreign keys to new parents of every key kind -------------------------------


def _reload_players(engine: Engine, team_cls: type[Any], team_pk: Any) -> list[str]:
    with Session(engine) as s:
        team = s.get(team_cls, team_pk)
        assert team is not None
        return sorted(p.name for p in team.players)


@pytest.mark.parametrize("explicit", [False, True])
def test_new_parent_with_uuid_key_gets_its_childrens_foreign_key(
    engine: Engine, redis_client: redis.Redis, explicit: bool
) -> None:
    """`add(UPlayer(team=UTeam()))` with generated or explicit UUID keys writes the
    player's team_id, and the team lists the player after a reload."""
    with Session(engine) as s:
        team = UTeam(name="red", id=uuid.uuid4() if explicit else None)
        player = UPlayer(name="ann", team=team)
        s.add(player)
        s.commit()
        assert player.team_id == team.id and team.id is not None
        team_pk, player_pk = team.id, player.id
    raw = redis_client.hget(mapper_of(UPlayer).object_key(player_pk), "team_id")
    assert raw == str(team_pk).encode()
    assert _reload_players(engine, UTeam, team_pk) == ["ann"]
    _clean(redis_client)


def test_uuid_parent_key_is_written_when_other_ids_come_from_a_counter(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A new UUID team with its player, flushed with a new counter-id note, still writes
    the player's team_id."""
    with Session(engine) as s:
        team = UTeam(name="red")
        s.add_all([UPlayer(name="ann", team=team), Note(body="n")])
        s.commit()
        team_pk = team.id
    assert _reload_players(engine, UTeam, team_pk) == ["ann"]
    _clean(redis_client)


@pytest.mark.parametrize("kind", ["uuid", "str", "int"])
def test_reparent_to_new_parent_writes_the_key_not_hdel(
    engine: Engine, redis_client: redis.Redis, kind: str
) -> None:
    """Moving an existing player to a new team writes the new key (never `HDEL team_id`),
    for UUID, str and generated int keys; both teams' lists follow."""
    team_cls, player_cls, new_team, old_team, player = {
        "uuid": (UTeam, UPlayer, lambda: UTeam(name="new"), UTeam(name="old"), UPlayer("p")),
        "str": (STeam, SPlayer, lambda: STeam(code="new"), STeam(code="old"), SPlayer("p")),
        "int": (ITeam, IPlayer, lambda: ITeam(name="new"), ITeam(name="old"), IPlayer("p")),
    }[kind]
    with Session(engine) as s:
        player.team = old_team
        s.add(player)
        s.commit()
        old_pk = _pk(old_team)
        player_pk = _pk(player)
    with Session(engine) as s:
        p = s.get(player_cls, player_pk)
        assert p is not None
        target = new_team()
        p.team = target
        with count_round_trips(engine) as rt:
            s.commit()
        assert "HDEL" not in rt.command_names, rt.commands
        new_pk = _pk(target)
    raw = redis_client.hget(mapper_of(player_cls).object_key(player_pk), "team_id")
    assert raw == str(new_pk).encode()
    assert _reload_players(engine, team_cls, new_pk) == ["p"]
    assert _reload_players(engine, team_cls, old_pk) == []
    _clean(redis_client)


def test_int_keyed_child_moved_to_new_uuid_parent_gets_its_key(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """An existing int-keyed fan moved to a new UUID-keyed team (no counter id needed):
    the flush writes team_id, it does not send `HDEL team_id`."""
    with Session(engine) as s:
        s.add(Fan(name="f", team=UTeam(name="old")))
        s.commit()
    with Session(engine) as s:
        fan = s.get(Fan, 1)
        assert fan is not None
        new = UTeam(name="new")
        fan.team = new
        with count_round_trips(engine) as rt:
            s.commit()
        assert "HDEL" not in rt.command_names and "INCRBY" not in rt.command_names
        new_pk = new.id
    assert redis_client.hget(mapper_of(Fan).object_key(1), "team_id") == str(new_pk).encode()
    assert redis_client.zrange(mapper_of(Fan).keys.foreign("team_id", str(new_pk)), 0, -1) == [b"1"]
    _clean(redis_client)


def _pk(obj: Any) -> Any:
    return getattr(obj, mapper_of(type(obj)).pk.key)


# -- item 6: a missing object or version is stale -------------------------------------------


def test_stale_update_does_not_resurrect_a_hash_without_version(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """An object whose hash has no `#v`, deleted by someone else after it was loaded:
    an update and a delete are stale and write nothing (no partial hash comes back)."""
    key = mapper_of(Note).object_key(1)
    redis_client.hset(key, "body", "written by another tool")
    for action in ("update", "delete"):
        redis_client.hset(key, "body", "written by another tool")
        with Session(engine) as s:
            note = s.get(Note, 1)
            assert note is not None and note.body == "written by another tool"
            redis_client.delete(key)
            if action == "update":
                note.body = "stale"
            else:
                s.delete(note)
            with pytest.raises(StaleDataError):
                s.commit()
        assert not redis_client.exists(key), action


def test_hash_without_version_can_still_be_updated(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A hash written without `#v` (another tool) that still exists updates normally and
    gets version 1 of a new incarnation `#i`."""
    key = mapper_of(Note).object_key(1)
    redis_client.hset(key, "body", "x")
    with Session(engine) as s:
        note = s.get(Note, 1)
        assert note is not None
        note.body = "y"
        s.commit()
    stored = redis_client.hgetall(key)
    assert len(stored.pop(b"#i")) == 16
    assert stored == {b"body": b"y", b"#v": b"1"}


# -- item 8: staleness wins over unique conflicts ----------------------------------------


def test_stale_flush_that_claims_a_taken_value_is_stale(
    engine: Engine, other: Engine, redis_client: redis.Redis
) -> None:
    """A flush whose object changed underneath it and that claims a value someone else
    holds raises StaleDataError (retryable), not IntegrityError; run_in_transaction
    then succeeds on fresh data."""
    with Session(engine) as s:
        s.add_all([Account(name="a"), Account(name="b")])
        s.commit()
    with Session(engine) as s:
        a = s.get(Account, 1)
        assert a is not None
        with Session(other) as o:
            oa = o.get(Account, 1)
            assert oa is not None
            oa.balance = 5
            o.commit()
        a.name = "b"
        a.balance += 1
        with pytest.raises(StaleDataError):
            s.commit()

    calls = []

    def bump(s: Session) -> None:
        calls.append(1)
        acc = s.get(Account, 1)
        assert acc is not None
        if len(calls) == 1:
            with Session(other) as o:
                oa = o.get(Account, 1)
                assert oa is not None
                oa.balance += 100
                o.commit()
            acc.name = "b"  # taken: would be an IntegrityError once fresh
        acc.balance += 1

    run_in_transaction(bump, lambda: Session(engine))
    assert len(calls) == 2
    assert redis_client.hget(mapper_of(Account).object_key(1), "balance") == b"106"


# -- item 9: out of memory at EXEC ------------------------------------------------------


def test_out_of_memory_at_exec_is_summarised_and_names_the_moved_counter(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A big flush refused at EXEC for memory: a short message counting the refused
    commands with the distinct errors, naming the counter that moved; nothing written."""
    raw = redis_client
    policy = raw.config_get("maxmemory-policy")["maxmemory-policy"]
    seq = mapper_of(Note).keys.seq()
    try:
        raw.config_set("maxmemory-policy", "noeviction")
        with Session(engine) as s:
            s.add_all([Note(body="x" * 2000) for _ in range(3000)])
            before = dump_keys(raw)
            used = int(raw.info("memory")["used_memory"])
            raw.config_set("maxmemory", used + 2 * 1024 * 1024)
            try:
                with pytest.raises(FlushError) as info:
                    s.commit()
            finally:
                raw.config_set("maxmemory", 0)
            err = info.value
            text = str(err)
            assert len(text) < 1000, len(text)
            assert len(err.errors) <= 5, len(err.errors)
            assert "maxmemory" in text and "nothing was written" in text
            assert seq in text and "never reused" in text, text
            moved = int(raw.get(seq) or 0)
            assert moved == 3000 and "3000" in text
            print(f"\nOOM at EXEC: {len(text)} characters, errors {err.errors}: {text}")
            assert {k: v for k, v in dump_keys(raw).items() if k != seq.encode()} == {
                k: v for k, v in before.items() if k != seq.encode()
            }
            s.commit()  # the kept changes, once memory is back
    finally:
        raw.config_set("maxmemory", 0)
        raw.config_set("maxmemory-policy", policy)
    _clean(raw)


# -- item 10: a non-canonical version ---------------------------------------------------


def test_version_with_leading_zero_updates_and_deletes(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """`#v` stored as "01" (equal to 1 as a number) is not stale forever: an update
    writes version 2 and a delete removes the object."""
    key = mapper_of(Note).object_key(1)
    redis_client.hset(key, mapping={"body": "x", "#v": "01"})
    with Session(engine) as s:
        note = s.get(Note, 1)
        assert note is not None
        note.body = "y"
        s.commit()
    assert redis_client.hget(key, "#v") == b"2"
    redis_client.hset(key, "#v", "002")
    with Session(engine) as s:
        note = s.get(Note, 1)
        assert note is not None
        s.delete(note)
        s.commit()
    assert not redis_client.exists(key)


@pytest.mark.parametrize("raw_version", [" 1", "1_0", "+1", "-1", "1.0", "x"])
def test_version_that_is_not_digits_is_refused_at_load(
    engine: Engine, redis_client: redis.Redis, raw_version: str
) -> None:
    """A `#v` that is not a decimal number raises DecodeError naming key and field."""
    key = mapper_of(Note).object_key(1)
    redis_client.hset(key, mapping={"body": "x", "#v": raw_version})
    with Session(engine) as s, pytest.raises(DecodeError) as info:
        s.get(Note, 1)
    assert info.value.key == key and info.value.field == "#v"


# -- item 12 (part): connection lost while ids are handed out ----------------------------


def test_connection_lost_during_id_allocation_is_reported_before_the_flush(
    redis_client: redis.Redis, redis_url: str
) -> None:
    """Cutting every connection when INCRBY is sent: "connection lost before the flush
    was sent; nothing was written"; the same commit succeeds once the server is back."""
    host, port = (
        redis_client.connection_pool.connection_kwargs["host"],
        int(redis_client.connection_pool.connection_kwargs["port"]),
    )
    with LoopbackProxy(host, port) as proxy:
        eng = redmap.create_engine(proxy.url, socket_timeout=0.5)
        try:
            cut = {"armed": True}

            def listener(commands: Sequence[tuple[Any, ...]]) -> None:
                if cut["armed"] and any(str(c[0]).upper() == "INCRBY" for c in commands):
                    cut["armed"] = False
                    proxy.set_mode("reset")
                    time.sleep(0.3)  # the proxy thread closes the open connections

            eng.add_listener(listener)
            with Session(eng) as s:
                s.add(Note(body="n"))
                before = dump_keys(redis_client)
                with pytest.raises(RedmapConnectionError) as info:
                    s.commit()
                assert "connection lost before the flush was sent; nothing was written" in str(
                    info.value
                ), str(info.value)
                assert "cannot talk to Redis" not in str(info.value)
                seq = mapper_of(Note).keys.seq().encode()
                assert {k: v for k, v in dump_keys(redis_client).items() if k != seq} == before
                proxy.set_mode("pass")
                s.commit()
        finally:
            eng.dispose()
    assert redis_client.hget(mapper_of(Note).object_key(1), "body") in (b"n", None)
    _clean(redis_client)


# -- item 16: checks after id allocation, and no self-abort ------------------------------


def test_mixed_explicit_and_generated_ids_commit_in_three_round_trips(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A flush with explicit and generated ids of one model does not abort on its own
    counter: INCRBY, WATCH + checks, MULTI/EXEC; generated ids skip the explicit ones."""
    with Session(engine) as s:
        objs = [Account(name=f"g{i}") for i in range(3)]
        s.add_all([Account(name="e2", id=2), *objs, Account(name="e9", id=9)])
        with assert_round_trips(engine, 3) as rt:
            s.commit()
        assert rt.command_names.count("EXEC") == 1
        assert not any("#new" in str(a) for c in rt.commands for a in c)
        ids = sorted(a.id for a in objs if a.id is not None)
    assert len(ids) == 3 and 2 not in ids and 9 not in ids
    assert int(redis_client.get(mapper_of(Account).keys.seq()) or 0) >= 9
    _clean(redis_client)


def test_new_parent_key_checks_are_sent_and_refuse_before_multi(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """The children's zset of a new parent is type-checked like any other key: a string
    there refuses the flush before its writes are sent, nothing is written and the ids
    go back to their counters."""
    fk = mapper_of(IPlayer).keys.foreign("team_id", "1")
    redis_client.set(fk, "not a zset")
    with Session(engine) as s:
        s.add(IPlayer(name="p", team=ITeam(name="t")))
        with count_round_trips(engine) as rt, pytest.raises(FlushError) as info:
            s.commit()
    assert fk in str(info.value) and "HSET" not in rt.command_names
    assert not any("#new" in str(a) for c in rt.commands for a in c)
    assert not redis_client.exists(mapper_of(ITeam).object_key(1))
    assert not redis_client.exists(mapper_of(IPlayer).object_key(1))
    # The ids taken before the checks were given back.
    assert not redis_client.exists(mapper_of(ITeam).keys.seq(), mapper_of(IPlayer).keys.seq())


def test_new_objects_link_zset_is_type_checked_with_its_id(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A new kid linked to a new tag: the link zsets are type-checked under the ids the
    objects get (never a placeholder key); a string there refuses the flush before its
    writes are sent, nothing is written and the ids go back to their counters."""
    link = mapper_of(Kid).relationships["tags"].link_name
    rel = mapper_of(Kid).keys.relation(link, "1")
    redis_client.set(rel, "not a zset")
    with Session(engine) as s:
        s.add(Kid(name="k", tags=[Tag(name="t")]))
        with count_round_trips(engine) as rt, pytest.raises(FlushError) as info:
            s.commit()
    assert rel in str(info.value) and "HSET" not in rt.command_names
    assert not any("#new" in str(a) for c in rt.commands for a in c)
    assert ("TYPE", rel) in rt.commands
    assert not redis_client.exists(mapper_of(Kid).object_key(1))
    assert not redis_client.exists(mapper_of(Tag).object_key(1))
    assert not redis_client.exists(mapper_of(Kid).keys.seq(), mapper_of(Tag).keys.seq())


def test_refused_flush_with_ids_first_gives_its_ids_back(
    engine: Engine, other: Engine, redis_client: redis.Redis
) -> None:
    """A flush that took ids before its checks (a new team with its player) and is then
    refused as stale leaves every key as it was, counters included; the next commit
    gets the ids the refused one had."""
    with Session(engine) as s:
        s.add(Note(body="n"))
        s.add(ITeam(name="t0"))
        s.commit()
    with Session(engine) as s:
        note = s.get(Note, 1)
        assert note is not None
        with Session(other) as o:
            theirs = o.get(Note, 1)
            assert theirs is not None
            theirs.body = "theirs"
            o.commit()
        note.body = "stale"
        team = ITeam(name="new", players=[IPlayer(name="p")])
        s.add(team)
        before = dump_keys(redis_client)
        with count_round_trips(engine) as rt, pytest.raises(StaleDataError):
            s.commit()
        assert rt.command_names[0] == "INCRBY"  # the ids came first
        assert dump_keys(redis_client) == before
    with Session(engine) as s:
        team = ITeam(name="new", players=[IPlayer(name="p")])
        s.add(team)
        s.commit()
        assert team.id == 2 and team.players[0].id == 1
    _clean(redis_client)


def test_unique_foreign_key_to_new_parent_is_claimed_with_a_check(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """A `Unique` foreign key pointing at a new parent is checked like any claim: a value
    already claimed refuses the flush (IntegrityError) and nothing is written."""
    claim = mapper_of(Captain).keys.unique("team_id", "1")
    redis_client.set(claim, "77")
    with Session(engine) as s:
        s.add(Captain(name="c", team=ITeam(name="t")))
        with pytest.raises(IntegrityError):
            s.commit()
    assert redis_client.get(claim) == b"77"
    assert not redis_client.exists(mapper_of(ITeam).object_key(1))
    with Session(engine) as s:
        redis_client.delete(claim)
        cap = Captain(name="c", team=ITeam(name="t"))
        s.add(cap)
        s.commit()
        assert redis_client.get(mapper_of(Captain).keys.unique("team_id", str(cap.team_id)))


def test_flush_works_with_pools_that_want_a_command_name(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A flush checks its connection out of a pool whose `get_connection` requires a
    command name, as redis-py before 5.3 does (later versions warn when given one)."""
    names: list[str] = []

    class OldPool(redis.ConnectionPool):
        def get_connection(  # type: ignore[override]
            self, command_name: str, *keys: Any, **options: Any
        ) -> Any:
            names.append(command_name)
            return super().get_connection()

    eng = redmap.create_engine(redis_url)
    eng.dialect.client.connection_pool = OldPool.from_url(redis_url)
    try:
        with Session(eng) as s:
            s.add(Note(body="old", id=1))  # an explicit id: the flush is the only I/O
            s.commit()
    finally:
        eng.dialect.client.connection_pool.disconnect()
        eng.dispose()
    assert names == ["MULTI"]
    stored = redis_client.hgetall(mapper_of(Note).object_key(1))
    assert stored.pop(b"#i") and stored == {b"body": b"old", b"#v": b"1"}


# -- incarnations: a key deleted and inserted again is another object --------------------
# (docs/design/flush-concurrency.md, I1: versions count per incarnation `#i`)


@reg.mapped
@dataclass
class StrNote:
    code: Annotated[str, PrimaryKey()]
    body: Annotated[str, redmap.Indexed()] = ""
    n: int = 0


@reg.mapped
@dataclass
class UuidNote:
    id: Annotated[uuid.UUID, PrimaryKey()]
    body: Annotated[str, redmap.Indexed()] = ""
    n: int = 0


_KEYS: dict[str, tuple[type[Any], Any]] = {
    "str": (StrNote, "a:b é"),
    "uuid": (UuidNote, uuid.UUID(int=7)),
    "int": (Note, 7),
}


def _note(kind: str, body: str) -> Any:
    model, pk = _KEYS[kind]
    if model is Note:
        return Note(body=body, id=pk)
    if model is StrNote:
        return StrNote(code=pk, body=body)
    return UuidNote(id=pk, body=body)


def _reinsert(engine: Engine, kind: str, body: str) -> None:
    """Delete the object of `kind` and insert another under the same key (version 1)."""
    model, pk = _KEYS[kind]
    with Session(engine) as s:
        s.delete(s.get_one(model, pk))
        s.commit()
    with Session(engine) as s:
        s.add(_note(kind, body))
        s.commit()


class TestIncarnation:
    """Versions count per incarnation: holders of a deleted object are stale for good."""

    @pytest.mark.parametrize("change", ["update", "delete"])
    @pytest.mark.parametrize("kind", ["str", "uuid", "int"])
    def test_holder_of_a_deleted_object_is_stale_after_reinsert(
        self, engine: Engine, redis_client: redis.Redis, kind: str, change: str
    ) -> None:
        """An update or delete by a session that loaded the object before it was deleted
        and inserted again (same key, version 1 again) is StaleDataError, writes nothing."""
        model, pk = _KEYS[kind]
        with Session(engine) as s:
            s.add(_note(kind, "first"))
            s.commit()
        old = Session(engine)
        held = old.get_one(model, pk)
        _reinsert(engine, kind, "second")
        before = dump_keys(redis_client)
        if change == "update":
            held.body = "stale"
        else:
            old.delete(held)
        with pytest.raises(StaleDataError):
            old.commit()
        old.close()
        assert dump_keys(redis_client) == before
        report = audit(redis_client, reg)
        assert report.ok, report.mismatches + report.unexplained

    @pytest.mark.parametrize("kind", ["str", "uuid"])
    def test_merge_of_a_copy_from_before_a_reinsert_is_stale(
        self, engine: Engine, redis_client: redis.Redis, kind: str
    ) -> None:
        """merge() of a detached copy loaded before a delete and re-insert raises
        StaleDataError (same version number, another incarnation) and changes nothing."""
        model, pk = _KEYS[kind]
        with Session(engine) as s:
            s.add(_note(kind, "first"))
            s.commit()
        with Session(engine, expire_on_commit=False) as s:
            copy = s.get_one(model, pk)
        _reinsert(engine, kind, "second")
        copy.body = "from the copy"
        before = dump_keys(redis_client)
        with Session(engine) as s:
            with pytest.raises(StaleDataError, match="another object under the same key"):
                s.merge(copy)
            s.commit()
        assert dump_keys(redis_client) == before
        with Session(engine) as s:
            assert s.get_one(model, pk).body == "second"

    def test_reload_of_expired_fields_keeps_the_loaded_incarnation(
        self, engine: Engine, redis_client: redis.Redis
    ) -> None:
        """An object with a pending change whose other fields reload after a re-insert
        keeps the incarnation it was loaded at, so its flush is stale, not applied."""
        with Session(engine) as s:
            s.add(StrNote(code="x", body="first", n=1))
            s.commit()
        old = Session(engine)
        held = old.get_one(StrNote, "x")
        held.body = "mine"  # pending, loaded at version 1 of the first object
        old.expire(held, ["n"])
        with Session(engine) as s:
            s.delete(s.get_one(StrNote, "x"))
            s.commit()
        with Session(engine) as s:
            s.add(StrNote(code="x", body="second", n=2))
            s.commit()
        assert held.n == 2  # reloaded from the new object
        with pytest.raises(StaleDataError):
            old.commit()
        old.close()
        assert redis_client.hget(mapper_of(StrNote).object_key("x"), "body") == b"second"

    def test_checks_are_one_hmget_per_object_and_round_trips_unchanged(
        self, engine: Engine, redis_client: redis.Redis
    ) -> None:
        """An update checks `#v` and `#i` with one HMGET (2 round trips, as before); an
        insert writes `#i` with `#v`; an update of a loaded object leaves `#i` alone."""
        with Session(engine) as s:
            with count_round_trips(engine) as rt:
                s.add(StrNote(code="k", body="a"))
                s.commit()
            (hset,) = [c for c in rt.commands if c[0] == "HSET"]
            assert hset[-4:-1] == ("#v", b"1", "#i") and len(hset[-1]) == 16
        key = mapper_of(StrNote).object_key("k")
        incarnation = redis_client.hget(key, "#i")
        assert incarnation == hset[-1]
        with Session(engine) as s:
            s.get_one(StrNote, "k").body = "b"
            with assert_round_trips(engine, 2) as rt:
                s.commit()
        assert ("HMGET", key, "#v", "#i") in rt.commands
        assert not [c for c in rt.commands if c[0] == "HGET"]
        (hset,) = [c for c in rt.commands if c[0] == "HSET"]
        assert "#i" not in hset
        assert redis_client.hmget(key, ["#v", "#i"]) == [b"2", incarnation]

    def test_data_written_without_incarnation_keeps_working(
        self, engine: Engine, redis_client: redis.Redis
    ) -> None:
        """A hash with `#v` and no `#i` (written before incarnations) updates normally and
        keeps having no `#i`; a holder of it is stale once it is deleted and re-inserted."""
        key = mapper_of(Note).object_key(3)
        redis_client.hset(key, mapping={"body": "old", "#v": "4"})
        redis_client.zadd(mapper_of(Note).keys.all(), {"3": 3})
        with Session(engine) as s:
            s.get_one(Note, 3).body = "new"
            s.commit()
        assert redis_client.hgetall(key) == {b"body": b"new", b"#v": b"5"}
        assert audit(redis_client, reg).ok
        old = Session(engine)
        held = old.get_one(Note, 3)  # version 5, no incarnation
        with Session(engine) as s:
            s.delete(s.get_one(Note, 3))
            s.commit()
        with Session(engine) as s:
            s.add(Note(body="again", id=3))
            s.commit()
        with Session(engine) as s:
            for _ in range(4):  # the new object reaches version 5 as well
                s.get_one(Note, 3).body += "!"
                s.commit()
        assert redis_client.hget(key, "#v") == b"5"
        held.body = "stale"
        with pytest.raises(StaleDataError):
            old.commit()
        old.close()
