"""redmap.asyncio against real servers: the API of API.md section 8, the same round trips
as the sync API, lazy loads that raise instead of blocking, and an event loop that
never sees a blocking socket call.

Each test runs its coroutine with `asyncio.run` (no pytest plugin needed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import random
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import pytest

import redmap
from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Sorted,
    Unique,
    col,
    registry,
    relationship,
    select,
)
from redmap.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
    run_in_transaction,
)
from redmap.exc import InvalidRequestError, NoResultFound, StaleDataError
from redmap.orm.attributes import state_of
from redmap.testing.assertions import count_round_trips

T = TypeVar("T")

areg = registry(prefix="aio")


@areg.mapped
@dataclass
class Team:
    name: Annotated[str, Indexed()]
    players: list[Player] = relationship(back_populates="team", cascade="all, delete-orphan")
    fans: list[Fan] = relationship(back_populates="team", lazy="selectin")
    id: Annotated[int | None, PrimaryKey()] = None


@areg.mapped
@dataclass
class Player:
    name: str
    email: Annotated[str, Unique()]
    score: Annotated[int, Sorted()] = 0
    team_id: Annotated[int | None, ForeignKey("Team")] = None
    team: Team | None = relationship(back_populates="players")
    id: Annotated[int | None, PrimaryKey()] = None


@areg.mapped
@dataclass
class Fan:
    name: str
    team_id: Annotated[int | None, ForeignKey("Team")] = None
    team: Team | None = relationship(back_populates="fans")
    id: Annotated[int | None, PrimaryKey()] = None


@pytest.fixture(params=["standalone", "cluster"])
def aengine_url(request: pytest.FixtureRequest) -> str:
    """The URL of an emptied standalone server, then of an emptied 3-node cluster."""
    if request.param == "standalone":
        request.getfixturevalue("clean_redis")
        url: str = request.getfixturevalue("redis_url")
        return url
    request.getfixturevalue("cluster_client")
    cluster_url: str = request.getfixturevalue("cluster").url
    return cluster_url


def arun(fn: Callable[[AsyncEngine], Awaitable[T]], url: str) -> T:
    """Run `fn(engine)` on a fresh event loop with a fresh engine, disposed after."""

    async def main() -> T:
        engine = create_async_engine(url)
        try:
            return await fn(engine)
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _players(n: int, domain: str = "x") -> list[Player]:
    return [Player(name=f"p{i}", email=f"p{i}@{domain}", score=i) for i in range(n)]


class TestAPI:
    def test_section_8_walkthrough(self, aengine_url: str) -> None:
        async def fn(engine: AsyncEngine) -> None:
            async with AsyncSession(engine) as s:
                team = Team(name="reds")
                team.players.extend(_players(3))
                s.add(team)
                await s.commit()
                assert team.id is not None
                assert team.players[0].name == "p0"  # expire_on_commit=False by default
            async with AsyncSession(engine) as s:
                got = await s.get(Team, team.id)
                assert got is not None and got.name == "reds"
                many = await s.get_many(Player, [p.id for p in team.players] + [999])
                assert [p.name if p else None for p in many] == ["p0", "p1", "p2", None]
                rows = (await s.scalars(select(Player).where(col(Player.score) >= 1))).all()
                assert sorted(p.name for p in rows) == ["p1", "p2"]
                assert await s.count(select(Player)) == 3
                await s.refresh(got, ["players"])
                assert sorted(p.name for p in got.players) == ["p0", "p1", "p2"]
                assert (await s.get_one(Player, many[0].id if many[0] else 0)).name == "p0"
                with pytest.raises(NoResultFound):
                    await s.get_one(Player, 12345)
                await s.delete(got)
                await s.flush()
                await s.rollback()
            async with AsyncSession(engine) as s:
                assert await s.get(Team, team.id) is None  # the flush was applied
                assert await s.count(select(Player)) == 0  # delete-orphan cascade

        arun(fn, aengine_url)

    def test_sessionmaker_begin_commits_and_rolls_back(self, aengine_url: str) -> None:
        async def fn(engine: AsyncEngine) -> None:
            factory = async_sessionmaker(engine)
            async with factory.begin() as s:
                s.add(Player(name="a", email="a@x"))
            with pytest.raises(RuntimeError):
                async with factory.begin() as s:
                    s.add(Player(name="b", email="b@x"))
                    raise RuntimeError("boom")
            async with factory() as s:
                names = sorted(p.name for p in (await s.scalars(select(Player))).all())
                assert names == ["a"]

        arun(fn, aengine_url)

    def test_update_stale_and_run_in_transaction(self, aengine_url: str) -> None:
        async def fn(engine: AsyncEngine) -> None:
            factory = async_sessionmaker(engine)
            async with factory.begin() as s:
                p = Player(name="a", email="a@x")
                s.add(p)
            pid = p.id
            async with factory() as s1, factory() as s2:
                a = await s1.get(Player, pid)
                b = await s2.get(Player, pid)
                assert a is not None and b is not None
                a.score = 1
                b.score = 2
                await s1.commit()
                with pytest.raises(StaleDataError):
                    await s2.commit()

            async def bump(s: AsyncSession) -> int:
                obj = await s.get_one(Player, pid)
                obj.score += 10
                await asyncio.sleep(0)  # let the other tasks interleave
                return obj.score

            await asyncio.gather(
                *(run_in_transaction(bump, session_factory=factory) for _ in range(20))
            )
            async with factory() as s:
                assert (await s.get_one(Player, pid)).score == 1 + 200

        arun(fn, aengine_url)

    def test_round_trips_equal_the_sync_api(self, aengine_url: str) -> None:
        """The same work costs the same round trips on both drivers."""
        sync_engine = redmap.create_engine(aengine_url)

        def sync_work() -> list[int]:
            counts = []
            with redmap.Session(sync_engine) as s:
                with count_round_trips(sync_engine) as c:
                    s.add_all(_players(5))
                    s.commit()
                counts.append(c.round_trips)
                ids = [p.id for p in s.new] or list(range(1, 6))
            with redmap.Session(sync_engine, expire_on_commit=False) as s:
                with count_round_trips(sync_engine) as c:
                    objs = s.get_many(Player, ids)
                counts.append(c.round_trips)
                with count_round_trips(sync_engine) as c:
                    for o in objs:
                        assert o is not None
                        o.score += 1
                    s.commit()
                counts.append(c.round_trips)
                with count_round_trips(sync_engine) as c:
                    s.scalars(select(Player).where(col(Player.score) >= 2)).all()
                counts.append(c.round_trips)
                for o in objs:
                    s.delete(o)  # the async half starts from an empty model
                s.commit()
            return counts

        async def async_work(engine: AsyncEngine) -> list[int]:
            counts = []
            async with AsyncSession(engine) as s:
                with count_round_trips(engine) as c:
                    s.add_all(_players(5, "async"))
                    await s.commit()
                counts.append(c.round_trips)
            ids = list(range(6, 11))  # the counter goes on after the sync half
            async with AsyncSession(engine) as s:
                with count_round_trips(engine) as c:
                    objs = await s.get_many(Player, ids)
                counts.append(c.round_trips)
                with count_round_trips(engine) as c:
                    for o in objs:
                        assert o is not None
                        o.score += 1
                    await s.commit()
                counts.append(c.round_trips)
                with count_round_trips(engine) as c:
                    (await s.scalars(select(Player).where(col(Player.score) >= 2))).all()
                counts.append(c.round_trips)
            return counts

        try:
            expected = sync_work()
        finally:
            sync_engine.dispose()
        assert expected == [3, 1, 2, 1]
        assert arun(async_work, aengine_url) == expected


class TestLazyLoadsRaise:
    def test_unloaded_relationship_and_expired_attribute_raise(self, aengine_url: str) -> None:
        async def fn(engine: AsyncEngine) -> None:
            async with AsyncSession(engine) as s:
                team = Team(name="reds", players=_players(2), fans=[Fan(name="f")])
                s.add(team)
                await s.commit()
                tid = team.id
            async with AsyncSession(engine) as s:
                t = await s.get_one(Team, tid)
                assert [f.name for f in t.fans] == ["f"]  # lazy="selectin": loaded by get
                with pytest.raises(InvalidRequestError, match=r"Team\.players .*refresh"):
                    _ = t.players
                await s.refresh(t, ["players"])
                assert len(t.players) == 2
                s.expire(t)
                with pytest.raises(InvalidRequestError, match=r"Team\.name .*await session"):
                    _ = t.name
                await s.refresh(t, ["name", "players"])
                assert t.name == "reds"
                # A many-to-one whose target is in the session needs no I/O.
                p = t.players[0]
                assert p.team is t

        arun(fn, aengine_url)

    def test_the_wrapped_session_refuses_blocking_calls(self, redis_url: str) -> None:
        async def fn(engine: AsyncEngine) -> None:
            s = AsyncSession(engine)
            with pytest.raises(InvalidRequestError, match="AsyncSession"):
                s.sync_session.get(Player, 1)
            with pytest.raises(InvalidRequestError, match="AsyncSession"):
                _ = s.sync_session.bind

        arun(fn, redis_url)


class _BlockingSocketCall(OSError):
    """Raised by the guard (an OSError, so the client reports it as a connection error)."""


@contextlib.contextmanager
def no_blocking_sockets() -> Iterator[None]:
    """Make every blocking socket call made on this (the event loop's) thread fail.

    asyncio's sockets are non-blocking (timeout 0.0); a sync redis-py call would use a
    blocking one. Calls from other threads (an embedded server started by to_thread) are
    allowed.
    """
    loop_thread = threading.get_ident()
    originals: dict[str, Any] = {}

    def guard(name: str) -> Any:
        original = getattr(socket.socket, name)
        originals[name] = original

        def wrapper(self: socket.socket, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread and self.gettimeout() != 0.0:
                raise _BlockingSocketCall(f"blocking socket.{name} on the event loop")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("connect", "recv", "recv_into", "send", "sendall"):
        setattr(socket.socket, name, guard(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(socket.socket, name, original)


class TestNeverBlocks:
    def test_a_whole_workload_without_a_blocking_call_or_slow_callback(
        self, aengine_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def work(engine: AsyncEngine) -> None:
            loop = asyncio.get_running_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = 0.25
            async with AsyncSession(engine) as s:
                teams = [Team(name=f"t{i}", players=_players(0)) for i in range(5)]
                for i, t in enumerate(teams):
                    t.players.extend(
                        Player(name=f"p{i}.{j}", email=f"{i}.{j}@x", score=j) for j in range(20)
                    )
                s.add_all(teams)
                await s.commit()
            async with AsyncSession(engine) as s:
                got = await s.get_many(Team, [t.id for t in teams])
                for team in got:
                    assert team is not None
                    await s.refresh(team, ["players"])
                    for p in team.players:
                        p.score += 1
                await s.commit()
                top = await s.scalars(
                    select(Player).where(col(Player.score) >= 19).order_by(col(Player.score))
                )
                assert len(top.all()) == 10
                for team in got:
                    assert team is not None
                    await s.delete(team)
                await s.commit()
                assert await s.count(select(Player)) == 0

        # A blocking call is caught two ways: the socket guard refuses it outright, and
        # asyncio's debug mode reports any step that held the loop for 0.25 s. The second
        # is a wall-clock measure, so a garbage collection late in a long suite or a CI
        # machine's scheduler can trip it without any blocking call (CI once saw 0.488 s
        # inside redis-py's own ClusterNode.execute_pipeline). The collector is paused for
        # the workload, and a slow step must repeat: a blocking call in redmap blocks on
        # every run, a stall of the machine does not. Each run leaves Redis empty.
        caplog.set_level("WARNING", logger="asyncio")
        runs: list[list[str]] = []
        for _ in range(3):
            caplog.clear()
            gc.collect()
            gc.disable()
            try:
                with no_blocking_sockets():
                    arun(work, aengine_url)
            finally:
                gc.enable()
            runs.append([r.getMessage() for r in caplog.records if "took" in r.getMessage()])
            if not runs[-1]:
                break
        assert runs[-1] == [], runs

    def test_the_guard_catches_a_blocking_call(self, redis_url: str, clean_redis: None) -> None:
        """The guard is real: the sync API on the loop thread trips it."""
        engine = redmap.create_engine(redis_url)
        try:
            with (
                no_blocking_sockets(),
                pytest.raises(redmap.exc.RedmapError, match="blocking socket"),
                redmap.Session(engine) as s,
            ):
                s.get(Player, 1)
        finally:
            engine.dispose()


class TestCancellation:
    """A commit cancelled at a random moment is applied once or not at all, and the
    session says which (issue 13: cancellation is a lost reply)."""

    @pytest.mark.parametrize("commits", [2000])
    def test_commits_cancelled_at_random_moments(self, redis_url: str, commits: int) -> None:
        async def fn(engine: AsyncEngine) -> dict[str, int]:
            rng = random.Random(1313)
            async with AsyncSession(engine) as s:
                p = Player(name="c", email="c@x")
                s.add(p)
                await s.commit()
                pid = p.id
            score = fans = 0  # what Redis holds
            seen: collections.Counter[str] = collections.Counter()
            for i in range(commits):
                s = AsyncSession(engine)
                obj = await s.get_one(Player, pid)
                obj.score += 1
                fan = Fan(name=f"f{i}")
                s.add(fan)
                task = asyncio.create_task(s.commit())
                for _ in range(rng.randint(0, 40)):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    await task
                    cancelled = False
                except asyncio.CancelledError:
                    cancelled = True
                async with AsyncSession(engine) as check:
                    held = (await check.get_one(Player, pid)).score
                    held_fans = await check.count(select(Fan))
                applied = held == score + 1
                assert held in (score, score + 1), "applied twice"
                assert held_fans == fans + (1 if applied else 0), "applied in part"
                doubt = state_of(obj).in_doubt  # type: ignore[union-attr]
                if doubt:
                    seen["in doubt"] += 1
                    await s.rollback()
                elif applied:
                    seen["applied" + (" then cancelled" if cancelled else "")] += 1
                    assert not s.is_modified(obj) and fan in s and fan.id is not None
                else:
                    assert cancelled
                    seen["not applied"] += 1
                    # The session is as before the commit: the change is still pending,
                    # and committing again applies it exactly once.
                    assert s.is_modified(obj) and fan in s.new
                    await s.commit()
                    applied = True
                    async with AsyncSession(engine) as check:
                        assert (await check.get_one(Player, pid)).score == score + 1
                if applied:
                    score, fans = score + 1, fans + 1
                else:
                    score, fans = held, held_fans
                await s.close()
            return dict(seen)

        seen = arun(fn, redis_url)
        print(seen)
        # Every kind of moment was hit: before the send, after the EXEC, and done.
        assert seen.get("not applied", 0) >= 10
        assert seen.get("applied", 0) >= 10
        assert seen.get("applied then cancelled", 0) + seen.get("in doubt", 0) >= 1


class TestEmbedded:
    def test_async_session_on_the_embedded_server(self, tmp_path: Any) -> None:
        """`create_async_engine("redis+embedded://...")` starts its server on first use in
        a worker thread (the loop thread makes no blocking socket call), and the
        AsyncSession API works on it."""
        from redmap.dialects import _server

        datadir = tmp_path / "data"
        url = "redis+embedded://" + str(datadir)

        async def fn(engine: AsyncEngine) -> list[str]:
            async with async_sessionmaker(engine).begin() as s:
                s.add_all(_players(3))
            async with AsyncSession(engine) as s:
                rows = await s.scalars(select(Player).order_by(col(Player.score)))
                return [p.name for p in rows]

        try:
            with no_blocking_sockets():
                assert arun(fn, url) == ["p0", "p1", "p2"]
        finally:
            assert _server.release_embedded(datadir.resolve())
