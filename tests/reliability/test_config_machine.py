"""Property-based: a state machine whose every run draws its configuration (issue 11).

The other two machines always use int keys and one fixed model; the defects of issue 11
(an explicit id overwritten by a generated one, a UUID foreign key to a new parent never
written, a merge overwriting concurrent changes, a failed flush with side effects, a
missing or non-canonical `#v`) live in the configurations and steps they never took.
Each example here draws:

- the primary key kind of both models: generated int, explicit int, str, generated
  UUID or explicit UUID;
- `Unique()` on `Player.email` or not; both models sharded by their own key or not
  (4 shards); ``cascade="all, delete-orphan"`` on `Team.players` or not; on the
  3-node cluster, `allow_cross_slot` on or off;
- the driver of the two sessions: sync, or asyncio (`tests/_async_driver.py`: the
  same `Session` API, every round trip awaited on `redis.asyncio` by `AsyncEngine`);

and builds `Team` / `Player` in a fresh `registry()` under a prefix of its own
(`tests/reliability/_models.py: config_models`). Two sessions, A and B (autoflush off),
add, change, re-parent, release and delete players and commit, roll back or expire;
the steps issue 11 asked for are rules too:

- **merge of a detached copy**: a copy loaded earlier (`expire_on_commit=False`, session
  closed), changed, `merge()`d into a fresh session and committed: `StaleDataError`
  (nothing written) when the stored object changed or went since, else applied;
- **flush failure, then retry**: a duplicate unique value or a stale object makes a
  commit fail; Redis and the session must be exactly as before (identity map, pending
  sets, attribute values, versions); the cause is fixed and the same session commits;
- **explicit id near the counter** (generated int keys): a session inserts generated
  ids while, between its id allocation and its EXEC, another process inserts
  `id = counter` or `counter + 1`; a session mixes an explicit `counter + 1` with
  generated ids in one flush;
- **a concurrent writer in another process**: a worker process (JSON lines over a
  pipe, redmap on its own connections) inserts, updates or deletes when told, between
  steps or *inside* a session's commit (after its checks, before its EXEC: the engine's
  round-trip hook tells it when); the model applies what the worker acknowledged;
- **corrupt `#v`** (a leading zero, deleted, garbage) with raw redis-py: the audit
  must report it; a session that loaded the object before must get `StaleDataError`
  (or, for a leading zero, which is the same number, have its update applied); a
  fresh load must get a `DecodeError` or the stored values, and its update must be
  applied or refused with a `DecodeError`, never stale forever; once deleted the
  object stays deleted (no resurrection by a stale update); then `#v` is repaired.
- **the same key, another object**: the worker deletes a player a session holds and
  inserts another under its key; the session's update or delete must be stale.

After every step (skipped when neither Redis nor the reference changed, by
`DEBUG DIGEST`): a fresh session reads exactly the reference (players with their fields,
foreign keys and teams, teams with their players, equality, unique and sorted queries),
every `#v` equals the reference's version, and `redmap.audit` is clean.

Budgets: the run is seeded (`REDMAP_SEED` replays it; the seed is printed, and on a
failure with the command to replay), every rule and every outcome class is counted, and
the run fails unless the interesting branches ran often enough. `REDMAP_PP_EXAMPLES=0`
is an error, not a vacuous pass. Default: 100 examples x 30 steps on one server and 10
on the cluster; `-m soak`: 10,000 (and 300 on the cluster).

Known defects the machine finds while they are open make it fail with a message naming
them: issue 11's items (1, 2, 3, 4, 6, 8, 10) and the defects it found besides, each with
a regression test in `tests/test_property_regressions.py` ("orphan-expire": expiry keeps
a released child's delete-orphan; "reinsert-aba": a key deleted and inserted again
restarts at version 1, so holders of the old object pass the version check;
"version-restart": the same after a missing or non-canonical `#v` was rewritten).
`REDMAP_PP_TOLERATE=1,2,reinsert-aba` accepts (and counts) the named wrong outcomes, or
avoids the step that provokes them, to look for other defects meanwhile. Nothing is
tolerated by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from redmap import Session, create_engine, select
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import (
    CrossSlotError,
    DecodeError,
    IntegrityError,
    PartialCommitError,
    RedmapError,
    StaleDataError,
)
from redmap.orm.attributes import STATE_ATTR
from redmap.orm.base import ObjectStatus
from redmap.orm.mapper import mapper_of
from tests.reliability._budget import check_minimums, examples_from_env, run_seeded

NAMES = ("a", "b", "c")
EMAILS = ("w", "x", "y")
SCORES = (-2, 2)
FIELDS = ("name", "email", "score")
SESSIONS = st.sampled_from(("A", "B"))
POOLS: dict[str, tuple[Any, ...]] = {
    "int": (1, 2, 3, 4, 5, 6, 7),
    "str": ("a", "b:c", "\u00e9", "", "10", "9", "{x}"),
    "uuid": tuple(uuid.UUID(int=i * 0x1000_0000_0001) for i in range(1, 8)),
}
REPO = Path(__file__).resolve().parents[2]
UNLOADED = "<unloaded>"
TOLERATE = {s.strip() for s in os.environ.get("REDMAP_PP_TOLERATE", "").split(",") if s.strip()}


def known(item: str, what: str) -> None:
    """A wrong outcome that is issue 11's item `item`: fail naming it, unless tolerated."""
    bump(f"known defect seen: {item}")
    if item not in TOLERATE:
        where = (f"issue 11 item {item}" if item.isdigit()
                 else f"defect {item!r} (tests/test_property_regressions.py)")
        raise AssertionError(f"{where}: {what}")


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What one example runs on."""

    pk: str
    unique: bool
    sharded: bool
    orphans: bool
    cross_slot: bool = False
    # Which driver sessions A and B run on: the sync Engine, or the asyncio driver
    # behind the same Session API (tests/_async_driver.py: LoopEngine).
    driver: str = "sync"
    # How sessions A, B and the worker commit (issue 14): "watch" (WATCH + checks, then
    # MULTI/EXEC) or "script" (one script inside MULTI), whatever the flush's size.
    flush: str = "watch"

    @property
    def explicit(self) -> bool:
        """New objects get their primary key from the test (no generated keys)."""
        return self.pk in POOLS

    def pool(self) -> tuple[Any, ...]:
        return POOLS[self.pk]


def configs(cluster: bool) -> st.SearchStrategy[Config]:
    """Every combination; `Unique()` is refused on sharded models, so never both."""
    return st.builds(
        Config,
        pk=st.sampled_from(("gen_int", "int", "str", "gen_uuid", "uuid")),
        unique=st.booleans(),
        sharded=st.booleans(),
        orphans=st.booleans(),
        cross_slot=st.booleans() if cluster else st.just(False),
        driver=st.sampled_from(("sync", "async")),
        flush=st.sampled_from(("watch", "script")),
    ).map(lambda c: dataclasses.replace(c, unique=c.unique and not c.sharded)).filter(wanted)


def wanted(cfg: Config) -> bool:
    """`REDMAP_PP_CONFIG=pk=gen_uuid,sharded=1` restricts a run to matching configurations
    (to chase one defect); unset, every configuration is drawn."""
    for term in filter(None, os.environ.get("REDMAP_PP_CONFIG", "").split(",")):
        key, _, value = term.partition("=")
        have = getattr(cfg, key)
        if (str(int(have)) if isinstance(have, bool) else str(have)) != value:
            return False
    return True


def enc(pk: Any) -> Any:
    """A primary key as JSON for the worker (None stays None)."""
    if pk is None:
        return None
    if isinstance(pk, uuid.UUID):
        return ["u", str(pk)]
    return ["i", pk] if isinstance(pk, int) else ["s", pk]


def dec(value: Any) -> Any:
    if value is None:
        return None
    kind, v = value
    return uuid.UUID(v) if kind == "u" else v


BORN: dict[Any, int] = {}
"""Primary keys by order of creation in the current example: generated UUIDs are random,
so the machine orders keys by birth, never by value (else a replayed example draws
differently)."""


def born(pk: Any) -> Any:
    BORN.setdefault(pk, len(BORN))
    return pk


def order_key(pk: Any) -> tuple[int, str, str]:
    """Sort primary keys of mixed kinds: by birth, then (explicit keys) by value."""
    return (BORN.get(pk, 1 << 60), type(pk).__name__, str(pk))


class ReplayableUUIDs:
    """`uuid.uuid4` for the run: random-looking, but the same sequence in every example
    (reset at its start), so that a replayed example generates the same keys, lands in
    the same shards and takes the same path. Each process uses its own stream."""

    def __init__(self, stream: int):
        self.stream = stream
        self.rng = random.Random(stream)

    def reset(self) -> None:
        self.rng = random.Random(self.stream)

    def __call__(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)


UUIDS = ReplayableUUIDs(0)

SHARD_CHOICE = random.Random(0)
"""The random shard a new object of a model sharded by its own generated key joins
(`redmap.orm.unitofwork` draws it from `random`): a generator of its own, reset at every
example, so that other users of `random` (retry back-offs on a cluster, whose number
depends on timing) do not change which shards a replayed example uses."""


# -- the worker process ----------------------------------------------------------------


def worker_main() -> None:
    """Apply writes through redmap when told: JSON lines on stdin, one answer per line."""
    from tests.reliability._models import config_models

    engine: Engine | None = None
    team: Any = None
    player: Any = None
    uuids = ReplayableUUIDs(1)
    uuid.uuid4 = uuids  # type: ignore[assignment]  # this process only
    import redmap.orm.unitofwork

    shards = random.Random(1)
    redmap.orm.unitofwork.random = shards  # type: ignore[assignment]
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg["op"]
        if op == "quit":
            break
        try:
            if op == "config":
                uuids.reset()
                shards.seed(1)
                if engine is not None:
                    engine.dispose()
                engine = create_engine(
                    msg["url"],
                    flush_script_threshold=0 if msg.get("flush") == "script" else None,
                )
                _, team, player = config_models(
                    msg["prefix"],
                    pk=msg["pk"],
                    unique=msg["unique"],
                    sharded=msg["sharded"],
                    orphans=msg["orphans"],
                )
                answer: dict[str, Any] = {"ok": True}
            else:
                assert engine is not None
                answer = _worker_write(engine, team, player, msg)
        except RedmapError as exc:
            answer = {"error": type(exc).__name__, "message": str(exc)[:300]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    if engine is not None:
        engine.dispose()


def _worker_write(engine: Engine, team: Any, player: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """One insert, update or delete of a player, or delete of a team, committed alone."""
    with Session(engine, allow_cross_slot=msg.get("cross_slot", False)) as s:
        if msg["op"] == "insert":
            row = msg["row"]
            p = player(
                name=row["name"], email=row["email"], score=row["score"], team_id=dec(row["team"])
            )
            if msg["pk"] is not None:
                p.id = dec(msg["pk"])
            s.add(p)
            s.commit()
            return {"ok": True, "pk": enc(p.id)}
        if msg["op"] == "delete_team":
            gone = s.get(team, dec(msg["pk"]))
            if gone is None:
                return {"absent": True}
            s.delete(gone)
            s.commit()
            return {"ok": True}
        found = s.get(player, dec(msg["pk"]))
        if found is None:
            return {"absent": True}
        if msg["op"] == "delete":
            s.delete(found)
        else:
            name = "team_id" if msg["field"] == "team" else msg["field"]
            value = dec(msg["value"]) if msg["field"] == "team" else msg["value"]
            setattr(found, name, value)
        s.commit()
        return {"ok": True}


class Worker:
    """The machine's side of the worker process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.reliability.test_config_machine import "
             "worker_main; worker_main()"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the worker process died (exit code {self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        """Stop the worker (it exits on "quit" or on the end of its input) and close the
        pipes."""
        with contextlib.suppress(Exception):
            self.ask(op="quit")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


# -- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A player's committed values; `team` is the team's primary key (or a handle)."""

    name: str
    email: str | None
    score: int
    team: Any


@dataclass(frozen=True)
class NewTeam:
    """Handle of a team pending in a session."""

    n: int


@dataclass(frozen=True)
class NewPlayer:
    """Handle of a player pending in a session."""

    n: int


@dataclass
class Tracked:
    """One session under test and what the model says it holds."""

    name: str
    session: Session
    engine: Engine
    objs: dict[Any, Any] = field(default_factory=dict)  # persistent players by pk
    snap: dict[Any, Row] = field(default_factory=dict)  # committed values at load
    version: dict[Any, int | None] = field(default_factory=dict)
    expired: set[Any] = field(default_factory=set)
    partial: dict[Any, set[str]] = field(default_factory=dict)  # assigned while expired
    # Fields assigned while expired, until the session writes or expires them: they are
    # written even when equal to the snapshot (InstanceState.blind), unlike `partial`,
    # which a reload ends.
    blind: dict[Any, set[str]] = field(default_factory=dict)
    dirty: dict[Any, dict[str, Any]] = field(default_factory=dict)
    new: list[tuple[NewPlayer, Any, Row]] = field(default_factory=list)
    new_teams: list[tuple[NewTeam, Any]] = field(default_factory=list)
    deleted: set[Any] = field(default_factory=set)
    orphans: set[Any] = field(default_factory=set)
    teams: dict[Any, Any] = field(default_factory=dict)  # loaded teams by pk
    # Which object (incarnation) of each key the session loaded: a key deleted and
    # inserted again names another object, whatever its version number says.
    inc: dict[Any, int] = field(default_factory=dict)
    # Players a StaleDataError named since the last rollback, and those that rollback
    # marked: their next load or flush takes what Redis holds (`InstanceState.reload`).
    refused: set[Any] = field(default_factory=set)
    reload: set[Any] = field(default_factory=set)

    def view(self, pk: Any) -> Row:
        return dataclasses.replace(self.snap[pk], **self.dirty.get(pk, {}))

    def team_obj(self, handle: Any) -> Any:
        if isinstance(handle, NewTeam):
            return next(o for h, o in self.new_teams if h == handle)
        return self.teams[handle]

    def expire_all(self) -> None:
        self.expired = set(self.objs)
        self.partial.clear()
        self.blind.clear()
        self.dirty.clear()
        self.orphans.clear()

    def rollback(self) -> None:
        self.new.clear()
        self.new_teams.clear()
        self.deleted.clear()
        self.expire_all()
        self.reload |= self.refused
        self.refused.clear()

    def forget(self, pk: Any) -> None:
        for d in (self.objs, self.snap, self.version, self.dirty, self.partial, self.blind):
            d.pop(pk, None)
        self.expired.discard(pk)
        self.refused.discard(pk)
        self.reload.discard(pk)

    def named(self, error: StaleDataError) -> None:
        """The players a refusal named: the next rollback marks them."""
        ids = {id(o) for o in error.objects}
        self.refused |= {pk for pk, o in self.objs.items() if id(o) in ids}

    @property
    def idle(self) -> bool:
        return not (self.new or self.new_teams or self.deleted or self.orphans or any(
            self.view(pk) != self.snap[pk] for pk in self.dirty
        ))


STATS: dict[str, int] = {}


def bump(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


def counted(fn: Callable[..., None]) -> Callable[..., None]:
    """Count every run of a rule, under its name."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        bump(f"rule {fn.__name__}")
        fn(self, *args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class ConfigHistories(RuleBasedStateMachine):
    """Two sessions, a worker process and foreign writers on one drawn configuration."""

    url: str
    client: Any
    worker: Worker
    cluster: bool = False

    def __init__(self) -> None:
        super().__init__()
        if self.cluster:
            self.client.flushall(target_nodes=self.client.PRIMARIES)
        else:
            self.client.flushall()
        self.engines = {w: create_engine(self.url) for w in ("A", "B", "check")}
        self.players: dict[Any, Row] = {}
        self.pver: dict[Any, int] = {}
        self.inc: dict[Any, int] = {}  # incarnation of each committed key
        self.births = 0
        # Keys whose version sequence restarted (re-inserted, or #v rewritten from
        # missing): why a holder of an earlier version is stale although the numbers match.
        self.restarted: dict[Any, str] = {}
        self.teams: dict[Any, str] = {}
        self.sv: dict[str, Tracked] = {}
        # (detached copy, pk, version, incarnation)
        self.copies: list[tuple[Any, Any, int, int]] = []
        self.handles = 0
        self.fresh = 0
        self.checked: Any = None
        self.cfg: Config | None = None
        BORN.clear()
        UUIDS.reset()
        SHARD_CHOICE.seed(0)
        bump("examples")

    def teardown(self) -> None:
        """Close both sessions and the engines of this example."""
        for t in self.sv.values():
            t.session.close()
        for e in self.engines.values():
            e.dispose()

    # -- setup ----------------------------------------------------------------------

    @initialize(cfg=st.deferred(lambda: configs(ConfigHistories.cluster)), data=st.data())
    def setup(self, cfg: Config, data: st.DataObject) -> None:
        """Build the drawn configuration's models and seed a few teams and players."""
        from tests.reliability._models import config_models

        self.cfg = cfg
        # One prefix per configuration (a replayed example uses the same keys).
        prefix = "cm-" + "-".join(
            [cfg.pk, *(k for k in ("unique", "sharded", "orphans", "cross_slot")
                       if getattr(cfg, k))])
        self.reg, self.Team, self.Player = config_models(
            prefix, pk=cfg.pk, unique=cfg.unique, sharded=cfg.sharded, orphans=cfg.orphans
        )
        bump(f"config pk={cfg.pk}")
        bump(f"config {'unique' if cfg.unique else 'no unique'}")
        bump(f"config {'sharded' if cfg.sharded else 'unsharded'}")
        bump(f"config {'delete-orphan' if cfg.orphans else 'save-update'}")
        if self.cluster:
            bump(f"config cross-slot {'on' if cfg.cross_slot else 'off'}")
        bump(f"config driver={cfg.driver}")
        if cfg.driver == "async":
            from tests._async_driver import LoopEngine

            for who in ("A", "B"):
                self.engines[who].dispose()
                self.engines[who] = LoopEngine(self.url)
        bump(f"config flush={cfg.flush}")
        for who in ("A", "B"):
            self.engines[who].flush_script_threshold = 0 if cfg.flush == "script" else None
        answer = self.worker.ask(op="config", url=self.url, prefix=prefix, **{
            k: getattr(cfg, k) for k in ("pk", "unique", "sharded", "orphans", "flush")
        })
        assert answer == {"ok": True}, answer
        for who in ("A", "B"):
            self.sv[who] = Tracked(who, self._session(self.engines[who]), self.engines[who])
        nteams = data.draw(st.integers(0, 2), label="teams")
        nplayers = data.draw(st.integers(0, 4), label="players")
        # Seeded one object per commit: on a cluster a sharded model's objects of one
        # commit must share a shard.
        for i in range(nteams):
            pk = self._fresh_pk(data, set(self.teams))
            with self._session(self.engines["check"]) as s:
                t = self.Team(name=NAMES[i % 3])
                if pk is not None:
                    t.id = pk
                s.add(t)
                s.commit()
                self.teams[born(t.id)] = t.name
        for i in range(nplayers):
            pk = self._fresh_pk(data, set(self.players))
            team = data.draw(st.sampled_from([None, *sorted(self.teams, key=order_key)]))
            email = EMAILS[i] if i < len(EMAILS) and data.draw(st.booleans()) else None
            row = Row(NAMES[i % 3], email, i % 3, team)
            with self._session(self.engines["check"]) as s:
                p = self.Player(name=row.name, email=row.email, score=row.score, team_id=team)
                if pk is not None:
                    p.id = pk
                s.add(p)
                try:
                    s.commit()
                except CrossSlotError:
                    assert self.cluster and cfg.sharded
                    continue
                self._inserted(p.id, row)

    def _session(self, engine: Engine, **kw: Any) -> Session:
        assert self.cfg is not None
        return Session(engine, autoflush=False, allow_cross_slot=self.cfg.cross_slot, **kw)

    def _fresh_pk(self, data: st.DataObject, avoid: set[Any]) -> Any:
        """None for generated keys, else a pool value not in `avoid` (None if none left)."""
        assert self.cfg is not None
        if not self.cfg.explicit:
            return None
        options = [v for v in self.cfg.pool() if v not in avoid]
        return data.draw(st.sampled_from(options), label="pk") if options else None

    def _explicit_pk(self, data: st.DataObject, avoid: set[Any]) -> tuple[bool, Any]:
        """(possible, pk) for a new object of an explicit-key configuration; collisions
        with committed objects are allowed (they must raise IntegrityError)."""
        assert self.cfg is not None
        if not self.cfg.explicit:
            return True, None
        options = [v for v in self.cfg.pool() if v not in avoid and self._reusable(v)]
        if not options:
            return False, None
        return True, data.draw(st.sampled_from(options), label="pk")

    def _reusable(self, pk: Any) -> bool:
        """Whether a new object may take this key: any, unless the re-insert defect is
        tolerated (then keys of deleted objects are not used again)."""
        return "reinsert-aba" not in TOLERATE or pk in self.players or pk not in BORN

    def _inserted(self, pk: Any, row: Row) -> None:
        """A player now committed at version 1: a new incarnation of its key."""
        if pk in BORN and pk not in self.players:
            self.restarted[pk] = "reinsert-aba"
        self.players[born(pk)] = row
        self.pver[pk] = 1
        self.births += 1
        self.inc[pk] = self.births

    def _new_handle(self) -> int:
        self.handles += 1
        return self.handles

    # -- reading through a session -----------------------------------------------------

    def _get(self, t: Tracked, pk: Any) -> Any:
        """`session.get` of a player, checked against the model (identity, reload, values)."""
        s = t.session
        obj = s.get(self.Player, pk)
        if pk in t.deleted:
            assert obj is None, f"{t.name}: get({pk!r}) of a player marked deleted"
            return None
        if pk in t.objs and pk not in t.expired:
            assert obj is t.objs[pk], f"{t.name}: get({pk!r}) is not the identity-map object"
        elif pk not in self.players:
            assert obj is None, f"{t.name}: get({pk!r}) found a player the reference lacks"
            return None
        else:
            assert obj is not None, f"{t.name}: get({pk!r}) found nothing"
            if pk in t.objs:
                assert obj is t.objs[pk]
            t.objs[pk] = obj
            kept = t.partial.pop(pk, set())
            marked = pk in t.reload  # (nothing read at the old version since)
            t.reload.discard(pk)
            if kept and not marked and (
                t.version[pk] != self.pver[pk] or t.inc.get(pk) != self.inc[pk]
            ):
                # Assigned while expired and changed since: the reload keeps the old
                # version, so that the commit detects the conflict.
                bump("reload keeps old version (stale after expire)")
                old = t.snap[pk]
                t.snap[pk] = dataclasses.replace(
                    self.players[pk], **{f: getattr(old, f) for f in kept}
                )
            else:
                t.snap[pk] = self.players[pk]
                t.version[pk] = self.pver[pk]
                t.inc[pk] = self.inc[pk]
            t.expired.discard(pk)
        got = Row(obj.name, obj.email, obj.score, None)
        want = dataclasses.replace(t.view(pk), team=None)
        assert got == want, f"{t.name}: player {pk!r} shows {got}, model says {want}"
        return obj

    def _pick(self, data: st.DataObject, t: Tracked) -> Any:
        pending = {p.id for _, p, _ in t.new if p.__dict__.get("id") is not None}
        options = sorted((set(self.players) | set(t.objs)) - pending, key=order_key)
        if not options:
            return None
        return data.draw(st.sampled_from(options), label="player")

    def _team_handle(self, t: Tracked, obj: Any) -> Any:
        if obj is None:
            return None
        for h, o in t.new_teams:
            if o is obj:
                return h
        t.teams[obj.id] = obj
        return obj.id

    def _choose_team(self, data: st.DataObject, t: Tracked, *, allow_none: bool) -> tuple[Any, Any]:
        """(handle, object) of a team for a player: none, committed, pending or new."""
        committed = sorted(self.teams, key=order_key)
        kinds = ["new"] + (["committed"] if committed else []) + (["pending"] if t.new_teams
                                                                   else [])
        if allow_none:
            kinds.append("none")
        kind = data.draw(st.sampled_from(kinds), label="team")
        assert self.cfg is not None
        bump(f"team for a player: {kind} ({self.cfg.pk} keys)")
        if kind == "none":
            return None, None
        if kind == "committed":
            pk = data.draw(st.sampled_from(committed), label="team pk")
            obj = t.session.get(self.Team, pk)
            assert obj is not None and obj.name == self.teams[pk]
            t.teams[pk] = obj
            return pk, obj
        if kind == "pending":
            i = data.draw(st.integers(0, len(t.new_teams) - 1), label="pending team")
            h, obj = t.new_teams[i]
            return h, obj
        avoid = {o.__dict__.get("id") for _, o in t.new_teams} | set(t.teams)
        possible, pk = self._explicit_pk(data, avoid)
        if not possible:
            return None, None
        obj = self.Team(name=data.draw(st.sampled_from(NAMES), label="team name"))
        if pk is not None:
            obj.id = pk
        h = NewTeam(self._new_handle())
        t.new_teams.append((h, obj))
        t.session.add(obj)
        return h, obj

    # -- rules: changes in a session -----------------------------------------------------

    @rule(who=SESSIONS, data=st.data(), name=st.sampled_from(NAMES),
          email=st.sampled_from((None, *EMAILS)), score=st.integers(*SCORES))
    @counted
    def add(self, who: str, data: st.DataObject, name: str, email: str | None,
            score: int) -> None:
        """A session adds a player, with no team, a committed one, a pending one or a new one."""
        t = self.sv[who]
        avoid = {p.__dict__.get("id") for _, p, _ in t.new} | set(t.objs)
        possible, pk = self._explicit_pk(data, avoid)
        if not possible:
            return
        handle, team = self._choose_team(data, t, allow_none=True)
        obj = self.Player(name=name, email=email, score=score, team=team)
        if pk is not None:
            obj.id = pk
        t.session.add(obj)
        t.new.append((NewPlayer(self._new_handle()), obj, Row(name, email, score, handle)))

    @rule(who=SESSIONS, data=st.data(), via_get=st.booleans(), fld=st.sampled_from(FIELDS))
    @counted
    def update(self, who: str, data: st.DataObject, via_get: bool, fld: str) -> None:
        """A session assigns one field of a player it holds (loading it first, or not)."""
        t = self.sv[who]
        pk = self._pick(data, t)
        if pk is None:
            return
        if via_get or pk not in t.objs or pk in t.deleted:
            obj = self._get(t, pk)
            if obj is None:
                return
        else:
            obj = t.objs[pk]  # possibly expired: assigning loads nothing
        value = data.draw(
            {"name": st.sampled_from(NAMES), "email": st.sampled_from((None, *EMAILS)),
             "score": st.integers(*SCORES)}[fld], label="value")
        setattr(obj, fld, value)
        t.dirty.setdefault(pk, {})[fld] = value
        if pk in t.expired:
            t.partial.setdefault(pk, set()).add(fld)
            t.blind.setdefault(pk, set()).add(fld)
            bump("assigned while expired")

    @rule(who=SESSIONS, data=st.data())
    @counted
    def reparent(self, who: str, data: st.DataObject) -> None:
        """A session points a player at another team, a new one, or none (an orphan when
        `Team.players` deletes orphans and the player had a team)."""
        t = self.sv[who]
        pk = self._pick(data, t)
        if pk is None:
            return
        obj = self._get(t, pk)
        if obj is None:
            return
        old = obj.team  # loads the many-to-one: orphans are decided by it
        before = t.view(pk).team
        shown = self._team_handle(t, old)
        # A team deleted since the player was loaded reads as None, unless the session
        # holds it.
        assert shown == before or (old is None and before not in self.teams), (
            f"{t.name}: {pk!r}.team is {old!r}, model says {before!r}")
        handle, team = self._choose_team(data, t, allow_none=True)
        obj.team = team
        t.dirty.setdefault(pk, {})["team"] = handle
        assert self.cfg is not None
        if handle is None and before is not None and self.cfg.orphans:
            t.orphans.add(pk)
        elif handle is not None:
            t.orphans.discard(pk)

    @rule(who=SESSIONS, data=st.data(), via_get=st.booleans())
    @counted
    def delete(self, who: str, data: st.DataObject, via_get: bool) -> None:
        """A session marks a player for deletion."""
        t = self.sv[who]
        pk = self._pick(data, t)
        if pk is None:
            return
        if via_get or pk not in t.objs or pk in t.deleted:
            obj = self._get(t, pk)
            if obj is None:
                return
        else:
            obj = t.objs[pk]
        t.session.delete(obj)
        t.deleted.add(pk)

    @rule(who=SESSIONS)
    @counted
    def commit(self, who: str) -> None:
        """A session commits: all of it is written, or none of it, as the model predicts."""
        self._commit(self.sv[who])

    @rule(who=SESSIONS)
    @counted
    def rollback(self, who: str) -> None:
        """A session rolls back: new objects leave it, everything else is expired."""
        t = self.sv[who]
        t.session.rollback()
        t.rollback()

    @rule(who=SESSIONS)
    @counted
    def expire_all(self, who: str) -> None:
        """Expiry discards every pending assignment, a release from a delete-orphan list
        included (tests/test_property_regressions.py: the player must survive)."""
        t = self.sv[who]
        if t.orphans:
            if "orphan-expire" in TOLERATE:
                return
            bump("expire discards a pending orphan")
        t.session.expire_all()
        t.expire_all()

    @rule(who=SESSIONS, data=st.data())
    @counted
    def expire_one(self, who: str, data: st.DataObject) -> None:
        """A session expires one player it holds: its pending assignments go, a release
        from a delete-orphan list included."""
        t = self.sv[who]
        held = [pk for pk in sorted(t.objs, key=order_key) if pk not in t.deleted]
        if not held:
            return
        pk = data.draw(st.sampled_from(held), label="expire")
        if pk in t.orphans:
            if "orphan-expire" in TOLERATE:
                return
            bump("expire discards a pending orphan")
        t.session.expire(t.objs[pk])
        t.dirty.pop(pk, None)
        t.partial.pop(pk, None)
        t.blind.pop(pk, None)
        t.orphans.discard(pk)
        t.expired.add(pk)

    @precondition(lambda self: self.cfg is not None and self.cfg.explicit)
    @rule(who=SESSIONS, data=st.data(), change=st.sampled_from(("update", "delete")))
    @counted
    def reinsert_under_holder(self, who: str, data: st.DataObject, change: str) -> None:
        """A session holds a player; the worker deletes it and inserts another under the
        same key (version 1 again); the session's update or delete of what it holds must
        be stale, never applied to the new object."""
        t = self.sv[who]
        pk = self._pick(data, t)
        if pk is None or pk not in self.players or pk in t.deleted or pk in t.orphans:
            return
        if self._get(t, pk) is None:
            return
        if self._ask(op="delete", pk=enc(pk)) is None:
            return
        del self.players[pk], self.pver[pk]
        row = Row("b", None, 0, None)
        answer = self._ask(op="insert", pk=enc(pk), row={"name": row.name, "email": None,
                                                         "score": 0, "team": None})
        assert answer is not None and answer.get("ok"), answer
        self._inserted(pk, row)
        obj = t.objs[pk]
        if change == "delete":
            t.session.delete(obj)
            t.deleted.add(pk)
        else:
            obj.score = 3 if obj.score != 3 else -3
            t.dirty.setdefault(pk, {})["score"] = obj.score
        self._commit(t)

    @rule(who=SESSIONS, data=st.data(), fld=st.sampled_from(FIELDS))
    @counted
    def stale_after_expire(self, who: str, data: st.DataObject, fld: str) -> None:
        """A session loads a player, expires everything, assigns one field without
        loading; the worker changes the player; the session reads it (the reload must
        keep the old version) and commits: stale, nothing written."""
        t = self.sv[who]
        pk = self._pick(data, t)
        if pk is None or pk not in self.players or pk in t.deleted or t.orphans:
            return
        obj = self._get(t, pk)
        if obj is None:
            return
        t.session.expire_all()
        t.expire_all()
        value = data.draw(
            {"name": st.sampled_from(NAMES), "email": st.sampled_from((None, *EMAILS)),
             "score": st.integers(*SCORES)}[fld], label="value")
        setattr(obj, fld, value)
        t.dirty.setdefault(pk, {})[fld] = value
        t.partial.setdefault(pk, set()).add(fld)
        t.blind.setdefault(pk, set()).add(fld)
        assert self.cfg is not None
        score = self.players[pk].score + 1
        answer = self._ask(op="update", pk=enc(pk), field="score", value=score)
        if answer is None:
            t.session.rollback()
            t.rollback()
            return
        assert answer == {"ok": True}, answer
        self.players[pk] = dataclasses.replace(self.players[pk], score=score)
        self.pver[pk] += 1
        self._get(t, pk)
        if not self._commit(t):
            bump("stale after expire: commit refused")

    # -- the model of a commit -------------------------------------------------------------

    @staticmethod
    def _before(t: Tracked) -> tuple[set[Any], list[Any], list[Any]]:
        """What a prediction needs from before the commit: the identities the session holds
        and the explicit keys of its new teams and players (a commit sets generated ones)."""
        held = {o.__dict__[STATE_ATTR].identity for o in t.session}
        return (held, [o.__dict__.get("id") for _, o in t.new_teams],
                [p.__dict__.get("id") for _, p, _ in t.new])

    def _predict(self, t: Tracked, before: tuple[set[Any], list[Any], list[Any]] | None = None,
                 ) -> tuple[set[type[Exception]], dict[Any, dict[str, Any]], set[Any]]:
        """(errors the commit must raise, updates per player, players deleted)."""
        assert self.cfg is not None
        held, team_pks, new_pks = before or self._before(t)
        doomed = set(t.deleted) | {pk for pk in t.orphans if t.view(pk).team is None}
        updates: dict[Any, dict[str, Any]] = {}
        for pk in sorted(t.dirty, key=order_key):
            if pk in doomed:
                continue
            snap = t.snap[pk]
            blind = t.blind.get(pk, set())
            ch = {f: v for f, v in t.dirty[pk].items() if getattr(snap, f) != v or f in blind}
            if ch:
                updates[pk] = ch
        errors: set[type[Exception]] = set()
        # Two objects of one primary key in the session: refused before any I/O.
        if any((self.Team, pk) in held for pk in team_pks if pk is not None) or any(
            (self.Player, pk) in held and pk not in doomed for pk in new_pks if pk is not None
        ):
            return {IntegrityError}, updates, doomed
        for pk in [*doomed, *updates]:
            if self.pver.get(pk) != t.version[pk] or self.inc.get(pk) != t.inc.get(pk):
                errors.add(StaleDataError)
        claims = [(ch["email"], pk) for pk, ch in updates.items() if ch.get("email")]
        claims += [(row.email, None) for _, _, row in t.new if row.email is not None]
        emails = [c for c, _ in claims]
        twice = self.cfg.unique and len(set(emails)) < len(emails)
        # Staleness wins (issue 11 item 8), but one value claimed twice in the flush may
        # be refused before any I/O (it fails again on a retry anyway), and a cross-slot
        # flush checks part by part: an earlier part's conflict may come first.
        per_part = self.cluster and self.cfg.cross_slot
        # A foreign key written by the commit must name a team that still exists.
        targets = [ch["team"] for ch in updates.values() if "team" in ch]
        targets += [row.team for _, _, row in t.new]
        if any(k is not None and not isinstance(k, NewTeam) and k not in self.teams
               for k in targets):
            errors.add(StaleDataError)
        if errors and not per_part:
            return errors | ({IntegrityError} if twice else set()), updates, doomed
        if twice:
            errors.add(IntegrityError)
        if any(pk is not None and pk in self.teams for pk in team_pks):
            errors.add(IntegrityError)
        # (A key the same commit deletes may be taken by a new object: the delete comes
        # first.)
        if any(pk is not None and pk in self.players and pk not in doomed for pk in new_pks):
            errors.add(IntegrityError)
        if self.cfg.unique:
            released = {t.snap[pk].email for pk in doomed if t.snap[pk].email} | {
                t.snap[pk].email for pk, ch in updates.items() if "email" in ch
            }
            owners = {r.email: pk for pk, r in self.players.items() if r.email is not None}
            for email, claimer in claims:
                owner = owners.get(email)
                if owner is not None and owner != claimer and email not in released:
                    errors.add(IntegrityError)
        return errors, updates, doomed

    def _reload_marked(self, t: Tracked) -> Callable[[], None]:
        """What a commit with anything pending does first: the players a rollback marked
        (those Redis still holds) load, so their version, incarnation and snapshot are
        current. Returns the undo a failed commit runs (it puts them back as they were,
        marks included)."""
        if not t.reload or not (t.new or t.new_teams or t.deleted or t.dirty or t.orphans):
            return lambda: None
        saved = []
        for pk in sorted(t.reload & set(self.players), key=order_key):
            saved.append((pk, t.version.get(pk), t.inc.get(pk), t.snap.get(pk),
                          pk in t.expired, t.partial.get(pk)))
            if (t.version.get(pk), t.inc.get(pk)) != (self.pver[pk], self.inc[pk]):
                bump("commit reloaded a marked player that had changed")
            t.version[pk], t.inc[pk], t.snap[pk] = self.pver[pk], self.inc[pk], self.players[pk]
            t.expired.discard(pk)
            t.partial.pop(pk, None)
            t.reload.discard(pk)

        def undo() -> None:
            for pk, version, inc, snap, expired, partial in saved:
                if pk not in t.objs:
                    continue
                t.version[pk] = version
                if inc is not None:
                    t.inc[pk] = inc
                if snap is not None:
                    t.snap[pk] = snap
                if expired:
                    t.expired.add(pk)
                if partial is not None:
                    t.partial[pk] = partial
                t.reload.add(pk)

        return undo

    def _commit(self, t: Tracked, *, during: Callable[[], None] | None = None,
                allowed: set[type[Exception]] | None = None) -> bool:
        """Commit `t` and check the outcome. `during` runs inside the flush, after its checks
        and before its EXEC; the prediction is made against the reference after it ran.
        `allowed`: errors accepted besides the predicted ones (a race the flush may lose).
        Returns whether the commit was applied."""
        error: Exception | None = None
        pre_players = set(self.players)
        undo = self._reload_marked(t)
        before = self._before(t)
        with self._inside_flush(t, during) as fired:
            try:
                t.session.commit()
            except (StaleDataError, IntegrityError, CrossSlotError, PartialCommitError) as exc:
                error = exc
        if fired:
            pre_players |= set(self.players)
        errors, updates, doomed = self._predict(t, before)
        assert self.cfg is not None
        if error is not None:
            undo()
            if isinstance(error, StaleDataError):
                t.named(error)
        if isinstance(error, PartialCommitError):
            assert self.cluster and self.cfg.cross_slot, f"{t.name}: {error!r}"
            self._partial(t, error, updates, doomed)
            return False
        if isinstance(error, CrossSlotError):
            # Refused before anything was sent: always without allow_cross_slot, and with
            # it when one part would still span two slots (a foreign key's target check
            # in another shard).
            assert self.cluster and self.cfg.sharded, f"{t.name}: {error!r}"
            bump("commits refused: cross-slot" + (" (allowed)" if self.cfg.cross_slot else ""))
            self._assert_redis_is_reference()
            t.session.rollback()
            t.rollback()
            return False
        if errors or (error is not None and allowed and type(error) in allowed):
            if error is None:
                self._unpredicted_success(t, errors)
                return True
            if type(error) not in errors and not (allowed and type(error) in allowed):
                if errors == {StaleDataError} and type(error) is IntegrityError:
                    known("8", f"{t.name}: a stale commit that also claims a unique value "
                          f"raised {error!r}, not StaleDataError")
                else:
                    raise AssertionError(f"{t.name}: {error!r}, expected one of {errors}")
            bump(f"commits refused: {type(error).__name__}")
            if isinstance(error, StaleDataError) and any(
                self.pver.get(pk) == t.version.get(pk) and self.inc.get(pk) != t.inc.get(pk)
                for pk in [*doomed, *updates]
            ):
                bump("commits refused: stale, same version of an earlier object of the key")
            if fired:
                bump(f"interleaved commits refused: {type(error).__name__}")
            self._assert_redis_is_reference()
            t.session.rollback()
            t.rollback()
            return False
        if error is not None:
            raise AssertionError(
                f"{t.name}: unexpected {error!r} (model predicts success; model: deleted "
                f"{t.deleted}, orphans {t.orphans}, updates {updates}, new {len(t.new)}; "
                f"versions held {t.version}, committed {self.pver}; assigned {t.dirty}, "
                f"snapshots {t.snap}, expired {t.expired}, committed {self.players})")
        self._apply(t, updates, doomed, pre_players)
        bump("commits applied")
        if fired:
            bump("interleaved commits applied")
        return True

    def _partial(self, t: Tracked, error: PartialCommitError, updates: dict[Any, dict[str, Any]],
                 doomed: set[Any]) -> None:
        """A cross-slot commit applied in part: what the error lists as written goes into
        the reference, then Redis must equal it (the report is exact); the session rolls
        back."""
        assert not error.unknown, f"{t.name}: {error!r} with unknown parts"
        if not error.written:
            known("check-only-part", f"{t.name}: {error!r} reports a partial commit, but "
                  f"no object was written (the applied part only checked)")
        written = {id(o) for o in error.written}
        bump("commits applied in part (PartialCommitError)")
        for _, obj in t.new_teams:
            if id(obj) in written:
                self.teams[born(obj.id)] = obj.name
        for _, obj, row in t.new:
            if id(obj) in written:
                team = row.team
                if isinstance(team, NewTeam):
                    team = t.team_obj(team).id
                self._inserted(obj.id, dataclasses.replace(row, team=team))
                # Persistent in the session now (the rollback below expires it).
                t.objs[obj.id] = obj
                t.version[obj.id] = 1
                t.inc[obj.id] = self.inc[obj.id]
                t.snap[obj.id] = self.players[obj.id]
        for pk in sorted({*updates, *doomed}, key=order_key):
            if id(t.objs[pk]) not in written:
                continue
            if pk in doomed:
                del self.players[pk], self.pver[pk]
                t.forget(pk)
                continue
            ch = dict(updates[pk])
            if isinstance(ch.get("team"), NewTeam):
                ch["team"] = t.team_obj(ch["team"]).id
            self.players[pk] = dataclasses.replace(self.players[pk], **ch)
            self.pver[pk] += 1
            t.version[pk] = self.pver[pk]
            t.snap[pk] = self.players[pk]
            t.reload.discard(pk)  # (written: what the flush recorded stands)
        t.deleted -= doomed - set(t.objs)
        self._assert_redis_is_reference()
        t.session.rollback()
        t.rollback()

    def _unpredicted_success(self, t: Tracked, errors: set[type[Exception]]) -> None:
        """A commit the model says must fail was applied: name the defect it shows."""
        _, updates, doomed = self._predict(t)
        stale = [pk for pk in [*doomed, *updates] if self.pver.get(pk) != t.version[pk]
                 or self.inc.get(pk) != t.inc.get(pk)]
        if errors == {StaleDataError} and stale and all(
            self.pver.get(pk) == t.version[pk] and pk in self.restarted for pk in stale
        ):
            item = self.restarted[stale[0]]
            known(item, f"{t.name}: a commit over {stale} (loaded at version "
                  f"{[t.version[pk] for pk in stale]} of an earlier object of the key) was "
                  f"applied: the version number restarted, so the check passed")
        raise AssertionError(f"{t.name}: commit succeeded, the model predicts {errors}")

    def _apply(self, t: Tracked, updates: dict[Any, dict[str, Any]], doomed: set[Any],
               pre_players: set[Any]) -> None:
        """A commit applied: the reference and the session follow."""
        for _, obj in t.new_teams:
            assert obj.id is not None, f"{t.name}: a committed team has no id"
            assert obj.id not in self.teams, f"{t.name}: team id {obj.id!r} handed out twice"
            self.teams[born(obj.id)] = obj.name

        def resolve(handle: Any) -> Any:
            if isinstance(handle, NewTeam):
                return t.team_obj(handle).id
            return handle

        for pk in doomed:
            del self.players[pk], self.pver[pk]
            t.forget(pk)
        for pk, ch in updates.items():
            if "team" in ch:
                ch = {**ch, "team": resolve(ch["team"])}
            self.players[pk] = dataclasses.replace(self.players[pk], **ch)
            self.pver[pk] += 1
            t.version[pk] = self.pver[pk]
            t.snap[pk] = self.players[pk]
        seen: set[Any] = set()
        overwritten: list[Any] = []
        for _, obj, row in t.new:
            pk = obj.id
            assert pk is not None, f"{t.name}: a committed player has no id"
            if (pk in pre_players and pk not in doomed) or pk in seen:
                known("1", f"{t.name}: player id {pk!r} given to a new object, but an "
                      f"acknowledged insert holds it (overwritten)")
                overwritten.append(pk)
            seen.add(pk)
            self._inserted(pk, dataclasses.replace(row, team=resolve(row.team)))
            t.objs[pk] = obj
            t.version[pk] = 1
            t.inc[pk] = self.inc[pk]
            t.snap[pk] = self.players[pk]
        t.new.clear()
        t.new_teams.clear()
        t.deleted.clear()
        for pk in overwritten:  # tolerated item 1: Redis holds a mix of both writes
            self._resync_player(pk)
        # Objects the commit did not write keep the snapshot and version they were
        # loaded at (an assignment before their reload is compared with that).
        t.expire_all()

    @contextlib.contextmanager
    def _inside_flush(self, t: Tracked, during: Callable[[], None] | None) -> Iterator[list[int]]:
        """Run `during` once, when `t`'s flush sends MULTI/.../EXEC (its checks passed)."""
        fired: list[int] = []
        if during is None:
            yield fired
            return

        def hook(commands: Any) -> None:
            if fired or not commands or str(commands[0][0]).upper() != "MULTI":
                return
            if any(str(c[0]).upper() == "SET" and "#flush:" in str(c[1]) for c in commands):
                fired.append(1)
                during()

        t.engine.add_listener(hook)
        try:
            yield fired
        finally:
            t.engine.remove_listener(hook)

    # -- rules: the worker process -------------------------------------------------------

    def _ask(self, **msg: Any) -> dict[str, Any] | None:
        """Ask the worker for one write; None when the cluster refused it as cross-slot
        (sharded models, `allow_cross_slot` off: nothing written)."""
        assert self.cfg is not None
        answer = self.worker.ask(cross_slot=self.cfg.cross_slot, **msg)
        if answer.get("error") == "PartialCommitError" and " 0 object(s) written" in str(
            answer.get("message")
        ):
            known("check-only-part", f"worker {msg['op']}: {answer['message'][:200]}")
            answer = {"error": answer["message"].split("stopped by ")[-1].split(":")[0]}
        if answer.get("error") == "CrossSlotError":
            assert self.cluster and self.cfg.sharded, answer
            bump("worker refused: cross-slot")
            return None
        return answer

    def _worker_op(self, data: st.DataObject, *, prefer: Sequence[Any] = (),
                   claims: Sequence[str] = (), explicit: Any = None,
                   teams: Sequence[Any] = ()) -> None:
        """Ask the worker for one write and apply its predicted outcome to the reference."""
        assert self.cfg is not None
        # Only teams without committed players are deleted (no cascade to model here):
        # what a session still points at them must then be refused as stale.
        empty = [k for k in sorted(self.teams, key=order_key)
                 if all(r.team != k for r in self.players.values())]
        ops = ["insert"] + (["update", "update", "delete"] if self.players else [])
        ops += ["delete_team"] if empty else []
        op = "insert" if explicit is not None else data.draw(st.sampled_from(ops), label="op")
        bump(f"worker {op}")
        if op == "delete_team":
            pool = [k for k in teams if k in empty] or empty
            tpk = data.draw(st.sampled_from(pool), label="worker team")
            answer = self._ask(op="delete_team", pk=enc(tpk))
            if answer is None:
                return
            assert answer == {"ok": True}, f"worker delete of team {tpk!r}: {answer}"
            del self.teams[tpk]
            bump("worker applied")
            return
        owners = {r.email: pk for pk, r in self.players.items() if r.email is not None}
        if op == "insert":
            pk = explicit
            if pk is None and self.cfg.explicit:
                options = [v for v in self.cfg.pool() if self._reusable(v)]
                if not options:
                    return
                pk = data.draw(st.sampled_from(options), label="worker pk")
            email = data.draw(st.sampled_from((None, *EMAILS, *claims)), label="worker email")
            team = data.draw(st.sampled_from([None, *sorted(self.teams, key=order_key)]),
                             label="worker team")
            row = Row(data.draw(st.sampled_from(NAMES)), email, 0, team)
            answer = self._ask(
                op="insert", pk=enc(pk), row={"name": row.name, "email": email, "score": 0,
                                              "team": enc(team)},
            )
            if answer is None:
                return
            taken = pk is not None and pk in self.players
            clash = self.cfg.unique and email is not None and email in owners
            if taken or clash:
                assert answer.get("error") == "IntegrityError", f"worker insert: {answer}"
                bump("worker refused: IntegrityError")
                return
            assert answer.get("ok"), f"worker insert {pk!r} {row}: {answer}"
            got = dec(answer["pk"])
            if pk is not None:
                assert got == pk
            assert got not in self.players, f"worker insert got the id of {got!r}"
            self._inserted(got, row)
            bump("worker applied")
            return
        pool = [p for p in prefer if p in self.players] or sorted(self.players, key=order_key)
        pk = data.draw(st.sampled_from(pool), label="worker target")
        if op == "delete":
            answer = self._ask(op="delete", pk=enc(pk))
            if answer is None:
                return
            assert answer == {"ok": True}, f"worker delete {pk!r}: {answer}"
            del self.players[pk], self.pver[pk]
            bump("worker applied")
            return
        fields = ["name", "score", "team"] if self.teams else ["name", "score"]
        if self.cfg.unique:
            fields.append("email")
        fld = data.draw(st.sampled_from(fields), label="worker field")
        value: Any
        if fld == "email":
            value = data.draw(st.sampled_from((None, *EMAILS, *claims)), label="worker value")
        elif fld == "team":
            value = data.draw(st.sampled_from(sorted(self.teams, key=order_key)))
        elif fld == "name":
            value = data.draw(st.sampled_from(NAMES))
        else:
            value = data.draw(st.integers(*SCORES))
        answer = self._ask(op="update", pk=enc(pk), field=fld,
                           value=enc(value) if fld == "team" else value)
        if answer is None:
            return
        if fld == "email" and value is not None and owners.get(value, pk) != pk:
            assert answer.get("error") == "IntegrityError", f"worker update: {answer}"
            bump("worker refused: IntegrityError")
            return
        assert answer == {"ok": True}, f"worker update {pk!r}.{fld}={value!r}: {answer}"
        new = dataclasses.replace(self.players[pk], **{fld: value})
        if new != self.players[pk]:
            self.players[pk] = new
            self.pver[pk] += 1
        bump("worker applied")

    @rule(data=st.data())
    @counted
    def worker_write(self, data: st.DataObject) -> None:
        """The worker process inserts, updates or deletes one player, between steps."""
        self._worker_op(data)

    @rule(who=SESSIONS, data=st.data())
    @counted
    def commit_racing_worker(self, who: str, data: st.DataObject) -> None:
        """A session commits while the worker writes between its checks and its EXEC,
        preferably to what the commit touches: the commit must then see the write
        (WATCH) and decide on what Redis holds after it."""
        t = self.sv[who]
        if not (t.new or t.new_teams or t.dirty or t.deleted or t.orphans):
            # Nothing pending would mean no flush for the worker to race (most draws of
            # this rule, which left "interleaved commits applied" at 1 per 200 examples
            # in a CI run): give the session a new player to insert first.
            self.add(who, data, name=NAMES[0], email=None, score=0)
        errors, updates, doomed = self._predict(t)
        prefer = sorted({*updates, *doomed}, key=order_key)
        claims = [ch["email"] for ch in updates.values() if ch.get("email")]
        claims += [row.email for _, _, row in t.new if row.email]
        teams = [row.team for _, _, row in t.new] + [ch.get("team") for ch in updates.values()]
        teams = [k for k in teams if k is not None and not isinstance(k, NewTeam)]

        def during() -> None:
            self._worker_op(data, prefer=prefer, claims=claims, teams=teams)

        self._commit(t, during=during)

    # -- rules: ids near the counter ----------------------------------------------------

    def _seq_key(self) -> str:
        return mapper_of(self.Player).keys.seq()

    @precondition(lambda self: self.cfg is not None and self.cfg.pk == "gen_int"
                  and not self.cfg.sharded)
    @rule(who=SESSIONS, data=st.data(), n=st.integers(1, 2), offset=st.integers(0, 1),
          mixed=st.booleans())
    @counted
    def explicit_id_near_counter(self, who: str, data: st.DataObject, n: int, offset: int,
                                 mixed: bool) -> None:
        """A session inserts `n` players with generated ids (and, if `mixed`, one with the
        explicit id `counter + 1`); between its id allocation and its EXEC, the worker
        inserts the explicit id `counter + offset` (the counter as it is then). One of
        the two must lose, or they must get different ids; an acknowledged insert is
        never overwritten."""
        t = self.sv[who]
        for i in range(n):
            obj = self.Player(name=NAMES[i % 3])
            t.session.add(obj)
            t.new.append((NewPlayer(self._new_handle()), obj, Row(obj.name, None, 0, None)))
        if mixed:
            raw = self.client.get(self._seq_key())
            pk = (int(raw) if raw else 0) + 1
            if pk not in {p.__dict__.get("id") for _, p, _ in t.new}:
                obj = self.Player(name="a", id=pk)
                t.session.add(obj)
                t.new.append((NewPlayer(self._new_handle()), obj, Row("a", None, 0, None)))
        raced: list[Any] = []

        def during() -> None:
            raw = self.client.get(self._seq_key())
            pk = (int(raw) if raw else 0) + offset
            if pk < 1:
                return
            before = set(self.players)
            self._worker_op(data, explicit=pk)
            if pk in self.players and pk not in before:
                raced.append(pk)
                bump("near counter: the worker's explicit insert was applied")

        allowed = {IntegrityError, StaleDataError} if raced else None
        applied = self._commit(t, during=during, allowed=allowed)
        bump("near counter: the session's commit " + ("applied" if applied else "refused"))

    # -- rules: merge of a detached copy -------------------------------------------------

    @rule(data=st.data())
    @counted
    def take_copy(self, data: st.DataObject) -> None:
        """Load a player in a short-lived session that keeps its values, and close it."""
        if not self.players:
            return
        pk = data.draw(st.sampled_from(sorted(self.players, key=order_key)), label="copy of")
        with self._session(self.engines["check"], expire_on_commit=False) as s:
            obj = s.get(self.Player, pk)
            assert obj is not None
        self.copies = [*self.copies[-3:], (obj, pk, self.pver[pk], self.inc[pk])]

    @precondition(lambda self: bool(self.copies))
    @rule(data=st.data(), fld=st.sampled_from(FIELDS))
    @counted
    def merge_copy(self, data: st.DataObject, fld: str) -> None:
        """Change a detached copy and merge it into a fresh session, then commit: stale if
        the stored player changed or went since the copy was loaded, else applied."""
        assert self.cfg is not None
        # Drawn by index: Hypothesis prints what it draws, and a detached copy's repr
        # would touch its unloaded relationship.
        i = data.draw(st.integers(0, len(self.copies) - 1), label="copy")
        copy, pk, version, inc = self.copies[i]
        value = data.draw(
            {"name": st.sampled_from(NAMES), "email": st.sampled_from((None, *EMAILS)),
             "score": st.integers(*SCORES)}[fld], label="value")
        setattr(copy, fld, value)
        current = Row(copy.name, copy.email, copy.score, copy.team_id)
        stale = self.pver.get(pk) != version or self.inc.get(pk) != inc
        owners = {r.email: p for p, r in self.players.items() if r.email is not None}
        with self._session(self.engines["check"]) as s:
            error: Exception | None = None
            try:
                s.merge(copy)
                s.commit()
            except (StaleDataError, IntegrityError) as exc:
                error = exc
        if stale:
            what = "deleted" if pk not in self.players else "changed"
            if error is None:
                if self.pver.get(pk) == version and pk in self.restarted:
                    known(self.restarted[pk], f"merge of a copy of {pk!r} (version {version}"
                          f" of an earlier object of the key) applied over the new object")
                    self._resync_player(pk)
                    return
                known("3", f"merge of a copy of {pk!r} loaded at version {version} applied "
                      f"over a {what} player (now {self.pver.get(pk)})")
                self._resync_player(pk)
                return
            assert isinstance(error, StaleDataError), f"merge of a stale copy: {error!r}"
            bump(f"merge refused: stale ({what})")
            self._assert_redis_is_reference()
            return
        clash = (self.cfg.unique and current.email is not None
                 and owners.get(current.email, pk) != pk)
        if clash:
            assert isinstance(error, IntegrityError), f"merge claiming a taken email: {error!r}"
            bump("merge refused: IntegrityError")
            return
        assert error is None, f"merge of a current copy of {pk!r}: {error!r}"
        if current != self.players[pk]:
            self.players[pk] = current
            self.pver[pk] += 1
            bump("merge applied")
        else:
            bump("merge applied (no change)")

    @rule(data=st.data(), name=st.sampled_from(NAMES), score=st.integers(*SCORES))
    @counted
    def merge_new(self, data: st.DataObject, name: str, score: int) -> None:
        """Merge a player built by hand (never loaded, with a key no object has) into a
        fresh session and commit: it is inserted, as `add` would."""
        assert self.cfg is not None
        pk = None
        if self.cfg.explicit:
            free = [k for k in self.cfg.pool() if k not in self.players and self._reusable(k)]
            if not free:
                return
            pk = data.draw(st.sampled_from(free), label="key")
        built = self.Player(name=name, score=score)
        if pk is not None:
            built.id = pk
        with self._session(self.engines["check"]) as s:
            merged = s.merge(built)
            assert merged is not built, "merge returned the caller's object"
            s.commit()
            got = merged.id
        assert got is not None and (pk is None or got == pk), f"merged new player got {got!r}"
        assert got not in self.players, f"a merged new player took the key of {got!r}"
        self._inserted(got, Row(name, None, score, None))
        bump("merge of a new object inserted")

    def _resync_player(self, pk: Any) -> None:
        """After a tolerated wrong outcome: take what Redis holds for `pk` as the reference."""
        with self._session(self.engines["check"]) as s:
            obj = s.get(self.Player, pk)
            if obj is None:
                self.players.pop(pk, None)
                self.pver.pop(pk, None)
                return
            self.players[pk] = Row(obj.name, obj.email, obj.score, obj.team_id)
            raw = self.client.hget(mapper_of(self.Player).object_key(pk), "#v")
            self.pver[pk] = int(raw) if raw is not None and raw.isdigit() else 0

    # -- rules: a failed flush, then a retry ---------------------------------------------

    def _session_state(self, t: Tracked) -> dict[int, tuple[Any, ...]]:
        """Everything a session holds that a failed flush must leave as it was, by object:
        life status, identity, version, snapshot, assigned attributes and values, the
        many-to-one and loaded lists (as object ids), and membership of new/dirty/deleted."""
        s = t.session
        new, dirty, deleted = ({id(o) for o in group} for group in (s.new, s.dirty, s.deleted))

        def describe(obj: Any) -> tuple[Any, ...]:
            st_ = obj.__dict__[STATE_ATTR]
            d = obj.__dict__
            team = d.get("team", UNLOADED)
            players = d.get("players", UNLOADED)
            return (
                type(obj).__name__,
                st_.status,
                st_.identity,
                st_.version,
                tuple(sorted(st_.modified)),
                tuple(sorted(st_.loaded.items())),
                tuple(sorted((k, repr(v)) for k, v in d.items()
                             if k not in (STATE_ATTR, "team", "players"))),
                id(team) if team not in (None, UNLOADED) else team,
                tuple(id(p) for p in players) if isinstance(players, list) else players,
                (id(obj) in new, id(obj) in dirty, id(obj) in deleted),
            )

        objs = {id(o): o for o in [*s, *s.new]}
        return {k: describe(o) for k, o in objs.items()}

    @staticmethod
    def _session_changes(before: dict[int, tuple[Any, ...]],
                         after: dict[int, tuple[Any, ...]]) -> list[str]:
        """What changed in a session. Objects the failed flush loaded, and relationships it
        loaded where they were unloaded, are reads, not changes."""
        out = []
        for k, was in before.items():
            now = after.get(k)
            if now is None:
                out.append(f"{was[:3]} left the session")
                continue
            if was[-3] == UNLOADED:
                now = (*now[:-3], UNLOADED, *now[-2:])
            if was[-2] == UNLOADED:
                now = (*now[:-2], UNLOADED, now[-1])
            if now != was:
                out.append(f"{was} -> {now}")
        for k, now in after.items():
            if k not in before and (now[1] is not ObjectStatus.PERSISTENT or now[4]
                                    or any(now[-1])):
                out.append(f"{now} joined the session")
        return out

    def _release(self, data: st.DataObject, t: Tracked) -> None:
        """Take a committed player the session holds off its team (an orphan with
        delete-orphan), as pending work the flush's preparation acts on."""
        held = [pk for pk in sorted(self.players, key=order_key)
                if self.players[pk].team is not None and pk not in t.deleted]
        if not held:
            return
        pk = data.draw(st.sampled_from(held), label="release")
        obj = self._get(t, pk)
        if obj is None or t.view(pk).team is None:
            return
        assert obj.team is not None
        obj.team = None
        t.dirty.setdefault(pk, {})["team"] = None
        assert self.cfg is not None
        if self.cfg.orphans:
            t.orphans.add(pk)
        bump("failed flush: with a released player pending")

    @rule(who=SESSIONS, data=st.data(), how=st.sampled_from(("unique", "stale")),
          pending=st.sampled_from(("as is", "release", "child of a new team")))
    @counted
    def fail_then_retry(self, who: str, data: st.DataObject, how: str, pending: str) -> None:
        """Make the session's commit fail (a duplicate unique value, or a player changed by
        the worker since the session loaded it), with relationship work pending (a released
        player, a child of a new team), check that Redis and the session are exactly as
        before it, fix the cause and commit the same session again."""
        assert self.cfg is not None
        t = self.sv[who]
        fix: Callable[[], None]
        if pending == "release":
            self._release(data, t)
        elif pending == "child of a new team":
            team = self.Team(name="n")
            possible, tpk = self._explicit_pk(
                data, {o.__dict__.get("id") for _, o in t.new_teams} | set(t.teams))
            if possible:
                if tpk is not None:
                    team.id = tpk
                h = NewTeam(self._new_handle())
                t.new_teams.append((h, team))
                t.session.add(team)
                avoid = {p.__dict__.get("id") for _, p, _ in t.new} | set(t.objs)
                possible, ppk = self._explicit_pk(data, avoid)
                if possible:
                    child = self.Player(name="k", team=team)
                    if ppk is not None:
                        child.id = ppk
                    t.session.add(child)
                    t.new.append((NewPlayer(self._new_handle()), child, Row("k", None, 0, h)))
        if how == "unique":
            # A duplicate: a taken unique email, or (explicit keys) a taken primary key.
            owners = sorted(
                (r.email, pk) for pk, r in self.players.items()
                if r.email and pk not in t.deleted and pk not in t.orphans
                and "email" not in t.dirty.get(pk, {})
            )
            avoid = {p.__dict__.get("id") for _, p, _ in t.new} | set(t.objs)
            if self.cfg.unique and owners:
                email, _ = data.draw(st.sampled_from(owners), label="duplicate of")
                possible, pk = self._explicit_pk(data, avoid | set(self.players))
                if not possible:
                    return
            elif self.cfg.explicit:
                taken = [k for k in sorted(self.players, key=order_key) if k not in avoid]
                if not taken:
                    return
                email, pk = None, data.draw(st.sampled_from(taken), label="duplicate key")
            else:
                return
            dup = self.Player(name="d", email=email)
            if pk is not None:
                dup.id = pk
            t.session.add(dup)
            handle = NewPlayer(self._new_handle())
            t.new.append((handle, dup, Row("d", email, 0, None)))
            self.fresh += 1
            unique_email = f"f{self.fresh}" if email is not None else None
            free = [k for k in self.cfg.pool() if k not in avoid and k not in self.players
                    and self._reusable(k)] if self.cfg.explicit else []

            def fix() -> None:
                i = next(i for i, (h, _, _) in enumerate(t.new) if h == handle)
                if email is not None:
                    dup.email = unique_email
                    t.new[i] = (handle, dup, Row("d", unique_email, 0, None))
                elif free:
                    dup.id = free[0]  # another key
                else:
                    t.session.expunge(dup)  # no key left: drop the duplicate
                    del t.new[i]
        else:
            pk = self._pick(data, t)
            if pk is None or pk not in self.players or pk in t.deleted or pk in t.orphans:
                return
            obj = self._get(t, pk)
            if obj is None:
                return
            answer = self.worker.ask(op="update", pk=enc(pk), field="score",
                                     value=self.players[pk].score + 1,
                                     cross_slot=self.cfg.cross_slot)
            assert answer == {"ok": True}, answer
            self.players[pk] = dataclasses.replace(self.players[pk],
                                                   score=self.players[pk].score + 1)
            self.pver[pk] += 1
            name = data.draw(st.sampled_from([n for n in NAMES if n != t.snap[pk].name]),
                             label="name")
            obj.name = name
            t.dirty.setdefault(pk, {})["name"] = name

            def fix() -> None:
                t.session.expire(obj)
                t.dirty.pop(pk, None)
                t.partial.pop(pk, None)
                t.blind.pop(pk, None)
                t.expired.add(pk)
                again = self._get(t, pk)
                assert again is obj
                again.name = name
                t.dirty.setdefault(pk, {})["name"] = name

        undo = self._reload_marked(t)
        errors, _, _ = self._predict(t)
        assert errors, f"{t.name}: the provoked failure ({how}) is not predicted"
        undo()
        before = self._session_state(t)
        snapshot = self._snapshot()
        with pytest.raises(
            (StaleDataError, IntegrityError, CrossSlotError, PartialCommitError)
        ) as info:
            t.session.commit()
        if isinstance(info.value, StaleDataError):
            t.named(info.value)
        if isinstance(info.value, PartialCommitError):
            assert self.cluster and self.cfg.cross_slot, repr(info.value)
            undo = self._reload_marked(t)
            _, updates, doomed = self._predict(t)
            undo()
            self._partial(t, info.value, updates, doomed)
            return
        if isinstance(info.value, CrossSlotError):
            assert self.cluster and self.cfg.sharded, repr(info.value)
            t.session.rollback()
            t.rollback()
            return
        if type(info.value) not in errors:
            if errors == {StaleDataError} and isinstance(info.value, IntegrityError):
                known("8", f"{t.name}: stale commit claiming a unique value raised "
                      f"{info.value!r}")
            else:
                raise AssertionError(f"{t.name}: {info.value!r}, expected one of {errors}")
        bump(f"failed flush: {type(info.value).__name__}")
        self._assert_unchanged(snapshot, f"{t.name}: the failed commit ({info.value!r})")
        changes = self._session_changes(before, self._session_state(t))
        if changes:
            known("4", f"{t.name}: the failed commit ({info.value!r}) changed the session: "
                  f"{'; '.join(changes)[:2000]}")
            t.session.rollback()
            t.rollback()
            return
        fix()
        applied = self._commit(t)
        bump("retry after failure: " + ("applied" if applied else "refused again"))

    # -- rules: corrupt #v ----------------------------------------------------------------

    @precondition(lambda self: bool(self.players))
    @rule(data=st.data(), mode=st.sampled_from(("01", "missing", "garbage")))
    @counted
    def corrupt_version(self, data: st.DataObject, mode: str) -> None:
        """Corrupt one player's `#v` with raw redis-py: a session that loaded it before
        must get StaleDataError; the audit must report it; a fresh load gets a DecodeError
        or the stored values, and its update is applied or refused with a DecodeError,
        never stale forever; once deleted it stays deleted; then `#v` is repaired."""
        assert self.cfg is not None
        pk = data.draw(st.sampled_from(sorted(self.players, key=order_key)), label="corrupt")
        key = mapper_of(self.Player).object_key(pk)
        check = self.engines["check"]
        holder = self._session(check)
        held = holder.get(self.Player, pk)
        assert held is not None
        held.score = self.players[pk].score + 1
        if mode == "missing":
            self.client.hdel(key, "#v")
        else:
            # "01": the same number with a leading zero (item 10), never another number
            # (that would rewind the version, which no check can tell from a change).
            self.client.hset(key, "#v", f"0{self.pver[pk]}" if mode == "01" else "x!")
        bump(f"corrupt #v: {mode}")
        # The audit reports the corruption (and does not crash).
        report = audit(self.client, self.reg)
        if report.ok:
            known("10" if mode == "01" else "6" if mode == "missing" else "15",
                  f"the audit reports nothing about #v {mode!r} on {key}")
        else:
            text = "\n".join(report.mismatches + report.unexplained)
            assert key in text, f"the audit's report does not name {key}: {text[:500]}"
            bump(f"audit reported #v {mode}")
        snapshot = self._snapshot()
        try:
            holder.commit()
        except StaleDataError:
            self._assert_unchanged(snapshot, "a stale commit over a corrupt #v")
            bump(f"corrupt #v {mode}: held copy refused as stale")
        else:
            # Only a leading zero (the same number) may pass the version check; the
            # write then stores the canonical next version.
            assert mode == "01", (
                f"an update loaded at version {self.pver[pk]} was applied over #v {mode!r}")
            raw = self.client.hget(key, "#v")
            want = str(self.pver[pk] + 1).encode()
            assert raw == want, f"{key}: #v is {raw!r} after an update, not {want!r}"
            self.players[pk] = dataclasses.replace(self.players[pk], score=held.score)
            self.pver[pk] += 1
            holder.close()
            bump("corrupt #v 01: held copy applied (same number)")
            return
        holder.close()
        # A fresh session.
        fresh = self._session(check)
        try:
            obj = fresh.get(self.Player, pk)
        except DecodeError as exc:
            assert "#v" in str(exc) or "version" in str(exc), f"unclear DecodeError: {exc}"
            bump(f"corrupt #v {mode}: fresh load refused (DecodeError)")
            fresh.close()
            self._repair(key, pk)
            return
        assert mode != "garbage", f"#v 'x!' loaded as version {mode!r}"
        assert obj is not None and Row(obj.name, obj.email, obj.score, None) == dataclasses.replace(
            self.players[pk], team=None)
        if mode == "missing" and "6" not in TOLERATE and data.draw(st.booleans(),
                                                                   label="deleted meanwhile"):
            # Someone deletes it (through redmap, from the corrupt state); the fresh
            # session's update of the now missing object must be stale, not resurrect it.
            other = self._session(check)
            gone = other.get(self.Player, pk)
            assert gone is not None
            other.delete(gone)
            try:
                other.commit()
            except (StaleDataError, DecodeError):
                other.rollback()
                other.close()
                fresh.close()
                bump("corrupt #v missing: delete refused")
                self._repair(key, pk)
                return
            other.close()
            del self.players[pk], self.pver[pk]
            obj.score += 1
            try:
                fresh.commit()
            except StaleDataError:
                bump("corrupt #v missing: update of the deleted object refused as stale")
            else:
                known("6", f"an update of {key} (loaded without #v, deleted since) was "
                      f"applied: the object is resurrected")
                self._resync_player(pk)
            fresh.close()
            assert pk in self.players or not self.client.exists(key), f"{key} resurrected"
            return
        score = obj.score + 1
        obj.score = score
        try:
            fresh.commit()
        except DecodeError:
            bump(f"corrupt #v {mode}: fresh update refused (DecodeError)")
            fresh.close()
            self._repair(key, pk)
            return
        except StaleDataError:
            fresh.close()
            known("10" if mode == "01" else "6",
                  f"#v {mode!r}: an update from a fresh load is stale (stale forever)")
            self._repair(key, pk)
            return
        fresh.close()
        bump(f"corrupt #v {mode}: fresh update applied")
        raw = self.client.hget(key, "#v")
        assert raw is not None and raw.decode().isdigit() and not raw.startswith(b"0"), (
            f"after an applied update {key} holds #v {raw!r}")
        self.players[pk] = dataclasses.replace(self.players[pk], score=score)
        if int(raw) <= self.pver[pk]:
            # The version sequence restarted: holders of an earlier version must be stale.
            if "version-restart" in TOLERATE:
                self.client.hset(key, "#v", str(self.pver[pk] + 1))
                raw = str(self.pver[pk] + 1).encode()
            else:
                self.births += 1
                self.inc[pk] = self.births
                self.restarted[pk] = "version-restart"
        self.pver[pk] = int(raw)

    def _repair(self, key: str, pk: Any) -> None:
        """Put a corrupted `#v` back to the version the reference holds."""
        if pk in self.players:
            self.client.hset(key, "#v", str(self.pver[pk]))

    # -- invariants ------------------------------------------------------------------------

    def _digest(self) -> Any:
        """`DEBUG DIGEST` of the server (of every master on a cluster)."""
        if self.cluster:
            return tuple(sorted(
                (str(k), v) for k, v in
                self.client.execute_command("DEBUG", "DIGEST",
                                            target_nodes=self.client.PRIMARIES).items()
            ))
        return self.client.execute_command("DEBUG", "DIGEST")

    def _snapshot(self) -> dict[bytes, bytes]:
        """Every key's serialized value but flush tokens (id counters included: a refused
        flush that took ids first gives them back when no one took ids since, which no one
        does while a failed commit is checked; docs/session.md)."""
        if self.cluster:
            names = self.client.keys(target_nodes=self.client.PRIMARIES)
        else:
            names = self.client.keys("*")
        # On the cluster a refused flush of a sharded model may leave its counter moved
        # (ids taken first are not given back there: seed 3527604211, reported to the
        # lead); on one server the counter must be as it was.
        names = sorted(k for k in names if b"#flush:" not in k
                       and not (self.cluster and k.endswith(b"#seq")))
        return {k: self.client.dump(k) for k in names}

    def _assert_unchanged(self, snapshot: dict[bytes, bytes], what: str) -> None:
        now = self._snapshot()
        changed = sorted(k for k in set(now) | set(snapshot) if now.get(k) != snapshot.get(k))
        assert not changed, f"{what} changed Redis: {changed}"

    def _assert_redis_is_reference(self) -> None:
        self.checked = None
        self.redis_matches_reference()

    @invariant()
    def redis_matches_reference(self) -> None:
        """A fresh session reads exactly the reference; versions match; the audit is clean."""
        bump("steps")
        if self.cfg is None:
            return
        digest = self._digest()
        state = (tuple(sorted(self.players.items(), key=lambda kv: order_key(kv[0]))),
                 tuple(sorted(self.pver.items(), key=lambda kv: order_key(kv[0]))),
                 tuple(sorted(self.teams.items(), key=lambda kv: order_key(kv[0]))))
        if self.checked == (digest, state):
            return
        bump("full checks")
        with self._session(self.engines["check"]) as s:
            players = s.scalars(select(self.Player)).all()
            got = {p.id: Row(p.name, p.email, p.score, p.team_id) for p in players}
            if got != self.players:
                lost = {pk: (got.get(pk), self.players.get(pk))
                        for pk in set(got) | set(self.players)
                        if got.get(pk) != self.players.get(pk)}
                unwritten = {pk: pair for pk, pair in lost.items()
                             if None not in pair and pair[0].team is None
                             and pair[0] == dataclasses.replace(pair[1], team=None)}
                if unwritten == lost:
                    known("2", f"foreign keys to a team were never written: {lost}")
                    for pk, (stored, _) in lost.items():
                        self.players[pk] = stored
                    self.checked = None
                    return self.redis_matches_reference()
                raise AssertionError(f"players (Redis, model) differ: {lost}")
            teams = s.scalars(select(self.Team)).all()
            assert {t.id: t.name for t in teams} == self.teams
            for p in players:
                want = self.players[p.id].team
                assert (p.team.id if p.team is not None else None) == want, p.id
            for team in teams:
                got_ids = sorted((p.id for p in team.players), key=order_key)
                want_ids = sorted((pk for pk, r in self.players.items() if r.team == team.id),
                                  key=order_key)
                assert got_ids == want_ids, f"team {team.id!r}: {got_ids} != {want_ids}"
            for name in NAMES:
                got_ids = sorted((p.id for p in s.scalars(
                    select(self.Player).where(self.Player.name == name))), key=order_key)
                assert got_ids == sorted((pk for pk, r in self.players.items()
                                          if r.name == name), key=order_key), name
            if self.cfg.unique:
                for email in EMAILS:
                    found = s.scalars(select(self.Player).where(
                        self.Player.email == email)).all()
                    assert [p.id for p in found] == [pk for pk, r in self.players.items()
                                                      if r.email == email], email
            ordered = [p.score for p in s.scalars(
                select(self.Player).order_by(self.Player.score))]
            assert ordered == sorted(r.score for r in self.players.values())
        pipe = self.client.pipeline(transaction=False)
        pks = sorted(self.players, key=order_key)
        for pk in pks:
            pipe.hget(mapper_of(self.Player).object_key(pk), "#v")
        versions = {pk: v for pk, v in zip(pks, pipe.execute(), strict=True)}
        want = {pk: str(self.pver[pk]).encode() for pk in pks}
        assert versions == want, f"versions {versions} != {want}"
        report = audit(self.client, self.reg)
        assert report.ok, report.mismatches[:5] + report.unexplained[:5]
        self.checked = (digest, state)


# -- running ---------------------------------------------------------------------------

STEPS = 30

# The least each interesting branch must run in a default run of 100 examples (scaled
# down for smaller runs); a run where they did not is a failure, not a pass.
MINIMUMS = {
    "reload keeps old version (stale after expire)": 5,
    # Both merge outcomes ran from 0-1 to 58 times per 200 examples once the driver is
    # drawn too (Hypothesis sometimes spends a run elsewhere): counted, no minimum. Each is
    # covered deterministically by tests/test_session_regressions.py::TestMergeVersion.
    "merge refused: stale (changed)": 0,
    "merge applied": 0,
    "failed flush: IntegrityError": 1,
    "failed flush: StaleDataError": 5,
    "retry after failure: applied": 5,
    "commits refused: StaleDataError": 10,
    "stale after expire: commit refused": 5,
    "commits refused: IntegrityError": 1,
    "commits applied": 100,
    # A scripted flush (half the examples since issue 14) has no round trip between its
    # checks and its writes for the worker to write in, so interleaved writes mostly land
    # before it (1 to 3 per 200 examples): counted, no minimum. tests/reliability/
    # test_races.py refuses stale commits under real concurrency deterministically.
    "interleaved commits refused: StaleDataError": 0,
    # Once commit_racing_worker gives an idle session something to flush: 55 to 153 per
    # 200 examples (three seeds); before, 1 to 86, which failed a CI run.
    "interleaved commits applied": 5,
    "near counter: the worker's explicit insert was applied": 0,
    "corrupt #v: 01": 2,
    "corrupt #v: missing": 2,
    "corrupt #v: garbage": 2,
    "commits refused: stale, same version of an earlier object of the key": 1,
    "worker applied": 50,
    **{f"config pk={k}": 1 for k in ("gen_int", "int", "str", "gen_uuid", "uuid")},
    **{f"config driver={k}": 1 for k in ("sync", "async")},
    **{f"config flush={k}": 1 for k in ("watch", "script")},
}


def _run(url: str, client: Any, max_examples: int, *, cluster: bool, test_id: str,
         minimums: bool) -> None:
    """Run the machine with a fresh worker process, print its counts, check its budget."""
    STATS.clear()
    worker = Worker()
    ConfigHistories.url = url
    ConfigHistories.client = client
    ConfigHistories.worker = worker
    ConfigHistories.cluster = cluster
    t0 = time.perf_counter()
    try:
        with (
            mock.patch("uuid.uuid4", UUIDS),
            mock.patch("redmap.orm.unitofwork.random", SHARD_CHOICE),
        ):
            run_seeded("configuration state machine", ConfigHistories,
                       max_examples=max_examples, steps=STEPS, test_id=test_id)
    finally:
        worker.close()
    print(f"configuration state machine ({'cluster' if cluster else 'one server'}): "
          f"{STATS.get('examples', 0)} examples, {STATS.get('steps', 0)} steps, "
          f"{time.perf_counter() - t0:.0f}s; counts: {dict(sorted(STATS.items()))}")
    assert STATS.get("examples", 0) >= max_examples
    if minimums and not os.environ.get("REDMAP_PP_CONFIG"):
        check_minimums(STATS, MINIMUMS, examples=max_examples, per=100)


def test_config_histories(redis_url: str) -> None:
    """200 histories on drawn configurations (key kind, unique, sharded, delete-orphan) with
    merges, failed-then-retried flushes, ids near the counter, a writer process and corrupt
    versions keep Redis equal to the model."""
    client = redis.Redis.from_url(redis_url)
    try:
        _run(redis_url, client, examples_from_env(200), cluster=False, minimums=True,
             test_id="tests/reliability/test_config_machine.py::test_config_histories")
    finally:
        client.close()


@pytest.mark.cluster
def test_config_histories_cluster(cluster: Any, cluster_client: Any) -> None:
    """30 histories on a 3-node cluster, cross-slot flushes allowed or not: a partial
    commit must report exactly what it wrote."""
    _run(cluster.url, cluster_client, examples_from_env(30), cluster=True, minimums=False,
         test_id="tests/reliability/test_config_machine.py::test_config_histories_cluster")


@pytest.mark.soak
def test_config_histories_soak(redis_url: str) -> None:
    """The configuration machine, 10,000 examples."""
    client = redis.Redis.from_url(redis_url)
    try:
        _run(redis_url, client, 10_000, cluster=False, minimums=True,
             test_id="tests/reliability/test_config_machine.py::test_config_histories_soak")
    finally:
        client.close()


@pytest.mark.soak
@pytest.mark.cluster
def test_config_histories_cluster_soak(cluster: Any, cluster_client: Any) -> None:
    """The configuration machine on the cluster, 300 examples."""
    _run(cluster.url, cluster_client, 300, cluster=True, minimums=False,
         test_id="tests/reliability/test_config_machine.py::test_config_histories_cluster_soak")
