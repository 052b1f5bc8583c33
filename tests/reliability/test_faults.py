"""Reliability under faults: killed clients, lost replies and timeouts, errors inside the
transaction and out of memory, and a killed and restarted redis-server.

Each test prints its figures on one line (run with `-s` to see them) and fails on its
threshold. The `soak` versions carry the full figures and are excluded from the default
run: `python -m pytest tests/reliability/test_faults.py -m soak -s`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import redis

from redmap import Session
from redmap import select as select_
from redmap.audit import audit
from redmap.dialects._server import ServerProcess
from redmap.engine import Engine
from redmap.exc import (
    FlushError,
    InvalidRequestError,
    OutcomeUnknownError,
)
from redmap.orm import keys
from redmap.orm.attributes import state_of
from redmap.orm.mapper import VERSION_FIELD, mapper_of
from redmap.testing.assertions import count_round_trips, dump_keys
from tests._async_driver import SCRIPT_ENV, make_engine
from tests.proxy import LoopbackProxy
from tests.reliability._crash_worker import (
    INSERTS,
    OWN_BASE,
    SHARED,
    UPDATES,
    Box,
    Item,
    Receipt,
    Tally,
    reg,
)
from tests.test_flush_faults import (
    APPLIED_LOG,
    Counter,
    _create_counter,
    _pause_run,
    _stored,
)

REPO = Path(__file__).resolve().parents[2]
WORKER = "tests.reliability._crash_worker"

# Every test here runs on the sync driver, then on the asyncio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("driver")


def _audit_clean(raw: redis.Redis) -> str:
    """Audit the models of this file; fail on any mismatch or unexplained key."""
    report = audit(raw, reg)
    assert report.ok, report.summary() + "\n" + "\n".join(report.mismatches + report.unexplained)
    return report.summary()


def _dump(raw: redis.Redis) -> dict[bytes, bytes | None]:
    """`_dump(raw)` (every key but flush tokens, with its DUMP) in two pipelined steps."""
    names = [k for k in raw.scan_iter(count=1000) if b"#flush:" not in k]
    pipe = raw.pipeline(transaction=False)
    for k in names:
        pipe.dump(k)
    return dict(zip(names, pipe.execute(), strict=True))


def _in_doubt(obj: object) -> bool:
    st = state_of(obj)
    return st is not None and st.in_doubt


def _index_key(field: str, value: Any) -> str:
    mapper = mapper_of(Item)
    codec = mapper.columns[field].codec
    assert codec is not None
    return mapper.keys.index(field, keys.escape(codec.encode(value)))


def _object_keys(raw: redis.Redis, model: type) -> list[str]:
    ks = mapper_of(model).keys
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in ks.object_prefix) + "*"
    found = (k.decode() for k in raw.scan_iter(match=pattern, count=1000))
    return [k for k in found if ks.is_object_key(k)]


# --------------------------------------------------------------------------------------
# 6. Killed clients: a 50-object flush SIGKILLed at random points is all or nothing.
# --------------------------------------------------------------------------------------

# How the child dies: killed from outside after a random delay since it was forked
# ("random") or since it called commit() ("window"), or by itself at a point of the
# flush (see _crash_worker._arm): just before the MULTI...EXEC batch is sent, as soon as
# its send returned (EXEC written, no reply read), or from a timer 0-600 us after that.
# Trials take the modes in turn, so each gets a sixth of the trials whatever the seed.
KILL_MODES = ("random", "window", "before_exec", "window", "exec_sent", "exec_timer")
POOL = 100  # existing Items the trials update
BOXES = 4


class _Zygote:
    """The fork server of `_crash_worker`: one forked child per trial, killable by pid.

    A child is reaped only when `reap()` asks, so its pid cannot be reused while the
    test may still signal it.
    """

    def __init__(self, url: str, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER, "zygote", url],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self._buf = b""
        self.child: int | None = None
        self.seen: list[str] = []

    def _line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"worker silent for {timeout}s; log:\n{self.log()}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"worker exited; log:\n{self.log()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode()
        self.seen.append(text)
        return text

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def spawn(self, spec: dict[str, Any]) -> int:
        self.seen = []
        self._send(json.dumps(spec))
        while True:
            line = self._line()
            if line.startswith("pid "):
                self.child = int(line.split()[1])
                return self.child

    def wait_for(self, word: str) -> bool:
        """Wait until the child prints `word`; False if it exited or failed first."""
        while word not in self.seen:
            if "failed" in self.seen:
                return False
            self._line()
        return True

    def kill_child(self) -> None:
        assert self.child is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child, signal.SIGKILL)  # a zombie until reaped: never another process

    def reap(self) -> int:
        self._send("reap")
        while True:
            line = self._line()
            if line.startswith("exit "):
                self.child = None
                return int(line.split()[1])

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.child is not None:
            self.kill_child()
            with contextlib.suppress(Exception):
                self.reap()
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def _snapshot(raw: redis.Redis, pks: Sequence[int]) -> dict[int, tuple[bytes, int]]:
    mapper = mapper_of(Item)
    pipe = raw.pipeline(transaction=False)
    for pk in pks:
        pipe.hmget(mapper.object_key(pk), ["marker", VERSION_FIELD])
    out = {}
    for pk, (marker, version) in zip(pks, pipe.execute(), strict=True):
        out[pk] = (marker, int(version))
    return out


def _tagged_hashes(raw: redis.Redis, tag: str) -> set[int]:
    """Items whose hash holds `marker == tag`, found by scanning every Item hash."""
    mapper = mapper_of(Item)
    found = _object_keys(raw, Item)
    pipe = raw.pipeline(transaction=False)
    for k in found:
        pipe.hget(k, "marker")
    return {
        mapper.pk_from_segment(mapper.keys.id_segment_of(k))
        for k, marker in zip(found, pipe.execute(), strict=True)
        if marker == tag.encode()
    }


def _without_counter(dump: dict[bytes, bytes | None]) -> dict[bytes, bytes | None]:
    # The id counter may move for a flush that never ran (ids are never handed out twice).
    seq = mapper_of(Item).keys.seq().encode()
    return {k: v for k, v in dump.items() if k != seq}


def _wait_connections_gone(raw: redis.Redis, tag: str) -> bool:
    """Wait until the server has closed every connection of the trial's (dead) child.

    Until then it may still run a MULTI...EXEC the child wrote just before dying. True
    when there was one left to wait for.
    """
    name = f"crash-{tag}"
    deadline = time.monotonic() + 10
    waited = False
    while any(c.get("name") == name for c in raw.client_list()):
        waited = True
        assert time.monotonic() < deadline, f"{name}: the server kept the connection 10 s"
        time.sleep(0.001)
    return waited


def _check_all_or_nothing(
    raw: redis.Redis,
    tag: str,
    updated: Sequence[int],
    before: dict[int, tuple[bytes, int]],
    dump_before: dict[bytes, bytes | None],
) -> tuple[bool, set[int]]:
    """Whether the trial's flush is wholly present (True) or wholly absent (False).

    Fails on any partial state: updated objects disagreeing, inserted objects missing,
    an index disagreeing with the hashes, or (absent) any key changed at all.
    """
    after = _snapshot(raw, updated)
    new = {pk for pk in updated if after[pk][0] == tag.encode()}
    assert new in (set(), set(updated)), f"{tag}: {len(new)}/{len(updated)} updates applied"
    present = bool(new)
    for pk in updated:
        assert after[pk][1] == before[pk][1] + present, f"{tag}: Item {pk} version"
    tagged = _tagged_hashes(raw, tag)
    indexed = {int(m) for m in raw.smembers(_index_key("marker", tag))}
    assert tagged == indexed, f"{tag}: marker index disagrees with the hashes"
    inserted = tagged - set(updated)
    assert len(tagged) == (UPDATES + INSERTS if present else 0), (
        f"{tag}: {len(tagged)} objects carry the marker (present={present})"
    )
    assert raw.zcard(mapper_of(Item).keys.all()) == POOL + (INSERTS if present else 0)
    if not present:
        assert _without_counter(_dump(raw)) == _without_counter(dump_before), (
            f"{tag}: the flush is absent but keys changed"
        )
    _audit_clean(raw)
    return present, inserted


def _kill_run(redis_url: str, raw: redis.Redis, trials: int, seed: int, tmp: Path) -> str:
    rng = random.Random(seed)
    engine = make_engine(redis_url)
    with Session(engine) as s:
        boxes = [Box(label=f"b{i}") for i in range(BOXES)]
        s.add_all(boxes)
        s.flush()
        box_ids = [b.id for b in boxes]
        pool = [
            Item(group="g0", marker="init", code=f"init-{i}", rank=i, box_id=box_ids[0])
            for i in range(POOL)
        ]
        s.add_all(pool)
        s.commit()
        pool_ids = [cast(int, i.id) for i in pool]
    zyg = _Zygote(redis_url, tmp / "zygote.log")
    split: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    try:
        # Calibrate: how long a child takes from fork to committed, and commit to committed.
        whole, flush = [], []
        for w in range(5):
            tag = f"cal{w}"
            upd = rng.sample(pool_ids, UPDATES)
            before, dump_before = _snapshot(raw, upd), _dump(raw)
            t0 = time.perf_counter()
            zyg.spawn(_spec(tag, upd, box_ids, "none", rng))
            assert zyg.wait_for("ready"), zyg.log()
            t1 = time.perf_counter()
            assert zyg.wait_for("committed"), zyg.log()
            t2 = time.perf_counter()
            assert zyg.reap() == 0, zyg.log()
            _wait_connections_gone(raw, tag)
            whole.append(t2 - t0)
            flush.append(t2 - t1)
            present, inserted = _check_all_or_nothing(raw, tag, upd, before, dump_before)
            assert present
            _drop(engine, inserted)
        span, flush_span = sorted(whole)[2] * 1.2, sorted(flush)[2] * 1.2
        lingering = 0
        killed = 0

        # Children that commit before their kill do not count toward `trials` kills.
        for t in range(3 * trials):
            if killed == trials:
                break
            tag = f"k{t}"
            mode = KILL_MODES[t % len(KILL_MODES)]
            upd = rng.sample(pool_ids, UPDATES)
            before, dump_before = _snapshot(raw, upd), _dump(raw)
            zyg.spawn(_spec(tag, upd, box_ids, mode, rng))
            if mode == "random":
                time.sleep(rng.uniform(0, span))
                zyg.kill_child()
            elif mode == "window":
                if zyg.wait_for("ready"):
                    time.sleep(rng.uniform(0, flush_span))
                zyg.kill_child()
            code = zyg.reap()
            assert code in (0, -signal.SIGKILL), f"child failed ({code}):\n{zyg.log()}"
            lingering += _wait_connections_gone(raw, tag)
            present, inserted = _check_all_or_nothing(raw, tag, upd, before, dump_before)
            if code == 0:
                assert present, f"{tag}: commit() returned but the flush is absent"
                split[mode]["completed"] += 1
            else:
                killed += 1
                split[mode]["killed_present" if present else "killed_absent"] += 1
            if mode == "before_exec":
                assert not present, f"{tag}: killed before EXEC was sent, yet applied"
            _drop(engine, inserted)
    finally:
        zyg.close()
        engine.dispose()
    assert killed == trials, f"only {killed} of {t + 1} children were killed mid-flight"
    summary = _audit_clean(raw)
    total = collections.Counter[str]()
    for c in split.values():
        total.update(c)
    per_mode = "; ".join(
        f"{m}: {c['killed_present']}/{c['killed_absent']}/{c['completed']}"
        for m, c in sorted(split.items())
    )
    # Every outcome the test is about occurred: kills at every point, kills after EXEC
    # was sent that Redis applied, kills before it that left nothing.
    figures = f"seed {seed}, per mode present/absent/completed: {per_mode}"
    for mode in KILL_MODES:
        got = split[mode]["killed_present"] + split[mode]["killed_absent"]
        assert got >= 1, f"no child was killed in mode {mode}; {figures}"
    assert split["exec_sent"]["killed_present"] >= 1, f"no kill after EXEC applied; {figures}"
    assert split["before_exec"]["killed_absent"] >= 1, figures
    assert total["killed_present"] >= 1 and total["killed_absent"] >= 1, figures
    return (
        f"killed clients x{trials} (50-object flushes, seed {seed}): "
        f"killed {killed} (wholly present {total['killed_present']}, "
        f"wholly absent {total['killed_absent']}), "
        f"completed before the kill {total['completed']}, partial 0; per mode "
        f"present/absent/completed: {per_mode}; kill span {span * 1000:.1f} ms, "
        f"commit span {flush_span * 1000:.1f} ms; the server still held a killed child's "
        f"connection {lingering} times; audit: {summary}"
    )


def _spec(tag: str, upd: list[int], boxes: list[Any], mode: str, rng: random.Random) -> dict:
    return {
        "tag": tag,
        "update": upd,
        "boxes": boxes,
        "mode": mode,
        "seed": rng.randrange(2**32),
    }


def _drop(engine: Engine, pks: set[int]) -> None:
    """Delete a trial's inserted Items (a normal flush), keeping the data set small."""
    if not pks:
        return
    with Session(engine) as s:
        for obj in s.get_many(Item, sorted(pks)):
            assert obj is not None
            s.delete(obj)
        s.commit()


