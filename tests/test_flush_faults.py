"""Tests for the flush's behaviour under lost replies, dropped connections and timeouts."""

from __future__ import annotations

import collections
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, cast
from urllib.parse import urlsplit

import pytest
import redis

from redmap import PrimaryKey, Session, registry
from redmap.engine import Engine
from redmap.exc import OutcomeUnknownError, RedmapConnectionError
from redmap.orm import flushscript, persistence
from redmap.orm.attributes import state_of
from redmap.orm.mapper import VERSION_FIELD, mapper_of
from redmap.testing.assertions import RoundTripCounter, count_round_trips, dump_keys
from tests._async_driver import make_engine
from tests.proxy import LoopbackProxy

reg = registry(prefix="faults")

# Every test here runs on the sync driver, then on the asyncio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("driver")


@reg.mapped
@dataclass
class Counter:
    id: Annotated[int, PrimaryKey()]
    value: int = 0


# The settle read-back logs this when it finds the flush applied.
APPLIED_LOG = "read-back shows it was applied"
# A port nothing listens on (privileged, never bound by the test servers).
DEAD_URL = "redis://user:s3cret@127.0.0.1:1/0"
# How a commit under CLIENT PAUSE can end.
OUTCOMES = ("returned", "not_written", "unknown_applied", "unknown_not_applied")
# Pauses (ms range, kind) that give one outcome each with a 0.3 s socket timeout
# (measured: 6 of 6 at each length tried near each range). Shorter than the timeout,
# the commit returns; a little longer, the EXEC times out and the read-back, answered
# once the pause ends, finds nothing written; a WRITE pause longer than two timeouts
# leaves the outcome unknown (and the server then drops the EXEC with its closed
# connection: not applied).
# "unknown, applied" and "settled, applied" need a lost reply: the proxy tests make them.
PAUSE_BANDS = {
    "unknown_not_applied": ((800, 1000), "WRITE"),  # first: the one most timing-bound
    "not_written": ((380, 450), "WRITE"),
    "returned": ((50, 150), "ALL"),
}
SEED_ENV = "REDMAP_SEED"


def _target(redis_url: str) -> tuple[str, int]:
    parts = urlsplit(redis_url)
    if parts.hostname is None or parts.port is None:
        pytest.skip("the fault tests need a TCP server")
    return parts.hostname, parts.port


def _proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("redmap-proxy-")]


@pytest.fixture
def proxy(redis_client: redis.Redis, redis_url: str) -> Iterator[LoopbackProxy]:
    """A loopback proxy in front of the (emptied) test server, stopped after the test."""
    host, port = _target(redis_url)
    with LoopbackProxy(host, port) as p:
        yield p
    assert not p.alive
    assert not _proxy_threads(), "a proxy thread outlived its test"


@pytest.fixture
def proxy_engine(proxy: LoopbackProxy) -> Iterator[Engine]:
    """An engine reaching the server through the proxy, with a short socket timeout."""
    eng = make_engine(proxy.url, socket_timeout=0.5)
    try:
        yield eng
    finally:
        eng.dispose()


def _stored(raw: redis.Redis, pk: int) -> tuple[int, int] | None:
    """(value, version) of a counter as Redis holds it, read without redmap."""
    key = mapper_of(Counter).object_key(pk)
    value, version = raw.hmget(key, ["value", VERSION_FIELD])
    if value is None or version is None:
        return None
    return int(value), int(version)


def _in_doubt(obj: object) -> bool:
    st = state_of(obj)
    assert st is not None
    return st.in_doubt


def _create_counter(engine: Engine, pk: int = 1) -> None:
    with Session(engine) as s:
        s.add(Counter(id=pk))
        s.commit()


def test_proxy_finds_exec_split_across_reads(
    proxy: LoopbackProxy, redis_client: redis.Redis
) -> None:
    """The proxy finds an EXEC sent one byte per TCP segment and loses only its reply."""
    proxy.set_mode("drop_exec_reply", once=True)
    payload = b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*1\r\n$4\r\nEXEC\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(payload)):
            sock.sendall(payload[i : i + 1])
            time.sleep(0.001)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received == b"+OK\r\n+QUEUED\r\n"  # MULTI and SET answered; EXEC's reply lost
    assert redis_client.get("k") == b"v"  # ... after the server applied it
    assert (proxy.exec_seen, proxy.exec_forwarded, proxy.exec_replies_dropped) == (1, 1, 1)
    assert proxy.mode == "pass"


