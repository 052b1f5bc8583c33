"""The wire: the flush's command packing (hiredis's packer when installed sends the same
bytes as redis-py's; what hiredis refuses falls back to redis-py) and the hash-fetching
read path of get_many, selectin and query results."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
import redis
from redis.connection import Connection

import redmap
from redmap.dialects import base
from redmap.exc import RedmapConnectionError

reg = redmap.registry(prefix="pack")


@reg.mapped
@dataclass
class Note:
    text: str
    id: Annotated[Optional[int], redmap.PrimaryKey()] = None


ARGS = [
    ("HSET", "{redmap}:player:1", "name", b"\x00\xff bytes", "score", b"1", "#v", b"1"),
    ("ZADD", "{redmap}:p:#zs:score", 1.5, "1", -0.0, "2", 1e300, "3", 0.1 + 0.2, "4"),
    ("SADD", "{redmap}:p:#ix:name:\u00e9\u6f22\U0001f600", "k e y", "*?[]{}:"),
    ("INCRBY", "{redmap}:p:#seq", 10_000),
    ("ZADD", "{redmap}:p:#zs:n", -math.inf, "a", math.inf, "b", -(2**63), "c"),
]


def test_same_bytes_as_redis_py() -> None:
    conn = Connection()
    assert b"".join(base._pack(conn, ARGS)) == b"".join(conn.pack_commands(ARGS))


def test_refused_types_fall_back_to_redis_py() -> None:
    conn = Connection()
    with pytest.raises(redis.DataError):  # redis-py's verdict on a bool, as before
        base._pack(conn, [("SET", "k", True)])


def test_round_trip_through_a_server(redis_client: redis.Redis) -> None:
    """What the packer sends is what Redis stores."""
    conn = redis_client.connection_pool.get_connection()
    try:
        commands = [("SET", "\u00e9k", b"\x00v"), ("GET", "\u00e9k")]
        conn.send_packed_command(base._pack(conn, commands))
        assert [conn.read_response(), conn.read_response()] == [b"OK", b"\x00v"]
    finally:
        redis_client.connection_pool.release(conn)


def test_fetch_hashes_replies_per_key(engine: redmap.Engine, redis_client: redis.Redis) -> None:
    """A dict per key, {} when absent, and a wrong-typed key's error for that key only."""
    redis_client.hset("h1", mapping={"a": b"1", "\u00e9": b"\x00"})
    redis_client.set("s", "x")
    got = engine.fetch_hashes(["h1", "missing", "s"])
    assert got[:2] == [{b"a": b"1", "\u00e9".encode(): b"\x00"}, {}]
    assert isinstance(got[2], redis.ResponseError) and "WRONGTYPE" in str(got[2])


def test_fetch_hashes_reconnects_after_a_killed_connection(
    engine: redmap.Engine, redis_client: redis.Redis
) -> None:
    """The pooled connection is killed by the server between two reads: redis-py's retry
    policy reopens it and the (idempotent) batch is sent again."""
    redis_client.hset("h", "f", b"v")
    assert engine.fetch_hashes(["h"]) == [{b"f": b"v"}]
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    assert engine.fetch_hashes(["h", "h"]) == [{b"f": b"v"}, {b"f": b"v"}]


def test_get_many_on_a_dead_server_is_a_redmap_error(redis_url: str) -> None:
    engine = redmap.create_engine("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(RedmapConnectionError):
            engine.fetch_hashes(["a", "b"])
    finally:
        engine.dispose()


# CI says which packer it installed: "required" (the default job, hiredis in the dev
# extra) or "absent" (the lowest-versions job). Unset: whatever is installed is checked.
HIREDIS_ENV = "REDMAP_TEST_HIREDIS"


def _hiredis_installed() -> bool:
    return importlib.util.find_spec("hiredis") is not None


def test_ci_installed_the_packer_it_meant_to() -> None:
    """The job's hiredis expectation (REDMAP_TEST_HIREDIS) matches the environment."""
    expected = os.environ.get(HIREDIS_ENV, "")
    assert expected in ("", "required", "absent")
    if expected:
        assert _hiredis_installed() == (expected == "required")


def test_flush_packs_with_hiredis_when_installed(
    engine: redmap.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hiredis installed: every flush goes through hiredis.pack_command; not installed:
    the packer is redis-py's and the flush still writes."""
    calls: list[int] = []
    if _hiredis_installed():
        hiredis = importlib.import_module("hiredis")
        assert base._hiredis_pack is hiredis.pack_command

        def counting(cmd: Any) -> bytes:
            calls.append(1)
            packed: bytes = hiredis.pack_command(cmd)
            return packed

        monkeypatch.setattr(base, "_hiredis_pack", counting)
    else:
        assert base._hiredis_pack is None
    with redmap.Session(engine) as s:
        s.add_all(Note(text=f"t{i}") for i in range(3))
        s.commit()
    with redmap.Session(engine) as s:
        assert sorted(n.text for n in s.get_many(Note, [1, 2, 3])) == ["t0", "t1", "t2"]
    assert (len(calls) > 0) == _hiredis_installed()
