"""The flush protocol driven by hand: chosen replies, no server, exact requests.

`redmap.orm.flushprotocol.FlushProtocol` is I/O-free: it yields requests and takes replies.
These tests walk its states (lost EXEC reply, reset connection, redirects, stale
versions, aborted EXEC, refusals at queue time, refused INCRBY, ids taken) by answering
each request themselves; the engine they plan with points at a port nothing listens on
and fails the test on any round trip. Replies are what redis-py hands the driver
(bytes, ints, its exception objects); redirects are recognised by the sync driver's own
classifier. Real-server versions of these faults: tests/test_flush_faults.py and
tests/reliability/test_faults.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis.exceptions as rex

import redmap
from redmap import PrimaryKey, Session, Unique, create_engine, registry
from redmap.commands import Command
from redmap.dialects.base import _is_redirect
from redmap.engine import Engine
from redmap.exc import (
    FlushError,
    IntegrityError,
    OutcomeUnknownError,
    RedmapConnectionError,
    StaleDataError,
)
from redmap.orm import flushscript
from redmap.orm.attributes import state_of
from redmap.orm.flushplan import FlushPlan
from redmap.orm.flushprotocol import (
    REDIRECT_RETRIES,
    ClientExecute,
    FlushProtocol,
    Lost,
    Redirect,
    Reply,
    Request,
    RoundTrip,
    ScriptCache,
    Settle,
)
from redmap.orm.persistence import InsertTask
from redmap.orm.unitofwork import UOWTransaction

reg = registry(prefix="proto")


@reg.mapped
@dataclass
class Player:
    name: Annotated[str, Unique()]
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Team:
    id: Annotated[int, PrimaryKey()]
    title: str = ""


PLAYER_SEQ = "{proto}:player:#seq"
OK = b"OK"
QUEUED = b"QUEUED"
# What redis-py hands the driver for a redirect reply (the driver's classifier says so).
REDIRECTS = [
    rex.MovedError("3999 127.0.0.1:7001"),
    rex.AskError("3999 127.0.0.1:7001"),
    rex.TryAgainError(),
]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Job:
    """The unit of work as the protocol's `FlushJob`, recording every plan it makes."""

    def __init__(self, uow: UOWTransaction):
        self.uow = uow
        self.plans: list[FlushPlan] = []

    @property
    def inserts(self) -> list[InsertTask]:
        return self.uow.inserts

    def ids_first(self) -> bool:
        return self.uow.ids_first()

    @property
    def size(self) -> int:
        return self.uow.size

    @property
    def has_increments(self) -> bool:
        return self.uow.has_increments

    def plan(self) -> FlushPlan:
        plan = self.uow.plan()
        self.plans.append(plan)
        return plan


class Wire:
    """One flush driven by hand: `request` is what the protocol asks now; `answer`
    feeds a reply, `fail` throws what a driver's client raised. `requests` records
    every request in order."""

    def __init__(self, protocol: FlushProtocol):
        self.protocol = protocol
        self.steps = protocol.run()
        self.requests: list[Request] = []
        self.done = False
        self._record(next(self.steps))

    def _record(self, request: Request) -> None:
        self.request = request
        self.requests.append(request)

    def answer(self, reply: Reply) -> None:
        assert not self.done
        try:
            request = self.steps.send(reply)
        except StopIteration:
            self.done = True
            return
        self._record(request)

    def fail(self, exc: BaseException) -> None:
        self._record(self.steps.throw(exc))


def _no_io(commands: Sequence[Command]) -> None:
    raise AssertionError(f"the protocol tests must not send anything: {commands[:3]}")


@pytest.fixture
def offline() -> Iterator[Engine]:
    """An engine on a port nothing listens on, failing the test on any round trip."""
    engine = create_engine("redis://127.0.0.1:1/0")
    engine.add_listener(_no_io)
    yield engine
    engine.dispose()