def test_killed_clients_all_or_nothing(
    redis_url: str, redis_client: redis.Redis, seed: int, tmp_path: Path
) -> None:
    """60 flushes of 50 objects (25 updates, 25 inserts, 5 indexes) SIGKILLed at random
    points: each wholly present or wholly absent."""
    print("\n" + _kill_run(redis_url, redis_client, 60, seed, tmp_path))


@pytest.mark.soak
def test_killed_clients_all_or_nothing_soak(
    redis_url: str, redis_client: redis.Redis, seed: int, tmp_path: Path
) -> None:
    """1,000 flushes of 50 objects (25 updates, 25 inserts, 5 indexes) SIGKILLed at random
    points: each wholly present or wholly absent."""
    print("\n" + _kill_run(redis_url, redis_client, 1000, seed, tmp_path))


# --------------------------------------------------------------------------------------
# 7. Lost replies and timeouts at scale (helpers from tests/test_flush_faults.py).
# --------------------------------------------------------------------------------------


@pytest.fixture
def proxy(redis_client: redis.Redis, redis_url: str) -> Iterator[LoopbackProxy]:
    parts = urlsplit(redis_url)
    if parts.hostname is None or parts.port is None:
        pytest.skip("the proxy needs a TCP server")
    with LoopbackProxy(parts.hostname, parts.port) as p:
        yield p
    assert not p.alive


