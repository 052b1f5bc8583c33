"""The scripted flush (issue 14): WATCH token + MULTI + EVALSHA + EXEC, linear in N.

Flushes of more than `Engine.flush_script_threshold` objects run their checks and
writes as one script inside MULTI (`redmap/orm/flushscript.py`; the argument is in
docs/design/flush-concurrency.md). These tests hold it to the classic flush: the same
keys written, the same refusals with nothing written, and what only a script has to
get right (a plan cut into several invocations, NOSCRIPT, maxmemory, 10,000 objects
committed while other processes write).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
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
    registry,
    relationship,
    run_in_transaction,
    select,
)
from redmap.exc import FlushError, IntegrityError, StaleDataError
from redmap.orm import flushscript
from redmap.testing.assertions import count_round_trips, dump_keys

sreg = registry(prefix="fs")


@sreg.mapped
@dataclass
class Club:
    name: Annotated[str, Unique()]
    members: list[Member] = relationship(back_populates="club", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@sreg.mapped
@dataclass
class Member:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    age: Annotated[int, Sorted()]
    club_id: Annotated[int | None, ForeignKey("Club")] = None
    club: Club | None = relationship(back_populates="members")
    id: Annotated[int | None, PrimaryKey()] = None


def _normal(client: redis.Redis) -> dict[bytes, Any]:
    """The keyspace without flush tokens and with each hash's incarnation (`#i`, random
    per flush) blanked: what two flushes of the same work must leave alike."""
    out: dict[bytes, Any] = {}
    for key, value in dump_keys(client).items():
        if b"#flush:" in key:
            continue
        if key.startswith((b"{fs}:member:", b"{fs}:club:")):
            kind = client.type(key)
            if kind == b"hash":
                fields = client.hgetall(key)
                if b"#i" in fields:
                    fields[b"#i"] = b"?"
                out[key] = fields
                continue
        out[key] = value
    return out


def _workload(engine: redmap.Engine) -> None:
    """Inserts with relationships and claims, updates of every index kind, deletes with
    cascades and a unique value moving between objects: three flushes of 100+ objects."""
    with Session(engine) as s:
        clubs = [Club(name=f"club{c}") for c in range(4)]
        for i in range(120):
            clubs[i % 4].members.append(
                Member(name=f"n{i % 7}", email=f"m{i}@x", age=i % 50)
            )
        s.add_all(clubs)
        s.commit()
    with Session(engine) as s:
        members = s.scalars(select(Member)).all()
        assert len(members) == 120
        for m in members:
            m.age += 1
            if m.id is not None and m.id % 3 == 0:
                m.name = "renamed"
        moved = {m.id: m for m in members}
        held = moved[5].email
        moved[5].email = "freed@x"
        moved[6].email = held  # released and claimed in the same flush
        moved[7].club = None
        s.commit()
    with Session(engine) as s:
        club = s.scalars(select(Club).where(Club.name == "club1")).one()
        s.delete(club)  # its members go with it (delete-orphan)
        for m in s.scalars(select(Member).where(Member.name == "n2")).all():
            s.delete(m)
        s.commit()


@pytest.fixture
def engines(clean_redis: None, redis_url: str) -> Iterator[dict[str, redmap.Engine]]:
    made = {
        "watch": redmap.create_engine(redis_url, flush_script_threshold=None),
        "script": redmap.create_engine(redis_url, flush_script_threshold=0),
        "default": redmap.create_engine(redis_url),
    }
    try:
        yield made
    finally:
        for e in made.values():
            e.dispose()


def test_script_and_watch_flushes_leave_the_same_keys(
    engines: dict[str, redmap.Engine], redis_client: redis.Redis
) -> None:
    """The same work through both strategies (and the default, which scripts these
    flushes of more than 64 objects) leaves byte-identical keys, incarnations aside."""
    dumps = {}
    for name, engine in engines.items():
        redis_client.flushall()
        with count_round_trips(engine) as rt:
            _workload(engine)
        dumps[name] = _normal(redis_client)
        scripted = "EVALSHA" in rt.command_names
        assert scripted == (name != "watch"), name
    assert dumps["watch"] == dumps["script"] == dumps["default"]
    assert len(dumps["watch"]) > 100


def _seed(engine: redmap.Engine, n: int) -> list[int]:
    with Session(engine) as s:
        ms = [Member(name=f"n{i % 5}", email=f"s{i}@x", age=i) for i in range(n)]
        s.add_all(ms)
        s.commit()
        return [m.id for m in ms if m.id is not None]


def test_a_stale_object_refuses_a_large_flush_and_nothing_is_written(
    engines: dict[str, redmap.Engine], redis_client: redis.Redis
) -> None:
    engine = engines["default"]
    ids = _seed(engine, 300)
    with Session(engine) as s:
        ms = s.get_many(Member, ids)
        for m in ms:
            m.age += 1000
        with Session(engine) as other:
            victim = other.get(Member, ids[137])
            assert victim is not None
            victim.name = "changed"
            other.commit()
        before = dump_keys(redis_client)
        with count_round_trips(engine) as rt, pytest.raises(StaleDataError) as info:
            s.commit()
        assert rt.round_trips == 1 and "EVALSHA" in rt.command_names
        assert dump_keys(redis_client) == before
        assert info.value.objects == [ms[137]]
        assert f"Member({ids[137]!r})" in str(info.value)
        assert len(s.dirty) == 300  # the changes stay pending
        s.refresh(ms[137])
        ms[137].age += 1000
        s.commit()
    with Session(engine) as s:
        assert [m.age for m in s.get_many(Member, ids)] == [i + 1000 for i in range(300)]


def test_a_taken_unique_value_refuses_and_staleness_wins(
    engines: dict[str, redmap.Engine], redis_client: redis.Redis
) -> None:
    engine = engines["default"]
    ids = _seed(engine, 100)
    with Session(engine) as s:
        s.add_all([Member(name="new", email=f"new{i}@x", age=1) for i in range(99)])
        s.add(Member(name="new", email="s3@x", age=1))  # held by a stored member
        before = dump_keys(redis_client)
        with pytest.raises(IntegrityError, match=r"email value 's3@x' is already taken"):
            s.commit()
        assert dump_keys(redis_client) == before
        # The same flush, one of its updated objects also stale: StaleDataError first.
        with s.no_autoflush:
            m = s.get(Member, ids[0])
        assert m is not None
        m.age = -1
        redis_client.hset(f"{{fs}}:member:{ids[0]}", "#v", 99)
        before = dump_keys(redis_client)
        with pytest.raises(StaleDataError):
            s.commit()
        assert dump_keys(redis_client) == before


def test_a_plan_cut_into_many_invocations_applies_or_refuses_whole(
    engines: dict[str, redmap.Engine],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past Redis's argument limit a plan is cut into several EVALSHA in one MULTI that
    share the verdict through the token: forced here with tiny limits."""
    monkeypatch.setattr(flushscript, "MAX_ARGS", 60)
    monkeypatch.setattr(flushscript, "MAX_WORDS", 7)
    engine = engines["script"]
    redis_client.flushall()
    with count_round_trips(engine) as rt:
        _workload(engine)
    assert rt.command_names.count("EVALSHA") > 30
    chunked = _normal(redis_client)
    redis_client.flushall()
    _workload(engines["watch"])
    assert chunked == _normal(redis_client)

    # A refusal found by the last invocation's checks: nothing written, token gone.
    ids = [m for m in redis_client.zrange("{fs}:member:#all", 0, -1)]
    with Session(engine) as s:
        ms = s.get_many(Member, [int(i) for i in ids])
        for m in ms:
            m.age += 1
        last = ms[-1]
        redis_client.hset(f"{{fs}}:member:{last.id}", "#v", 99)
        before = dump_keys(redis_client)
        with count_round_trips(engine) as rt, pytest.raises(StaleDataError) as info:
            s.commit()
        assert rt.command_names.count("EVALSHA") > 5
        assert info.value.objects == [last]
        assert dump_keys(redis_client) == before
        assert not [k for k in redis_client.keys("*#flush:*") if redis_client.get(k) != b"applied"]