def start(session: Session, clock: Clock | None = None) -> tuple[Job, Wire]:
    """Collect the session's pending work and start its flush protocol by hand."""
    uow = UOWTransaction(session._context)
    session.bind.run(uow.collect())
    uow.start()
    job = Job(uow)
    protocol = FlushProtocol(
        job, url="redis://127.0.0.1:1/0", is_redirect=_is_redirect, clock=clock or Clock()
    )
    return job, Wire(protocol)


def watch_request(plan: FlushPlan) -> RoundTrip:
    return RoundTrip([("WATCH", *plan.watch), *plan.check_commands], plan.token_key)


def exec_request(plan: FlushPlan) -> RoundTrip:
    return RoundTrip([("MULTI",), *plan.transaction, ("EXEC",)], plan.token_key)


def passing(plan: FlushPlan) -> list[Any]:
    """The replies of a WATCH + checks round trip whose every check passes."""
    replies: list[Any] = [OK]
    for check in plan.checks:
        if check.kind == "version":
            version, incarnation = check.expected
            replies.append([None if version is None else str(version).encode(), incarnation])
        elif check.kind in ("absent", "fresh"):
            replies.append(0)
        elif check.kind in ("exists", "target"):
            replies.append(1)
        elif check.kind == "members":
            replies.append(list(check.expected))
        elif check.kind == "type":
            replies.append(b"none")
        else:  # unique claims and counters: absent
            replies.append(None)
    return replies


def executed(plan: FlushPlan) -> list[Any]:
    """The replies of a MULTI/writes/EXEC round trip that ran."""
    n = len(plan.transaction)
    return [OK, *[QUEUED] * n, [1] * n]


def aborted(plan: FlushPlan) -> list[Any]:
    """The replies of a MULTI/writes/EXEC whose WATCH failed (null EXEC)."""
    return [OK, *[QUEUED] * len(plan.transaction), None]


def commit_team(engine: Engine) -> tuple[Session, Team]:
    """A persistent Team(7), made by a hand-driven flush (version 1)."""
    s = Session(engine)
    team = Team(id=7, title="old")
    s.add(team)
    job, wire = start(s)
    plan = job.plans[0]
    wire.answer(passing(plan))
    wire.answer(executed(plan))
    assert wire.done
    job.uow.finalize()
    return s, team


# -- importing the core ------------------------------------------------------------------


def test_core_imports_without_redis_py() -> None:
    """The package, the planner, the flush protocol, the unit of work and the session
    import in a fresh interpreter without loading redis-py (the driver loads it when an
    engine is created)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(redmap.__file__)))
    code = (
        "import sys, redmap, redmap.orm.flushplan, redmap.orm.persistence, "
        "redmap.orm.flushprotocol, "
        "redmap.commands, redmap.orm.unitofwork, redmap.orm.session\n"
        "bad = sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_core_imports_with_redis_blocked() -> None:
    """With redis-py made unimportable, the core still imports (and the driver does not)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(redmap.__file__)))
    code = (
        "import sys\n"
        "sys.modules['redis'] = None\n"
        "import redmap.orm.flushprotocol\n"
        "try:\n"
        "    import redmap.dialects.base\n"
        "except ImportError:\n"
        "    print('driver needs redis')\n"
    )
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "driver needs redis"


# -- the usual paths -----------------------------------------------------------------------


def test_explicit_insert_is_watch_then_exec(offline: Engine) -> None:
    """An explicit-id insert asks for exactly two round trips: WATCH + checks, MULTI/EXEC."""
    s = Session(offline)
    s.add(Team(id=7, title="x"))
    job, wire = start(s)
    plan = job.plans[0]
    assert wire.request == watch_request(plan)
    assert plan.watch[0] == "{proto}:team:7"
    wire.answer(passing(plan))
    assert wire.request == exec_request(plan)
    assert wire.request.commands[1][:2] == ("HSET", "{proto}:team:7")
    wire.answer(executed(plan))
    assert wire.done
    assert len(wire.requests) == 2
    assert not wire.protocol.broken