class _AppliedLog(logging.Handler):
    """Counts the read-backs that found a lost-reply flush applied."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if APPLIED_LOG in record.getMessage():
            self.count += 1


def _lost_reply_run(n: int, proxy: LoopbackProxy, raw: redis.Redis, seed: int) -> str:
    """n flushes (an update and an insert each) whose EXEC reply the proxy loses.

    One in five (shuffled) also makes the server unreachable right after the loss (the
    read-back fails): those must raise OutcomeUnknownError, and Redis holds them (outcome
    "unknown, applied"). Every other commit must return only after a read-back found it
    applied ("settled, applied"). Redis must hold every flush exactly once.
    """
    rng = random.Random(seed)
    schedule = [i < max(1, n // 5) for i in range(n)]
    rng.shuffle(schedule)
    engine = make_engine(proxy.url, socket_timeout=0.5)
    applied_log = _AppliedLog()
    logger = logging.getLogger("redmap.engine")
    logger.addHandler(applied_log)
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        _create_counter(engine)
        for i, unreachable in enumerate(schedule):
            before = _stored(raw, 1)
            assert before is not None
            read_backs = applied_log.count
            with Session(engine) as s, count_round_trips(engine) as rt:
                c = s.get(Counter, 1)
                assert c is not None
                c.value += 1
                extra = Counter(id=10_000 + i, value=i)
                s.add(extra)
                proxy.set_mode(
                    "drop_exec_reply", once=True, then="reset" if unreachable else "pass"
                )
                try:
                    s.commit()
                    outcome = "settled_applied"
                    assert applied_log.count == read_backs + 1, "success without a read-back"
                except OutcomeUnknownError as exc:
                    outcome = "unknown_applied"  # applied: checked below
                    assert {id(o) for o in exc.objects} == {id(c), id(extra)}
                    assert _in_doubt(c) and _in_doubt(extra)
                    with pytest.raises(InvalidRequestError):
                        s.commit()  # refuses to go on until rolled back
                    proxy.set_mode("pass")
                    s.rollback()
                proxy.set_mode("pass")
                assert rt.command_names.count("EXEC") == 1, "EXEC was re-sent"
            # A reachable server always settles the outcome; an unreachable one never can.
            assert outcome == ("unknown_applied" if unreachable else "settled_applied")
            outcomes[outcome] += 1
            after = _stored(raw, 1)
            assert after == (before[0] + 1, before[1] + 1), f"flush {i}: {before} -> {after}"
            assert _stored(raw, 10_000 + i) == (i, 1)
        assert proxy.exec_replies_dropped == n
        final = _stored(raw, 1)
        assert final is not None and final[0] == n  # 0 double applications
        # Both outcomes occurred (the schedule makes them; this keeps it honest).
        assert outcomes["unknown_applied"] == sum(schedule) >= 1, outcomes
        assert outcomes["settled_applied"] == n - sum(schedule) >= 1, outcomes
    finally:
        logger.removeHandler(applied_log)
        engine.dispose()
    return (
        f"lost EXEC replies x{n} (seed {seed}): replies dropped {proxy.exec_replies_dropped}, "
        f"settled by read-back as applied {outcomes['settled_applied']}, reported unknown "
        f"and applied {outcomes['unknown_applied']}, blind successes 0, double applications 0, "
        f"final counter {final[0]}"
    )


def test_lost_exec_replies(proxy: LoopbackProxy, redis_client: redis.Redis, seed: int) -> None:
    """50 flushes with the EXEC reply lost: each applied once, settled or reported unknown."""
    print("\n" + _lost_reply_run(50, proxy, redis_client, seed))


@pytest.mark.soak
def test_lost_exec_replies_soak(proxy: LoopbackProxy, redis_client: redis.Redis, seed: int) -> None:
    """500 flushes with the EXEC reply lost: each applied once, settled or reported unknown."""
    print("\n" + _lost_reply_run(500, proxy, redis_client, seed))


def _pause_line(n: int, figures: dict[str, int], seed: int) -> str:
    # (_pause_run itself asserts that each outcome it steers towards occurred.)
    shown = ", ".join(f"{k} {v}" for k, v in figures.items())
    return f"CLIENT PAUSE timeouts x{n} (seed {seed}): {shown}; double applications 0"


def test_client_pause_timeouts(proxy: LoopbackProxy, redis_client: redis.Redis, seed: int) -> None:
    """8 commits under CLIENT PAUSE timeouts: at most once each, never a false success;
    returned, "nothing was written" and "unknown, not applied" each occur."""
    print("\n" + _pause_line(8, _pause_run(8, proxy, redis_client, seed), seed))


@pytest.mark.soak
def test_client_pause_timeouts_soak(
    proxy: LoopbackProxy, redis_client: redis.Redis, seed: int
) -> None:
    """200 commits under CLIENT PAUSE timeouts: at most once each, never a false success;
    returned, "nothing was written" and "unknown, not applied" each occur."""
    print("\n" + _pause_line(200, _pause_run(200, proxy, redis_client, seed), seed))


# --------------------------------------------------------------------------------------
# 8. Wrong-typed index keys and out of memory.
# --------------------------------------------------------------------------------------

# Which key of a flush gets the wrong type: equality index of the new group value, the
# sorted index, the foreign-key zset of the new box, the model's id zset (insert), the
# unique key of the new code.
WRONG_KINDS = ("index", "sorted", "foreign", "all", "unique")


def _setup_items(engine: Engine, n: int = 10) -> tuple[list[int], list[int]]:
    with Session(engine) as s:
        boxes = [Box(label=f"b{i}") for i in range(3)]
        s.add_all(boxes)
        s.flush()
        items = [
            Item(group="g0", marker="m", code=f"c{i}", rank=i, box_id=boxes[0].id) for i in range(n)
        ]
        s.add_all(items)
        s.commit()
        return [cast(int, i.id) for i in items], [cast(int, b.id) for b in boxes]


def _target_key(kind: str, t: int, box: int) -> str:
    ks = mapper_of(Item).keys
    if kind == "index":
        return _index_key("group", f"new{t}")
    if kind == "sorted":
        return ks.sorted("rank")
    if kind == "foreign":
        return ks.foreign("box_id", mapper_of(Box).pk_segment(box))
    if kind == "all":
        return ks.all()
    return ks.unique("code", keys.escape(f"c-new{t}".encode()))


def _pick(
    raw: redis.Redis, rng: random.Random, pool: list[int], boxes: list[int]
) -> tuple[int, int]:
    """An Item to update and a box it is not in yet (so its foreign-key zsets change)."""
    pk = rng.choice(pool)
    current = raw.hget(mapper_of(Item).object_key(pk), "box_id")
    return pk, rng.choice([b for b in boxes if str(b).encode() != current])


def _change(s: Session, pk: int, t: int, box: int, insert: bool = True) -> tuple[Item, Item]:
    """Update one Item on every indexed field and (`insert`) add another: the flush under
    test. Without `insert` the new Item is returned unattached."""
    item = s.get(Item, pk)
    assert item is not None
    item.group = f"new{t}"
    item.rank = 1000 + t
    item.box_id = box
    item.code = f"c-new{t}"
    new = Item(group="gx", marker="m", code=f"n{t}", rank=t, box_id=box)
    if insert:
        s.add(new)
    return item, new


def _force_wrong_type(raw: redis.Redis, key: str) -> bytes | None:
    """Give `key` the wrong type (a string, or a list for unique keys); its old dump."""
    saved = raw.dump(key)
    raw.delete(key)
    if "uq:" in key:
        raw.rpush(key, "not-a-string")
    else:
        raw.set(key, "not-a-collection")
    return saved


def _restore(raw: redis.Redis, key: str, saved: bytes | None) -> None:
    raw.delete(key)
    if saved is not None:
        raw.restore(key, 0, saved)


def test_wrong_type_index_keys(redis_url: str, redis_client: redis.Redis, seed: int) -> None:
    """100 flushes meeting an index key of the wrong type: FlushError naming it, sent
    before MULTI, nothing changed, changes kept pending; and 100 where the key changes
    type between the checks and EXEC: FlushError naming it, objects marked for refresh."""
    raw = redis_client
    rng = random.Random(seed)
    engine = make_engine(redis_url)
    # A scripted flush (issue 14) checks types inside its transaction: it refuses with
    # MULTI sent and nothing run, and has no window between its checks and its writes.
    scripted = os.environ.get(SCRIPT_ENV) == "0"
    pre = collections.Counter[str]()
    inside = collections.Counter[str]()
    try:
        pool, boxes = _setup_items(engine)
        assert _dump(raw) == dump_keys(raw)  # the fast dump is the shared helper's
        # (a) the wrong type is there before the flush: the type checks catch it.
        for t in range(100):
            kind = WRONG_KINDS[t % len(WRONG_KINDS)]
            pk, box = _pick(raw, rng, pool, boxes)
            key = _target_key(kind, t, box)
            with Session(engine) as s:
                # Only the id zset needs an insert; fewer objects keep the audits quick.
                item, new = _change(s, pk, t, box, insert=kind == "all")
                saved = _force_wrong_type(raw, key)
                before = _dump(raw)
                with count_round_trips(engine) as rt, pytest.raises(FlushError) as info:
                    s.commit()
                assert type(info.value) is FlushError
                assert info.value.key == key, f"{kind}: reported {info.value.key!r}, not {key!r}"
                if scripted:
                    assert "EVALSHA" in rt.command_names
                else:
                    assert "MULTI" not in rt.command_names and "EXEC" not in rt.command_names
                assert _dump(raw) == before, f"{kind}: keys changed"
                assert item in s.dirty, "pending changes were dropped"
                assert (new in s.new) == (kind == "all"), "pending changes were dropped"
                assert not _in_doubt(item) and not _in_doubt(new)
                _restore(raw, key, saved)
                s.commit()  # the same unit of work, once the key is fixed
            pre[kind] += 1
            _audit_clean(raw)

        # (b) the key changes type after the checks, before EXEC: a runtime error in EXEC.
        for t in range(100, 200):
            kind = WRONG_KINDS[t % (len(WRONG_KINDS) - 1)]  # SET on a unique key never fails
            pk, box = _pick(raw, rng, pool, boxes)
            key = _target_key(kind, t, box)
            sent: list[tuple[Any, ...]] = []
            saved_box: list[bytes | None] = []

            def sabotage(
                commands: Sequence[tuple[Any, ...]],
                key: str = key,
                sent: list[tuple[Any, ...]] = sent,
                saved_box: list[bytes | None] = saved_box,
            ) -> None:
                if commands and ("MULTI",) in commands[:3] and not saved_box:
                    sent.extend(commands)
                    saved_box.append(_force_wrong_type(raw, key))

            with Session(engine) as s:
                item, new = _change(s, pk, t, box, insert=kind == "all")
                version = cast(Any, state_of(item)).version
                engine.add_listener(sabotage)
                try:
                    with pytest.raises(FlushError) as info:
                        s.commit()
                finally:
                    engine.remove_listener(sabotage)
                assert info.value.key == key, f"{kind}: reported {info.value.key!r}, not {key!r}"
                if scripted:
                    # Changed before the script ran: refused like (a), nothing written.
                    assert "nothing was written" in str(info.value)
                    assert not _in_doubt(item) and not _in_doubt(new)
                    assert item in s.dirty, "pending changes were dropped"
                    _restore(raw, key, saved_box[0])
                    s.commit()
                    _audit_clean(raw)
                    inside[kind] += 1
                    continue
                assert any("WRONGTYPE" in e for e in info.value.errors)
                assert _in_doubt(item), "objects not marked for refresh"
                assert _in_doubt(new) == (kind == "all"), "objects not marked for refresh"
                with pytest.raises(InvalidRequestError):
                    s.flush()  # nothing more until the session is rolled back
                s.rollback()
                assert new not in s
                # Redis has no rollback: the rest of the transaction applied.
                assert item.group == f"new{t}" and cast(Any, state_of(item)).version == version + 1
            # The audit finds exactly the damage; replaying the named command repairs it.
            _restore(raw, key, saved_box[0])
            report = audit(raw, reg)
            assert not report.unexplained and len(report.mismatches) == 1, report.mismatches
            assert report.mismatches[0].startswith(key + ":"), report.mismatches
            (failed,) = [c for c in sent if len(c) > 1 and c[1] == key]
            cast(Any, raw).execute_command(*failed)
            _audit_clean(raw)
            inside[kind] += 1
    finally:
        engine.dispose()
    print(
        f"\nwrong-typed index keys (seed {seed}): before the flush 100/100 FlushError naming "
        f"the key before MULTI, 0 keys changed, changes kept and committed after the fix "
        f"({dict(pre)}); between checks and EXEC 100/100 FlushError naming the key, objects "
        f"marked for refresh, 0 successes ({dict(inside)}); audit: {_audit_clean(raw)}"
    )


def test_out_of_memory_flush_is_refused_and_retryable(
    redis_url: str, redis_client: redis.Redis, seed: int
) -> None:
    """100 flushes under a tiny maxmemory (noeviction): refused with OOM, 0 keys changed,
    the session's changes kept; the same commit succeeds once memory is raised."""
    raw = redis_client
    rng = random.Random(seed)
    engine = make_engine(redis_url)
    policy = raw.config_get("maxmemory-policy")["maxmemory-policy"]
    paths = collections.Counter[str]()
    try:
        pool, boxes = _setup_items(engine)
        raw.config_set("maxmemory-policy", "noeviction")
        for t in range(100):
            pk, box = _pick(raw, rng, pool, boxes)
            with Session(engine) as s:
                item, new = _change(s, pk, t, box)
                if t % 2:
                    new.id = 100_000 + t  # explicit id: no counter round trip before MULTI
                before = _dump(raw)
                raw.config_set("maxmemory", 1)
                try:
                    with count_round_trips(engine) as rt, pytest.raises(FlushError) as info:
                        s.commit()
                finally:
                    raw.config_set("maxmemory", 0)
                # Reported as what it is (redis-py drops the "OOM" code from the text).
                err = info.value
                assert "maxmemory" in str(err) and "not a counter" not in str(err), str(err)
                assert any("maxmemory" in e for e in err.errors), err.errors
                paths["at EXEC" if "EXEC" in rt.command_names else "at id allocation"] += 1
                assert _dump(raw) == before, "keys changed by a refused flush"
                assert item in s.dirty and new in s.new, "pending changes were dropped"
                assert not _in_doubt(item) and not _in_doubt(new)
                # Someone else writes an object the refused flush had watched: the
                # engine's connections must not carry that WATCH into later commands.
                raw.hset(mapper_of(Item).object_key(item.id), "unrelated", "x")
                raw.hdel(mapper_of(Item).object_key(item.id), "unrelated")
                with Session(engine) as other:
                    found = other.scalars(select_(Item).where(Item.group == "g0")).all()
                    assert all(o.group == "g0" for o in found)
                s.commit()  # the kept changes, now that memory is available
                assert cast(Any, state_of(item)).version is not None
            assert raw.hget(mapper_of(Item).object_key(item.id), "code") == f"c-new{t}".encode()
            _audit_clean(raw)
    finally:
        raw.config_set("maxmemory", 0)
        raw.config_set("maxmemory-policy", policy)
        engine.dispose()
    print(
        f"\nout of memory x100 (seed {seed}): refused 100/100 ({dict(paths)}), 0 keys "
        f"changed, pending changes kept 100/100, retry after raising maxmemory committed "
        f"100/100; audit: {_audit_clean(raw)}"
    )


