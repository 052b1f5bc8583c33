"""`update()` / `delete()` statements and `Session.replace_all` (issue 14 items 3 to 5).

A statement runs as one atomic flush of the unit of work over the matching objects, so
it must leave exactly the keys the same change made object by object leaves; these tests
compare the two keyspaces byte for byte (incarnations aside), then check what the
session sees, what a refusal leaves, and that round trips do not grow with N.
"""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    delete,
    registry,
    relationship,
    run_in_transaction,
    select,
    update,
)
from redmap.asyncio import AsyncSession, create_async_engine
from redmap.exc import IntegrityError, InvalidRequestError, RedmapError, StaleDataError
from redmap.testing.assertions import count_round_trips, dump_keys

treg = registry(prefix="st")


@treg.mapped
@dataclass
class Guild:
    name: Annotated[str, Unique()]
    heroes: list[Hero] = relationship(back_populates="guild", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@treg.mapped
@dataclass
class Hero:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    level: Annotated[int, Sorted()] = 1
    gen: Annotated[int, Indexed()] = 1
    guild_id: Annotated[int | None, ForeignKey("Guild")] = None
    guild: Guild | None = relationship(back_populates="heroes")
    id: Annotated[int | None, PrimaryKey()] = None


def _normal(client: redis.Redis) -> dict[bytes, Any]:
    """Keys without flush tokens, each hash's incarnation blanked."""
    out: dict[bytes, Any] = {}
    for key, value in dump_keys(client).items():
        if b"#flush:" in key:
            continue
        if client.type(key) == b"hash":
            fields = client.hgetall(key)
            fields.pop(b"#i", None)
            out[key] = fields
        else:
            out[key] = value
    return out


def _seed(engine: redmap.Engine, n: int = 30) -> None:
    with Session(engine) as s:
        guilds = [Guild(name=f"g{g}") for g in range(3)]
        for i in range(n):
            guilds[i % 3].heroes.append(
                Hero(name=f"h{i % 4}", email=f"h{i}@x", level=i, gen=i % 2)
            )
        s.add_all(guilds)
        s.commit()


def _same_as_by_hand(
    engine: redmap.Engine,
    raw: redis.Redis,
    statement: Callable[[Session], int],
    by_hand: Callable[[Session], int],
) -> int:
    """Run the statement and the same change object by object on the same seed; assert
    they leave the same keys and report the same count."""
    raw.flushall()
    _seed(engine)
    with Session(engine) as s:
        counted = statement(s)
    after_statement = _normal(raw)
    raw.flushall()
    _seed(engine)
    with Session(engine) as s:
        expected = by_hand(s)
        s.commit()
    assert _normal(raw) == after_statement
    assert counted == expected
    return counted


def test_update_keeps_every_index_as_the_unit_of_work_does(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    def statement(s: Session) -> int:
        return s.execute(
            update(Hero).where(Hero.gen == 1).values(name="renamed", level=Hero.level + 100)
        ).rowcount

    def by_hand(s: Session) -> int:
        heroes = s.scalars(select(Hero).where(Hero.gen == 1)).all()
        for h in heroes:
            h.name = "renamed"
            h.level += 100
        return len(heroes)

    assert _same_as_by_hand(engine, redis_client, statement, by_hand) == 15
    with Session(engine) as s:
        assert s.count(select(Hero).where(Hero.name == "renamed")) == 15
        assert s.count(select(Hero).where(Hero.level >= 100)) == 15


def test_delete_follows_cascades_as_the_unit_of_work_does(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    def statement(s: Session) -> int:
        return s.execute(delete(Guild).where(Guild.name == "g1")).rowcount

    def by_hand(s: Session) -> int:
        g = s.scalars(select(Guild).where(Guild.name == "g1")).one()
        s.delete(g)
        return 1

    _same_as_by_hand(engine, redis_client, statement, by_hand)
    with Session(engine) as s:
        assert s.count(select(Hero)) == 20  # the 10 heroes of g1 went with it

    def statement2(s: Session) -> int:
        return s.execute(delete(Hero).where(Hero.level < 7, Hero.name == "h1")).rowcount

    def by_hand2(s: Session) -> int:
        hs = s.scalars(select(Hero).where(Hero.level < 7, Hero.name == "h1")).all()
        for h in hs:
            s.delete(h)
        return len(hs)

    assert _same_as_by_hand(engine, redis_client, statement2, by_hand2) == 2


def test_the_session_sees_what_a_statement_did(engine: redmap.Engine) -> None:
    _seed(engine)
    with Session(engine) as s:
        g0 = s.scalars(select(Guild).where(Guild.name == "g0")).one()
        heroes = list(g0.heroes)
        assert len(heroes) == 10
        r = s.execute(update(Hero).where(Hero.gen == 0).values(level=Hero.level + 1000))
        assert r.rowcount == 15
        assert all(h.level >= 1000 for h in heroes if h.gen == 0)
        assert all(h.level < 1000 for h in heroes if h.gen == 1)
        assert not s.dirty
        doomed = [h for h in heroes if h.level >= 1000]
        r = s.execute(delete(Hero).where(Hero.level >= 1000))
        assert r.rowcount == 15
        assert all(h not in s for h in doomed)
        assert len(g0.heroes) == 5  # the loaded collection was expired and reloads
        # A pending change is flushed before the statement runs.
        heroes[1].name = "pending"
        s.execute(update(Hero).where(Hero.name == "pending").values(gen=7))
        assert heroes[1].gen == 7 and not s.dirty


def test_a_refused_statement_writes_nothing_and_leaves_the_session(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    _seed(engine)
    with Session(engine) as s:
        hero = s.scalars(select(Hero).where(Hero.email == "h3@x")).one()
        before = dump_keys(redis_client)
        with pytest.raises(IntegrityError):
            # Two objects cannot both take one unique value.
            s.execute(update(Hero).where(Hero.gen == 1).values(email="same@x"))
        assert dump_keys(redis_client) == before
        assert hero.email == "h3@x" and not s.dirty and hero in s

        # A matched object changed by another client before the flush: StaleDataError.
        victim = f"{{st}}:hero:{s.scalars(select(Hero).where(Hero.gen == 1)).all()[3].id}"

        def interfere(commands: Any) -> None:
            if any(c[0] in ("EVALSHA", "HSET") for c in commands):  # the flush
                engine.remove_listener(interfere)
                redis_client.hincrby(victim, "#v", 1)

        engine.add_listener(interfere)
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError):
            s.execute(update(Hero).where(Hero.gen == 1).values(level=0))
        after = dump_keys(redis_client)
        assert {k: v for k, v in after.items() if k != victim.encode()} == {
            k: v for k, v in before.items() if k != victim.encode()
        }
    attempts = 0

    def retry(s: Session) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            engine.add_listener(interfere)
        return s.execute(update(Hero).where(Hero.gen == 1).values(level=0)).rowcount

    assert run_in_transaction(retry, lambda: Session(engine)) == 15 and attempts == 2


def test_bad_statements_are_refused_before_any_round_trip(engine: redmap.Engine) -> None:
    with pytest.raises(InvalidRequestError, match="not a field"):
        update(Hero).values(nope=1)
    with pytest.raises(InvalidRequestError, match="relationship"):
        update(Hero).values(guild=None)
    with pytest.raises(InvalidRequestError, match="primary key"):
        update(Hero).values(id=3)
    with pytest.raises(InvalidRequestError, match="adds to the field"):
        update(Hero).values(level=Hero.gen + 1)


@pytest.mark.parametrize("n", [10, 1000])
def test_delete_by_key_costs_constant_round_trips(
    engine: redmap.Engine, redis_client: redis.Redis, n: int
) -> None:
    with Session(engine) as s:
        s.add_all([Hero(name="k", email=f"k{i}@x") for i in range(n)])
        s.commit()
    with Session(engine) as s, count_round_trips(engine) as rt:
        r = s.execute(delete(Hero).where(Hero.id.in_(range(1, n + 1))))
    assert r.rowcount == n
    assert rt.round_trips <= 4, rt.command_names[:20]
    assert redis_client.zcard("{st}:hero:#all") == 0
    assert not redis_client.keys("{st}:hero:#uq:*")


def test_nothing_matched_writes_nothing(engine: redmap.Engine) -> None:
    _seed(engine)
    with Session(engine) as s, count_round_trips(engine) as rt:
        assert s.execute(update(Hero).where(Hero.name == "nobody").values(level=1)).rowcount == 0
    assert rt.round_trips == 1  # the query only: no flush
    assert not {"EVALSHA", "HSET", "WATCH"} & set(rt.command_names)


def test_async_statements_and_replace_all(redis_url: str, engine: redmap.Engine) -> None:
    _seed(engine)

    async def main() -> tuple[int, int, int]:
        aengine = create_async_engine(redis_url)
        try:
            async with AsyncSession(aengine) as s:
                up = await s.execute(update(Hero).where(Hero.gen == 1).values(level=5))
                gone = await s.execute(delete(Hero).where(Hero.gen == 0))
                await s.replace_all(Guild, [Guild(name="only", id=1)])
                await s.commit()
                return up.rowcount, gone.rowcount, await s.count(select(Guild))
        finally:
            await aengine.dispose()

    assert asyncio.run(main()) == (15, 15, 1)


# -- replace_all ---------------------------------------------------------------------------


def test_replace_all_deletes_updates_and_inserts_in_one_flush(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    with Session(engine) as s:
        s.add_all([Hero(name=f"r{i}", email=f"r{i}@x", id=i) for i in range(1, 6)])
        s.commit()
    with Session(engine) as s:
        s.replace_all(
            Hero,
            [
                Hero(name="r2", email="r2@x", id=2),  # unchanged: nothing written
                Hero(name="r3", email="new3@x", level=9, id=3),
                Hero(name="r9", email="r9@x", id=9),
            ],
        )
        with count_round_trips(engine) as rt:
            s.commit()
        assert rt.round_trips <= 2
        written = [c for c in rt.commands if c[0] == "EVALSHA" or c[0] == "HSET"]
        assert written
        assert sorted((h.id, h.email, h.level) for h in s.scalars(select(Hero))) == [
            (2, "r2@x", 1),
            (3, "new3@x", 9),
            (9, "r9@x", 1),
        ]
    assert redis_client.get("{st}:hero:#uq:email:r1%40x") is None  # "@" is escaped
    assert redis_client.get("{st}:hero:#uq:email:new3%40x") == b"3"


def test_replace_all_refuses_if_the_stored_set_changed(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    with Session(engine) as s:
        s.add_all([Hero(name="r", email=f"r{i}@x", id=i) for i in range(1, 4)])
        s.commit()
    with Session(engine) as s:
        s.replace_all(Hero, [Hero(name="r", email="r1@x", id=1)])
        with Session(engine) as other:
            other.add(Hero(name="late", email="late@x", id=7))
            other.commit()
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError, match="the stored Hero objects"):
            s.commit()
        assert dump_keys(redis_client) == before


READER = textwrap.dedent(
    """
    import sys, redis
    r = redis.Redis.from_url(sys.argv[1])
    seen = set()
    while not r.exists("{st}:test-stop"):
        p = r.pipeline(transaction=True)
        p.zcard("{st}:hero:#all")
        p.scard("{st}:hero:#ix:gen:1")
        p.scard("{st}:hero:#ix:gen:2")
        seen.add(tuple(p.execute()))
    print(repr(sorted(seen)))
    """
)


@pytest.mark.parametrize(
    "n", [10_000, pytest.param(100_000, marks=pytest.mark.soak)], ids=["10k", "100k"]
)
def test_replace_all_is_seen_whole_by_a_reader(
    engine: redmap.Engine, redis_url: str, redis_client: redis.Redis, n: int
) -> None:
    """The "reset the cache" job: n objects replaced by n others (half of the keys
    shared, so n/2 updates, n/2 deletes and n/2 inserts) while another process keeps
    reading the set in MULTI: it sees the old set or the new one, never a mix. (100,000
    objects under `-m soak`: about 15 s.)"""
    with Session(engine) as s:
        s.add_all([Hero(name="old", email=f"a{i}", gen=1, id=i) for i in range(n)])
        s.commit()
    reader = subprocess.Popen([sys.executable, "-c", READER, redis_url], stdout=subprocess.PIPE)
    try:
        time.sleep(0.5)
        started = time.perf_counter()
        with Session(engine) as s:
            new = [Hero(name="new", email=f"b{i}", gen=2, id=i) for i in range(n // 2, n * 3 // 2)]
            s.replace_all(Hero, new)
            s.commit()
        took = time.perf_counter() - started
        time.sleep(0.3)
    finally:
        redis_client.set("{st}:test-stop", 1)
        out = reader.communicate(timeout=60)[0]
    seen = set(ast.literal_eval(out.decode()))
    print(f"\nreplace_all of {n:,} objects: {took:.1f} s; the reader saw {sorted(seen)}")
    assert seen == {(n, n, 0), (n, 0, n)}
    with Session(engine) as s:
        assert s.count(select(Hero).where(Hero.gen == 2)) == n
        assert s.count(select(Hero)) == n


def test_replace_all_of_a_corrupt_id_zset_is_a_redmap_error(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """A refused read names the key in a `redmap.exc` error, not redis-py's."""
    redis_client.set("{st}:hero:#all", "not a zset")
    with Session(engine) as s, pytest.raises(RedmapError, match=r"\{st\}:hero:#all"):
        s.replace_all(Hero, [])
