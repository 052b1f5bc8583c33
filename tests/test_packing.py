"""The flush's command packing: hiredis's packer (when installed) sends the same bytes as
redis-py's, and whatever hiredis refuses falls back to redis-py."""

from __future__ import annotations

import math

import pytest
import redis
from redis.connection import Connection

from redmap.dialects import base

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