def test_generated_insert_takes_its_id_after_the_checks(offline: Engine) -> None:
    """A generated id is asked for (INCRBY through the client) only once the checks
    passed, and bound into the writes: three requests."""
    s = Session(offline)
    s.add(Player(name="ann"))
    job, wire = start(s)
    plan = job.plans[0]
    assert wire.request == watch_request(plan)
    assert all("#new" not in str(c) for c in plan.check_commands)
    wire.answer(passing(plan))
    assert wire.request == ClientExecute([("INCRBY", PLAYER_SEQ, 1)])
    wire.answer([41])
    assert wire.request == exec_request(plan)
    assert ("HSET", "{proto}:player:41") == wire.request.commands[1][:2]
    assert ("SET", "{proto}:player:#uq:name:ann", "41") in wire.request.commands
    wire.answer(executed(plan))
    assert wire.done
    assert [type(r) for r in wire.requests] == [RoundTrip, ClientExecute, RoundTrip]
    assert plan.moved_counters == [(PLAYER_SEQ, 41, 41)]


# -- a lost EXEC reply ---------------------------------------------------------------------


def _lose_exec(offline: Engine, clock: Clock | None = None) -> tuple[Job, Wire, Team]:
    s = Session(offline)
    team = Team(id=7, title="x")
    s.add(team)
    job, wire = start(s, clock)
    plan = job.plans[0]
    wire.answer(passing(plan))
    wire.answer(Lost("TimeoutError"))
    assert wire.request == Settle(
        [("SET", plan.token_key, b"settled", "NX", "PX", plan.token_ttl_ms)], plan.token_key
    )
    assert wire.protocol.broken
    return job, wire, team


