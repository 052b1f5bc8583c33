"""Issue 15: the sweep removes many-to-many links to objects under another hash tag.

`Club` (unsharded, hash tag `{xl}`) and `Player` (sharded by id, `{xl|0}` to `{xl|3}`)
are linked both ways (`Club.members` / `Player.clubs`) and one way (`Club.fans`, whose
far side is Player's hidden link). Purging a gone object of either side removes its id
from the other side's link zsets, whatever their hash tag: the sweep script purges
what lives under the object's own tag and reports the links under other tags; a second
step removes those and ends the object (`sweep.finish_steps`). Runs on the sync and
asyncio drivers and the scripted flush (`driver`), and on a 3-node cluster (`sengine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import ExpiresAt, Indexed, PrimaryKey, Session, registry, relationship, select
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import IntegrityError
from redmap.orm import sweep
from redmap.orm.mapper import mapper_of
from tests._clock import T0, Clock

reg = registry(prefix="xl", shards=4)


@reg.mapped
@dataclass
class Club:
    name: Annotated[str, Indexed()]
    members: list[Player] = relationship(secondary="club_players", back_populates="clubs")
    fans: list[Player] = relationship(secondary="club_fans")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Player:
    __shard_key__ = "id"
    name: str
    clubs: list[Club] = relationship(secondary="club_players", back_populates="members")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


def _raw(engine: Engine) -> Any:
    return engine.dialect.client


def _keys(engine: Engine) -> list[bytes]:
    """Every key but flush tokens and id counters, sorted."""
    keys = _raw(engine).keys("*")
    return sorted(k for k in keys if b"#flush:" not in k and not k.endswith(b"#seq"))


def _audit_clean(engine: Engine) -> None:
    report = audit(_raw(engine), reg)
    assert report.ok, report.mismatches + report.unexplained
    assert report.broken_references == []


def _player_links(engine: Engine, pk: int, name: str = "clubs") -> set[bytes]:
    key = mapper_of(Player).keys_for_pk(pk).relation(name, str(pk))
    return set(_raw(engine).zrange(key, 0, -1))


def _club_links(engine: Engine, pk: int, name: str = "members") -> set[bytes]:
    return set(_raw(engine).zrange(mapper_of(Club).keys.relation(name, str(pk)), 0, -1))


def _seed(
    engine: Engine, clock: Clock, *, club_expires: float | None, player_expires: float | None
) -> None:
    """Clubs 1 (expiring at `club_expires`) and 2; players 1 to 4 (player 1 expiring at
    `player_expires`), each a member of both clubs and a fan of club 1."""
    with Session(engine) as s:
        c1 = Club(name="c1", expires=None if club_expires is None else clock.at(club_expires))
        c2 = Club(name="c2")
        for i in range(1, 5):
            when = player_expires if i == 1 else None
            p = Player(name=f"p{i}", id=i, expires=None if when is None else clock.at(when))
            c1.members.append(p)
            c2.members.append(p)
            c1.fans.append(p)
        s.add_all([c1, c2])
        s.commit()


@pytest.mark.usefixtures("driver")
class TestOneServer:
    def test_gone_club_leaves_no_link_on_the_players_shards(
        self, engine: Engine, clock: Clock
    ) -> None:
        """A club purged by the sweep is no longer listed by its players (all four
        shards), through the two-sided and the one-sided relationship; audit is clean."""
        _seed(engine, clock, club_expires=10, player_expires=None)
        clock.now = T0 + 11
        assert engine.sweep(reg) == 1
        for i in range(1, 5):
            assert _player_links(engine, i) == {b"2"}
            assert _player_links(engine, i, "~club.fans") == set()
        assert _club_links(engine, 2) == {b"1", b"2", b"3", b"4"}
        _audit_clean(engine)
        club_keys = [k for k in _keys(engine) if k.startswith(b"{xl}:club:")]
        assert club_keys == [
            b"{xl}:club:#all", b"{xl}:club:#ix:name:c2", b"{xl}:club:#rel:members:2",
            b"{xl}:club:2",
        ]  # fmt: skip
        with Session(engine) as s:
            p = s.get(Player, 3)
            assert p is not None and [c.name for c in p.clubs] == ["c2"]

    def test_gone_player_leaves_no_link_on_the_clubs_tag(
        self, engine: Engine, clock: Clock
    ) -> None:
        """The reverse: a sharded player purged by the sweep is no longer listed by the
        clubs (another hash tag), in either relationship."""
        _seed(engine, clock, club_expires=None, player_expires=10)
        clock.now = T0 + 11
        assert engine.sweep(reg) == 1
        for c in (1, 2):
            assert _club_links(engine, c) == {b"2", b"3", b"4"}
        assert _club_links(engine, 1, "fans") == {b"2", b"3", b"4"}
        _audit_clean(engine)
        with Session(engine) as s:
            club = s.scalars(select(Club).where(Club.name == "c1")).one()
            assert sorted(p.name for p in club.fans) == ["p2", "p3", "p4"]

    def test_a_flush_purges_on_the_side_and_the_sweep_ends_it(
        self, engine: Engine, clock: Clock
    ) -> None:
        """A flush's bounded sweep purges the gone club under its own tag and leaves it
        waiting (`-inf` in `#dl`) for the far links, which it cannot write in its MULTI:
        the club stays gone for reads, its id cannot be inserted again, and a later
        flush's bounded sweep passes over it; `engine.sweep` then ends it."""
        _seed(engine, clock, club_expires=10, player_expires=None)
        clock.now = T0 + 11
        with Session(engine) as s:
            s.add(Club(name="c3"))  # rides a bounded sweep of Club
            s.commit()
        dl = mapper_of(Club).keys.deadlines()
        assert _raw(engine).zscore(dl, "1") == float("-inf")
        assert not _raw(engine).exists(mapper_of(Club).keys.object("1"))
        assert _player_links(engine, 2) == {b"1", b"2"}  # far side: not yet
        with Session(engine) as s:
            assert s.get(Club, 1) is None
            assert s.count(select(Club)) == 2
            assert s.count(select(Club).where(Club.name == "c1")) == 0
            p = s.get(Player, 2)
            assert p is not None and sorted(c.name for c in p.clubs) == ["c2"]
            s.add(Club(name="again", id=1))
            with pytest.raises(IntegrityError):
                s.commit()
            s.rollback()
            s.add(Club(name="c4"))
            s.commit()
        assert _raw(engine).zscore(dl, "1") == float("-inf")
        assert engine.sweep(reg) == 0  # purged already: only its far links were left
        for i in range(1, 5):
            assert _player_links(engine, i) == {b"2"}
            assert _player_links(engine, i, "~club.fans") == set()
        assert _raw(engine).zcard(dl) == 0
        _audit_clean(engine)

    def test_interrupted_between_the_steps(self, engine: Engine, clock: Clock) -> None:
        """A sweep stopped after its first step (the purge under the object's own tag)
        leaves the objects waiting; the next sweep finds them through `#dl` and removes
        what is left; running the second step twice changes nothing."""
        _seed(engine, clock, club_expires=10, player_expires=20)
        clock.now = T0 + 21
        mappers = [mapper_of(Club), mapper_of(Player)]
        steps = sweep.sweep_steps(mappers, one_server=True)
        first = next(steps)
        replies = engine.execute(first.commands)
        finish = steps.send(replies)  # the second step's request: never sent
        steps.close()
        assert _raw(engine).zscore(mapper_of(Club).keys.deadlines(), "1") == float("-inf")
        assert _player_links(engine, 3) == {b"1", b"2"}
        assert not _audit_clean_quietly(engine)
        engine.execute(finish.commands)
        engine.execute(finish.commands)  # again: the ids ended already, nothing happens
        assert engine.sweep(reg) == 0
        for i in range(2, 5):
            assert _player_links(engine, i) == {b"2"}
        assert _club_links(engine, 2) == {b"2", b"3", b"4"}
        _audit_clean(engine)


    def test_a_late_second_step_changes_nothing(self, engine: Engine, clock: Clock) -> None:
        """Two sweeps: the first stops after its first step; the second ends the club,
        whose id is then inserted again with links of its own. The first sweep's second
        step, arriving late, finds the id no longer waiting and removes nothing."""
        _seed(engine, clock, club_expires=10, player_expires=None)
        clock.now = T0 + 11
        steps = sweep.sweep_steps([mapper_of(Club)], one_server=True)
        first = next(steps)
        late = steps.send(engine.execute(first.commands))
        steps.close()
        assert engine.sweep(reg) == 0  # the other sweep ends the waiting club
        with Session(engine) as s:
            club = Club(name="again", id=1)
            club.members.extend([p for p in s.get_many(Player, [2, 3]) if p is not None])
            s.add(club)
            s.commit()
        assert engine.execute(late.commands) == [0]
        assert _player_links(engine, 2) == {b"1", b"2"}
        assert _club_links(engine, 1) == {b"2", b"3"}
        _audit_clean(engine)


