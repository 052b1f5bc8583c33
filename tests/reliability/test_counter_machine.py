"""Issue 14: a state machine of atomic counters (`p.hits = Meter.hits + n`) and the paths
their commits take: the counter lane (one object, sync driver), `IncrementFlush` (several
objects, a model with shards, the asyncio driver, or the lane's reply handed over), and
the general unit of work (an increment beside a plain value).

Each example draws its configuration (`Config`): the primary key kind (generated or
explicit int, str, generated or explicit UUID), whether `hits` is `Sorted()`, whether
the model is sharded by its own key, `expire_on_commit`, the sync or asyncio driver, and
a WATCH or scripted general flush. Then random steps in two sessions: loads, increments
of one or two fields, plain assignments, commits, rollbacks, expiries; another writer
(another engine) that increments, updates, deletes or deletes and inserts again under
the same key; and the paths of things going wrong: the server forgetting the flush
script (`SCRIPT FLUSH`, as after a restart: NOSCRIPT), a corrupt stored counter, a
commit refused as stale then retried the way users retry (rollback, reload, the same
increments again), a commit refused by Redis (the corrupt value) then retried once the
value is repaired.

A reference model says what Redis must hold after every step (every field, `#v`, the
Sorted score) and what each commit must do: applied, with the incremented attributes
holding what Redis computed, or refused with nothing written (Redis compared before and
after). Increments commute: an update made only of them checks only that the object is
still the one loaded (its incarnation), so another writer's change never makes it
stale, while a plain value beside them needs the version loaded.

Budgets (tests/reliability/_budget.py): seeded (`REDMAP_SEED` replays), every rule and
outcome counted, minimums per branch (`MINIMUMS`). Default: 200 examples of 30 steps
(about 10 s here); `-m soak`: 5,000.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from dataclasses import dataclass, field, make_dataclass
from typing import Annotated, Any, Optional
from unittest import mock

import hypothesis.strategies as st
import pytest
import redis
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from redmap import PrimaryKey, Session, Sorted, create_engine, registry
from redmap.engine import Engine
from redmap.exc import FlushError, ObjectDeletedError, StaleDataError
from redmap.orm.attributes import state_of
from redmap.orm.counterlane import CounterLane
from redmap.orm.mapper import mapper_of
from tests.reliability._budget import Stats, check_minimums, examples_from_env, run_seeded
from tests.reliability.test_config_machine import POOLS, ReplayableUUIDs

STATS = Stats()
NAMES = ["a", "b", "c"]
COUNTED = ("hits", "coins")

PK_KINDS = ("gen_int", "int", "str", "gen_uuid", "uuid")
PK_TYPES: dict[str, Any] = {"gen_int": int, "int": int, "str": str, "gen_uuid": uuid.UUID,
                            "uuid": uuid.UUID}


@dataclass(frozen=True)
class Config:
    pk: str
    sorted: bool
    sharded: bool
    expire_on_commit: bool
    driver: str
    flush: str

    @property
    def explicit(self) -> bool:
        return self.pk in POOLS


def config_of(n: int) -> Config:
    """The configuration numbered `n` (one drawn number per example: every value evenly,
    the same in a replay)."""
    rng = random.Random(n)
    return Config(
        pk=rng.choice(PK_KINDS),
        sorted=rng.random() < 0.5,
        sharded=rng.random() < 0.3,
        expire_on_commit=rng.random() < 0.3,
        driver=rng.choice(["sync", "sync", "async"]),
        flush=rng.choice(["watch", "script"]),
    )


CONFIGS = st.integers(0, 2**32 - 1).map(config_of)

_MODELS: dict[tuple[Any, ...], Any] = {}


def model_for(cfg: Config) -> Any:
    key = (cfg.pk, cfg.sorted, cfg.sharded)
    if key not in _MODELS:
        prefix = "km-" + "-".join(
            [cfg.pk, "z" if cfg.sorted else "p", "s" if cfg.sharded else "t"]
        )
        reg = registry(prefix=prefix, shards=4)
        hits: Any = Annotated[int, Sorted()] if cfg.sorted else int
        meter = make_dataclass(
            "Meter",
            [
                ("hits", hits, field(default=0)),
                ("coins", int, field(default=0)),
                ("name", str, field(default="a")),
                ("id", Annotated[Optional[PK_TYPES[cfg.pk]], PrimaryKey()],
                 field(default=None)),
            ],
            namespace={"__shard_key__": "id"} if cfg.sharded else {},
        )
        reg.mapped(meter)
        reg.configure()
        _MODELS[key] = meter
    return _MODELS[key]


@dataclass
class Ref:
    """What Redis must hold for one object."""

    hits: int
    coins: int
    name: str
    version: int
    inc: int  # the model's name for the object's incarnation
    corrupt: bool = False  # `coins` holds a value that is not a number


@dataclass
class Held:
    """An object a session holds, as the session knows it."""

    obj: Any
    inc: int
    version: int
    # The name the session loaded or wrote last (assigning it again is no change); None
    # once the object expired (any assignment is then a change).
    name: str | None
    pending: dict[str, tuple[str, Any]] = dataclasses.field(default_factory=dict)
    # Named by a StaleDataError since the session's last rollback ...
    refused: bool = False
    # ... and so marked by that rollback: the next flush with anything pending loads the
    # object first (its version and incarnation become what Redis holds), as a load does.
    reload: bool = False

    def changes(self) -> dict[str, tuple[str, Any]]:
        """What a flush writes: the pending increments, and the name if it differs."""
        return {f: c for f, c in self.pending.items() if c[0] == "inc" or c[1] != self.name}


UUIDS = ReplayableUUIDs(9)
SHARD_CHOICE = random.Random(0)


class CounterMachine(RuleBasedStateMachine):
    engines: dict[tuple[str, str], Engine]
    other: Engine
    client: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        self.cfg: Config | None = None
        self.sessions: dict[str, Session] = {}
        self.held: dict[str, dict[Any, Held]] = {}
        self.ref: dict[Any, Ref] = {}
        self.incs = 0

    def teardown(self) -> None:
        for s in self.sessions.values():
            s.close()

    @initialize(cfg=CONFIGS, data=st.data())
    def setup(self, cfg: Config, data: st.DataObject) -> None:
        UUIDS.reset()
        SHARD_CHOICE.seed(0)
        self.client.flushall()
        self.cfg = cfg
        self.M = model_for(cfg)
        self.engine = self.engines[(cfg.driver, cfg.flush)]
        self.sessions = {
            w: Session(self.engine, expire_on_commit=cfg.expire_on_commit) for w in ("s1", "s2")
        }
        self.held = {w: {} for w in self.sessions}
        # How this example's users retry a refused commit: reload what they change, or
        # make the same changes again on the objects they hold, reading nothing.
        self.blind_retry = data.draw(st.booleans(), label="blind retry")
        STATS.bump("examples")
        STATS.bump(f"config pk={cfg.pk}")
        STATS.bump("config sorted" if cfg.sorted else "config plain")
        STATS.bump("config sharded" if cfg.sharded else "config unsharded")
        STATS.bump(f"config driver={cfg.driver}")
        STATS.bump(f"config flush={cfg.flush}")
        STATS.bump(f"config expire_on_commit={cfg.expire_on_commit}")
        if cfg.driver == "sync" and not cfg.sharded:
            STATS.bump("config lane")  # the configurations the counter lane can take
        for _ in range(3):
            self.insert(data, data.draw(st.integers(-3, 3), label="hits"), 0, "a")
        for who in self.sessions:
            self._load(who, data)

    # -- helpers ---------------------------------------------------------------------

    def _key(self, pk: Any) -> str:
        mapper = mapper_of(self.M)
        return mapper.keys_for_pk(pk).object(mapper.pk_segment(pk))

    def _zset(self, pk: Any) -> str:
        return mapper_of(self.M).keys_for_pk(pk).sorted("hits")

    def _new_inc(self) -> int:
        self.incs += 1
        return self.incs

    def _insert(self, pk: Any, hits: int, coins: int, name: str) -> Any:
        with Session(self.other) as s:
            obj = self.M(hits=hits, coins=coins, name=name)
            if pk is not None:
                obj.id = pk
            s.add(obj)
            s.commit()
            pk = obj.id
        self.ref[pk] = Ref(hits, coins, name, 1, self._new_inc())
        return pk

    def _snapshot(self) -> dict[bytes, Any]:
        out: dict[bytes, Any] = {}
        for key in self.client.keys("*"):
            kind = self.client.type(key)
            if kind == b"hash":
                out[key] = self.client.hgetall(key)
            elif kind == b"zset":
                out[key] = self.client.zrange(key, 0, -1, withscores=True)
            elif kind == b"string" and b"#flush:" not in key:
                out[key] = self.client.get(key)
        return out

    def _pick_held(self, data: st.DataObject, who: str) -> tuple[Any, Held] | None:
        held = self.held[who]
        if not held:
            self._load(who, data)
        if not held:
            return None
        pk = data.draw(st.sampled_from(sorted(held, key=repr)), label="held")
        return pk, held[pk]

    # -- rules: what users do -----------------------------------------------------------

    @rule(data=st.data(), hits=st.integers(-3, 3), coins=st.integers(0, 3),
          name=st.sampled_from(NAMES))
    @STATS.rule
    def insert(self, data: st.DataObject, hits: int, coins: int, name: str) -> None:
        assert self.cfg is not None
        pk = None
        if self.cfg.explicit:
            free = [p for p in POOLS[self.cfg.pk] if p not in self.ref]
            if not free:
                return
            pk = data.draw(st.sampled_from(free), label="pk")
        self._insert(pk, hits, coins, name)

    @rule(who=st.sampled_from(("s1", "s2")), data=st.data())
    @STATS.rule
    def load(self, who: str, data: st.DataObject) -> None:
        """A session loads an object (or reloads one it holds with nothing pending)."""
        self._load(who, data)

    def _load(self, who: str, data: st.DataObject) -> None:
        if any(h.pending for h in self.held[who].values()):
            # A read would autoflush them: flush first, as a step of its own (refused,
            # the session is rolled back or retried as after a refused commit).
            self._commit(who, retry=True, flush=True)
        loadable = [pk for pk, r in self.ref.items() if not r.corrupt]
        if not loadable:
            return  # (a corrupt counter cannot be loaded: DecodeError, tested elsewhere)
        pk = data.draw(st.sampled_from(sorted(loadable, key=repr)), label="pk")
        held = self.held[who].get(pk)
        s = self.sessions[who]
        if held is not None:
            if held.pending:
                return
            s.refresh(held.obj)
            obj = held.obj
        else:
            obj = s.get(self.M, pk)
            assert obj is not None
        r = self.ref[pk]
        assert (obj.hits, obj.name) == (r.hits, r.name)
        refused = held is not None and held.refused  # (until the next rollback)
        self.held[who][pk] = Held(obj, r.inc, r.version, r.name, refused=refused)

    @rule(who=st.sampled_from(("s1", "s2")), data=st.data(),
          fields=st.sampled_from((("hits",), ("coins",), ("hits", "coins"))),
          delta=st.integers(-5, 5))
    @STATS.rule
    def increment(self, who: str, data: st.DataObject, fields: tuple[str, ...],
                  delta: int) -> None:
        """`obj.f = Meter.f + delta` (assigning again replaces the pending increment)."""
        picked = self._pick_held(data, who)
        if picked is None:
            return
        _, held = picked
        for f in fields:
            setattr(held.obj, f, getattr(self.M, f) + delta)
            held.pending[f] = ("inc", delta)

    @rule(who=st.sampled_from(("s1", "s2")), data=st.data(),
          fields=st.sampled_from((("hits",), ("coins",), ("hits", "coins"))),
          delta=st.integers(-5, 5))
    @STATS.rule
    def bump(self, who: str, data: st.DataObject, fields: tuple[str, ...], delta: int) -> None:
        """The hot counter's pattern: increment one object and commit at once."""
        self.increment(who, data, fields, delta)
        self._commit(who, retry=True)

    @rule(who=st.sampled_from(("s1", "s2")), data=st.data(), name=st.sampled_from(NAMES))
    @STATS.rule
    def assign(self, who: str, data: st.DataObject, name: str) -> None:
        """A plain value beside the increments: the general path, with a version check."""
        picked = self._pick_held(data, who)
        if picked is None:
            return
        _, held = picked
        held.obj.name = name
        held.pending["name"] = ("set", name)

    @rule(who=st.sampled_from(("s1", "s2")))
    @STATS.rule
    def expire_all(self, who: str) -> None:
        """Pending changes go; the objects reload on access (and keep the version and
        incarnation they were loaded with until then)."""
        self.sessions[who].expire_all()
        for held in self.held[who].values():
            held.pending.clear()
            held.name = None

    @rule(who=st.sampled_from(("s1", "s2")))
    @STATS.rule
    def rollback(self, who: str) -> None:
        self._rollback(who)

    def _rollback(self, who: str) -> None:
        """Pending changes go, objects expire; those a refusal named are marked to reload
        (so that a retry is written against what Redis holds, not refused forever)."""
        self.sessions[who].rollback()
        for held in self.held[who].values():
            held.pending.clear()
            held.name = None
            if held.refused:
                held.reload, held.refused = True, False
                STATS.bump("rollback marked a refused object to reload")

    def _reload_marked(self, who: str) -> list[tuple[Held, int, int, str | None]]:
        """What a flush does first when anything is pending: the marked objects load
        (not a corrupt one: it cannot be decoded, and keeps what it had). Returns what
        to put back if the flush fails (it leaves the session as it was, marks too)."""
        saved: list[tuple[Held, int, int, str | None]] = []
        if not any(h.pending for h in self.held[who].values()):
            return saved
        for pk, held in self.held[who].items():
            r = self.ref.get(pk)
            if held.reload and r is not None and not r.corrupt:
                saved.append((held, held.inc, held.version, held.name))
                if (held.inc, held.version) != (r.inc, r.version):
                    STATS.bump("flush reloaded a marked object that had changed")
                held.inc, held.version, held.reload = r.inc, r.version, False
                if "name" not in held.pending:
                    held.name = r.name
        return saved

    @rule(who=st.sampled_from(("s1", "s2")))
    @STATS.rule
    def commit(self, who: str) -> None:
        self._commit(who, retry=True)

    def _predict(self, who: str) -> tuple[type[Exception] | None, list[Any]]:
        """(the error the commit must raise, or None; the objects it writes)."""
        writing = [pk for pk, h in self.held[who].items() if h.changes()]
        for pk in writing:
            h = self.held[who][pk]
            r = self.ref.get(pk)
            plain = any(kind == "set" for kind, _ in h.changes().values())
            if r is None or r.inc != h.inc or (plain and r.version != h.version):
                return StaleDataError, writing
        for pk in writing:
            if self.ref[pk].corrupt and "coins" in self.held[who][pk].changes():
                return FlushError, writing
        return None, writing

    @rule(who=st.sampled_from(("s1", "s2")))
    @STATS.rule
    def flush(self, who: str) -> None:
        self._commit(who, retry=True, flush=True)

    def _commit(self, who: str, *, retry: bool, flush: bool = False) -> Exception | None:
        """Commit (or flush) `who` and check the outcome; after a refusal, retry as users
        do when `retry`. Returns the error the commit raised (None: applied)."""
        s = self.sessions[who]
        reloaded = self._reload_marked(who)
        expected, writing = self._predict(who)
        assert self.cfg is not None
        # Whether the counter lane sends it (the asyncio driver declines the lane).
        lane = ("lane" if CounterLane.collect(s._context) is not None
                and not s._context.to_reload() and self.cfg.driver == "sync" else "general")
        before = self._snapshot()
        error: Exception | None = None
        try:
            if flush:
                s.flush()
            else:
                s.commit()
        except (StaleDataError, FlushError) as exc:
            error = exc
        if not writing:
            assert error is None, error
            for h in self.held[who].values():
                h.pending.clear()
                if not flush and self.cfg.expire_on_commit:
                    h.name = None  # a commit expires everything, written or not
            return None
        path = type(s._last_flush).__name__
        if expected is None:
            assert error is None, (
                f"{who}: {error!r}; pending {[(pk, self.held[who][pk].pending) for pk in writing]}"
            )
            self._applied(who, writing, path, expired=not flush and self.cfg.expire_on_commit)
            if lane == "lane" and path == "IncrementFlush":
                # The lane's reply was not the plain success (NOSCRIPT after the
                # server forgot its scripts): the protocol finished the flush.
                STATS.bump("lane handed its reply to the protocol: applied")
            return None
        assert type(error) is expected, f"{who}: {error!r}, expected {expected.__name__}"
        assert self._snapshot() == before, "a refused commit wrote something"
        for held, inc, version, name in reloaded:
            held.inc, held.version, held.name, held.reload = inc, version, name, True
        if isinstance(error, StaleDataError):
            named = {id(o) for o in error.objects}
            for h in self.held[who].values():
                if id(h.obj) in named:
                    h.refused = True
        STATS.bump(f"refused: {expected.__name__} ({lane})")
        STATS.bump(f"refused: {expected.__name__}")
        if not retry:
            return error
        if expected is FlushError:
            # A corrupt counter: repaired, and the same pending increments committed.
            for pk in writing:
                r = self.ref[pk]
                if r.corrupt:
                    self.client.hset(self._key(pk), "coins", r.coins)
                    r.corrupt = False
            self._commit(who, retry=False, flush=flush)
            STATS.bump("retry after a refused write: applied")
            return error
        if self.blind_retry:
            self._retry_blind(who, writing, flush=flush)
            return error
        # Stale: roll back, reload, and the same increments again (plain values dropped:
        # the user decides them again from what is stored now).
        again = {pk: {f: c for f, c in self.held[who][pk].pending.items() if c[0] == "inc"}
                 for pk in writing}
        self._rollback(who)
        for pk in again:
            r_ = self.ref.get(pk)
            if r_ is not None and r_.corrupt:  # reloading needs a number there
                self.client.hset(self._key(pk), "coins", r_.coins)
                r_.corrupt = False
        for pk, held in list(self.held[who].items()):
            held.pending.clear()
            if pk not in self.ref:
                with pytest.raises(ObjectDeletedError):
                    _ = held.obj.hits
                s.expunge(held.obj)
                del self.held[who][pk]
                continue
            if pk in again:
                s.refresh(held.obj)
                r = self.ref[pk]
                held.inc, held.version, held.name = r.inc, r.version, r.name
                held.reload = False
        for pk, incs in again.items():
            held = self.held[who].get(pk)
            if held is None:
                continue
            for f, (_, delta) in incs.items():
                setattr(held.obj, f, getattr(self.M, f) + delta)
                held.pending[f] = ("inc", delta)
        expected_now, _ = self._predict(who)
        if expected_now is None:
            self._commit(who, retry=False, flush=flush)
            STATS.bump("retry after StaleDataError: applied")
        return error

    def _retry_blind(self, who: str, writing: list[Any], *, flush: bool) -> None:
        """The other way users retry a refused commit: roll back and make the same
        changes again on the objects they hold, reading nothing. The rollback marked the
        refused objects, so the retry is written against what Redis holds now: it
        applies whenever the objects still exist (before the marks, it was refused
        again and again, for the same stale version)."""
        s = self.sessions[who]
        again = {pk: dict(self.held[who][pk].pending) for pk in writing}
        self._rollback(who)
        for pk, changes in again.items():
            r = self.ref.get(pk)
            if r is not None and r.corrupt:
                self.client.hset(self._key(pk), "coins", r.coins)
                r.corrupt = False
            held = self.held[who][pk]
            for f, (kind, value) in changes.items():
                setattr(held.obj, f, getattr(self.M, f) + value if kind == "inc" else value)
                held.pending[f] = (kind, value)
        exists = all(pk in self.ref for pk in again)
        error = self._commit(who, retry=False, flush=flush)
        if exists:
            assert error is None, f"{who}: a retry after rollback was refused: {error!r}"
            STATS.bump("retry after StaleDataError, reading nothing: applied")
            STATS.bump("retry after StaleDataError: applied")  # (either way of retrying)
        else:
            assert isinstance(error, StaleDataError), error
            STATS.bump("retry after StaleDataError, reading nothing: gone")
            self._rollback(who)
            for pk in [pk for pk in self.held[who] if pk not in self.ref]:
                s.expunge(self.held[who].pop(pk).obj)

    def _applied(self, who: str, writing: list[Any], path: str, *, expired: bool) -> None:
        assert self.cfg is not None
        STATS.bump(f"applied ({path})")
        only_incs = all(kind == "inc" for pk in writing
                        for kind, _ in self.held[who][pk].changes().values())
        if path == "CounterLane":
            assert len(writing) == 1 and only_incs
            assert self.cfg.driver == "sync" and not self.cfg.sharded

        written = {pk: self.held[who][pk].changes() for pk in writing}
        for h in self.held[who].values():
            if not h.changes():
                h.pending.clear()  # a name assigned its own value: nothing to write
            if expired:
                h.name = None  # expire_on_commit: every object expired
        for pk in writing:
            held = self.held[who][pk]
            r = self.ref[pk]
            changes = written[pk]
            for f, (kind, value) in changes.items():
                if kind == "inc":
                    setattr(r, f, getattr(r, f) + value)
                else:
                    r.name = value
                    if not expired:
                        held.name = value
            r.version += 1
            held.version = r.version
            incremented = [f for f, (kind, _) in changes.items() if kind == "inc"]
            held.pending.clear()
            st_ = state_of(held.obj)
            assert st_ is not None and not st_.modified and not st_.in_doubt
            assert st_.version == r.version, (st_.version, r.version)
            for f in incremented:  # what Redis computed (or reloaded, when expired)
                assert getattr(held.obj, f) == getattr(r, f), (pk, f)
                if expired:
                    held.name = r.name  # reloaded with it

    # -- rules: the rest of the world ---------------------------------------------------

    @rule(data=st.data(), kind=st.sampled_from(("increment", "update", "delete", "reinsert")),
          value=st.integers(-3, 3))
    @STATS.rule
    def other_writer(self, data: st.DataObject, kind: str, value: int) -> None:
        """Another engine changes an object: increments commute with the sessions'
        increments; anything else makes a plain value beside them stale; a delete (and a
        new object under the same key) makes them stale too."""
        assert self.cfg is not None
        loadable = [pk for pk, r in self.ref.items() if not r.corrupt]
        if not loadable:
            return
        pk = data.draw(st.sampled_from(sorted(loadable, key=repr)), label="pk")
        r = self.ref[pk]
        if kind == "reinsert" and not self.cfg.explicit:
            kind = "delete"
        with Session(self.other) as s:
            obj = s.get(self.M, pk)
            assert obj is not None
            if kind == "increment":
                obj.hits = self.M.hits + value
                s.commit()
                r.hits += value
                r.version += 1
            elif kind == "update":
                name = NAMES[value % len(NAMES)]
                if name == r.name:
                    name += "'"  # a change (the same value would write nothing)
                obj.name = name
                s.commit()
                r.name = name
                r.version += 1
            else:
                s.delete(obj)
                s.commit()
                del self.ref[pk]
        if kind == "reinsert":
            self._insert(pk, value, 0, "a")
        STATS.bump(f"other writer: {kind}")

    @rule()
    @STATS.rule
    def forget_scripts(self) -> None:
        """The server forgets its scripts (a restart, a failover): the next flush script
        is answered NOSCRIPT and sent again with its body."""
        self.client.script_flush()

    @rule(data=st.data())
    @STATS.rule
    def corrupt_counter(self, data: st.DataObject) -> None:
        """A stored counter that is not a number (written by hand, another program).
        Only without expire_on_commit: a commit would then reload the object, which a
        corrupt value refuses (DecodeError, tests/test_counters.py)."""
        assert self.cfg is not None
        live = [pk for pk, r in self.ref.items() if not r.corrupt]
        if self.cfg.expire_on_commit:
            return
        if not live:
            return
        pk = data.draw(st.sampled_from(sorted(live, key=repr)), label="pk")
        self.client.hset(self._key(pk), "coins", "garbage")
        self.ref[pk].corrupt = True

    # -- what Redis holds ---------------------------------------------------------------

    @invariant()
    def redis_holds_the_reference(self) -> None:
        if self.cfg is None:
            return
        for pk, r in self.ref.items():
            stored = self.client.hgetall(self._key(pk))
            coins = b"garbage" if r.corrupt else str(r.coins).encode()
            got = (stored.get(b"hits"), stored.get(b"coins"), stored.get(b"name"),
                   stored.get(b"#v"))
            want = (str(r.hits).encode(), coins, r.name.encode(), str(r.version).encode())
            assert got == want, (pk, got, want)
            if self.cfg.sorted:
                member = mapper_of(self.M).pk_segment(pk)
                assert self.client.zscore(self._zset(pk), member) == r.hits