def test_exec_reply_lost_then_token_found(
    offline: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost EXEC reply whose token the read-back finds (SET NX answers nil): applied."""
    job, wire, team = _lose_exec(offline)
    with caplog.at_level(logging.WARNING, logger="redmap.engine"):
        wire.answer([None])
    assert wire.done
    assert "read-back shows it was applied" in caplog.text
    assert not state_of(team).in_doubt
    assert len(wire.requests) == 3


def test_exec_reply_lost_then_token_not_found(offline: Engine) -> None:
    """A lost EXEC reply whose token the read-back creates: nothing was written, said so."""
    job, wire, team = _lose_exec(offline)
    with pytest.raises(RedmapConnectionError, match="read-back shows nothing was written"):
        wire.answer([True])
    assert not state_of(team).in_doubt
    assert len(wire.requests) == 3


@pytest.mark.parametrize(
    "reply",
    [Lost("ConnectionError"), [rex.ResponseError("OOM command not allowed")]],
    ids=["read-back-lost", "read-back-refused"],
)
def test_exec_reply_lost_then_read_back_failed(offline: Engine, reply: Reply) -> None:
    """A lost EXEC reply whose read-back fails or is refused: outcome unknown, the
    objects in doubt."""
    job, wire, team = _lose_exec(offline)
    with pytest.raises(OutcomeUnknownError, match="could not be read back") as info:
        wire.answer(reply)
    assert state_of(team).in_doubt
    assert info.value.objects == [team]


def test_exec_reply_lost_read_back_after_token_lifetime(offline: Engine) -> None:
    """A read-back that creates the token after its lifetime proves nothing: unknown."""
    clock = Clock()
    job, wire, team = _lose_exec(offline, clock)
    clock.now += job.plans[0].token_ttl_ms / 1000
    with pytest.raises(OutcomeUnknownError, match="after the token's lifetime"):
        wire.answer([True])
    assert state_of(team).in_doubt


# -- connection failures before EXEC -------------------------------------------------------


def test_connection_reset_after_watch(offline: Engine) -> None:
    """The WATCH + checks round trip fails at the connection: nothing was written, the
    connection is dropped, no other request follows."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    with pytest.raises(RedmapConnectionError, match="before the flush was sent.*ConnectionError"):
        wire.answer(Lost("ConnectionError"))
    assert wire.protocol.broken
    assert len(wire.requests) == 1


def test_connection_lost_on_unwatch_after_refusal(offline: Engine) -> None:
    """A refused flush whose UNWATCH fails still reports the refusal, and the connection
    (which may keep the WATCH) is dropped, not pooled."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    plan = job.plans[0]
    replies = passing(plan)
    replies[1 + [c.kind for c in plan.checks].index("absent")] = 1  # the key is taken
    wire.answer(replies)
    assert wire.request == RoundTrip([("UNWATCH",)], plan.token_key)
    with pytest.raises(IntegrityError, match="already exists"):
        wire.answer(Lost("ConnectionError"))
    assert wire.protocol.broken


# -- redirects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "redirect",
    REDIRECTS,
    ids=["MOVED", "ASK", "TRYAGAIN"],
)
def test_redirect_on_checks_starts_again(offline: Engine, redirect: Exception) -> None:
    """MOVED / ASK / TRYAGAIN answering a check: UNWATCH, `Redirect` (the driver learns
    the topology), then the same plan from WATCH on a new connection."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    plan = job.plans[0]
    replies = passing(plan)
    replies[1] = redirect
    wire.answer(replies)
    assert wire.request == RoundTrip([("UNWATCH",)], plan.token_key)
    wire.answer([OK])
    assert wire.request == Redirect(1)
    wire.answer(None)
    assert wire.request == watch_request(plan)
    wire.answer(passing(plan))
    wire.answer(executed(plan))
    assert wire.done
    assert len(job.plans) == 1


@pytest.mark.parametrize(
    "redirect",
    REDIRECTS,
    ids=["MOVED", "ASK", "TRYAGAIN"],
)
def test_redirect_at_exec_starts_again(offline: Engine, redirect: Exception) -> None:
    """A redirect answering a queued write (EXECABORT: nothing ran) starts the flush again."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    plan = job.plans[0]
    wire.answer(passing(plan))
    n = len(plan.transaction)
    wire.answer([OK, redirect, *[QUEUED] * (n - 1), rex.ExecAbortError("EXECABORT")])
    assert wire.request == Redirect(1)
    wire.answer(None)
    assert wire.request == watch_request(plan)


def test_redirect_after_late_ids_plans_again(offline: Engine) -> None:
    """A redirect at EXEC after ids were handed out: a new plan whose checks cover the
    ids' own keys; no second INCRBY."""
    s = Session(offline)
    s.add(Player(name="ann"))
    job, wire = start(s)
    first = job.plans[0]
    wire.answer(passing(first))
    wire.answer([5])
    n = len(first.transaction)
    wire.answer([OK, rex.TryAgainError(), *[QUEUED] * (n - 1), rex.ExecAbortError("EXECABORT")])
    assert wire.request == Redirect(1)
    wire.answer(None)
    assert len(job.plans) == 2
    second = job.plans[1]
    assert wire.request == watch_request(second)
    assert ("EXISTS", "{proto}:player:5") in second.check_commands
    wire.answer(passing(second))
    assert wire.request == exec_request(second)
    wire.answer(executed(second))
    assert wire.done
    assert sum(isinstance(r, ClientExecute) for r in wire.requests) == 1


def test_endless_redirects_give_up(offline: Engine) -> None:
    """A slot that keeps answering TRYAGAIN: the flush gives up, nothing written."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    plan = job.plans[0]
    with pytest.raises(RedmapConnectionError, match="kept redirecting"):
        for attempt in range(1, REDIRECT_RETRIES + 1):
            replies = passing(plan)
            replies[1] = rex.TryAgainError()
            wire.answer(replies)
            wire.answer([OK])  # UNWATCH
            assert wire.request == Redirect(attempt)
            wire.answer(None)


# -- refusals ------------------------------------------------------------------------------


def test_stale_version_is_stale_data(offline: Engine) -> None:
    """An update whose object changed since it was loaded (another `#v`): StaleDataError
    naming it, after UNWATCH; nothing sent inside MULTI."""
    s, team = commit_team(offline)
    team.title = "new"
    job, wire = start(s)
    plan = job.plans[0]
    assert ("HMGET", "{proto}:team:7", "#v", "#i") in plan.check_commands
    replies = passing(plan)
    at = 1 + [c.kind for c in plan.checks].index("version")
    replies[at] = [b"2", replies[at][1]]
    wire.answer(replies)
    assert wire.request == RoundTrip([("UNWATCH",)], plan.token_key)
    with pytest.raises(StaleDataError, match=r"Team\(7\) changed") as info:
        wire.answer([OK])
    assert info.value.objects == [team]
    assert not any(r.commands[0] == ("MULTI",) for r in wire.requests if isinstance(r, RoundTrip))


def test_null_exec_runs_the_checks_again(offline: Engine) -> None:
    """A null EXEC (a watched key changed) re-runs the same plan's checks, then commits."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    plan = job.plans[0]
    wire.answer(passing(plan))
    wire.answer(aborted(plan))
    assert wire.request == watch_request(plan)
    wire.answer(passing(plan))
    assert wire.request == exec_request(plan)
    wire.answer(executed(plan))
    assert wire.done
    assert len(wire.requests) == 4
    assert len(job.plans) == 1


def test_null_exec_after_late_ids_plans_again(offline: Engine) -> None:
    """A null EXEC after the ids were handed out: planned again with the ids (their
    keys checked), the same ids kept."""
    s = Session(offline)
    s.add(Player(name="ann"))
    job, wire = start(s)
    wire.answer(passing(job.plans[0]))
    wire.answer([9])
    wire.answer(aborted(job.plans[0]))
    second = job.plans[1]
    assert wire.request == watch_request(second)
    assert ("EXISTS", "{proto}:player:9") in second.check_commands
    wire.answer(passing(second))
    wire.answer(executed(second))
    assert wire.done


def test_null_exec_forever_is_stale(offline: Engine) -> None:
    """Watched keys that change before every EXEC: StaleDataError after the retries."""
    s = Session(offline)
    s.add(Team(id=7))
    job, wire = start(s)
    plan = job.plans[0]
    with pytest.raises(StaleDataError, match="kept changing"):
        while True:
            wire.answer(passing(plan))
            wire.answer(aborted(plan))


def test_oom_at_queue_time(offline: Engine) -> None:
    """Redis refusing queued commands (OOM; EXECABORT): FlushError quoting the refusal
    once, nothing written, the counter that moved named."""
    s = Session(offline)
    s.add(Player(name="ann"))
    job, wire = start(s)
    plan = job.plans[0]
    wire.answer(passing(plan))
    wire.answer([3])
    n = len(plan.transaction)
    oom = rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    with pytest.raises(FlushError, match=f"before running it \\({n} of {n} queued") as info:
        wire.answer([OK, *[oom] * n, rex.ExecAbortError("EXECABORT Transaction discarded")])
    assert info.value.errors == [str(oom)]
    assert f"'{PLAYER_SEQ}' handed out 3..3" in str(info.value)
    assert len(wire.requests) == 3


def test_incrby_refused(offline: Engine) -> None:
    """INCRBY refused (wrong type of the counter): UNWATCH, then FlushError naming it."""
    s = Session(offline)
    s.add(Player(name="ann"))
    job, wire = start(s)
    plan = job.plans[0]
    wire.answer(passing(plan))
    assert wire.request == ClientExecute([("INCRBY", PLAYER_SEQ, 1)])
    wire.answer([rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind")])
    assert wire.request == RoundTrip([("UNWATCH",)], plan.token_key)
    with pytest.raises(FlushError, match="cannot hand out Player ids.*WRONGTYPE"):
        wire.answer([OK])
    assert not wire.protocol.broken


def test_incrby_connection_lost(offline: Engine) -> None:
    """The client could not send the INCRBY: UNWATCH, then an error saying the counter
    may have moved."""
    s = Session(offline)
    s.add(Player(name="ann"))
    job, wire = start(s)
    plan = job.plans[0]
    wire.answer(passing(plan))
    wire.fail(RedmapConnectionError("cannot talk to Redis (ConnectionError: reset)", url="x"))
    assert wire.request == RoundTrip([("UNWATCH",)], plan.token_key)
    with pytest.raises(RedmapConnectionError, match=f"handing out ids: '{PLAYER_SEQ}'"):
        wire.answer([OK])


def test_ids_taken_are_replaced(offline: Engine) -> None:
    """Ids first (explicit and generated ids of one model): an id found taken by an
    explicit insert is replaced by a new INCRBY (never given back), then committed."""
    s = Session(offline)
    s.add(Player(name="gen"))
    s.add(Player(name="exp", id=3))
    job, wire = start(s)
    assert wire.request == ClientExecute([("INCRBY", PLAYER_SEQ, 2)])
    wire.answer([2])  # 1..2: the generated one gets 1
    first = job.plans[0]
    assert wire.request == watch_request(first)
    assert ("EXISTS", "{proto}:player:1") in first.check_commands
    replies = passing(first)
    replies[1 + first.check_commands.index(("EXISTS", "{proto}:player:1"))] = 1
    wire.answer(replies)
    assert wire.request == RoundTrip([("UNWATCH",)], first.token_key)  # no give-back
    wire.answer([OK])
    assert wire.request == ClientExecute([("INCRBY", PLAYER_SEQ, 2)])
    wire.answer([4])  # 3..4: 3 is the explicit one, the generated one gets 4
    second = job.plans[1]
    assert wire.request == watch_request(second)
    assert ("EXISTS", "{proto}:player:4") in second.check_commands
    wire.answer(passing(second))
    wire.answer(executed(second))
    assert wire.done
    assert second.moved_counters == [(PLAYER_SEQ, 1, 2), (PLAYER_SEQ, 3, 4)]


def test_refused_flush_gives_its_ids_back(offline: Engine) -> None:
    """Ids first, then a check refuses the flush (a unique value taken): the counter is
    set back under WATCH if it still ends the range (two more round trips)."""
    s = Session(offline)
    s.add(Player(name="gen"))
    s.add(Player(name="exp", id=3))
    job, wire = start(s)
    wire.answer([2])
    plan = job.plans[0]
    replies = passing(plan)
    claim = ("GET", "{proto}:player:#uq:name:gen")
    replies[1 + plan.check_commands.index(claim)] = b"77"
    wire.answer(replies)
    probe = ("EXISTS", "{proto}:player:1", "{proto}:player:2")
    assert wire.request == RoundTrip(
        [("WATCH", PLAYER_SEQ), ("GET", PLAYER_SEQ), probe], plan.token_key
    )
    wire.answer([OK, b"2", 0])
    assert wire.request == RoundTrip([("MULTI",), ("DEL", PLAYER_SEQ), ("EXEC",)], plan.token_key)
    with pytest.raises(IntegrityError, match="already taken"):
        wire.answer([OK, QUEUED, [1]])


def test_ids_taken_by_an_explicit_insert_are_not_given_back(offline: Engine) -> None:
    """The same refusal, but a key of the range exists by now (an explicit insert took
    that id between the INCRBY and the WATCH): the counter stays (a gap), or the id would
    be handed out again to a flush that does not check it."""
    s = Session(offline)
    s.add(Player(name="gen"))
    s.add(Player(name="exp", id=3))
    job, wire = start(s)
    wire.answer([2])
    plan = job.plans[0]
    replies = passing(plan)
    claim = ("GET", "{proto}:player:#uq:name:gen")
    replies[1 + plan.check_commands.index(claim)] = b"77"
    wire.answer(replies)
    wire.answer([OK, b"2", 1])  # one of player:1, player:2 exists
    assert wire.request == RoundTrip([("UNWATCH",)], plan.token_key)
    with pytest.raises(IntegrityError, match="already taken"):
        wire.answer([OK])


# -- the scripted flush (issue 14) -------------------------------------------------------


def start_scripted(session: Session, clock: Clock | None = None) -> tuple[Job, Wire]:
    """As `start`, for a protocol that scripts every flush (threshold 0) on an engine
    known to hold the script (EVALSHA, not EVAL)."""
    uow = UOWTransaction(session._context)
    session.bind.run(uow.collect())
    uow.start()
    job = Job(uow)
    protocol = FlushProtocol(
        job,
        url="redis://127.0.0.1:1/0",
        is_redirect=_is_redirect,
        clock=clock or Clock(),
        script_threshold=0,
        script_cache=ScriptCache(loaded=True),
    )
    return job, Wire(protocol)


def _script_trip(wire: Wire) -> RoundTrip:
    request = wire.request
    assert isinstance(request, RoundTrip)
    names = [c[0] for c in request.commands]
    assert names[:2] == ["WATCH", "MULTI"] and names[-1] == "EXEC", names
    return request


def test_scripted_flush_is_one_round_trip(offline: Engine) -> None:
    s, team = commit_team(offline)
    team.title = "new"
    job, wire = start_scripted(s)
    request = _script_trip(wire)
    assert [c[0] for c in request.commands] == ["WATCH", "MULTI", "EVALSHA", "EXEC"]
    assert request.commands[2][1] == flushscript.SCRIPT_SHA
    wire.answer([OK, OK, QUEUED, [[1, []]]])
    assert wire.done


def test_scripted_flush_refused_by_its_checks_is_stale(offline: Engine) -> None:
    """The script answers the replies of its checks: the classic wording."""
    s, team = commit_team(offline)
    team.title = "new"
    job, wire = start_scripted(s)
    _script_trip(wire)
    plan = job.plans[0]
    stale = [[b"2", c.expected[1]] if c.kind == "version" else b"none" for c in plan.checks]
    with pytest.raises(StaleDataError, match=r"Team\(7\)"):
        wire.answer([OK, OK, QUEUED, [[0, stale]]])


def test_scripted_flush_after_noscript_sends_the_body(offline: Engine) -> None:
    s, team = commit_team(offline)
    team.title = "new"
    job, wire = start_scripted(s)
    _script_trip(wire)
    wire.answer([OK, OK, QUEUED, [rex.NoScriptError("No matching script.")]])
    request = _script_trip(wire)
    assert request.commands[2][:2] == ("EVAL", flushscript.SCRIPT)
    wire.answer([OK, OK, QUEUED, [[1, []]]])
    assert wire.done and wire.protocol.script_cache.loaded


def test_scripted_flush_with_watch_refused_reads_the_exec_reply(offline: Engine) -> None:
    """MULTI and the script go with the WATCH: a refused WATCH (say an ACL) does not mean
    nothing ran. The EXEC reply decides: here the script ran and the flush applied."""
    s, team = commit_team(offline)
    team.title = "new"
    job, wire = start_scripted(s)
    _script_trip(wire)
    wire.answer([rex.ResponseError("NOPERM no WATCH for you"), OK, QUEUED, [[1, []]]])
    assert wire.done


def test_scripted_flush_lost_reply_is_settled(offline: Engine) -> None:
    s, team = commit_team(offline)
    team.title = "new"
    job, wire = start_scripted(s)
    _script_trip(wire)
    wire.answer(Lost("ConnectionError"))
    assert isinstance(wire.request, Settle)
    assert wire.request.commands[0][:3] == ("SET", job.plans[0].token_key, b"settled")
    wire.answer([None])  # the token was there: applied
    assert wire.done
