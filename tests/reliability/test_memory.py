"""Memory: a long-lived Session that loads and discards objects does not grow.

SQLAlchemy's `test/aaa_profiling/test_memusage.py` analogue. One Session loads
objects in batches (by primary key, by query, and through a many-to-one
relationship), reads and changes their attributes, and is emptied with `expunge_all()`
after every batch and `close()` every ten batches. After a warm-up the resident set
size of the test process is sampled at the same point of every cycle; it must stay
within 5% of the post-warm-up figure.

RSS is read from /proc/self/statm (psutil is not a dependency of redmap). Objects are
distinct (one primary key each), so a leak keyed by identity would show too.

Default: 100,000 objects loaded; `-m soak`: 1,000,000.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated

import pytest
import redis

from redmap import ForeignKey, PrimaryKey, Session, registry, relationship, select
from redmap.audit import audit
from redmap.engine import Engine

reg = registry(prefix="mem")

BATCH = 1_000
INSERT_BATCH = 5_000
GROUPS = 50
# Loads before the baseline is taken: allocator pools, redis-py buffers and caches
# reach their steady size during these.
WARM_UP = 20_000
MAX_GROWTH = 0.05


@reg.mapped
@dataclass
class Group:
    name: str
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Row:
    name: str
    note: str | None = None
    tags: list[str] = field(default_factory=list)
    group_id: Annotated[int | None, ForeignKey("Group")] = None
    group: Group | None = relationship()
    id: Annotated[int | None, PrimaryKey()] = None


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _populate(engine: Engine, n: int) -> None:
    with Session(engine) as s:
        s.add_all(Group(name=f"g{i}") for i in range(GROUPS))
        s.commit()
    for start in range(0, n, INSERT_BATCH):
        with Session(engine) as s:
            s.add_all(
                Row(
                    name=f"row {i}",
                    note=None if i % 3 else "x" * (i % 200),
                    tags=[f"t{i % 7}", f"t{i % 11}"],
                    group_id=1 + i % GROUPS,
                )
                for i in range(start, min(n, start + INSERT_BATCH))
            )
            s.commit()


def _load_and_discard(engine: Engine, client: redis.Redis, n: int) -> None:
    if not sys.platform.startswith("linux"):
        pytest.fail("RSS is read from /proc/self/statm: Linux only")
    t0 = time.perf_counter()
    _populate(engine, n)
    populated = time.perf_counter() - t0

    session = Session(engine)
    loaded = 0
    batches = 0
    baseline: int | None = None
    samples: list[int] = []
    t1 = time.perf_counter()
    for start in range(1, n + 1, BATCH):
        pks = list(range(start, min(n, start + BATCH - 1) + 1))
        kind = batches % 3
        if kind == 0:
            rows = [r for r in session.get_many(Row, pks) if r is not None]
        elif kind == 1:
            stmt = select(Row).order_by(Row.id).offset(start - 1).limit(len(pks))
            rows = session.scalars(stmt).all()
        else:
            rows = [r for r in session.get_many(Row, pks) if r is not None]
            session.expire_all()  # everything reloads on access, one object at a time
            rows = rows[:50]
        # Reference data first: every many-to-one below is then an identity-map hit.
        groups = session.scalars(select(Group)).all()
        assert len(groups) == GROUPS
        for r in rows:
            assert r.name.startswith("row ")
            if r.group is not None:  # many-to-one: the group comes from the identity map
                _ = r.group.name
        for r in rows:
            # An in-place change the session must track (made after the loads above,
            # which would otherwise autoflush it) ...
            r.tags.append("seen")
        assert session.dirty  # ... and that is discarded with the objects
        loaded += len(pks)
        batches += 1
        session.expunge_all()
        del rows, groups
        if batches % 10 == 0:
            session.close()
            gc.collect()
            if baseline is None and loaded >= WARM_UP:
                baseline = rss_bytes()
            elif baseline is not None:
                samples.append(rss_bytes())
    session.close()
    gc.collect()
    samples.append(rss_bytes())
    elapsed = time.perf_counter() - t1
    assert baseline is not None
    peak = max(samples)
    growth = (peak - baseline) / baseline
    report = audit(client, reg)
    mb = 1024 * 1024
    print(
        f"\nmemory: {loaded} objects loaded and discarded through one Session in {batches} "
        f"batches of {BATCH} (expunge_all each, close every 10), {loaded / elapsed:,.0f} "
        f"objects/s; RSS after {WARM_UP} warm-up loads {baseline / mb:.1f} MB, peak of "
        f"{len(samples)} later samples {peak / mb:.1f} MB, final {samples[-1] / mb:.1f} MB: "
        f"growth {growth:+.2%} (limit {MAX_GROWTH:.0%}); populated in {populated:.1f}s; "
        f"audit: {report.summary()}"
    )
    assert loaded == n
    assert growth < MAX_GROWTH
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


def test_session_memory_is_flat(engine: Engine, redis_client: redis.Redis) -> None:
    """100,000 objects loaded and discarded: RSS grows by less than 5% after warm-up."""
    _load_and_discard(engine, redis_client, 100_000)


@pytest.mark.soak
def test_session_memory_is_flat_soak(engine: Engine, redis_client: redis.Redis) -> None:
    """1,000,000 objects loaded and discarded: RSS grows by less than 5% after warm-up."""
    _load_and_discard(engine, redis_client, 1_000_000)
