"""Tests for interrupted, locked and concurrent migrations (`batch`, `versioning`) via the CLI."""

from __future__ import annotations

import functools
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import redmap
from redmap.exc import StaleDataError

from .conftest import Project

N = 20_000
LOCK_KEY = "{app}:#meta:migrate:lock"

MODELS = """\
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from redmap import Indexed, PrimaryKey, Sorted, registry

reg = registry(prefix="app")


@reg.mapped
@dataclass
class Item:
    {name}: Annotated[str, Indexed()]
    n: {n_type} = 0
    label: str = ""
    flag: Optional[bool] = None
    id: Annotated[Optional[int], PrimaryKey()] = None
"""


def item_models(name: str = "name", sorted_n: bool = False) -> str:
    return MODELS.format(name=name, n_type="Annotated[int, Sorted()]" if sorted_n else "int")


def seed(project: Project, n: int) -> None:
    """n items: name itemI, n = I (ids 1..n)."""
    module = project.models()
    with redmap.Session(project.engine) as s:
        s.add_all(module.Item(name=f"item{i}", n=i, label=f"l{i}") for i in range(n))
        s.commit()


def column(project: Project, field: str, n: int) -> list[bytes | None]:
    """HGET field of items 1..n, in id order."""
    pipe = project.client.pipeline(transaction=False)
    for i in range(1, n + 1):
        pipe.hget(f"{{app}}:item:{i}", field)
    return pipe.execute()


def kill_when(proc: subprocess.Popen[str], label: str, lines: list[str]) -> None:
    """Read the migrator's progress lines; SIGKILL it once `label` is between 10% and 90%.

    A migrator that reaches no kill point within 60 s is killed too, but as a failure:
    a hang must not pass for the kill the test asked for.
    """
    assert proc.stdout is not None
    hung = threading.Event()

    def on_hang() -> None:
        hung.set()
        proc.kill()

    watchdog = threading.Timer(60, on_hang)
    watchdog.start()
    killed = False
    try:
        for line in proc.stdout:
            lines.append(line)
            match = re.match(re.escape(label) + r": \d+/\d+ \((\d+)%\)", line)
            if match and 10 <= int(match.group(1)) <= 90:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
    finally:
        watchdog.cancel()
        rest, err = proc.communicate()  # also closes the pipes
    output = "".join(lines) + rest + err
    assert not hung.is_set(), f"the migrator hung: no kill point within 60 s\n{output}"
    assert killed, f"{label!r} never reached 10-90%\n{output}"
    assert proc.returncode == -signal.SIGKILL, output


def wait_for_lock_expiry(project: Project) -> None:
    deadline = time.monotonic() + 10
    while project.client.exists(LOCK_KEY):
        assert time.monotonic() < deadline, "the dead migrator's lock never expired"
        time.sleep(0.05)


class TestInterruption:
    def test_killed_twice_then_rerun_finishes_exactly(self, project: Project) -> None:
        """SIGKILL during rename_field, then during transform; the rerun leaves exact data."""
        project.write_models(item_models())
        seed(project, N)
        project.write_models(item_models("title", sorted_n=True))
        project.write_revision(
            "r1",
            None,
            """
            op.rename_field("Item", "name", "title")
            op.transform("Item", bump)
            op.create_index("Item", "n", kind="sorted")
            """,
            header="""\
            def bump(fields):
                fields["n"] = str(int(fields["n"]) + 1)


            """,
        )
        slow = {
            "REDMAP_MIGRATE_BATCH_SIZE": "50",
            "REDMAP_MIGRATE_LOCK_TTL": "1",
            "REDMAP_PROGRESS_EVERY": "0",  # a progress line per batch, read to time the kill
        }
        lines: list[str] = []

        kill_when(
            project.spawn("upgrade", "head", env=slow), "rename_field Item.name -> title", lines
        )
        titles = column(project, "title", N)
        assert 0 < sum(t is not None for t in titles) < N  # killed half-way
        assert project.heads() == []
        wait_for_lock_expiry(project)

        kill_when(project.spawn("upgrade", "head", env=slow), "transform Item with bump", lines)
        assert all(t is not None for t in column(project, "title", N))
        bumped = [int(v) == i + 1 for i, v in enumerate(column(project, "n", N)) if v is not None]
        assert 0 < sum(bumped) < N  # some objects transformed, some not
        assert project.heads() == []
        wait_for_lock_expiry(project)

        project.ok("upgrade", "head")
        assert project.heads() == ["r1"]
        client = project.client
        assert client.zcard("{app}:item:#all") == N
        assert column(project, "title", N) == [f"item{i}".encode() for i in range(N)]
        assert column(project, "name", N) == [None] * N
        assert column(project, "n", N) == [str(i + 1).encode() for i in range(N)]  # exactly once
        scores = dict(client.zrange("{app}:item:#zs:n", 0, -1, withscores=True))
        assert scores == {str(i + 1).encode(): float(i + 1) for i in range(N)}
        assert not list(client.scan_iter(match="{app}:item:#ix:name:*", count=5000))
        assert sum(1 for _ in client.scan_iter(match="{app}:item:#ix:title:*", count=5000)) == N
        assert not list(client.scan_iter(match="{app}:#meta:migrate:done:*"))
        keys = sum(1 for _ in client.scan_iter(match="{app}:item:[0-9]*", count=5000))
        assert keys == N