def test_noscript_after_the_cache_was_flushed_loads_and_sends_again(
    engines: dict[str, redmap.Engine], redis_client: redis.Redis
) -> None:
    engine = engines["script"]
    _seed(engine, 3)
    redis_client.script_flush()
    with Session(engine) as s:
        s.add(Member(name="x", email="x@x", age=1))
        with count_round_trips(engine) as rt:
            s.commit()
    names = [[c[0] for c in batch] for batch in rt.batches]
    # The engine had run the script (the seed): EVALSHA, answered NOSCRIPT inside the
    # EXEC with nothing run, then the same flush with the script's body (EVAL).
    assert names[-2:] == [
        ["WATCH", "MULTI", "EVALSHA", "EXEC"],
        ["WATCH", "MULTI", "EVAL", "EXEC"],
    ]
    with Session(engine) as s:
        s.add(Member(name="y", email="y@x", age=1))
        with count_round_trips(engine) as rt:
            s.commit()
    assert [c[0] for c in rt.batches[-1]] == ["WATCH", "MULTI", "EVALSHA", "EXEC"]
    assert redis_client.exists("{fs}:member:4") and redis_client.exists("{fs}:member:5")


def test_the_first_scripted_flush_of_an_engine_carries_the_script(
    redis_url: str, redis_client: redis.Redis, clean_redis: None
) -> None:
    """No NOSCRIPT round trip on a server that never saw the script: EVAL first."""
    redis_client.script_flush()
    engine = redmap.create_engine(redis_url, flush_script_threshold=0)
    try:
        with Session(engine) as s:
            s.add(Member(name="x", email="x@x", age=1, id=1))
            with count_round_trips(engine) as rt:
                s.commit()
        assert [[c[0] for c in b] for b in rt.batches] == [["WATCH", "MULTI", "EVAL", "EXEC"]]
    finally:
        engine.dispose()
    assert redis_client.exists("{fs}:member:1")


