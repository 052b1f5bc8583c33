"""Migration under fire: writers update objects while the migrator is killed and resumed."""

from __future__ import annotations

import functools
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import redmap
from redmap.audit import audit
from redmap.exc import StaleDataError
from tests.migrate.conftest import PYPROJECT, Project
from tests.migrate.test_resume import column, item_models, kill_when, seed, wait_for_lock_expiry


@pytest.fixture
def fire_project(tmp_path: Path, redis_client: redis.Redis, redis_url: str) -> Iterator[Project]:
    """An empty server and a migration project (as in tests/migrate)."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    proj = Project(tmp_path, redis_url, redis_client)
    try:
        yield proj
    finally:
        if proj._engine is not None:
            proj._engine.dispose()


def _under_fire(project: Project, n: int, writers: int, kills: int) -> None:
    project.write_models(item_models())
    seed(project, n)
    # The application already runs the new code: n is Sorted, flag is Optional.
    project.write_models(item_models(sorted_n=True))
    module = project.models()
    project.write_revision(
        "r1",
        None,
        """
        op.add_field("Item", "flag", default=True)
        op.transform("Item", bump)
        op.create_index("Item", "n", kind="sorted")
        """,
        header="""\
        def bump(fields):
            fields["n"] = str(int(fields["n"]) + 1000000)


        """,
    )
    hot = max(1, n // 10)  # the writers update 10% of the objects
    done: list[Counter[int]] = [Counter() for _ in range(writers)]
    gave_up = [0] * writers
    stop = threading.Event()
    factory = redmap.sessionmaker(project.engine)

    def increment(session: Any, *, pk: int) -> None:
        item = session.get(module.Item, pk)
        item.n += 1

    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            write(w)
        except BaseException as exc:  # a writer that dies must fail the test
            errors.append(exc)

    def write(w: int) -> None:
        rng = random.Random(w)
        mine = range(1 + w, hot + 1, writers)
        while not stop.is_set():
            pk = rng.choice(mine)
            try:
                redmap.run_in_transaction(
                    functools.partial(increment, pk=pk), session_factory=factory, retries=200
                )
            except StaleDataError:
                gave_up[w] += 1
                continue
            done[w][pk] += 1

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    for t in threads:
        t.start()
    slow = {
        "REDMAP_MIGRATE_BATCH_SIZE": "100",
        "REDMAP_MIGRATE_LOCK_TTL": "1",
        "REDMAP_PROGRESS_EVERY": "0",  # a progress line per batch, read to time the kill
    }
    started = time.monotonic()
    lines: list[str] = []
    labels = ["add_field Item.flag (default=True)", "transform Item with bump"]
    try:
        for k in range(kills):
            kill_when(project.spawn("upgrade", "head", env=slow), labels[k % 2], lines)
            wait_for_lock_expiry(project)
        project.ok("upgrade", "head", env=slow)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    elapsed = time.monotonic() - started
    assert not errors, errors[:1]
    acked = sum(done, Counter())
    names = column(project, "name", n)
    flags = column(project, "flag", n)
    values = column(project, "n", n)
    lost = sum(1 for i in range(n) if names[i] != f"item{i}".encode())
    wrong = [i for i in range(n) if values[i] != str(i + acked[i + 1] + 1000000).encode()]
    # The old layout: objects without the new field, or missing from the new index.
    old_layout = sum(1 for v in flags if v != b"1") + (n - project.client.zcard("{app}:item:#zs:n"))
    report = audit(project.client, module.reg)
    print(
        f"migration under fire: {n} objects, {writers} writers on {hot}, {kills} kills, "
        f"{acked.total()} acknowledged updates ({sum(gave_up)} gave up), lost={lost}, "
        f"wrong values={len(wrong)}, old-layout leftovers={old_layout}, "
        f"audit: {report.summary()}, {elapsed:.1f}s"
    )
    assert project.heads() == ["r1"]
    assert project.client.zcard("{app}:item:#all") == n
    assert lost == 0 and old_layout == 0
    assert wrong == [], f"first wrong ids: {wrong[:5]}"  # 0 duplicated transforms, 0 stale
    assert acked.total() > 0, "the writers never committed during the migration"
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


def test_migration_under_fire(fire_project: Project) -> None:
    """10,000 objects, 2 writers, the migrator killed twice: nothing lost or applied twice."""
    _under_fire(fire_project, n=10_000, writers=2, kills=2)


@pytest.mark.soak
def test_migration_under_fire_soak(fire_project: Project) -> None:
    """100,000 objects, 4 writers on 10% of them, the migrator killed 5 times."""
    _under_fire(fire_project, n=100_000, writers=4, kills=5)