# --------------------------------------------------------------------------------------
# 9. Server killed and restarted under load.
# --------------------------------------------------------------------------------------


def _restart_run(
    tmp: Path, fsync: str, writers: int, seconds: float, kills: int, seed: int
) -> tuple[str, dict[str, int]]:
    """`writers` processes commit for `seconds` while redis-server (AOF, `fsync`) is
    SIGKILLed and restarted `kills` times; returns the figures line and the counts."""
    rng = random.Random(seed)
    datadir = tmp / f"aof-{fsync}"
    server = ServerProcess(
        datadir, persistent=True, config={"appendfsync": fsync}, die_with_parent=True
    )
    server.start()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    restarts: list[float] = []
    kills_at: list[float] = []
    try:
        engine = make_engine(server.url)
        with Session(engine) as s:
            s.add_all([Tally(id=i) for i in range(1, SHARED + 1)])
            s.add_all([Tally(id=OWN_BASE + w) for w in range(writers)])
            s.commit()
        engine.dispose()
        for w in range(writers):
            log = open(tmp / f"writer-{fsync}-{w}.err", "wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        WORKER,
                        "writer",
                        server.url,
                        str(w),
                        str(seconds),
                        str(tmp / f"writer-{fsync}-{w}.txt"),
                    ],
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        started = time.monotonic()
        downtime = []
        for k in range(kills):
            at = seconds * (k + 1) / (kills + 1) + rng.uniform(-0.3, 0.3)
            time.sleep(max(0.0, started + at - time.monotonic()))
            kills_at.append(time.time())
            server.kill()
            down_at = time.monotonic()
            time.sleep(rng.uniform(0.2, 0.6))
            server.restart()
            downtime.append(time.monotonic() - down_at)
            restarts.append(time.time())
        for p in procs:
            p.wait(timeout=seconds + 120)
        for w, p in enumerate(procs):
            err = (tmp / f"writer-{fsync}-{w}.err").read_text(errors="replace")
            assert p.returncode == 0, f"writer {w} exited {p.returncode}:\n{err[-3000:]}"

        lines: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
        for w in range(writers):
            for row in (tmp / f"writer-{fsync}-{w}.txt").read_text().splitlines():
                kind, pk, at_s = row.split()
                lines[kind].append((pk, float(at_s)))
        acked = {pk for pk, _ in lines["ack"]}
        unknown = {pk for pk, _ in lines["unknown"]}
        raw = server.client()
        try:
            mapper = mapper_of(Receipt)
            present = {
                mapper.pk_from_segment(mapper.keys.id_segment_of(k))
                for k in _object_keys(raw, Receipt)
            }
            lost = acked - present
            phantom = present - acked - unknown
            tallies = {
                int(mapper_of(Tally).pk_from_segment(mapper_of(Tally).keys.id_segment_of(k))): int(
                    raw.hget(k, "value") or 0
                )
                for k in _object_keys(raw, Tally)
            }
            summary = _audit_clean(raw)
        finally:
            raw.close()
        own = {w: sum(1 for pk in present if pk.startswith(f"w{w}-")) for w in range(writers)}
        detail = (
            f"lost {sorted(lost)}, unknown {sorted(unknown)}, tallies {tallies}, receipts "
            f"per writer {own}, failed {len(lines['failed'])}, restarts at {restarts}, "
            f"datadir {datadir}"
        )
        assert not phantom, f"{len(phantom)} commits reported as not written are in Redis"
        # Every commit incremented one shared and one own tally and added one receipt.
        assert sum(tallies[i] for i in range(1, SHARED + 1)) == len(present), detail
        for w in range(writers):
            assert tallies[OWN_BASE + w] == own[w], f"writer {w}: tally vs receipts; {detail}"
        # Sessions reconnect by themselves: every writer committed after the last restart.
        after_restart = collections.Counter(
            pk.split("-")[0] for pk, at_s in lines["ack"] if restarts and at_s > restarts[-1]
        )
        if restarts:
            assert len(after_restart) == writers, f"writers that resumed: {dict(after_restart)}"
        # Each kill landed under load: commits were acknowledged in the half second
        # before it (so commits were in flight when the server died).
        for k_at in kills_at:
            busy = sum(1 for _, at_s in lines["ack"] if k_at - 0.5 < at_s < k_at)
            assert busy >= 1, f"no commit in the 0.5 s before the kill at {k_at}; {detail}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()
        server.stop()
    counts = {
        "acked": len(acked),
        "lost": len(lost),
        "unknown": len(unknown),
        "unknown_applied": len(unknown & present),
        "failed_retried": len(lines["failed"]),
        "stale_exhausted": len(lines["stale"]),
    }
    line = (
        f"server SIGKILL+restart, appendfsync {fsync}, {writers} writers x {seconds:g}s, "
        f"{kills} kill(s) (down {', '.join(f'{d:.2f}s' for d in downtime)}; seed {seed}): "
        f"acknowledged {counts['acked']}, lost {counts['lost']}, outcome unknown "
        f"{counts['unknown']} (applied {counts['unknown_applied']}), connection errors "
        f"retried {counts['failed_retried']}, conflicts exhausted {counts['stale_exhausted']}, "
        f"phantom 0, all {writers} writers resumed after the restart; audit: {summary}"
    )
    return line, counts