def _memory_sweep(engine: redmap.Engine, raw: redis.Redis) -> list[str]:
    """Commit the same 610-object flush under maxmemory limits from 0 to 3 MB above the
    memory in use; the outcome of each: applied, refused (nothing written), or partial."""
    outcomes = []
    for step in range(40):
        raw.flushall()
        _seed(engine, 10)
        with Session(engine) as s:
            s.add_all([Member(name="m", email=f"oom{step}-{i}@x", age=i) for i in range(300)])
            s.add_all([Member(name="x" * 2000, email=f"big{i}", age=i) for i in range(300)])
            before = dump_keys(raw)
            raw.config_set("maxmemory", int(raw.info("memory")["used_memory"]) + step * 75_000)
            try:
                s.commit()
                assert raw.zcard("{fs}:member:#all") == 610
                outcomes.append("applied")
            except FlushError as exc:
                if "nothing was written" not in str(exc):
                    outcomes.append("partial")
                    continue
                # At most the id counter moved, and then the error says so.
                seq = b"{fs}:member:#seq"
                after = dump_keys(raw)
                if after[seq] != before[seq]:
                    assert "never reused" in str(exc) and seq.decode() in str(exc)
                assert {k: v for k, v in after.items() if k != seq} == {
                    k: v for k, v in before.items() if k != seq
                }
                outcomes.append("refused")
            finally:
                raw.config_set("maxmemory", 0)
    return outcomes


def test_out_of_memory_refuses_whole_or_applies_whole(
    engines: dict[str, redmap.Engine],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plan cut into invocations under maxmemory limits from below to above what it
    needs: each attempt applies whole or is refused with nothing written. (Redis 6.2
    decides a script's memory refusal before its first write; measured here, an EXEC of
    several invocations is refused at the first one or not at all. Each later invocation
    also starts with a write that needs no memory, PEXPIRE of the token, for servers that
    judge every invocation anew: see docs/design/flush-concurrency.md.)"""
    monkeypatch.setattr(flushscript, "MAX_ARGS", 400)
    raw = redis_client
    policy = raw.config_get("maxmemory-policy")["maxmemory-policy"]
    raw.config_set("maxmemory-policy", "noeviction")
    try:
        outcomes = _memory_sweep(engines["script"], raw)
    finally:
        raw.config_set("maxmemory-policy", policy)
    print(f"\nmaxmemory sweep over a scripted flush of 7 invocations: {outcomes}")
    assert "partial" not in outcomes and "refused" in outcomes and "applied" in outcomes


WRITER = textwrap.dedent(
    """
    import sys, time
    import redmap
    from redmap import Session
    from tests.test_flush_script import Member
    engine = redmap.create_engine(sys.argv[1])
    first, last, until = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    n = 0
    while time.time() < until:
        with Session(engine) as s:
            m = s.get(Member, first + n % (last - first))
            m.age += 1
            s.commit()
        n += 1
    print(n)
    """
)


def test_a_10000_object_commit_is_not_starved_by_small_writers(
    engines: dict[str, redmap.Engine], redis_url: str
) -> None:
    """Done-when of issue 14: a 10,000-object update commits in at most 3 attempts while
    4 processes keep committing single-object updates to other objects of the model."""
    engine = engines["default"]
    ids = _seed(engine, 10_100)
    big, others = ids[:10_000], ids[10_000:]
    until = time.time() + 8
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, redis_url, str(others[k * 25]),
             str(others[k * 25 + 24]), str(until)],
            stdout=subprocess.PIPE,
        )
        for k in range(4)
    ]
    try:
        time.sleep(1.0)  # the writers are running
        attempts = 0

        def bump(s: Session) -> None:
            nonlocal attempts
            attempts += 1
            for m in s.get_many(Member, big):
                m.age += 1

        run_in_transaction(bump, lambda: Session(engine))
        assert attempts <= 3, attempts
    finally:
        counts = [int(p.communicate(timeout=30)[0] or 0) for p in procs]
    assert all(c > 0 for c in counts), counts
    with Session(engine) as s:
        assert [m.age for m in s.get_many(Member, big[:5])] == [1, 2, 3, 4, 5]