STEPS = 30

# The least each branch must run per 100 examples (scaled to the run). Low on purpose
# (swarm testing switches rules off per example); they catch a machine that stopped
# reaching its branches.
MINIMUMS = {
    # About a third of the lowest seen in eleven runs of about 205 examples (seeds 1, 4
    # to 13; in brackets, per 100 examples): hypothesis reuses an example's first
    # draws, so a run has some forty distinct configurations and the counts swing with
    # them (a first minimum of 8 other-writer increments failed seed 1, which drew 7).
    "applied (IncrementFlush)": 15,  # (40)
    "applied (UOWTransaction)": 8,  # (25)
    "refused: StaleDataError": 4,  # (11)
    # "refused: StaleDataError (lane)": 0 to 16 per run: counted, no minimum (the
    # refusals of the lane are tested one by one in tests/test_counter_lane.py).
    # "refused: FlushError" and "retry after a refused write: applied" (a corrupt
    # counter: 8 per 100 at the lowest in those seeds, 1.5 in a CI run on 9b5ee91):
    # counted, no minimum; swarm testing can switch the corrupting rule off for most
    # of a run. A refused increment on a corrupt field is tested one by one in
    # tests/test_counters.py and tests/test_counter_lane.py.
    "retry after StaleDataError: applied": 4,  # (11)
    "other writer: increment": 2,  # (7)
    "other writer: delete": 12,  # (41)
    "other writer: reinsert": 1,  # (7)
    **{f"config pk={k}": 1 for k in PK_KINDS},
    **{f"config {k}": 1 for k in ("sorted", "plain", "sharded", "unsharded")},
    **{f"config driver={k}": 1 for k in ("sync", "async")},
    **{f"config flush={k}": 1 for k in ("watch", "script")},
}

