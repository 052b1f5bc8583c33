"""Issue 15: a state machine of expiring and soft-deleted objects under a clock it moves.

Each example draws its configuration (`Config`, as tests/reliability/test_config_machine.py
does): the primary key kind of the models (generated or explicit int, str, generated or
explicit UUID), `Unique()` on `Lease.code` or a plain equality index, sharded by the
object's own key (4 shards) or not (`Unique()` is refused on a sharded model, so never
both), restorable deletes (`__soft_delete__`) or final ones, the sync or asyncio driver,
a WATCH or scripted flush, and a relationship shape:

- none;
- "group": a plain `Group` whose `leases` are the expiring, soft-deletable children;
- "notes-...": an expiring `Lease` whose `notes` the sweep (and a final delete) detaches
  (foreign key None), with notes that are final ("notes-detached") or restorable
  themselves ("notes-detached-restorable"), or deletes (``cascade="all, delete"``), with
  an optional ("notes-deleted") or a required foreign key ("notes-deleted-required-fk").
  A required foreign key without a delete cascade stops the sweep with a RedmapError
  (tests/test_expiry_children.py), so it is never drawn.

Then random steps: inserts with random lifetimes (or none, or the `__ttl__` default),
moving and cancelling expiries, deletes, restores, clock moves, sweeps, a concurrent
writer taking over a unique value, notes added, deleted and restored, leases moved
between groups; and the paths of things going wrong: a flush refused (a unique value or
an explicit key taken; an object changed, expired or deleted since it was loaded) leaves
Redis as it was, and the same session fixes the cause and commits; a detached copy is
`merge()`d after its object expired, was deleted, changed or was purged meanwhile
(StaleDataError, nothing merged) or not (applied); a soft-deleted lease read with
`include_deleted=True` is changed or deleted again (InvalidRequestError, nothing written),
then restored and changed.

A reference model computes what every read must answer; the invariants compare `get`,
`count`, paged and ordered queries, equality queries, string queries and relationship
lists (never a gone child, never a gone parent) with it after every step, and `redmap
audit` must be clean after every sweep. No test sleeps: time is the machine's clock
(`redmap.orm.expiry.use_clock`).

Budgets (tests/reliability/_budget.py): the run is seeded (`REDMAP_SEED` replays it; the
seed and the command are printed), every rule and outcome is counted, and the run fails
unless each configuration value and each interesting branch ran its minimum
(`MINIMUMS`). Default: 200 examples of 30 steps (about 40 s here); `-m soak`: 5,000.

Children of leases gone for good (issue 15): the sweep and a final delete detach every
note of the lease, soft-deleted ones included (restored later, they come back with no
lease), or, with a delete cascade, purge them, soft-deleted ones and the notes of a
soft-delete model included (the machine draws a delete cascade on soft-delete leases,
whose notes are then soft-delete too). No path is put off.
`REDMAP_PP_CONFIG=shape=notes-detached-restorable,soft=0` restricts a run to matching
configurations.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
import uuid
from dataclasses import dataclass, field, make_dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Optional
from unittest import mock

import hypothesis.strategies as st
import pytest
import redis
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from redmap import (
    ExpiresAt,
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Text,
    Unique,
    create_engine,
    registry,
    relationship,
    select,
)
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import IntegrityError, InvalidRequestError, NoResultFound, StaleDataError
from redmap.orm import expiry
from redmap.orm.textindex import words
from tests.reliability._budget import Stats, check_minimums, examples_from_env, run_seeded
from tests.reliability.test_config_machine import POOLS, ReplayableUUIDs

TTL = 20  # seconds
GRACE = 20  # seconds: `__soft_delete__` of leases and of restorable notes

T0 = 1_900_000_000.0
CODES = [f"c{i}" for i in range(8)]
KINDS = ["a", "b"]
LABELS = ["x", "y"]
# Titles sharing prefixes and words, with characters the ordered index escapes.
TITLES = ["red fox", "red\x00fox", "Red", "redder", "blue fox", "Straße fox", "#new1", ""]

STATS = Stats()

# -- configuration -----------------------------------------------------------------------

PK_KINDS = ("gen_int", "int", "str", "gen_uuid", "uuid")
PK_TYPES: dict[str, Any] = {"gen_int": int, "int": int, "str": str, "gen_uuid": uuid.UUID,
                            "uuid": uuid.UUID}
PLACEHOLDER: dict[Any, Any] = {int: 0, str: "", uuid.UUID: uuid.UUID(int=0)}

# name: (relationship, cascade of the one-to-many, required foreign key, restorable notes)
SHAPES: dict[str, tuple[str, str, bool, bool]] = {
    "none": ("none", "save-update", False, False),
    "group": ("group", "save-update", False, False),
    "notes-detached": ("notes", "save-update", False, False),
    "notes-detached-restorable": ("notes", "save-update", False, True),
    "notes-deleted": ("notes", "all, delete", False, False),
    "notes-deleted-required-fk": ("notes", "all, delete", True, False),
}


@dataclass(frozen=True)
class Config:
    """What one example runs on."""

    pk: str
    unique: bool
    sharded: bool
    soft: bool  # Lease has `__soft_delete__`
    shape: str
    driver: str = "sync"
    flush: str = "watch"

    @property
    def rel(self) -> str:
        return SHAPES[self.shape][0]

    @property
    def cascade(self) -> str:
        return SHAPES[self.shape][1]

    @property
    def required(self) -> bool:
        return SHAPES[self.shape][2]

    @property
    def soft_notes(self) -> bool:
        """Notes have `__soft_delete__`: drawn, or required by a soft-deleting parent's
        delete cascade (configure refuses it otherwise)."""
        return SHAPES[self.shape][3] or (self.soft and "delete" in self.cascade)

    @property
    def explicit(self) -> bool:
        return self.pk in POOLS


def _valid(cfg: Config) -> Config:
    """`Unique()` is refused on a sharded model."""
    unique = cfg.unique and not cfg.sharded
    return dataclasses.replace(cfg, unique=unique)


def config_of(n: int) -> Config:
    """The configuration numbered `n`: every field drawn evenly from a generator seeded
    by `n`. Drawn field by field, hypothesis gave some values (a shape, a key kind) to
    none of 100 examples in some seeds; one drawn number per example spreads them (a
    replay draws the same number, so the same configuration)."""
    rng = random.Random(n)
    return _valid(
        Config(
            pk=rng.choice(PK_KINDS),
            unique=rng.random() < 0.5,
            sharded=rng.random() < 0.5,
            soft=rng.random() < 0.5,
            shape=rng.choice(list(SHAPES)),
            driver=rng.choice(["sync", "async"]),
            flush=rng.choice(["watch", "script"]),
        )
    )


def wanted(cfg: Config) -> bool:
    """`REDMAP_PP_CONFIG=shape=notes-detached-restorable,soft=0` restricts a run to the
    matching configurations (to chase one defect); unset, every configuration is drawn."""
    for term in filter(None, os.environ.get("REDMAP_PP_CONFIG", "").split(",")):
        key, _, value = term.partition("=")
        have = getattr(cfg, key)
        if (str(int(have)) if isinstance(have, bool) else str(have)) != value:
            return False
    return True


CONFIGS = st.integers(0, 2**32 - 1).map(config_of).filter(wanted)


@dataclass
class Models:
    reg: registry
    Lease: Any
    Group: Any = None
    Note: Any = None


_MODELS: dict[tuple[Any, ...], Models] = {}


def models_for(cfg: Config) -> Models:
    """The models of a configuration, in a registry of their own (built once per run)."""
    key = (cfg.pk, cfg.unique, cfg.sharded, cfg.soft, cfg.shape)
    if key in _MODELS:
        return _MODELS[key]
    prefix = "xm-" + "-".join(
        [cfg.pk, "u" if cfg.unique else "i", "s" if cfg.sharded else "t",
         "soft" if cfg.soft else "hard", cfg.shape]
    )
    reg = registry(prefix=prefix, shards=4)
    pk_type = PK_TYPES[cfg.pk]
    shard: dict[str, Any] = {"__shard_key__": "id"} if cfg.sharded else {}
    lease_ns: dict[str, Any] = {"__ttl__": timedelta(seconds=TTL), **shard}
    if cfg.soft:
        lease_ns["__soft_delete__"] = timedelta(seconds=GRACE)
    code: Any = Annotated[str, Unique()] if cfg.unique else Annotated[str, Indexed()]
    fields: list[Any] = [
        ("code", code),
        ("kind", Annotated[str, Indexed()], field(default="a")),
        ("rank", Annotated[int, Sorted()], field(default=0)),
        # String indexes (issue 16) kept through expiry, soft delete, restore and sweep.
        ("title", Annotated[str, Sorted(), Text()], field(default="")),
        ("expires", Annotated[Optional[datetime], ExpiresAt()], field(default=None)),
    ]
    if cfg.rel == "group":
        fields += [
            ("group_id", Annotated[Optional[pk_type], ForeignKey("Group")], field(default=None)),
            ("group", Optional["Group"], relationship(back_populates="leases")),  # noqa: F821
        ]
    if cfg.rel == "notes":
        fields.append(
            ("notes", list["Note"],  # type: ignore[name-defined]  # noqa: F821
             relationship(back_populates="lease", cascade=cfg.cascade))
        )
    fields.append(("id", Annotated[Optional[pk_type], PrimaryKey()], field(default=None)))
    lease = make_dataclass("Lease", fields, namespace=lease_ns)
    reg.mapped(lease)
    out = Models(reg, lease)
    if cfg.rel == "group":
        out.Group = make_dataclass(
            "Group",
            [
                ("name", str, field(default="")),
                ("leases", list["Lease"],  # type: ignore[name-defined]  # noqa: F821
                 relationship(back_populates="group")),
                ("id", Annotated[Optional[pk_type], PrimaryKey()], field(default=None)),
            ],
            namespace=dict(shard),
        )
        reg.mapped(out.Group)
    if cfg.rel == "notes":
        note_ns = dict(shard)
        if cfg.soft_notes:
            note_ns["__soft_delete__"] = timedelta(seconds=GRACE)
        fk: Any = Annotated[pk_type if cfg.required else Optional[pk_type], ForeignKey("Lease")]
        lease_id: Any = ("lease_id", fk) if cfg.required else ("lease_id", fk, field(default=None))
        out.Note = make_dataclass(
            "Note",
            [
                lease_id,
                ("label", Annotated[str, Indexed()], field(default="x")),
                ("lease", Optional["Lease"], relationship(back_populates="notes")),  # noqa: F821
                ("id", Annotated[Optional[int], PrimaryKey()], field(default=None)),
            ],
            namespace=note_ns,
        )
        reg.mapped(out.Note)
    reg.configure()
    _MODELS[key] = out
    return out


UUIDS = ReplayableUUIDs(7)
SHARD_CHOICE = random.Random(0)
"""Generated UUIDs and the shard a new object of a model sharded by its own generated key
joins, the same in every replay of an example (reset at its start)."""

# The least each branch must run per 100 examples (`check_minimums` scales them to the
# run: twice these in the default 200). Low on purpose: hypothesis's swarm testing
# switches rules off per example and reuses an example's first draws (so about 40
# distinct configurations run in 200 examples), and the counts vary a lot between seeds;
# these only catch a machine that stopped reaching its branches. Each is well under the
# lowest count seen on eight seeds (21 to 28, 218 to 233 examples each; in brackets) and
# checked on twelve more (31 to 36, 41 to 45, one unseeded).
MINIMUMS = {
    "insert applied": 100,  # (672)
    "insert refused: taken": 8,  # (53)
    "expired by the clock": 40,  # (260)
    "restores applied (any rule)": 4,  # (restore applied 0 to 97, + 19 or more)
    # (3 to 125; since each restored lease is restored twice, 29 and 116 on the seeds
    # that gave 3 and 45; a run whose restore rule never applied had 7)
    "restore refused": 1,
    "gone objects swept": 15,  # (92)
    "moved expiry": 20,  # (150)
    "cancelled expiry": 25,  # (172)
    # Relationship outcomes.
    "child detached (delete or sweep)": 5,  # (43)
    "child deleted (delete or sweep)": 8,  # (74)
    "sweep of a lease with children": 6,  # (52)
    "parent with notes gone, then swept": 4,  # (27)
    "note of a gone lease read": 40,  # (403)
    # A soft-deleted note still restorable when its lease goes for good (issue 15):
    # 0 to 19 per run (0 in seeds 457063391 and 1244706945): counted, no minimum. Each
    # way in is covered deterministically in tests/test_expiry_children.py and, on the
    # cluster, tests/test_expiry_cluster.py.
    "restorable child of a lease gone for good": 0,
    # "note added through the list" (4 to 67): counted, no minimum.
    # "regrouped" (1 to 9; its rule drew twice in a whole CI-sized run, seed 2534365979):
    # counted, no minimum (a move between parents is what the relationship and
    # configuration machines' reparent rules draw hundreds of times per run).
    # When things go wrong.
    "failed flush: IntegrityError": 6,  # (49)
    "retry after IntegrityError: applied": 6,  # (49)
    "failed flush: StaleDataError (changed meanwhile)": 15,  # (111)
    "failed flush: StaleDataError (deleted meanwhile)": 1,  # (10)
    "failed flush: StaleDataError (expired meanwhile)": 4,  # (27)
    "retry after StaleDataError: applied": 15,  # (130)
    "merge refused: the object is gone or deleted": 3,  # (29)
    # Every configuration value at least once per 100 examples (lowest seen: 6 of 219
    # examples, shape=notes-detached-restorable, seed 35; the others 11 or more).
    **{f"config pk={k}": 1 for k in PK_KINDS},
    **{f"config shape={k}": 1 for k in SHAPES},
    **{f"config {k}": 1 for k in ("unique", "no unique", "sharded", "unsharded",
                                   "soft delete", "final delete")},
    **{f"config driver={k}": 1 for k in ("sync", "async")},
    **{f"config flush={k}": 1 for k in ("watch", "script")},
}

# Branches only one configuration reaches: (the count of examples drawn with it, the
# least per 100 of them). Only a unique model has holders to take over from: 108 and 120
# per 100 unique examples on seeds 11 and 12 (`REDMAP_PP_CONFIG=unique=1`); seed
# 2928955858 drew unique for 16 of 234 examples and took over once (a whole-run minimum
# of 3 per 100 failed it).
GIVEN = {
    "insert took over an expired holder": ("config unique", 5),
    # Only a soft-delete model has soft-deleted leases to write to: writes refused 128,
    # 39 and 147 per 100 soft-delete examples on seeds 11 to 13; restored and changed
    # 59, 16 and 78.
    "soft-deleted lease: write refused": ("config soft delete", 8),
    "soft-deleted lease: restored then changed": ("config soft delete", 3),
}


@dataclasses.dataclass
class Ref:
    code: str
    kind: str
    rank: int
    title: str
    deadline: float | None  # seconds (clock), None: never
    deleted_at: float | None = None  # soft-deleted at (clock)
    group: Any = None  # the group's key ("group" shape)
    writes: int = 0  # committed writes since the insert: a copy taken before is stale


@dataclasses.dataclass
class NoteRef:
    lease: Any  # the lease's key, None: detached
    label: str
    deleted_at: float | None = None  # soft-deleted at (restorable notes)


class ExpiryMachine(RuleBasedStateMachine):
    engines: dict[str, Engine]
    client: redis.Redis

    def __init__(self) -> None:
        super().__init__()
        STATS.bump("examples")
        self.client.flushall()
        UUIDS.reset()
        SHARD_CHOICE.seed(0)
        self.now = T0
        self.ref: dict[Any, Ref] = {}
        self.notes: dict[Any, NoteRef] = {}
        self.groups: list[Any] = []
        # Detached copies: (copy, the Ref it was loaded as, its `writes` then).
        self.copies: list[tuple[Any, Ref, int]] = []
        self.engine: Engine = self.engines["sync"]
        self.cfg = Config("gen_int", True, False, True, "none")
        self.m = models_for(self.cfg)

    # -- the reference ----------------------------------------------------------------

    def clock(self) -> float:
        return self.now

    def gone(self, r: Ref) -> bool:
        if r.deadline is not None and r.deadline <= self.now:
            return True
        return r.deleted_at is not None and r.deleted_at + GRACE <= self.now

    def live(self) -> dict[Any, Ref]:
        return {pk: r for pk, r in self.ref.items() if not self.gone(r) and r.deleted_at is None}

    def holder(self, code: str) -> Any:
        """Who holds `code`: a live or soft-deleted (restorable) object."""
        for pk, r in self.ref.items():
            if r.code == code and not self.gone(r):
                return pk
        return None

    def restorable(self) -> list[Any]:
        """The soft-deleted leases whose grace period (and expiry) has not ended."""
        return [pk for pk, r in self.ref.items() if r.deleted_at is not None
                and not self.gone(r)]

    def note_gone(self, n: NoteRef) -> bool:
        return n.deleted_at is not None and n.deleted_at + GRACE <= self.now

    def visible_notes(self) -> dict[Any, NoteRef]:
        return {pk: n for pk, n in self.notes.items() if n.deleted_at is None}

    @property
    def now_ms(self) -> float:
        """Now as redmap takes it for the moments it stamps (the `__ttl__` default, a soft
        delete's `#d`): cut to whole milliseconds (`expiry.now_ms`), in seconds. Exact
        `now` there made the reference disagree with Redis for up to 1 ms (seed
        938180636: a `__ttl__` deadline read as 28.388 where Redis held 28.387)."""
        return int(self.now * 1000) / 1000

    def at(self, seconds: float) -> datetime:
        # Whole milliseconds: what the deadline zset stores.
        return datetime.fromtimestamp(round(self.now + seconds, 3), timezone.utc)

    def session(self, **kw: Any) -> Session:
        return Session(self.engine, **kw)

    def snapshot(self) -> dict[bytes, frozenset[Any]]:
        """Every key's content (as a set of items) but flush tokens."""
        out: dict[bytes, frozenset[Any]] = {}
        for k in sorted(k for k in self.client.keys("*") if b"#flush:" not in k):
            kind = self.client.type(k)
            if kind == b"zset":
                out[k] = frozenset(self.client.zrange(k, 0, -1, withscores=True))
            elif kind == b"set":
                out[k] = frozenset(self.client.smembers(k))
            elif kind == b"hash":
                out[k] = frozenset(self.client.hgetall(k).items())
            else:
                out[k] = frozenset([self.client.get(k)])
        return out

    def assert_nothing_written(self, before: dict[bytes, frozenset[Any]], what: str) -> None:
        """Redis as `before`, except that a flush refused by its checks inside a script
        (a scripted flush; on the classic one, a unique claim that a gone holder may
        free, decided by the script) still runs the bounded sweep it carries
        (`sweep.piggyback`, queued after the script in the same MULTI): gone objects
        purged, which no API sees. Such changes only remove."""
        after = self.snapshot()
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if not changed:
            return
        grown = [k for k in changed if not after.get(k, frozenset()) <= before.get(k, frozenset())]
        assert not grown, f"{what} changed Redis: {grown} (of {changed})"
        STATS.bump(f"refused flush ({self.cfg.flush}): gone objects purged on the side")

    # -- rules ------------------------------------------------------------------------

    @initialize(cfg=CONFIGS)
    def configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.m = models_for(cfg)
        self.engine = self.engines[cfg.driver]
        self.engine.flush_script_threshold = 0 if cfg.flush == "script" else None
        STATS.bump(f"config pk={cfg.pk}")
        STATS.bump(f"config {'unique' if cfg.unique else 'no unique'}")
        STATS.bump(f"config {'sharded' if cfg.sharded else 'unsharded'}")
        STATS.bump(f"config {'soft delete' if cfg.soft else 'final delete'}")
        STATS.bump(f"config shape={cfg.shape}")
        STATS.bump(f"config driver={cfg.driver}")
        STATS.bump(f"config flush={cfg.flush}")
        if cfg.rel == "group":
            with expiry.use_clock(self.clock), self.session() as s:
                for i in range(2):
                    g = self.m.Group(name=f"g{i}")
                    if cfg.explicit:
                        g.id = POOLS[cfg.pk][i]
                    s.add(g)
                    s.commit()
                    self.groups.append(g.id)

    def _pick_pk(self, data: st.DataObject) -> Any:
        """None (generated), or a pool key: a free one, or now and then a taken one."""
        if not self.cfg.explicit:
            return None
        pool = POOLS[self.cfg.pk]
        free = [k for k in pool if k not in self.ref]
        if free and data.draw(st.integers(0, 3), label="taken key") > 0:
            return data.draw(st.sampled_from(free), label="pk")
        return data.draw(st.sampled_from(pool), label="pk")

    @rule(
        code=st.sampled_from(CODES),
        kind=st.sampled_from(KINDS),
        rank=st.integers(0, 20),
        life=st.one_of(st.none(), st.just(-1.0), st.floats(0.5, 30)),
        title=st.sampled_from(TITLES),
        data=st.data(),
    )
    @STATS.rule
    def insert(
        self, code: str, kind: str, rank: int, life: float | None, title: str,
        data: st.DataObject,
    ) -> None:
        """life None: the __ttl__ default; -1: no expiry at all (set after the insert)."""
        self._insert(data, code, kind, rank, life, title)

    def _insert(
        self, data: st.DataObject, code: str, kind: str, rank: int, life: float | None,
        title: str = "",
    ) -> None:
        pk = self._pick_pk(data)
        group = None
        if self.cfg.rel == "group":
            group = data.draw(st.sampled_from([None, *self.groups]), label="group")
        labels: list[str] = []
        if self.cfg.rel == "notes":
            labels = data.draw(st.lists(st.sampled_from(LABELS), max_size=2), label="notes")
        taken = self.cfg.unique and self.holder(code) is not None
        old = self.ref.get(pk) if pk is not None else None
        # A gone object not swept yet still holds its key, unless a flush purged it on
        # the side (models without children): either outcome.
        maybe = old is not None and self.gone(old) and self.cfg.rel != "notes" and not taken
        refused = taken or (old is not None and not maybe)
        with expiry.use_clock(self.clock), self.session() as s:
            expires = None if life is None or life < 0 else self.at(life)
            obj = self.m.Lease(code=code, kind=kind, rank=rank, title=title, expires=expires)
            if pk is not None:
                obj.id = pk
            if group is not None:
                obj.group = s.get(self.m.Group, group)
                assert obj.group is not None
            notes = [self._new_note(label) for label in labels]
            if labels:
                obj.notes = notes
            s.add(obj)
            if refused or maybe:
                try:
                    s.commit()
                except IntegrityError:
                    STATS.bump("insert refused: taken")
                    if maybe:
                        STATS.bump("insert refused: the key of a gone object not swept")
                    return
                assert not refused, f"{code}/{pk!r} is held, yet the insert applied"
                STATS.bump("insert took the key of a gone object purged on the side")
                del self.ref[pk]
            else:
                s.commit()
            assert obj.id is not None
            if life is not None and life < 0:
                obj.expires = None
                s.commit()
            note_ids = [n.id for n in notes]
        if self.cfg.unique and any(r.code == code for r in self.ref.values()):
            STATS.bump("insert took over an expired holder")
        STATS.bump("insert applied")
        deadline = (
            None
            if life is not None and life < 0
            else (self.now_ms + TTL if life is None else round(self.now + life, 3))
        )
        self.ref[obj.id] = Ref(code, kind, rank, title, deadline, group=group)
        for nid, label in zip(note_ids, labels, strict=True):
            self.notes[nid] = NoteRef(obj.id, label)
        self._tick()

    def _live_pk(self, data: st.DataObject) -> Any:
        """A live lease's key; when there is none, one is inserted first (None if that
        insert was refused): rules that need an object do not idle on an empty model."""
        if not self.live():
            free = [c for c in CODES if self.holder(c) is None]
            code = data.draw(st.sampled_from(free or CODES), label="code")
            life = data.draw(st.one_of(st.none(), st.just(-1.0), st.floats(0.5, 30)),
                             label="life")
            self._insert(data, code, "a", data.draw(st.integers(0, 20), label="rank"), life,
                         data.draw(st.sampled_from(TITLES), label="title"))
        live = self.live()
        if not live:
            return None
        return data.draw(st.sampled_from(sorted(live)), label="live lease")

    def _new_note(self, label: str, lease: Any = None) -> Any:
        """A new note; a required foreign key gets a placeholder the relationship replaces."""
        if self.cfg.required and lease is None:
            lease = PLACEHOLDER[PK_TYPES[self.cfg.pk]]
        return self.m.Note(lease_id=lease, label=label)

    @rule(data=st.data())
    @STATS.rule
    def reclaim(self, data: st.DataObject) -> None:
        """Claim the unique value of a gone (unswept) object: taken over. When there is
        none, a lease is inserted with a short life and the clock moved past it first."""
        free = sorted(
            {r.code for r in self.ref.values() if self.gone(r)}
            - {r.code for r in self.ref.values() if not self.gone(r)}
        )
        if not free and self.cfg.unique:
            unheld = [c for c in CODES if all(r.code != c for r in self.ref.values())]
            if unheld:
                self._insert(data, data.draw(st.sampled_from(unheld), label="code"), "a", 0, 0.5)
                self._advance(1.0)
                free = sorted(
                    {r.code for r in self.ref.values() if self.gone(r)}
                    - {r.code for r in self.ref.values() if not self.gone(r)}
                )
        if not free:
            return
        code = data.draw(st.sampled_from(free))
        self._insert(data, code, "a", 0, -1.0)

    @rule(data=st.data(), life=st.floats(0.5, 100))
    @STATS.rule
    def move_expiry(self, data: st.DataObject, life: float) -> None:
        self._set_expiry(data, life)

    @rule(data=st.data())
    @STATS.rule
    def cancel_expiry(self, data: st.DataObject) -> None:
        """A rule of its own (not a None drawn by `move_expiry`, which hypothesis drew too
        rarely for the branch minimum in some seeds)."""
        self._set_expiry(data, None)

    def _set_expiry(self, data: st.DataObject, life: float | None) -> None:
        pk = self._live_pk(data)
        if pk is None:
            return
        with expiry.use_clock(self.clock), self.session() as s:
            obj = s.get(self.m.Lease, pk)
            assert obj is not None
            obj.expires = None if life is None else self.at(life)
            s.commit()
        r = self.ref[pk]
        deadline = None if life is None else round(self.now + life, 3)
        r.writes += deadline != r.deadline  # cancelling no expiry writes nothing
        r.deadline = deadline
        STATS.bump("cancelled expiry" if life is None else "moved expiry")
        self._tick()

    @rule(data=st.data())
    @STATS.rule
    def delete(self, data: st.DataObject) -> None:
        self._delete(data)

    def _delete(self, data: st.DataObject) -> None:
        pk = self._live_pk(data)
        if pk is not None:
            self._delete_pk(pk)

    def _delete_pk(self, pk: Any) -> None:
        with expiry.use_clock(self.clock), self.session() as s:
            obj = s.get(self.m.Lease, pk)
            assert obj is not None
            s.delete(obj)
            s.commit()
        children = [n for n in self.notes.values() if n.lease == pk]
        if any(n.deleted_at is not None and not self.note_gone(n) for n in children):
            STATS.bump("restorable note of a deleted lease")
        if self.cfg.soft:
            self._soft_deleted(pk)
            STATS.bump("soft deleted")
        else:
            del self.ref[pk]
            self._children_of_gone(pk, sweep=False)
            STATS.bump("deleted for good")
            if children:
                STATS.bump(f"children of a deleted lease: {self.cfg.cascade}")
        self._tick()

    def _soft_deleted(self, pk: Any) -> None:
        r = self.ref[pk]
        r.deleted_at = self.now_ms
        r.writes += 1
        if "delete" in self.cfg.cascade:
            # Soft-deleted with it, the same `#d`.
            for n in self.notes.values():
                if n.lease == pk and n.deleted_at is None:
                    n.deleted_at = self.now_ms

    def _restored(self, pk: Any) -> None:
        r = self.ref[pk]
        for n in self.notes.values():
            if n.lease == pk and n.deleted_at is not None and n.deleted_at == r.deleted_at:
                n.deleted_at = None
                STATS.bump("child restored with its lease")
        r.deleted_at = None
        r.writes += 1

    def _children_of_gone(self, pk: Any, *, sweep: bool) -> None:
        """What a final delete or the sweep does to the notes of `pk`, soft-deleted ones
        included: detach them, or delete them for good with a delete cascade (a
        soft-delete note too: its lease goes for good)."""
        for nid, n in list(self.notes.items()):
            if n.lease != pk:
                continue
            if n.deleted_at is not None and not self.note_gone(n):
                STATS.bump("restorable child of a lease gone for good")
            if "delete" not in self.cfg.cascade:
                n.lease = None
                STATS.bump("child detached by the sweep" if sweep else "child detached")
                STATS.bump("child detached (delete or sweep)")
            else:
                del self.notes[nid]
                STATS.bump("child deleted by the sweep" if sweep else "child deleted")
                STATS.bump("child deleted (delete or sweep)")

    @rule(data=st.data())
    @STATS.rule
    def restore(self, data: st.DataObject) -> None:
        """Restore a soft-deleted lease (one deleted first, now and then) or try another."""
        if not self.cfg.soft:
            if not self.ref:
                return
            pk = data.draw(st.sampled_from(sorted(self.ref)))
            with expiry.use_clock(self.clock), self.session() as s:
                with pytest.raises(InvalidRequestError, match="no __soft_delete__"):
                    s.restore(self.m.Lease, pk)
            STATS.bump("restore refused: no soft delete")
            return
        restorable = self.restorable()
        if not restorable and data.draw(st.booleans(), label="delete one first"):
            self._delete(data)
        if not self.ref:
            return
        deleted = sorted(pk for pk, r in self.ref.items() if r.deleted_at is not None)
        pool = deleted if deleted and data.draw(st.booleans()) else sorted(self.ref)
        pk = data.draw(st.sampled_from(pool))
        r = self.ref[pk]
        ok = r.deleted_at is not None and not self.gone(r)
        with expiry.use_clock(self.clock), self.session() as s:
            try:
                s.restore(self.m.Lease, pk)
            except NoResultFound:
                assert not ok, f"{pk} should have been restorable"
                STATS.bump("restore refused")
                return
        assert ok, f"{pk} was restored but is {r}"
        self._restored(pk)
        STATS.bump("restore applied")
        STATS.bump("restores applied (any rule)")
        with expiry.use_clock(self.clock), self.session() as s:
            with pytest.raises(NoResultFound):
                s.restore(self.m.Lease, pk)  # twice: there is nothing to restore now
        STATS.bump("restore refused")

    @precondition(lambda self: self.cfg.soft)
    @rule(data=st.data(), rank=st.integers(0, 20))
    @STATS.rule
    def write_soft_deleted(self, data: st.DataObject, rank: int) -> None:
        """A soft-deleted lease read with include_deleted=True: a change to it (rank,
        expiry) or a second delete is refused and writes nothing (a change once put it
        back in the indexes while reads hid it); the session drops the change, restores
        it and changes it then."""
        restorable = self.restorable()
        if not restorable:
            self._delete(data)
            restorable = self.restorable()
            if not restorable:
                return
        pk = data.draw(st.sampled_from(sorted(restorable)), label="soft-deleted lease")
        r = self.ref[pk]
        if rank == r.rank:
            rank += 1  # a change to write
        action = data.draw(st.sampled_from(["rank", "expiry", "delete"]), label="write")
        before = self.snapshot()
        with expiry.use_clock(self.clock), self.session() as s:
            obj = s.get(self.m.Lease, pk, include_deleted=True)
            assert obj is not None, f"{pk} is restorable, yet include_deleted read nothing"
            assert s.get(self.m.Lease, pk) is None
            if action == "delete":
                with pytest.raises(InvalidRequestError, match="already soft-deleted"):
                    s.delete(obj)
            else:
                if action == "rank":
                    obj.rank = rank
                else:
                    # Another moment than it has: ten 1.5 s ticks after a `__ttl__`
                    # insert, now + 5 s is its deadline (seed 357383108).
                    moment = self.at(5)
                    obj.expires = self.at(6) if obj.expires == moment else moment
                with pytest.raises(InvalidRequestError, match="is soft-deleted"):
                    s.commit()
            after = self.snapshot()
            assert after == before, "a refused write to a soft-deleted lease changed Redis"
            STATS.bump(f"soft-deleted lease: {action} refused")
            STATS.bump("soft-deleted lease: write refused")
            if not data.draw(st.booleans(), label="restore and change"):
                return
            s.rollback()
            back = s.restore(self.m.Lease, pk)
            back.rank = rank
            s.commit()
        self._restored(pk)
        r.rank = rank
        r.writes += 1
        STATS.bump("soft-deleted lease: restored then changed")
        STATS.bump("restores applied (any rule)")
        self._tick()

    @rule(seconds=st.floats(0.1, 15))
    @STATS.rule
    def advance(self, seconds: float) -> None:
        self._advance(seconds)

    def _advance(self, seconds: float) -> None:
        before = {pk for pk, r in self.ref.items() if not self.gone(r)}
        self.now += seconds
        after = {pk for pk, r in self.ref.items() if not self.gone(r)}
        STATS.bump("expired by the clock", len(before - after))

    def _tick(self) -> None:
        """Time passes a little with every write (swarm testing may disable `advance`)."""
        self._advance(1.5)

    @rule()
    @STATS.rule
    def sweep(self) -> None:
        self._sweep()

    def _sweep(self) -> bool:
        """Sweep and check the reference's prediction and the audit (True: it ran)."""
        with expiry.use_clock(self.clock):
            purged = self.engine.sweep(self.m.reg)
        gone = [pk for pk, r in self.ref.items() if self.gone(r)]
        for pk in gone:
            if any(n.lease == pk for n in self.notes.values() if n.deleted_at is None):
                STATS.bump("sweep of a lease with children")
            self._children_of_gone(pk, sweep=True)
            del self.ref[pk]
        for nid in [nid for nid, n in self.notes.items() if self.note_gone(n)]:
            del self.notes[nid]
        STATS.bump("sweep purged", purged)
        STATS.bump("gone objects swept", len(gone))
        report = audit(self.client, self.m.reg)
        assert report.ok, report.mismatches + report.unexplained
        return True

    # -- relationships ------------------------------------------------------------------

    @precondition(lambda self: self.cfg.rel == "group")
    @rule(data=st.data())
    @STATS.rule
    def regroup(self, data: st.DataObject) -> None:
        """Move a live lease to another group (or none), by its key or its relationship."""
        pk = self._live_pk(data)
        if pk is None:
            return
        group = data.draw(st.sampled_from([None, *self.groups]), label="group")
        with expiry.use_clock(self.clock), self.session() as s:
            obj = s.get(self.m.Lease, pk)
            assert obj is not None
            if data.draw(st.booleans(), label="by the relationship"):
                obj.group = None if group is None else s.get(self.m.Group, group)
            else:
                obj.group_id = group
            s.commit()
        r = self.ref[pk]
        r.writes += r.group != group
        r.group = group
        STATS.bump("regrouped")
        self._tick()

    @precondition(lambda self: self.cfg.rel == "notes")
    @rule(data=st.data())
    @STATS.rule
    def parent_gone_then_sweep(self, data: st.DataObject) -> None:
        """A lease with notes expires (or its grace period ends); the notes read no
        parent, its list is gone with it; the sweep detaches or deletes them."""
        parents = sorted({n.lease for n in self.visible_notes().values()} & set(self.live()))
        if not parents:
            return
        pk = data.draw(st.sampled_from(parents), label="parent")
        if self.cfg.soft and data.draw(st.booleans(), label="soft-deleted"):
            with expiry.use_clock(self.clock), self.session() as s:
                obj = s.get(self.m.Lease, pk)
                assert obj is not None
                s.delete(obj)
                s.commit()
            self._soft_deleted(pk)
            STATS.bump("soft deleted")
            self._advance(GRACE + 0.5)
        else:
            with expiry.use_clock(self.clock), self.session() as s:
                obj = s.get(self.m.Lease, pk)
                assert obj is not None
                obj.expires = self.at(0.5)
                s.commit()
            r = self.ref[pk]
            r.deadline = round(self.now + 0.5, 3)
            r.writes += 1
            self._advance(1.0)
        self.reads_match_the_reference()
        if self._sweep():
            STATS.bump("parent with notes gone, then swept")

    @precondition(lambda self: self.cfg.rel == "notes")
    @rule(data=st.data(), label=st.sampled_from(LABELS))
    @STATS.rule
    def add_note(self, data: st.DataObject, label: str) -> None:
        """A note on a live lease (by its foreign key or the lease's list), or on none."""
        live = sorted(self.live())
        options = live if self.cfg.required else [None, *live]
        if not options:
            return
        pk = data.draw(st.sampled_from(options), label="lease")
        with expiry.use_clock(self.clock), self.session() as s:
            if pk is not None and data.draw(st.booleans(), label="through the list"):
                lease = s.get(self.m.Lease, pk)
                assert lease is not None
                note = self._new_note(label)
                lease.notes.append(note)
                STATS.bump("note added through the list")
            else:
                note = self._new_note(label, pk)
                s.add(note)
            s.commit()
            nid = note.id
        self.notes[nid] = NoteRef(pk, label)
        self._tick()

    @precondition(lambda self: self.cfg.rel == "notes")
    @rule(data=st.data())
    @STATS.rule
    def delete_note(self, data: st.DataObject) -> None:
        self._delete_note(data)

    def _delete_note(self, data: st.DataObject) -> None:
        visible = self.visible_notes()
        if not visible:
            return
        nid = data.draw(st.sampled_from(sorted(visible)))
        with expiry.use_clock(self.clock), self.session() as s:
            note = s.get(self.m.Note, nid)
            assert note is not None
            s.delete(note)
            s.commit()
        if self.cfg.soft_notes:
            self.notes[nid].deleted_at = self.now_ms
            STATS.bump("note soft-deleted")
        else:
            del self.notes[nid]
            STATS.bump("note deleted")
        self._tick()

    @precondition(lambda self: self.cfg.rel == "notes" and self.cfg.soft_notes)
    @rule(data=st.data())
    @STATS.rule
    def restore_note(self, data: st.DataObject) -> None:
        """Restore a soft-deleted note (one deleted first, now and then) or try another."""
        restorable = [nid for nid, n in self.notes.items()
                      if n.deleted_at is not None and not self.note_gone(n)]
        if not restorable and data.draw(st.booleans(), label="delete one first"):
            self._delete_note(data)
        if not self.notes:
            return
        nid = data.draw(st.sampled_from(sorted(self.notes)))
        n = self.notes[nid]
        ok = n.deleted_at is not None and not self.note_gone(n)
        with expiry.use_clock(self.clock), self.session() as s:
            try:
                s.restore(self.m.Note, nid)
            except NoResultFound:
                assert not ok, f"note {nid} should have been restorable"
                STATS.bump("note restore refused")
                return
        assert ok, f"note {nid} was restored but is {n}"
        n.deleted_at = None
        STATS.bump("note restored")
        if n.lease is not None and n.lease not in self.live():
            STATS.bump("note restored while its lease is gone or deleted")

    # -- when things go wrong ---------------------------------------------------------------

    @rule(data=st.data(), rank=st.integers(0, 20))
    @STATS.rule
    def retry_after_conflict(self, data: st.DataObject, rank: int) -> None:
        """An insert refused (a unique value or an explicit key taken) writes nothing and
        leaves the object pending; the same session fixes the cause and commits."""
        held_codes = sorted({r.code for r in self.ref.values() if not self.gone(r)})
        held_pks = sorted(pk for pk, r in self.ref.items() if not self.gone(r))
        causes = (["code"] if self.cfg.unique and held_codes else []) + (
            ["key"] if self.cfg.explicit and held_pks else [])
        if not causes:
            return
        cause = data.draw(st.sampled_from(causes), label="cause")
        free_codes = [c for c in CODES if all(r.code != c for r in self.ref.values())]
        free_pks = [k for k in POOLS.get(self.cfg.pk, ()) if k not in self.ref]
        if cause == "code":
            code = data.draw(st.sampled_from(held_codes), label="code")
            pk = data.draw(st.sampled_from(free_pks), label="pk") if free_pks else None
            if self.cfg.explicit and pk is None:
                return
        else:
            pk = data.draw(st.sampled_from(held_pks), label="pk")
            code = data.draw(st.sampled_from(free_codes or CODES), label="code")
            if self.cfg.unique and self.holder(code) is not None:
                return
        before = self.snapshot()
        with expiry.use_clock(self.clock), self.session() as s:
            obj = self.m.Lease(code=code, rank=rank, expires=self.at(TTL))
            if pk is not None:
                obj.id = pk
            s.add(obj)
            with pytest.raises(IntegrityError):
                s.commit()
            self.assert_nothing_written(before, "a refused insert")
            STATS.bump(f"failed flush: IntegrityError ({cause})")
            STATS.bump("failed flush: IntegrityError")
            if cause == "code":
                if not free_codes:
                    s.rollback()
                    return
                code = data.draw(st.sampled_from(free_codes), label="free code")
                obj.code = code
            else:
                if not free_pks:
                    s.rollback()
                    return
                obj.id = pk = data.draw(st.sampled_from(free_pks), label="free pk")
            s.commit()
            assert obj.id is not None and (pk is None or obj.id == pk)
            pk = obj.id
        STATS.bump(f"retry after IntegrityError ({cause}): applied")
        STATS.bump("retry after IntegrityError: applied")
        # `self.at(TTL)`: the moment rounded to the nearest ms, as Redis holds it. The
        # reference once took `now_ms + TTL` (cut, not rounded): one ms early, it called
        # the lease gone a moment before Redis did (seed 2238959830, `count` 4 == 3).
        self.ref[pk] = Ref(code, "a", rank, "", round(self.now + TTL, 3))
        self._tick()

    @rule(data=st.data(), rank=st.integers(0, 20))
    @STATS.rule
    def retry_after_stale(self, data: st.DataObject, rank: int) -> None:
        """A session loads a lease; meanwhile it changes, expires or is deleted; the
        session's update is refused (StaleDataError, nothing written), then it rolls back,
        reads again and, where the lease is still there or restorable, commits."""
        pk = self._live_pk(data)
        if pk is None:
            return
        r = self.ref[pk]
        events = ["changed"] + (["expired"] if r.deadline is not None else []) + (
            ["deleted"] if self.cfg.soft else [])
        event = data.draw(st.sampled_from(events), label="meanwhile")
        if rank == r.rank:
            rank += 1  # a change to write
        with expiry.use_clock(self.clock), self.session() as s:
            obj = s.get(self.m.Lease, pk)
            assert obj is not None
            if event == "changed":
                kind = "b" if r.kind == "a" else "a"
                with self.session() as other:
                    o = other.get(self.m.Lease, pk)
                    assert o is not None
                    o.kind = kind
                    other.commit()
                r.kind = kind
                r.writes += 1
            elif event == "expired":
                assert r.deadline is not None
                self._advance(r.deadline - self.now + 0.01)
            else:
                with self.session() as other:
                    o = other.get(self.m.Lease, pk)
                    assert o is not None
                    other.delete(o)
                    other.commit()
                self._soft_deleted(pk)
            obj.rank = rank
            before = self.snapshot()
            with pytest.raises(StaleDataError):
                s.commit()
            self.assert_nothing_written(before, "a stale commit")
            STATS.bump(f"failed flush: StaleDataError ({event} meanwhile)")
            s.rollback()
            if event == "deleted":
                assert s.get(self.m.Lease, pk) is None
                s.restore(self.m.Lease, pk)
                self._restored(pk)
                STATS.bump("restores applied (any rule)")
            obj = s.get(self.m.Lease, pk)
            if event == "expired":
                assert obj is None, f"{pk} expired, yet it reads {obj}"
                STATS.bump("retry after StaleDataError: gone")
                return
            assert obj is not None
            obj.rank = rank
            s.commit()
        r.rank = rank
        r.writes += 1
        STATS.bump(f"retry after StaleDataError ({event}): applied")
        STATS.bump("retry after StaleDataError: applied")
        self._tick()

    @rule(data=st.data())
    @STATS.rule
    def take_copy(self, data: st.DataObject) -> None:
        """A copy loaded by a session that is closed since (detached)."""
        self._take_copy(data)

    def _take_copy(self, data: st.DataObject) -> None:
        if len(self.copies) >= 3:
            return
        pk = self._live_pk(data)
        if pk is None:
            return
        with expiry.use_clock(self.clock), self.session(expire_on_commit=False) as s:
            obj = s.get(self.m.Lease, pk)
            assert obj is not None
        self.copies.append((obj, self.ref[pk], self.ref[pk].writes))

    @rule(data=st.data(), rank=st.integers(0, 20))
    @STATS.rule
    def merge_copy(self, data: st.DataObject, rank: int) -> None:
        """`merge()` of a detached copy changed meanwhile: StaleDataError (nothing merged)
        when the stored object expired, was deleted, purged, replaced or changed since the
        copy was loaded; applied otherwise."""
        if not self.copies:
            self._take_copy(data)  # one now: the rule does not idle without take_copy
            if not self.copies:
                return
        i = data.draw(st.integers(0, len(self.copies) - 1), label="copy")
        copy, was, writes = self.copies.pop(i)
        pk = copy.id
        if self.ref.get(pk) is was and pk in self.live():
            self._meanwhile(data, pk)
        now = self.ref.get(pk)
        if now is not was:
            why = "purged or replaced"
        elif self.gone(was):
            why = "gone" if was.deleted_at is None else "soft-deleted, grace over"
        elif was.deleted_at is not None:
            why = "soft-deleted"
        elif was.writes != writes:
            why = "changed"
        else:
            why = ""
        if rank == copy.rank:
            rank += 1  # a change to write
        copy.rank = rank
        with expiry.use_clock(self.clock), self.session() as s:
            try:
                merged = s.merge(copy)
            except StaleDataError:
                assert why, f"merge of an unchanged copy of {pk!r} refused"
                STATS.bump(f"merge refused: {why} meanwhile")
                if why != "changed":
                    STATS.bump("merge refused: the object is gone or deleted")
                assert not s.new and not s.dirty, "a refused merge left changes behind"
                return
            assert not why, f"merge of a copy of {pk!r} ({why} meanwhile) was not refused"
            assert merged.rank == rank
            s.commit()
        was.rank = rank
        was.writes += 1
        STATS.bump("merge applied")
        self._tick()

    def _meanwhile(self, data: st.DataObject, pk: Any) -> None:
        """What happens to a live lease while a copy of it is detached: nothing, a change,
        its expiry, its delete, or its expiry and the sweep."""
        event = data.draw(
            st.sampled_from(["nothing", "changed", "expired", "deleted", "purged"]),
            label="meanwhile",
        )
        STATS.bump(f"copy's lease meanwhile: {event}")
        r = self.ref[pk]
        if event == "changed":
            with expiry.use_clock(self.clock), self.session() as s:
                obj = s.get(self.m.Lease, pk)
                assert obj is not None
                obj.kind = "b" if r.kind == "a" else "a"
                s.commit()
            r.kind = "b" if r.kind == "a" else "a"
            r.writes += 1
        elif event in ("expired", "purged"):
            with expiry.use_clock(self.clock), self.session() as s:
                obj = s.get(self.m.Lease, pk)
                assert obj is not None
                obj.expires = self.at(0.5)
                s.commit()
            r.deadline = round(self.now + 0.5, 3)
            r.writes += 1
            self._advance(1.0)
            if event == "purged":
                self._sweep()
        elif event == "deleted":
            self._delete_pk(pk)

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def reads_match_the_reference(self) -> None:
        live = self.live()
        lease = self.m.Lease
        with expiry.use_clock(self.clock), self.session() as s:
            assert s.count(select(lease)) == len(live)
            for kind in KINDS:
                want = sorted(pk for pk, r in live.items() if r.kind == kind)
                got = sorted(o.id for o in s.scalars(select(lease).where(lease.kind == kind)))
                assert got == want, (kind, got, want)
            for code in CODES[:3]:
                want = sorted(pk for pk, r in live.items() if r.code == code)
                got = sorted(o.id for o in s.scalars(select(lease).where(lease.code == code)))
                assert got == want, (code, got, want)
            ranks = sorted((r.rank for r in live.values()), reverse=True)
            page = s.scalars(select(lease).order_by(lease.rank.desc()).offset(1).limit(3))
            got_ranks = [o.rank for o in page]
            assert got_ranks == ranks[1:4], (got_ranks, ranks)
            ranged = s.count(select(lease).where(lease.rank >= 10))
            assert ranged == sum(1 for r in live.values() if r.rank >= 10)
            red = sorted(pk for pk, r in live.items() if r.title.startswith("red"))
            got = s.scalars(select(lease).where(lease.title.startswith("red"))).all()
            assert sorted(o.id for o in got) == red
            assert s.count(select(lease).where(lease.title.startswith("red"))) == len(red)
            # The documented tokenizer (tests/test_string_search.py checks it): here what is
            # checked is that the word sets follow expiry, soft delete, restore and sweep.
            fox = sorted(pk for pk, r in live.items() if "fox" in words(r.title))
            got = s.scalars(select(lease).where(lease.title.match("FOX"))).all()
            assert sorted(o.id for o in got) == fox, (got, fox)
            titles = sorted(r.title.encode() for r in live.values())
            page = s.scalars(select(lease).order_by(lease.title).offset(1).limit(3))
            assert [o.title.encode() for o in page] == titles[1:4]
            for pk in sorted(self.ref)[:6]:
                obj = s.get(lease, pk)
                assert (obj is not None) == (pk in live), pk
                if obj is None:
                    continue
                if self.cfg.rel == "group":
                    got_group = obj.group.id if obj.group is not None else None
                    assert got_group == live[pk].group, (pk, got_group, live[pk].group)
                if self.cfg.rel == "notes":
                    got_notes = sorted(n.id for n in obj.notes)
                    want_notes = sorted(nid for nid, n in self.visible_notes().items()
                                        if n.lease == pk)
                    assert got_notes == want_notes, (pk, got_notes, want_notes)
            if self.cfg.rel == "group":
                for g in self.groups:
                    group = s.get(self.m.Group, g)
                    assert group is not None
                    got = sorted(o.id for o in group.leases)
                    want = sorted(pk for pk, r in live.items() if r.group == g)
                    assert got == want, ("group", g, got, want)
            if self.cfg.rel == "notes":
                self._check_notes(s, live)

    def _check_notes(self, s: Session, live: dict[Any, Ref]) -> None:
        """Every visible note with its stored foreign key; its `lease` reads the lease only
        while that one is live (a gone or soft-deleted parent reads None)."""
        visible = self.visible_notes()
        got = {n.id: n.lease_id for n in s.scalars(select(self.m.Note))}
        want = {nid: n.lease for nid, n in visible.items()}
        assert got == want, ("notes", got, want)
        for nid in sorted(visible)[:4]:
            note = s.get(self.m.Note, nid)
            assert note is not None
            parent = visible[nid].lease
            got_parent = note.lease.id if note.lease is not None else None
            assert got_parent == (parent if parent in live else None), (nid, got_parent, parent)
            if parent is not None and parent not in live:
                r = self.ref[parent]
                STATS.bump("note of a gone lease read" if self.gone(r)
                           else "note of a soft-deleted lease read")


STEPS = 30


def _run(redis_url: str, max_examples: int, test_id: str) -> None:
    from tests._async_driver import LoopEngine

    engines: dict[str, Engine] = {"sync": create_engine(redis_url), "async": LoopEngine(redis_url)}
    client = redis.Redis.from_url(redis_url)
    ExpiryMachine.engines = engines
    ExpiryMachine.client = client
    STATS.clear()
    t0 = time.perf_counter()
    try:
        with (
            mock.patch("uuid.uuid4", UUIDS),
            mock.patch("redmap.orm.unitofwork.random", SHARD_CHOICE),
        ):
            run_seeded(
                "expiry state machine",
                ExpiryMachine,
                max_examples=max_examples,
                steps=STEPS,
                test_id=test_id,
            )
    finally:
        client.close()
        for engine in engines.values():
            engine.dispose()
    print(
        f"expiry state machine: {STATS.get('examples', 0)} examples, "
        f"{time.perf_counter() - t0:.0f}s; counts: {dict(sorted(STATS.items()))}"
    )
    if not os.environ.get("REDMAP_PP_CONFIG"):
        check_minimums(STATS, MINIMUMS, examples=max_examples, per=100, given=GIVEN)


def test_expiry_histories(redis_url: str, clean_redis: Any) -> None:
    """Random histories of expiring and soft-deleted objects agree with the reference."""
    _run(
        redis_url,
        max_examples=examples_from_env(200),
        test_id="tests/reliability/test_expiry_machine.py::test_expiry_histories",
    )


@pytest.mark.soak
def test_expiry_histories_soak(redis_url: str, clean_redis: Any) -> None:
    _run(
        redis_url,
        max_examples=5_000,
        test_id="tests/reliability/test_expiry_machine.py::test_expiry_histories_soak",
    )