class TestLock:
    def test_second_migrator_is_refused_naming_the_owner(self, project: Project) -> None:
        """While one upgrade runs, another exits 1 naming host:pid of the lock holder."""
        project.write_models(item_models())
        project.write_revision("r1", None, 'op.execute(lambda c: c.blpop("go", timeout=30))')
        first = project.spawn("upgrade", "head")
        try:
            deadline = time.monotonic() + 20
            while not project.client.exists(LOCK_KEY):
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            second = project.run("upgrade", "head")
            assert second.code == 1
            owner = f"{socket.gethostname()}:{first.pid}"
            assert f"Migrations are locked by {owner} since " in second.err
            assert "another `redmap migrate` is running" in second.err
            assert project.heads() == []
        finally:
            project.client.rpush("go", "1")
            out, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
        assert not project.client.exists(LOCK_KEY)  # released by its owner
        assert "Nothing to upgrade" in project.ok("upgrade", "head")


class TestConcurrentWriter:
    def test_writers_during_migration_lose_nothing(self, project: Project) -> None:
        """Sessions incrementing objects in a loop during a migration lose no update."""
        project.write_models(item_models())
        seed(project, N)
        project.write_models(item_models(sorted_n=True))  # the application's new code
        module = project.models()
        project.write_revision(
            "r1",
            None,
            """
            op.add_field("Item", "flag", default=True)
            op.transform("Item", shout)
            op.create_index("Item", "n", kind="sorted")
            """,
            header="""\
            def shout(fields):
                fields["label"] = fields["label"].upper()


            """,
        )
        writers = 4
        done: list[Counter[int]] = [Counter() for _ in range(writers)]
        attempts = [0] * writers
        gave_up = [0] * writers
        stop = threading.Event()
        factory = redmap.sessionmaker(project.engine)

        def increment(session: Any, *, pk: int, w: int) -> None:
            attempts[w] += 1
            item = session.get(module.Item, pk)
            time.sleep(0.002)  # hold the loaded version a little, as an application does
            item.n += 1

        def writer(w: int) -> None:
            # Disjoint ids per writer: every conflict a writer meets comes from the migration.
            rng = random.Random(w)
            mine = range(1 + w, 301, writers)
            while not stop.is_set():
                pk = rng.choice(mine)
                try:
                    redmap.run_in_transaction(
                        functools.partial(increment, pk=pk, w=w),
                        session_factory=factory,
                        retries=100,
                    )
                except StaleDataError:
                    gave_up[w] += 1  # not acknowledged, so not counted
                    continue
                done[w][pk] += 1

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
        for thread in threads:
            thread.start()
        try:
            migrator = project.spawn("upgrade", "head", env={"REDMAP_MIGRATE_BATCH_SIZE": "100"})
            out, err = migrator.communicate(timeout=60)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        assert migrator.returncode == 0, err
        acked = sum(done, Counter())
        assert acked.total() > 100, "the writers hardly ran during the migration"
        assert sum(attempts) > acked.total() + sum(gave_up), "no conflict: nothing was tested"
        n_values = column(project, "n", N)
        expected = [str(i + acked[i + 1]).encode() for i in range(N)]
        assert n_values == expected
        assert set(column(project, "flag", N)) == {b"1"}
        assert column(project, "label", N) == [f"L{i}".encode() for i in range(N)]
        scores = dict(project.client.zrange("{app}:item:#zs:n", 0, -1, withscores=True))
        assert scores == {str(i + 1).encode(): float(i + acked[i + 1]) for i in range(N)}
