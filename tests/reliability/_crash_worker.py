"""Child processes of tests/reliability/test_faults.py: a fork server of killable flushes
and the writers of the server-restart test.

Run as `python -m tests.reliability._crash_worker zygote URL` or
`python -m tests.reliability._crash_worker writer URL WRITER SECONDS OUTFILE`.

zygote: imports redmap once, then for every JSON line read on stdin forks a child that
runs one 50-object unit of work (`run_trial`) and prints `pid <n>`; on a `reap` line it
waits for the child and prints `exit <code>` (`-9` when it was SIGKILLed). The child
prints `ready` just before `commit()`, `committed` after it. Some modes make the child
kill itself at a precise point of the flush (see `_arm`); otherwise the test kills it
from outside after a random delay.

writer: commits increments through `run_in_transaction` until the time is up and
appends one line per attempt to OUTFILE (`ack|unknown|failed|stale <receipt id> <time>`),
retrying connection errors itself, so a restarted server is reached again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import redis.connection

import redmap
from redmap import ForeignKey, Indexed, PrimaryKey, Session, Sorted, Unique, registry
from redmap.exc import OutcomeUnknownError, RedmapConnectionError, StaleDataError
from tests._async_driver import script_option

reg = registry(prefix="rfaults")

# The unit of work of one trial: this many existing objects updated, as many inserted.
UPDATES = 25
INSERTS = 25


@reg.mapped
@dataclass
class Box:
    label: str = ""
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Item:
    """Every index kind: equality (group, marker), unique (code), sorted (rank), FK (box)."""

    group: Annotated[str, Indexed()]
    marker: Annotated[str, Indexed()]
    code: Annotated[str, Unique()]
    rank: Annotated[int, Sorted()] = 0
    box_id: Annotated[Optional[int], ForeignKey("Box")] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Tally:
    id: Annotated[int, PrimaryKey()]
    value: int = 0


@reg.mapped
@dataclass
class Receipt:
    """One per committed increment of the restart test, named by writer and attempt."""

    id: Annotated[str, PrimaryKey()]
    writer: Annotated[int, Indexed()]
    seq: int = 0


# Tallies of the restart test: SHARED ones every writer increments, then one per writer.
SHARED = 4
OWN_BASE = 100


def _say(line: str) -> None:
    """One whole line to stdout in one write(2): the zygote and its child share the pipe,
    and writes this small are never interleaved."""
    os.write(1, line.encode() + b"\n")


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(engine: redmap.Engine, mode: str, rng: random.Random) -> None:
    """Make the child SIGKILL itself at a point of the flush chosen by `mode`.

    before_exec: as the MULTI...EXEC batch is about to be sent (nothing of it is sent).
    exec_sent: as soon as the send of the MULTI...EXEC batch returns, before any reply
      is read (the whole transaction has been handed to the kernel).
    exec_timer: from a timer thread 0-600 us after the batch starts being sent.
    """
    if mode not in ("before_exec", "exec_sent", "exec_timer"):
        return
    armed = threading.Event()

    def listener(commands: Sequence[tuple[Any, ...]]) -> None:
        # The transaction's batch: MULTI...EXEC, or a scripted flush's WATCH token,
        # MULTI, EVALSHA..., EXEC (issue 14).
        if not commands or commands[-1] != ("EXEC",) or ("MULTI",) not in commands[:3]:
            return
        if mode == "before_exec":
            _kill_self()
        elif mode == "exec_sent":
            armed.set()
        else:
            threading.Timer(rng.uniform(0.0, 0.0006), _kill_self).start()

    engine.add_listener(listener)
    if mode == "exec_sent":
        original = redis.connection.AbstractConnection.send_packed_command

        def send_then_die(self: Any, command: Any, check_health: bool = True) -> None:
            original(self, command, check_health)
            if armed.is_set():
                _kill_self()

        redis.connection.AbstractConnection.send_packed_command = send_then_die  # type: ignore[method-assign]


def run_trial(url: str, spec: dict[str, Any]) -> None:
    """One unit of work: UPDATES existing Items and INSERTS new ones, all tagged spec["tag"]."""
    rng = random.Random(spec["seed"])
    tag = spec["tag"]
    # Named connections: the test waits until the server has dropped them all, since
    # bytes a killed process had already sent are still run by the server afterwards.
    # The sync driver always (its sends are what `_arm` patches); the commit strategy
    # of the test (`driver` fixture's "script").
    engine = redmap.create_engine(url, client_name=f"crash-{tag}", **script_option())
    _arm(engine, spec["mode"], rng)
    boxes = spec["boxes"]
    with Session(engine) as s:
        items = s.get_many(Item, spec["update"])
        for item in items:
            assert item is not None
            item.marker = tag
            item.group = f"g{rng.randrange(5)}"
            item.code = f"c{item.id}-{tag}"
            item.rank = rng.randrange(1000)
            item.box_id = rng.choice(boxes)
        for i in range(INSERTS):
            s.add(
                Item(
                    group=f"g{rng.randrange(5)}",
                    marker=tag,
                    code=f"n{tag}-{i}",
                    rank=rng.randrange(1000),
                    box_id=rng.choice(boxes),
                )
            )
        _say("ready")
        s.commit()
    _say("committed")
    time.sleep(0.002)  # room for a pending timer to fire after the commit returned
    engine.dispose()


def zygote(url: str) -> None:
    """Fork a child per JSON line; reap it only when told (`reap`), so that until then
    its pid stays reserved (a zombie at worst) and the test can signal it safely."""
    for line in sys.stdin:
        if line.strip() != "reap":
            spec = json.loads(line)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    run_trial(url, spec)
                except BaseException:
                    traceback.print_exc()
                    _say("failed")
                    code = 3
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            _say(f"pid {pid}")
        else:
            _, status = os.waitpid(pid, 0)
            _say(f"exit {os.waitstatus_to_exitcode(status)}")


def writer(url: str, w: int, seconds: float, out_path: str) -> None:
    """Commit `shared tally += 1, own tally += 1, new Receipt` until the time is up."""
    engine = redmap.create_engine(
        url, socket_timeout=5.0, socket_connect_timeout=2.0, **script_option()
    )
    deadline = time.monotonic() + seconds
    seq = 0
    with open(out_path, "a", encoding="utf-8") as out:

        def record(kind: str, pk: str) -> None:
            out.write(f"{kind} {pk} {time.time():.6f}\n")
            out.flush()

        while time.monotonic() < deadline:
            seq += 1
            pk = f"w{w}-{seq}"
            shared = 1 + seq % SHARED

            def work(s: Session, pk: str = pk, shared: int = shared, seq: int = seq) -> None:
                # Read everything first: a get() after a change would autoflush it, and an
                # autoflush is a transaction of its own (docs/session.md#autoflush).
                for t in s.get_many(Tally, [shared, OWN_BASE + w]):
                    assert t is not None
                    t.value += 1
                s.add(Receipt(id=pk, writer=w, seq=seq))

            try:
                redmap.run_in_transaction(work, lambda: Session(engine))
            except OutcomeUnknownError:
                record("unknown", pk)
            except RedmapConnectionError:
                record("failed", pk)  # nothing was written: try again shortly
                time.sleep(0.02)
            except StaleDataError:
                record("stale", pk)
            else:
                record("ack", pk)
    engine.dispose()


def main(argv: list[str]) -> None:
    if argv[0] == "zygote":
        zygote(argv[1])
    elif argv[0] == "writer":
        writer(argv[1], int(argv[2]), float(argv[3]), argv[4])
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