def test_server_restart_aof_always(tmp_path: Path, seed: int) -> None:
    """redis-server SIGKILLed under 4 writers (6 s), AOF appendfsync always: 0 acked lost."""
    line, counts = _restart_run(tmp_path, "always", 4, 6.0, 1, seed)
    print("\n" + line)
    assert counts["lost"] == 0


def test_server_restart_aof_everysec(tmp_path: Path, seed: int) -> None:
    """The same with appendfsync everysec: reports acknowledged commits lost (not asserted)."""
    line, _ = _restart_run(tmp_path, "everysec", 4, 6.0, 1, seed)
    print("\n" + line)


@pytest.mark.soak
def test_server_restart_aof_always_soak(tmp_path: Path, seed: int) -> None:
    """8 writers for 30 s, 3 SIGKILLs of redis-server, appendfsync always: 0 acked lost."""
    line, counts = _restart_run(tmp_path, "always", 8, 30.0, 3, seed)
    print("\n" + line)
    assert counts["lost"] == 0


@pytest.mark.soak
def test_server_restart_aof_everysec_soak(tmp_path: Path, seed: int) -> None:
    """8 writers for 30 s, 3 SIGKILLs, appendfsync everysec: reports acked commits lost."""
    line, _ = _restart_run(tmp_path, "everysec", 8, 30.0, 3, seed)
    print("\n" + line)