def _audit_clean_quietly(engine: Engine) -> bool:
    report = audit(_raw(engine), reg)
    return report.ok and not report.broken_references


def _link(client: Any, club: int, player: int, rel: str = "members") -> None:
    """Write both sides of a link as a flush on one server does (a flush on a cluster
    refuses a link spanning two hash tags, so on a cluster such links come from data
    written elsewhere, e.g. on one server before moving to a cluster)."""
    far = {"members": "clubs", "fans": "~club.fans"}[rel]
    client.zadd(mapper_of(Club).keys.relation(rel, str(club)), {str(player): player})
    client.zadd(mapper_of(Player).keys_for_pk(player).relation(far, str(player)), {str(club): club})


def test_both_directions_on_a_cluster(sengine: redmap.Engine, clock: Clock) -> None:
    """On one server and on a 3-node cluster (where a script cannot write another slot:
    the far entries are removed by plain commands before the second step ends the ids),
    gone clubs and gone players leave no link on the other side, also when a flush's
    bounded sweep took the first step."""
    with Session(sengine) as s:
        s.add_all([Club(name="c1", expires=clock.at(10)), Club(name="c2")])
        s.commit()
    for i in range(1, 9):
        with Session(sengine) as s:  # one flush per shard (hash tag)
            s.add(Player(name=f"p{i}", id=i, expires=clock.at(10) if i % 4 == 1 else None))
            s.commit()
    client = _raw(sengine)
    for i in range(1, 9):
        _link(client, 1, i)
        _link(client, 2, i)
        _link(client, 1, i, "fans")
    _audit_clean(sengine)
    clock.now = T0 + 11
    for name in ("c3", "c4"):  # their bounded sweeps purge club 1 under {xl}: waiting
        # (two flushes: the first may find the script unknown to this node, NOSCRIPT,
        # which a bounded sweep ignores, and makes the next one send the body)
        with Session(sengine) as s:
            s.add(Club(name=name))
            s.commit()
    assert client.zscore(mapper_of(Club).keys.deadlines(), "1") == float("-inf")
    assert sengine.sweep(reg) == 2  # players 1 and 5; club 1 only had links left
    for i in range(1, 9):
        expected = set() if i % 4 == 1 else {b"2"}
        assert _player_links(sengine, i) == expected
        assert _player_links(sengine, i, "~club.fans") == set()
    assert _club_links(sengine, 2) == {str(i).encode() for i in (2, 3, 4, 6, 7, 8)}
    _audit_clean(sengine)
    with Session(sengine) as s:
        assert s.count(select(Club)) == 3
        p = s.get(Player, 6)
        assert p is not None and [c.name for c in p.clubs] == ["c2"]


def test_asyncio_sweep(clean_redis: None, redis_url: str, clock: Clock) -> None:
    """`AsyncEngine.sweep` takes the same two steps."""
    import asyncio

    from redmap.asyncio import AsyncSession, create_async_engine

    client = redis.Redis.from_url(redis_url)

    async def main() -> None:
        engine = create_async_engine(redis_url)
        try:
            async with AsyncSession(engine) as s:
                club = Club(name="c1", expires=clock.at(10))
                club.members.extend(Player(name=f"p{i}", id=i) for i in range(1, 4))
                s.add(club)
                await s.commit()
            clock.now = T0 + 11
            assert await engine.sweep(reg) == 1
        finally:
            await engine.dispose()

    try:
        asyncio.run(main())
        for i in range(1, 4):
            key = mapper_of(Player).keys_for_pk(i).relation("clubs", str(i))
            assert client.zcard(key) == 0
        report = audit(client, reg)
        assert report.ok and not report.broken_references, report
    finally:
        client.close()