def test_lost_exec_reply_is_settled_as_applied(
    proxy: LoopbackProxy,
    proxy_engine: Engine,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An EXEC applied whose reply is lost: commit() succeeds and applies exactly once."""
    # A scripted flush meeting a server that never ran its script sends it again with
    # SCRIPT LOAD (a second EXEC): loaded here, so that EXECs count flushes.
    redis_client.script_load(flushscript.SCRIPT)
    _create_counter(proxy_engine)
    rounds = 50
    caplog.set_level(logging.WARNING, logger="redmap.engine")
    with Session(proxy_engine) as s:
        for i in range(1, rounds + 1):
            c = s.get(Counter, 1)
            assert c is not None
            c.value += 1
            proxy.set_mode("drop_exec_reply", once=True)
            with count_round_trips(proxy_engine) as rt:
                s.commit()  # settled by read-back: returns normally
            assert rt.command_names.count("EXEC") == 1, "EXEC was re-sent"
            assert _stored(redis_client, 1) == (i, 1 + i)  # value and version moved once
            assert not _in_doubt(c)
        assert proxy.exec_replies_dropped == rounds
        applied_logs = sum(APPLIED_LOG in r.getMessage() for r in caplog.records)
        print(
            f"\nlost EXEC replies: {rounds} flushes, EXEC seen {proxy.exec_seen} "
            f"(1 insert + {rounds}), replies dropped {proxy.exec_replies_dropped}, "
            f"settled as applied {applied_logs}, final value {_stored(redis_client, 1)}"
        )
        assert applied_logs == rounds
        assert proxy.exec_seen == proxy.exec_forwarded == rounds + 1
        # The session keeps working on a healthy path.
        c = s.get(Counter, 1)
        assert c is not None and c.value == rounds
        c.value += 1
        s.commit()
    assert _stored(redis_client, 1) == (rounds + 1, rounds + 2)
    with Session(proxy_engine) as s2:
        fresh = s2.get(Counter, 1)
        assert fresh is not None and fresh.value == rounds + 1


def test_dropped_exec_writes_nothing_and_keeps_changes_pending(
    proxy: LoopbackProxy, proxy_engine: Engine, redis_client: redis.Redis
) -> None:
    """An EXEC that never reached the server: RedmapConnectionError, nothing written, retryable."""
    _create_counter(proxy_engine)
    with Session(proxy_engine) as s:
        c = s.get(Counter, 1)
        assert c is not None
        c.value = 7
        extra = Counter(id=2, value=3)
        s.add(extra)
        before = dump_keys(redis_client)
        proxy.set_mode("drop_exec", once=True)
        with pytest.raises(RedmapConnectionError) as info:
            s.commit()
        err = info.value
        assert not isinstance(err, OutcomeUnknownError)
        assert "nothing was written" in str(err)
        assert proxy.exec_dropped == 1
        assert dump_keys(redis_client) == before  # byte-for-byte unchanged
        # The pending changes are still pending, and not in doubt.
        assert c in s.dirty and s.is_modified(c) and c.value == 7
        assert extra in s.new
        assert not _in_doubt(c) and not _in_doubt(extra)
        # The proxy is back to `pass`: the same commit now goes through.
        assert proxy.mode == "pass"
        s.commit()
    assert _stored(redis_client, 1) == (7, 2)
    assert _stored(redis_client, 2) == (3, 1)
    print(f"\ndropped EXEC: EXEC seen {proxy.exec_seen}, dropped {proxy.exec_dropped}")


@pytest.mark.parametrize("then", ["reset", "blackhole"])
def test_unsettled_outcome_is_reported_unknown(
    proxy: LoopbackProxy, redis_client: redis.Redis, then: Any
) -> None:
    """EXEC reply lost and the server unreachable for the read-back: OutcomeUnknownError."""
    url = f"redis://default:s3cret@127.0.0.1:{proxy.port}/0"  # the server accepts any password
    eng = make_engine(url, socket_timeout=0.5)
    try:
        _create_counter(eng)
        with Session(eng) as s:
            c = s.get(Counter, 1)
            assert c is not None
            c.value += 1
            new = Counter(id=2, value=5)
            s.add(new)
            proxy.set_mode("drop_exec_reply", once=True, then=then)
            started = time.monotonic()
            with pytest.raises(OutcomeUnknownError) as info:
                s.commit()
            elapsed = time.monotonic() - started
            err = info.value
            assert "s3cret" not in str(err) and "***" in str(err)
            assert "outcome" in str(err)
            assert {id(o) for o in err.objects} == {id(c), id(new)}
            assert _in_doubt(c) and _in_doubt(new)
            assert proxy.exec_replies_dropped == 1
            # Roll back once the server is reachable again: the objects reload from Redis.
            proxy.set_mode("pass")
            s.rollback()
            assert not _in_doubt(c)
            reloaded = s.get(Counter, 1)
            assert reloaded is c and c.value == 1
        # The server applied the EXEC (the proxy only lost its reply): exactly once.
        assert _stored(redis_client, 1) == (1, 2)
        assert _stored(redis_client, 2) == (5, 1)
        print(f"\nunsettled ({then}): OutcomeUnknownError after {elapsed:.2f}s")
    finally:
        eng.dispose()


def test_refused_read_back_is_reported_unknown(
    proxy: LoopbackProxy, proxy_engine: Engine, redis_client: redis.Redis
) -> None:
    """EXEC reply lost and the server refuses the read-back (OOM): OutcomeUnknownError."""
    _create_counter(proxy_engine)

    def refuse_settle(commands: Sequence[tuple[Any, ...]]) -> None:
        first = commands[0]
        if first[0] == "SET" and "#flush:" in str(first[1]) and "NX" in first:
            redis_client.config_set("maxmemory", 1)  # every write now fails with OOM

    with Session(proxy_engine) as s:
        c = s.get(Counter, 1)
        assert c is not None
        c.value += 1
        proxy.set_mode("drop_exec_reply", once=True)
        proxy_engine.add_listener(refuse_settle)
        try:
            with pytest.raises(OutcomeUnknownError) as info:
                s.commit()
        finally:
            proxy_engine.remove_listener(refuse_settle)
            redis_client.config_set("maxmemory", 0)
        assert info.value.objects == [c]
        assert _in_doubt(c)
        s.rollback()
        assert c.value == 1
    assert _stored(redis_client, 1) == (1, 2)


def test_read_back_after_token_expiry_is_reported_unknown(
    proxy: LoopbackProxy, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-back answered after the token may have expired cannot say "nothing written"."""
    # A token that lives 0.2 s and a server that holds the read-back for 0.6 s stand for
    # any settle slower than the token's life (long socket timeouts, connect retries).
    monkeypatch.setattr(persistence, "TOKEN_TTL_MS", 200)
    eng = make_engine(proxy.url, socket_timeout=5)

    def stall_settle(commands: Sequence[tuple[Any, ...]]) -> None:
        first = commands[0]
        if first[0] == "SET" and "#flush:" in str(first[1]) and "NX" in first:
            cast(Any, redis_client).execute_command("CLIENT", "PAUSE", 600, "WRITE")

    try:
        _create_counter(eng)
        with Session(eng) as s:
            c = s.get(Counter, 1)
            assert c is not None
            c.value += 1
            proxy.set_mode("drop_exec_reply", once=True)
            eng.add_listener(stall_settle)
            with pytest.raises(OutcomeUnknownError) as info:
                s.commit()
            eng.remove_listener(stall_settle)
            assert info.value.objects == [c] and _in_doubt(c)
            s.rollback()
            assert c.value == 1
        assert _stored(redis_client, 1) == (1, 2)  # it was applied, once
    finally:
        eng.dispose()


def test_dead_server_names_url_without_password() -> None:
    """Nothing listening: get and commit raise RedmapConnectionError naming the masked URL."""
    eng = make_engine(DEAD_URL, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        with Session(eng) as s:
            with pytest.raises(RedmapConnectionError) as got:
                s.get(Counter, 1)
            s.add(Counter(id=1))
            with pytest.raises(RedmapConnectionError) as committed:
                s.commit()
        for err in (got.value, committed.value):
            assert not isinstance(err, OutcomeUnknownError)
            assert "s3cret" not in str(err)
            assert "redis://user:***@127.0.0.1:1/0" in str(err)
            assert err.url == "redis://user:***@127.0.0.1:1/0"
    finally:
        eng.dispose()


def _pause_run(
    iterations: int, proxy: LoopbackProxy, raw: redis.Redis, seed: int
) -> dict[str, int]:
    """Commit one increment per iteration while CLIENT PAUSE makes the client time out.

    Every other iteration takes the next of PAUSE_BANDS in turn (so each outcome it
    steers towards occurs, asserted at the end); the rest draw pause lengths that
    straddle the socket timeout (0.3 s) and the time the read-back needs (a second
    timeout). After each pause ends, Redis must hold at most one more increment,
    exactly one for a normal return, none for a "nothing was written".
    """
    assert iterations >= 2 * len(PAUSE_BANDS)
    eng = make_engine(proxy.url, socket_timeout=0.3)
    rng = random.Random(seed)
    steered = list(PAUSE_BANDS.values())
    outcomes: collections.Counter[str] = collections.Counter()
    settled = _SettledCounter()
    logging.getLogger("redmap.engine").addHandler(settled)
    sent = RoundTripCounter()
    eng.add_listener(sent)
    try:
        _create_counter(eng)
        for i in range(iterations):
            stored = _stored(raw, 1)
            assert stored is not None
            before_value, before_version = stored
            if i % 2 == 0:
                (low, high), pause_kind = steered[(i // 2) % len(steered)]
                pause_ms = int(rng.uniform(low, high))
            else:
                pause_ms = int(
                    rng.choice(
                        [rng.uniform(100, 900), rng.uniform(250, 350), rng.uniform(550, 650)]
                    )
                )
                pause_kind = "ALL" if rng.random() < 0.2 else "WRITE"
            with Session(eng) as s, count_round_trips(eng) as rt:
                c = s.get(Counter, 1)
                assert c is not None
                c.value += 1
                cast(Any, raw).execute_command("CLIENT", "PAUSE", pause_ms, pause_kind)
                paused_at = time.monotonic()
                try:
                    s.commit()
                    outcome = "returned"
                except OutcomeUnknownError as exc:
                    assert exc.objects == [c] and _in_doubt(c)
                    outcome = "unknown"
                except RedmapConnectionError as exc:
                    assert "nothing was written" in str(exc)
                    assert not _in_doubt(c)
                    outcome = "not_written"
                assert rt.command_names.count("EXEC") <= 1, "EXEC was re-sent"
                # Past the pause, plus time for the server to drop or run what it held.
                time.sleep(max(0.0, paused_at + pause_ms / 1000 - time.monotonic()) + 0.15)
                if outcome == "unknown":
                    s.rollback()
            stored = _stored(raw, 1)
            assert stored is not None
            value, version = stored
            applied = value - before_value
            assert applied in (0, 1), f"double application: {before_value} -> {value}"
            assert version - before_version == applied
            if outcome == "returned":
                assert applied == 1, "commit() returned but Redis does not hold the increment"
            elif outcome == "not_written":
                assert applied == 0, "reported nothing written, but Redis holds the increment"
            if outcome == "unknown":
                outcome = "unknown_applied" if applied else "unknown_not_applied"
            outcomes[outcome] += 1
        final = _stored(raw, 1)
        assert final is not None
        applied_total = outcomes["returned"] + outcomes["unknown_applied"]
        assert final[0] == applied_total  # 0 double applications over the whole run
        assert proxy.exec_seen == sent.command_names.count("EXEC")  # none sent behind our back
        for outcome in PAUSE_BANDS:
            assert outcomes[outcome] >= 1, f"no {outcome} outcome (seed {seed}): {outcomes}"
    finally:
        logging.getLogger("redmap.engine").removeHandler(settled)
        eng.dispose()
    # Normal returns after a lost reply: the read-back found the flush applied.
    outcomes["returned_after_read_back"] = settled.count
    return {
        **{k: outcomes[k] for k in OUTCOMES},
        **{k: v for k, v in outcomes.items() if k not in OUTCOMES},
        "final_value": final[0],
        "exec_seen": proxy.exec_seen,
    }


class _SettledCounter(logging.Handler):
    """Counts the read-backs that found a flush applied."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if APPLIED_LOG in record.getMessage():
            self.count += 1


def _seed(default: int) -> int:
    """The seed of a randomized run: `REDMAP_SEED` if set (to replay one), else `default`."""
    fixed = os.environ.get(SEED_ENV)
    seed = int(fixed) if fixed else default
    print(f"\nseed {seed} (replay: {SEED_ENV}={seed})")
    return seed


def test_client_pause_never_double_applies(proxy: LoopbackProxy, redis_client: redis.Redis) -> None:
    """20 commits under CLIENT PAUSE timeouts: each applied at most once, reported truthfully;
    returned, "nothing was written" and "unknown, not applied" each occur."""
    seed = _seed(20)
    figures = _pause_run(20, proxy, redis_client, seed=seed)
    print(f"\nCLIENT PAUSE x20 (seed {seed}): {figures}")


@pytest.mark.soak
def test_client_pause_never_double_applies_soak(
    proxy: LoopbackProxy, redis_client: redis.Redis
) -> None:
    """200 commits under CLIENT PAUSE timeouts: each applied at most once, reported truthfully;
    returned, "nothing was written" and "unknown, not applied" each occur."""
    seed = _seed(200)
    figures = _pause_run(200, proxy, redis_client, seed=seed)
    print(f"\nCLIENT PAUSE x200 (seed {seed}): {figures}")