# Branches only the sync unsharded configurations reach (`config lane`): the least per
# 100 such examples (66 to 134 of 205 in those runs). Scaled to the whole run instead,
# a run that drew few of them would fail, as the expiry machine's take-over minimum
# did in CI.
GIVEN = {
    "applied (CounterLane)": ("config lane", 20),  # (50 per 100 lane examples)
    "lane handed its reply to the protocol: applied": ("config lane", 5),  # (15)
}


def _run(redis_url: str, max_examples: int, test_id: str) -> None:
    from tests._async_driver import LoopEngine

    engines: dict[tuple[str, str], Engine] = {}
    for flush, options in (("watch", {}), ("script", {"flush_script_threshold": 0})):
        engines[("sync", flush)] = create_engine(redis_url, **options)
        engines[("async", flush)] = LoopEngine(redis_url, **options)
    CounterMachine.engines = engines
    CounterMachine.other = create_engine(redis_url)
    CounterMachine.client = redis.Redis.from_url(redis_url)
    STATS.clear()
    t0 = time.perf_counter()
    try:
        with (
            mock.patch("uuid.uuid4", UUIDS),
            mock.patch("redmap.orm.unitofwork.random", SHARD_CHOICE),
        ):
            run_seeded("counter state machine", CounterMachine, max_examples=max_examples,
                       steps=STEPS, test_id=test_id)
    finally:
        CounterMachine.client.close()
        CounterMachine.other.dispose()
        for engine in engines.values():
            engine.dispose()
    print(
        f"counter state machine: {STATS.get('examples', 0)} examples, "
        f"{time.perf_counter() - t0:.0f}s; counts: {dict(sorted(STATS.items()))}"
    )
    check_minimums(STATS, MINIMUMS, examples=max_examples, per=100, given=GIVEN)


def test_counter_histories(redis_url: str, clean_redis: Any) -> None:
    """Random histories of counters in two sessions agree with the reference."""
    _run(redis_url, max_examples=examples_from_env(200),
         test_id="tests/reliability/test_counter_machine.py::test_counter_histories")


@pytest.mark.soak
def test_counter_histories_soak(redis_url: str, clean_redis: Any) -> None:
    _run(redis_url, max_examples=5_000,
         test_id="tests/reliability/test_counter_machine.py::test_counter_histories_soak")
