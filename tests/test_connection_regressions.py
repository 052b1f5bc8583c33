"""Regressions of issue 11 about connections: reads cut mid-flight are sent again (item 12),
servers loading their data set are waited for (item 13), and the packer in use (item 16).

Every test runs real redis-server processes. A read is cut mid-flight deterministically:
the server is stopped (SIGSTOP) while the read is sent, a CLIENT KILL of the reader's
connection is queued behind it, and the server resumes, so the kill runs in the same
event-loop turn as the read and its reply is never written.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
from redis.connection import Connection

import redmap
from redmap.dialects._retry import ReadRetry
from redmap.dialects._server import ServerProcess
from redmap.exc import RedmapConnectionError
from redmap.testing import servers

READER = "h3-reader"

reg = redmap.registry(prefix="cut")


@reg.mapped
@dataclass
class Ticket:
    title: Annotated[str, redmap.Indexed()]
    rank: Annotated[int, redmap.Sorted()] = 0
    id: Annotated[Optional[int], redmap.PrimaryKey()] = None


@pytest.fixture
def own_server() -> Iterator[ServerProcess]:
    """A private server this test may stop with SIGSTOP (never the shared one)."""
    server = servers.start_standalone()
    try:
        yield server
    finally:
        if server.running and server.pid is not None:
            os.kill(server.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def reader(own_server: ServerProcess) -> Iterator[redmap.Engine]:
    """An engine on `own_server` whose connections are named READER."""
    engine = redmap.create_engine(own_server.url, client_name=READER)
    try:
        yield engine
    finally:
        engine.dispose()


def _cut_mid_read(
    server: ServerProcess, engine: redmap.Engine, read: Callable[[], Any]
) -> tuple[Any, list[Sequence[Any]]]:
    """Run `read()` with the engine's connection killed after the read was sent and
    before its reply; returns what `read()` returned or raised, and the round trips."""
    assert server.pid is not None
    with server.client(decode_responses=True) as admin:
        ids = [c["id"] for c in admin.client_list() if c["name"] == READER]
    assert ids, "the engine holds no connection yet: read once before"
    killer = Connection(host=server.host, port=server.port or 0)
    killer.connect()
    trips: list[Sequence[Any]] = []
    sent = threading.Event()

    def listen(commands: Sequence[Any]) -> None:
        trips.append(commands)
        sent.set()

    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(read())
        except Exception as exc:
            outcome.append(exc)

    engine.add_listener(listen)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        thread = threading.Thread(target=run)
        thread.start()
        assert sent.wait(10)
        time.sleep(0.3)  # the request leaves right after the hook; the reader now waits
        assert thread.is_alive()
        killer.send_packed_command(
            killer.pack_commands([("CLIENT", "KILL", "ID", i) for i in ids])
        )
    finally:
        os.kill(server.pid, signal.SIGCONT)
    killed = [killer.read_response() for _ in ids]
    killer.disconnect()
    thread.join(30)
    engine.remove_listener(listen)
    assert killed == [1] * len(ids)  # CLIENT KILL ID answers how many it killed
    return outcome[0], trips


def _seed(server: ServerProcess, n: int = 50) -> None:
    with server.client() as client:
        for i in range(n):
            client.hset(f"h{i}", mapping={"i": i})
            client.zadd("z", {f"h{i}": i})


def _reads(engine: redmap.Engine) -> dict[str, Callable[[], Any]]:
    keys = [f"h{i}" for i in range(50)]
    return {
        "fetch_hashes": lambda: engine.fetch_hashes(keys),
        "execute": lambda: engine.execute([("HGETALL", k) for k in keys]),
        "execute_transaction": lambda: engine.execute_transaction(
            [("ZRANGE", "z", 0, 2), ("HGETALL", "h1")]
        ),
        "execute_transactions": lambda: engine.execute_transactions(
            [[("ZRANGE", "z", 0, 1)], [("HGETALL", "h2")]]
        ),
    }


EXPECTED: dict[str, Any] = {
    "fetch_hashes": [{b"i": str(i).encode()} for i in range(50)],
    "execute": [{b"i": str(i).encode()} for i in range(50)],
    "execute_transaction": [[b"h0", b"h1", b"h2"], {b"i": b"1"}],
    "execute_transactions": [[[b"h0", b"h1"]], [{b"i": b"2"}]],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_read_cut_mid_flight_is_sent_again(
    kind: str, own_server: ServerProcess, reader: redmap.Engine
) -> None:
    """A read whose connection is killed after it was sent succeeds on a new connection."""
    _seed(own_server)
    read = _reads(reader)[kind]
    assert read() == EXPECTED[kind]
    got, trips = _cut_mid_read(own_server, reader, read)
    assert got == EXPECTED[kind]
    assert len(trips) == 2  # the cut round trip, then the one that was answered


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_the_cut_is_real_without_retries(
    kind: str, own_server: ServerProcess, reader: redmap.Engine
) -> None:
    """With retries off the same cut raises RedmapConnectionError: the kill lands mid-read,
    where redis-py's pool cannot reconnect by itself."""
    _seed(own_server)
    reader.dialect.read_retry = ReadRetry(retries=0)
    read = _reads(reader)[kind]
    assert read() == EXPECTED[kind]
    got, trips = _cut_mid_read(own_server, reader, read)
    assert isinstance(got, RedmapConnectionError), got
    assert "cannot talk to Redis" in str(got) and len(trips) == 1


def test_query_cut_mid_flight_returns_its_rows(
    own_server: ServerProcess, reader: redmap.Engine
) -> None:
    """A session's indexed query whose connection is cut mid-read still returns its rows."""
    with redmap.Session(reader) as s:
        s.add_all(Ticket(title="t", rank=r) for r in range(30))
        s.commit()

    def query() -> list[int]:
        with redmap.Session(reader) as s:
            stmt = redmap.select(Ticket).where(Ticket.title == "t").order_by(Ticket.rank)
            return [t.rank for t in s.scalars(stmt.limit(5))]

    assert query() == [0, 1, 2, 3, 4]
    got, trips = _cut_mid_read(own_server, reader, query)
    assert got == [0, 1, 2, 3, 4]
    assert len(trips) >= 2


def test_dead_server_still_fails_fast(reader: redmap.Engine, own_server: ServerProcess) -> None:
    """A server that is gone: the bounded retry ends in RedmapConnectionError within ~1 s."""
    own_server.stop()
    started = time.monotonic()
    with pytest.raises(RedmapConnectionError, match="cannot talk to Redis"):
        reader.fetch_hashes(["a"])
    assert time.monotonic() - started < 5
