"""Tests for `redmap.dialects.asyncio_base` and its standalone, cluster and embedded
dialects, on real servers; and for the interruption of a flush (task cancellation,
and KeyboardInterrupt in the sync `Dialect.execute_flush`).

No pytest-asyncio: each test runs its coroutine with `asyncio.run`. The flushes come
from the sync `Session` over `LoopEngine`, a test-only `Engine` whose calls run the
async dialect on a private event loop: the same FlushJob the async session will hand
the dialect. A reply is held back deterministically by stopping a private server with
SIGSTOP inside the round-trip hook (which runs just before the send), as
tests/test_connection_regressions.py does.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import pytest
import redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.connection import Connection

import redmap
from redmap import PrimaryKey, Session, select
from redmap.dialects import _server, load, load_async
from redmap.dialects._retry import ReadRetry
from redmap.dialects.asyncio_base import AsyncDialect
from redmap.dialects.asyncio_cluster import AsyncClusterDialect
from redmap.dialects.asyncio_embedded import AsyncEmbeddedDialect
from redmap.dialects.asyncio_standalone import AsyncStandaloneDialect
from redmap.exc import (
    OutcomeUnknownError,
    RedmapConnectionError,
    StaleDataError,
)
from redmap.testing import servers
from redmap.testing.servers import ClusterProcesses
from redmap.urls import safe_url

T = TypeVar("T")

reg = redmap.registry(prefix="adl")


@reg.mapped
@dataclass
class Tally:
    value: int = 0
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Entry:
    label: Annotated[str, redmap.Indexed()]
    id: Annotated[Optional[int], PrimaryKey()] = None


TALLY = "{adl}:tally:1"
ENTRIES = "{adl}:entry:#all"
READER = "adl-reader"

Trip = Sequence[Sequence[Any]]


class LoopEngine(redmap.Engine):
    """A sync `Engine` whose I/O runs on an async dialect through a private event loop.

    Test-only: it lets the sync `Session` build real FlushJobs for
    `AsyncDialect.execute_flush`. `interrupt`, when set, is awaited next to each flush
    task with the task as argument (to cancel it at a chosen moment).
    """

    def __init__(self, url: str, **client_options: Any) -> None:
        # Not Engine.__init__, which would build the sync dialect.
        self.url = safe_url(url)
        self.echo = False
        self._listeners = []
        self.loop = asyncio.new_event_loop()
        self.dialect: Any = load_async(url)(url, hook=self._on_round_trip, **client_options)
        self.interrupt: Callable[[asyncio.Task[None]], Awaitable[None]] | None = None
        # Seconds of asyncio.timeout around each flush, or None.
        self.timeout: float | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def execute(self, commands: Sequence[Any]) -> list[Any]:
        return self._run(self.dialect.execute(commands))

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        return self._run(self.dialect.fetch_hashes(keys))

    def execute_transaction(self, commands: Sequence[Any]) -> list[Any]:
        return self._run(self.dialect.execute_transaction(commands))

    def execute_transactions(self, groups: Sequence[Sequence[Any]]) -> list[list[Any]]:
        return self._run(self.dialect.execute_transactions(groups))

    def flush(self, job: Any) -> None:
        self._run(self._flush(job))

    async def _flush(self, job: Any) -> None:
        flush = self.dialect.execute_flush(job, execute=self.dialect.execute)
        if self.timeout is not None:
            async with asyncio.timeout(self.timeout):
                await flush
            return
        task = asyncio.ensure_future(flush)
        if self.interrupt is not None:
            await self.interrupt(task)
        await task

    def dispose(self) -> None:
        self._run(self.dialect.dispose())

    def close(self) -> None:
        self.dispose()
        self.loop.close()


def _trips(engine: redmap.Engine) -> list[Trip]:
    trips: list[Trip] = []
    engine.add_listener(trips.append)
    return trips


def _shape(trips: list[Trip]) -> list[tuple[int, str]]:
    """Each round trip as (number of commands, first command's name): what must match
    between the sync and the async dialect (flush tokens are random)."""
    return [(len(t), str(t[0][0])) for t in trips]


@pytest.fixture
def own_server() -> Iterator[servers.ServerProcess]:
    """A private server this test may stop with SIGSTOP (never the shared one)."""
    server = servers.start_standalone()
    try:
        yield server
    finally:
        if server.running and server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def loop_engine(clean_redis: None, redis_url: str) -> Iterator[LoopEngine]:
    """A LoopEngine on the emptied standalone server."""
    eng = LoopEngine(redis_url)
    try:
        yield eng
    finally:
        eng.close()


def _seed_commands() -> list[tuple[Any, ...]]:
    return [
        ("HSET", "{t}h", "a", 1),
        ("ZADD", "{t}z", 1.5, "m"),
        ("HSET", "{u}h2", "b", 2),
    ]


READS: dict[str, Callable[[Any], Any]] = {
    "execute": lambda d: d.execute(
        [
            ("HGETALL", "{t}h"),
            ("ZRANGE", "{t}z", 0, -1, "WITHSCORES"),
            ("HGETALL", "{t}nope"),
            ("INCR", "{t}h"),
        ]
    ),
    "fetch_hashes": lambda d: d.fetch_hashes(["{t}h", "{t}nope", "{t}z"]),
    "execute_transaction": lambda d: d.execute_transaction(
        [("ZRANGE", "{t}z", 0, -1), ("EXISTS", "{t}h")]
    ),
    "execute_transactions": lambda d: d.execute_transactions(
        [[("ZRANGE", "{t}z", 0, -1), ("EXISTS", "{t}h")], [("EXISTS", "{u}h2"), ("HLEN", "{u}h2")]]
    ),
    "wait_until_loaded": lambda d: d.wait_until_loaded(),
}


def _same_as_sync(url: str) -> None:
    """Every read gives the sync dialect's replies with its round trips, hook call for hook
    call (error replies compared by type and text)."""
    sync_trips: list[Trip] = []
    sync = load(url)(url, hook=sync_trips.append)
    try:
        sync.execute(_seed_commands())
        sync_trips.clear()
        expected = {name: read(sync) for name, read in READS.items()}
    finally:
        sync.dispose()

    async def main() -> tuple[dict[str, Any], list[Trip]]:
        trips: list[Trip] = []
        dialect = load_async(url)(url, hook=trips.append)
        try:
            got = {name: await read(dialect) for name, read in READS.items()}
        finally:
            await dialect.dispose()
        return got, trips

    got, async_trips = asyncio.run(main())
    assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in expected.items()}
    assert async_trips == sync_trips
    fetched = got["fetch_hashes"]
    assert fetched[0] == {b"a": b"1"} and fetched[1] == {}
    assert isinstance(fetched[2], redis.ResponseError)


class TestRegistry:
    def test_schemes_load_the_async_classes(self) -> None:
        """Each scheme of `load` has its asyncio twin in `load_async`."""
        assert load_async("redis://h:1/0") is AsyncStandaloneDialect
        assert load_async("rediss://h:1/0") is AsyncStandaloneDialect
        assert load_async("unix:///tmp/x.sock") is AsyncStandaloneDialect
        assert load_async("redis+cluster://h:1,h:2") is AsyncClusterDialect
        assert load_async("redis+embedded:///tmp/x") is AsyncEmbeddedDialect
        for cls in (AsyncStandaloneDialect, AsyncClusterDialect, AsyncEmbeddedDialect):
            assert issubclass(cls, AsyncDialect)
            sync = load(
                {"standalone": "redis://h", "cluster": "redis+cluster://h:1"}.get(
                    cls.name, "redis+embedded:///tmp/x"
                )
            )
            for flag in (
                "name",
                "supports_multi_key_transactions",
                "supports_cluster",
                "supports_embedded_server",
            ):
                assert getattr(cls, flag) == getattr(sync, flag), (cls, flag)

    def test_unknown_scheme(self) -> None:
        """An unknown scheme names the known ones."""
        with pytest.raises(RedmapConnectionError, match="no dialect for URL scheme 'nope'"):
            load_async("nope://x")

    def test_creating_a_dialect_does_no_io(self, tmp_path: Path) -> None:
        """Creating any async dialect, outside any event loop and on unreachable or
        not yet existing servers, connects to nothing and starts nothing."""
        port = _server.free_port()
        calls: list[Trip] = []
        AsyncStandaloneDialect(f"redis://127.0.0.1:{port}/0", hook=calls.append)
        cluster = AsyncClusterDialect(f"redis+cluster://localhost:{port}", hook=calls.append)
        assert cluster.client is None
        datadir = tmp_path / "never"
        embedded = AsyncEmbeddedDialect("redis+embedded://" + str(datadir), hook=calls.append)
        assert embedded.client is None and not datadir.exists()
        assert calls == []


class TestStandalone:
    def test_reads_match_sync(self, clean_redis: None, redis_url: str) -> None:
        """execute, fetch_hashes, execute_transaction(s), wait_until_loaded: same replies,
        same hook calls as the sync StandaloneDialect."""
        _same_as_sync(redis_url)

    def test_empty_reads_send_nothing(self, redis_url: str) -> None:
        """No keys, no commands: no round trip and no hook call."""

        async def main() -> list[Trip]:
            trips: list[Trip] = []
            d = load_async(redis_url)(redis_url, hook=trips.append)
            assert await d.execute([]) == [] and await d.fetch_hashes([]) == []
            assert await d.execute_transactions([]) == []
            await d.dispose()
            return trips

        assert asyncio.run(main()) == []

    def test_bad_password_is_a_connection_error_without_the_password(
        self, own_server: servers.ServerProcess
    ) -> None:
        """A wrong password: RedmapConnectionError naming the URL, never the password."""
        with own_server.client() as admin:
            admin.config_set("requirepass", "s3cret")  # after start: its PING has none
        url = own_server.url.replace("redis://", "redis://:wr0ngpass@")

        async def main() -> None:
            d = load_async(url)(url, hook=lambda c: None)
            try:
                await d.execute([("PING",)])
            finally:
                await d.dispose()

        with pytest.raises(RedmapConnectionError, match="authentication failed") as info:
            asyncio.run(main())
        assert "wr0ngpass" not in str(info.value)
        assert info.value.url == safe_url(url)
        assert info.value.__suppress_context__

    def test_refused_server_is_a_connection_error(self) -> None:
        """Nobody listening: RedmapConnectionError after the read retries."""
        url = f"redis://127.0.0.1:{_server.free_port()}/0"

        async def main() -> None:
            d = load_async(url)(url, hook=lambda c: None)
            d.read_retry = type(d.read_retry)(retries=1)
            try:
                await d.fetch_hashes(["k"])
            finally:
                await d.dispose()

        with pytest.raises(RedmapConnectionError, match="cannot talk to Redis"):
            asyncio.run(main())

    @pytest.mark.parametrize(
        "read", ["execute", "execute_transaction", "execute_transactions", "fetch_hashes"]
    )
    @pytest.mark.parametrize("retries", [4, 0])
    def test_read_killed_mid_flight(
        self, own_server: servers.ServerProcess, read: str, retries: int
    ) -> None:
        """A read whose connection is killed (CLIENT KILL ID) after it was sent and before
        its reply is sent again (`ReadRetry.acall`): the same replies, two round trips.
        With retries off (redis-py's own too), the same kill raises RedmapConnectionError
        after one round trip: the cut is real."""
        url = own_server.url
        assert own_server.pid is not None
        pid = own_server.pid
        with own_server.client() as admin:
            for cmd in _seed_commands():
                admin.execute_command(*cmd)

        async def main() -> tuple[Any, Any, list[Trip], int]:
            before: list[Trip] = []
            d = load_async(url)(
                url, hook=before.append, client_name=READER, retry=AsyncRetry(NoBackoff(), 0)
            )
            d.read_retry = ReadRetry(retries=retries)
            try:
                first = await READS[read](d)  # opens the pooled connection
                with own_server.client(decode_responses=True) as admin:
                    ids = [c["id"] for c in admin.client_list() if c["name"] == READER]
                assert ids
                killer = Connection(host=own_server.host, port=own_server.port or 0)
                killer.connect()
                loop = asyncio.get_running_loop()

                def kill_then_resume() -> None:
                    killer.send_packed_command(
                        killer.pack_commands([("CLIENT", "KILL", "ID", i) for i in ids])
                    )
                    os.kill(pid, signal.SIGCONT)

                trips: list[Trip] = []

                def stop_once(commands: Trip) -> None:
                    trips.append(commands)
                    if len(trips) == 1:  # just before the read under test is sent
                        os.kill(pid, signal.SIGSTOP)
                        loop.call_later(0.2, kill_then_resume)

                d._hook = stop_once
                try:
                    again = await READS[read](d)
                except RedmapConnectionError as exc:
                    again = exc
                killed = [killer.read_response() for _ in ids]
                killer.disconnect()
                assert killed == [1] * len(ids)  # CLIENT KILL ID answers how many it killed
                return first, again, trips, len(before)
            finally:
                os.kill(pid, signal.SIGCONT)
                await d.dispose()

        # The kill and the server's reply race (they leave in different event-loop turns
        # of the server): when the reply was written first, the attempt shows nothing
        # either way. Cut again, up to 5 times, as tests/test_connection_regressions.py.
        # A read may take several round trips (`execute_transactions` on one server sends
        # one MULTI/EXEC per group): the cut shows as one round trip more than the
        # uncut read made (`base`), or as the error.
        for _ in range(5):
            first, again, trips, base = asyncio.run(main())
            if len(trips) > base or isinstance(again, RedmapConnectionError):
                break
        if retries:
            assert repr(again) == repr(first)
            assert len(trips) == base + 1 and trips[0] == trips[1]
        else:
            assert isinstance(again, RedmapConnectionError), again
            assert "cannot talk to Redis" in str(again) and len(trips) == 1


class TestCluster:
    pytestmark = pytest.mark.cluster

    def test_reads_match_sync(self, cluster_client: Any, cluster: ClusterProcesses) -> None:
        """execute, fetch_hashes, execute_transaction(s) (one pipeline per node),
        wait_until_loaded: same replies, same hook calls as the sync ClusterDialect."""
        _same_as_sync(cluster.url)

    def test_dispose_then_use_again(self, cluster_client: Any, cluster: ClusterProcesses) -> None:
        """After dispose the dialect learns the topology again on its next use."""

        async def main() -> list[Any]:
            d = load_async(cluster.url)(cluster.url, hook=lambda c: None)
            out = [await d.execute([("SET", "{a}k", 1)])]
            out.append(await d.execute_transactions([[("GET", "{a}k")], [("GET", "{b}k")]]))
            await d.dispose()
            out.append(await d.execute([("GET", "{a}k")]))
            await d.dispose()
            return out

        assert asyncio.run(main()) == [[True], [[b"1"], [None]], [b"1"]]


class TestEmbedded:
    def test_reads_and_flush(self, tmp_path: Path) -> None:
        """The server starts on first use (in a worker thread, once for concurrent
        first uses); reads, transactions and a flush work; dispose then release."""
        datadir = tmp_path / "data"
        url = "redis+embedded://" + str(datadir)

        async def main() -> tuple[Any, ...]:
            trips: list[Trip] = []
            d = load_async(url)(url, hook=trips.append)
            assert isinstance(d, AsyncEmbeddedDialect) and d.client is None
            # Three tasks use it at once: one server start, one client.
            await asyncio.gather(*(d.execute([("SET", f"{{t}}k{i}", i)]) for i in range(3)))
            client = d.client
            await d.execute(_seed_commands())
            out = (
                await d.fetch_hashes(["{t}h", "{t}nope"]),
                await d.execute_transactions([[("GET", "{t}k1")], [("ZCARD", "{t}z")]]),
                d.client is client,
                len(trips),
            )
            await d.dispose()
            return out

        try:
            hashes, groups, same_client, trips = asyncio.run(main())
            assert hashes == [{b"a": b"1"}, {}]
            assert groups == [[b"1"], [1]]
            assert same_client and trips == 6
            eng = LoopEngine(url)
            try:
                with Session(eng) as s:
                    s.add(Tally(value=5))
                    s.commit()
                with Session(eng) as s:
                    assert s.get(Tally, 1) == Tally(value=5, id=1)
            finally:
                eng.close()
        finally:
            assert _server.release_embedded(datadir.resolve())


# -- the flush ------------------------------------------------------------------------------


def _workload(engine: redmap.Engine) -> list[Any]:
    """Inserts (generated ids), a read, an update, a query and a delete."""
    with Session(engine) as s:
        s.add(Tally(value=1))
        s.add_all([Entry(label=f"e{i}") for i in range(3)])
        s.commit()
    with Session(engine) as s:
        got = s.get_many(Entry, [1, 2, 3, 4])
        tally = s.get(Tally, 1)
        assert tally is not None
        tally.value += 1
        s.commit()
        found = repr(s.scalars(select(Entry).where(Entry.label == "e1")).all())
        s.delete(got[0])
        s.commit()
    with Session(engine) as s:
        return [repr(s.get(Tally, 1)), repr(s.get_many(Entry, [1, 2, 3])), found]


class TestFlush:
    def test_commit_and_round_trips_match_sync(self, clean_redis: None, redis_url: str) -> None:
        """Inserts, an update, a query and a delete through the async dialect: the same
        result and the same round trips as through the sync engine."""
        sync = redmap.create_engine(redis_url)
        try:
            sync_trips = _trips(sync)
            expected = _workload(sync)
        finally:
            sync.dispose()
        with redis.Redis.from_url(redis_url) as raw:
            raw.flushall()
        eng = LoopEngine(redis_url)
        try:
            trips = _trips(eng)
            got = _workload(eng)
        finally:
            eng.close()
        assert got == expected
        assert got[0] == repr(Tally(value=2, id=1))
        assert _shape(trips) == _shape(sync_trips)

    def test_stale_update(self, loop_engine: LoopEngine) -> None:
        """Two sessions update one object: the second commit raises StaleDataError and
        writes nothing."""
        with Session(loop_engine) as s:
            s.add(Tally(value=1))
            s.commit()
        with Session(loop_engine) as a, Session(loop_engine) as b:
            x, y = a.get(Tally, 1), b.get(Tally, 1)
            assert x is not None and y is not None
            x.value, y.value = 10, 20
            a.commit()
            with pytest.raises(StaleDataError):
                b.commit()
        with Session(loop_engine) as s:
            assert s.get(Tally, 1) == Tally(value=10, id=1)

    @pytest.mark.cluster
    def test_cluster_flush(self, cluster_client: Any, cluster: ClusterProcesses) -> None:
        """The same workload on the cluster: the flush runs on the node of its slot, with
        the round trips of the sync cluster dialect; a stale update is refused."""
        sync = redmap.create_engine(cluster.url)
        try:
            sync_trips = _trips(sync)
            expected = _workload(sync)
        finally:
            sync.dispose()
        cluster_client.flushall(target_nodes=cluster_client.PRIMARIES)
        eng = LoopEngine(cluster.url)
        try:
            trips = _trips(eng)
            got = _workload(eng)
            assert got == expected
            assert _shape(trips) == _shape(sync_trips)
            with Session(eng) as a, Session(eng) as b:
                x, y = a.get(Tally, 1), b.get(Tally, 1)
                assert x is not None and y is not None
                x.value, y.value = 10, 20
                a.commit()
                with pytest.raises(StaleDataError):
                    b.commit()
        finally:
            eng.close()
        assert cluster_client.hget(TALLY, "value") == b"10"


# -- cancellation -----------------------------------------------------------------------------


def _held(raw: redis.Redis) -> tuple[int, int]:
    """(tally value, number of entries) as Redis holds them."""
    value = raw.hget(TALLY, "value")
    return int(value or 0), int(raw.zcard(ENTRIES))


def _bump(engine: LoopEngine, label: str) -> Any:
    """Commit tally+1 and one new entry; what the commit raised, or "done"."""
    with Session(engine) as s:
        tally = s.get(Tally, 1)
        assert tally is not None
        tally.value += 1
        s.add(Entry(label=label))
        try:
            s.commit()
        except asyncio.CancelledError as exc:
            return exc
    return "done"


def _start_tally(engine: redmap.Engine) -> None:
    with Session(engine) as s:
        s.add(Tally(value=0))
        s.commit()


class TestCancellation:
    @pytest.mark.parametrize("socket_timeout", [30.0, None])
    def test_cancelled_at_random_moments(
        self, clean_redis: None, redis_url: str, socket_timeout: float | None
    ) -> None:
        """300 flushes cancelled at random moments: Redis holds each whole or not at all,
        none twice, and `redmap_applied` (when not None) says which; the pool keeps no
        connection checked out and the next flush works.

        Half the cancellations come after a random time; the other half a random number
        of loop turns (or microseconds) after a random round trip began (WATCH, INCRBY
        or MULTI/EXEC). With a socket timeout (redmap's default), redis.asyncio sends
        through `asyncio.wait_for`, which on Python 3.11 swallows a cancellation landing
        while it waits if its write is done; when the server answers within that wait
        (on another core), a round trip suspends nowhere else, so most cancellations are
        swallowed and the driver takes them up before its next request (a MULTI/EXEC
        then answered `Lost` unsent: settled, nothing written) or after the last one
        (`redmap_applied=True`, not settled). Without a timeout the send does not
        suspend and cancellations land in reads: each stage (settled, refused, after
        the end) is then required to occur.
        """
        loop_engine = LoopEngine(redis_url, socket_timeout=socket_timeout)
        try:
            self._cancel_at_random(loop_engine, redis_url, strict=socket_timeout is None)
        finally:
            loop_engine.close()

    def _cancel_at_random(self, loop_engine: LoopEngine, redis_url: str, *, strict: bool) -> None:
        _start_tally(loop_engine)
        rng = random.Random(1234)
        seen: dict[str, int] = {}
        trips = _trips(loop_engine)
        anchor: list[tuple[int, float, asyncio.Task[None]]] = []

        def cancel_in(turns: float, task: asyncio.Task[None]) -> None:
            """Cancel `task` after `turns` loop turns, or after -`turns` seconds."""
            if turns < 0:
                asyncio.get_running_loop().call_later(-turns, task.cancel)
            elif turns:
                asyncio.get_running_loop().call_soon(cancel_in, turns - 1, task)
            else:
                task.cancel()

        def at_trip(commands: Trip) -> None:
            if anchor and anchor[0][0] == len(trips):
                _, turns, task = anchor.pop()
                cancel_in(turns, task)

        loop_engine.add_listener(at_trip)

        async def interrupt(task: asyncio.Task[None]) -> None:
            if rng.random() < 0.5:
                # The 1st, 2nd or 3rd round trip of the flush: WATCH, INCRBY, MULTI/EXEC;
                # then a few loop turns, or a few hundred microseconds.
                turns = rng.randrange(0, 8) if rng.random() < 0.5 else -rng.uniform(0, 3e-4)
                anchor.append((len(trips) + rng.randrange(1, 4), turns, task))
            elif rng.random() < 0.5:
                for _ in range(rng.randrange(0, 30)):
                    await asyncio.sleep(0)
                task.cancel()
            else:
                await asyncio.sleep(rng.uniform(0, 0.002))
                task.cancel()

        with redis.Redis.from_url(redis_url) as raw:
            for i in range(300):
                before, _ = _held(raw)
                trips.clear()
                anchor.clear()
                loop_engine.interrupt = interrupt
                try:
                    outcome = _bump(loop_engine, f"e{i}")
                finally:
                    loop_engine.interrupt = None
                value, entries = _held(raw)
                assert value == entries, "a flush was applied in part or twice"
                assert value in (before, before + 1)
                applied = value == before + 1
                if outcome == "done":
                    kind = "completed"
                    assert applied
                elif not hasattr(outcome, "redmap_applied"):
                    kind = "cancelled before it started"
                    assert not applied
                else:
                    flag = outcome.redmap_applied
                    settled = any(_is_settle(t) for t in trips)
                    kind = f"redmap_applied={flag}" + (", settled" if settled else "")
                    if flag is not None:
                        assert flag is applied, (i, outcome.__cause__)
                seen[kind] = seen.get(kind, 0) + 1
            print("outcomes:", seen)
            pool = loop_engine.dialect.client.connection_pool
            assert not pool._in_use_connections
            loop_engine.remove_listener(at_trip)
            assert _bump(loop_engine, "last") == "done"
            assert _held(raw)[0] == _held(raw)[1]
        assert seen.get("completed", 0) >= 1
        assert any(kind.startswith("redmap_applied") for kind in seen)
        if strict:
            # Cancelled mid-commit (then settled), before the commit, and after the end.
            assert seen.get("redmap_applied=True, settled", 0) >= 1
            assert seen.get("redmap_applied=False", 0) >= 1

    def _run_stopped(
        self,
        server: servers.ServerProcess,
        stop_at: Callable[[Trip], bool],
        schedule: list[tuple[float, str]],
    ) -> tuple[Any, tuple[int, int], tuple[int, int]]:
        """Bump the tally with the server stopped (SIGSTOP) just before the round trip
        `stop_at` picks, then run `schedule`: (delay, "cancel" | "resume") steps."""
        assert server.pid is not None
        pid = server.pid
        eng = LoopEngine(server.url)
        try:
            _start_tally(eng)
            task_box: list[asyncio.Task[None]] = []

            def hook(commands: Trip) -> None:
                if task_box and stop_at(commands):
                    task = task_box.pop()
                    os.kill(pid, signal.SIGSTOP)
                    loop = asyncio.get_running_loop()
                    for delay, what in schedule:
                        action = task.cancel if what == "cancel" else _resume(pid)
                        loop.call_later(delay, action)

            async def interrupt(task: asyncio.Task[None]) -> None:
                task_box.append(task)

            eng.add_listener(hook)
            eng.interrupt = interrupt
            with server.client() as raw:
                before = _held(raw)
                try:
                    outcome = _bump(eng, "x")
                finally:
                    os.kill(pid, signal.SIGCONT)
                return outcome, before, _held(raw)
        finally:
            eng.close()

    def test_cancelled_while_exec_reply_pending_applied(
        self, own_server: servers.ServerProcess
    ) -> None:
        """Cancelled after MULTI/EXEC was sent: the settle finds it applied; the
        CancelledError says redmap_applied=True and Redis holds the flush once."""
        outcome, before, after = self._run_stopped(
            own_server, _is_commit, [(0.05, "cancel"), (0.15, "resume")]
        )
        assert isinstance(outcome, asyncio.CancelledError)
        assert outcome.redmap_applied is True  # type: ignore[attr-defined]
        assert outcome.__cause__ is None
        assert after == (before[0] + 1, before[1] + 1)

    def test_cancelled_while_check_reply_pending_nothing_written(
        self, own_server: servers.ServerProcess
    ) -> None:
        """Cancelled during WATCH + checks: nothing was sent to commit;
        redmap_applied=False, caused by "before the flush was sent"."""
        outcome, before, after = self._run_stopped(
            own_server, _is_check, [(0.05, "cancel"), (0.15, "resume")]
        )
        assert isinstance(outcome, asyncio.CancelledError)
        assert outcome.redmap_applied is False  # type: ignore[attr-defined]
        assert isinstance(outcome.__cause__, RedmapConnectionError)
        assert "before the flush was sent" in str(outcome.__cause__)
        assert after == before

    def test_cancelled_while_ids_handed_out(self, own_server: servers.ServerProcess) -> None:
        """Cancelled during the INCRBY of generated ids (after the checks): the flush
        stops there, redmap_applied=False, nothing written."""
        outcome, before, after = self._run_stopped(
            own_server,
            lambda cmds: str(cmds[0][0]) == "INCRBY",
            [(0.05, "cancel"), (0.15, "resume")],
        )
        assert isinstance(outcome, asyncio.CancelledError)
        assert outcome.redmap_applied is False  # type: ignore[attr-defined]
        assert after == before

    def test_cancelled_again_during_settle_outcome_unknown(
        self, own_server: servers.ServerProcess
    ) -> None:
        """Cancelled after EXEC was sent and again during the settle: the outcome is
        unknown (redmap_applied=None, OutcomeUnknownError as cause)."""
        outcome, before, after = self._run_stopped(
            own_server, _is_commit, [(0.05, "cancel"), (0.15, "cancel")]
        )
        assert isinstance(outcome, asyncio.CancelledError)
        assert outcome.redmap_applied is None  # type: ignore[attr-defined]
        assert isinstance(outcome.__cause__, OutcomeUnknownError)
        # The server ran the EXEC once resumed: no second copy, no partial one.
        assert after == (before[0] + 1, before[1] + 1)

    @pytest.mark.skipif(not hasattr(asyncio, "timeout"), reason="asyncio.timeout: 3.11+")
    def test_timeout_during_commit_is_settled_first(
        self, own_server: servers.ServerProcess
    ) -> None:
        """asyncio.timeout around a flush whose EXEC reply is late: the settle runs before
        the caller gets TimeoutError, whose cause is the CancelledError carrying
        redmap_applied=True; Redis holds the flush once."""
        assert own_server.pid is not None
        pid = own_server.pid
        eng = LoopEngine(own_server.url)
        try:
            _start_tally(eng)

            def hook(commands: Trip) -> None:
                if _is_commit(commands):
                    os.kill(pid, signal.SIGSTOP)
                    asyncio.get_running_loop().call_later(0.2, _resume(pid))

            eng.add_listener(hook)
            eng.timeout = 0.05
            with own_server.client() as raw:
                before = _held(raw)
                try:
                    with Session(eng) as s:
                        tally = s.get(Tally, 1)
                        assert tally is not None
                        tally.value += 1
                        s.add(Entry(label="t"))
                        with pytest.raises(TimeoutError) as info:
                            s.commit()
                finally:
                    os.kill(pid, signal.SIGCONT)
                cancelled = info.value.__cause__
                assert isinstance(cancelled, asyncio.CancelledError)
                assert cancelled.redmap_applied is True  # type: ignore[attr-defined]
                assert _held(raw) == (before[0] + 1, before[1] + 1)
        finally:
            eng.close()

    @pytest.mark.cluster
    def test_cancelled_at_random_moments_on_cluster(
        self, cluster_client: Any, cluster: ClusterProcesses
    ) -> None:
        """100 cancelled flushes on the cluster (node connections): whole or nothing."""
        eng = LoopEngine(cluster.url)
        rng = random.Random(99)

        async def interrupt(task: asyncio.Task[None]) -> None:
            for _ in range(rng.randrange(0, 80)):
                await asyncio.sleep(0)
            task.cancel()

        try:
            _start_tally(eng)
            for i in range(100):
                before = _held(cluster_client)[0]
                eng.interrupt = interrupt
                try:
                    outcome = _bump(eng, f"e{i}")
                finally:
                    eng.interrupt = None
                value, entries = _held(cluster_client)
                assert value == entries and value in (before, before + 1)
                flag = getattr(outcome, "redmap_applied", None)
                if outcome == "done":
                    assert value == before + 1
                elif flag is not None:
                    assert flag is (value == before + 1)
            assert _bump(eng, "last") == "done"
        finally:
            eng.close()


def _is_commit(commands: Trip) -> bool:
    return tuple(commands[0]) == ("MULTI",) and tuple(commands[-1]) == ("EXEC",)


def _is_settle(commands: Trip) -> bool:
    return len(commands) == 1 and str(commands[0][0]) == "SET" and "NX" in commands[0]


def _is_check(commands: Trip) -> bool:
    return str(commands[0][0]) == "WATCH"


def _resume(pid: int) -> Callable[[], None]:
    def resume() -> None:
        os.kill(pid, signal.SIGCONT)

    return resume


# -- KeyboardInterrupt in the sync driver ----------------------------------------------------


class TestKeyboardInterrupt:
    def _bump_sync(self, engine: redmap.Engine) -> BaseException:
        with Session(engine) as s:
            tally = s.get(Tally, 1)
            assert tally is not None
            tally.value += 1
            s.add(Entry(label="k"))
            with pytest.raises(KeyboardInterrupt) as info:
                s.commit()
        return info.value

    @pytest.fixture
    def engine_with_tally(self, clean_redis: None, redis_url: str) -> Iterator[redmap.Engine]:
        """A *sync* engine whatever REDMAP_TEST_DRIVER says: these tests are of the sync
        driver's KeyboardInterrupt handling."""
        engine = redmap.create_engine(redis_url)
        _start_tally(engine)
        try:
            yield engine
        finally:
            engine.dispose()

    def test_interrupt_before_commit_is_sent(
        self, engine_with_tally: redmap.Engine, redis_url: str
    ) -> None:
        """KeyboardInterrupt from the hook of the MULTI/EXEC round trip (just before its
        send): settled as a lost reply, nothing written, redmap_applied=False."""
        fired: list[Trip] = []

        def hook(commands: Trip) -> None:
            if _is_commit(commands) and not fired:
                fired.append(commands)
                raise KeyboardInterrupt

        engine_with_tally.add_listener(hook)
        trips = _trips(engine_with_tally)
        exc = self._bump_sync(engine_with_tally)
        assert exc.redmap_applied is False  # type: ignore[attr-defined]
        assert "nothing was written" in str(exc.__cause__)
        assert str(trips[-1][0][0]) == "SET" and "NX" in trips[-1][0]  # the settle ran
        with redis.Redis.from_url(redis_url) as raw:
            assert _held(raw) == (0, 0)
        engine_with_tally.remove_listener(hook)
        with Session(engine_with_tally) as s:  # the pool was left clean
            s.add(Entry(label="after"))
            s.commit()

    def test_interrupt_after_commit_was_sent(
        self,
        engine_with_tally: redmap.Engine,
        redis_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """KeyboardInterrupt while the EXEC reply is read: the settle finds the flush
        applied; redmap_applied=True and Redis holds it once."""
        from redmap.dialects import base

        real = base.send_and_read

        def send_then_interrupt(conn: Any, commands: Sequence[Any]) -> list[Any]:
            if _is_commit(commands):
                conn.send_packed_command(base._pack(conn, commands))
                raise KeyboardInterrupt
            return real(conn, commands)

        monkeypatch.setattr(base, "send_and_read", send_then_interrupt)
        exc = self._bump_sync(engine_with_tally)
        assert exc.redmap_applied is True  # type: ignore[attr-defined]
        with redis.Redis.from_url(redis_url) as raw:
            assert _held(raw) == (1, 1)

    def test_second_interrupt_during_settle(
        self,
        engine_with_tally: redmap.Engine,
        redis_url: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A second KeyboardInterrupt during the settle: outcome unknown,
        redmap_applied=None with OutcomeUnknownError as cause."""
        from redmap.dialects import base

        real = base.send_and_read

        def send_then_interrupt(conn: Any, commands: Sequence[Any]) -> list[Any]:
            if _is_commit(commands) or str(commands[0][0]) == "SET":
                conn.send_packed_command(base._pack(conn, commands))
                raise KeyboardInterrupt
            return real(conn, commands)

        monkeypatch.setattr(base, "send_and_read", send_then_interrupt)
        exc = self._bump_sync(engine_with_tally)
        assert exc.redmap_applied is None  # type: ignore[attr-defined]
        assert isinstance(exc.__cause__, OutcomeUnknownError)
        with redis.Redis.from_url(redis_url) as raw:
            assert _held(raw) == (1, 1)
