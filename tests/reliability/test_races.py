"""Races between writers: nothing is lost and nothing is half-written.

Each test prints one line of figures and fails on its threshold; each ends with an
audit (`redmap.audit`) finding 0 mismatches and 0 unexplained keys. The default run
uses small sizes; `-m soak` runs the full figures of docs/reliability.md.
Randomized tests print their seed; `REDMAP_SEED=<seed>` replays one.

Concurrent writers are separate processes (multiprocessing, "spawn"), each with its
own engine, released together by a Barrier and reporting figures through a Queue.
"""

from __future__ import annotations

import multiprocessing
import queue
import random
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from redmap import Session, run_in_transaction, sessionmaker
from redmap.audit import AuditReport
from redmap.engine import Engine
from redmap.exc import IntegrityError, StaleDataError
from redmap.orm.mapper import INCARNATION_FIELD, VERSION_FIELD
from redmap.testing.assertions import dump_keys
from tests._async_driver import make_engine
from tests.reliability._models import Badge, Player, Tally, Team

CTX = multiprocessing.get_context("spawn")
# Generous: a worker that waits this long is stuck, not slow.
BARRIER_TIMEOUT = 120.0
RESULT_TIMEOUT = 900.0
# run_in_transaction's bound on retries: high enough that 8 writers on one key never
# exhaust it, so a give-up (counted and reported) would mean starvation.
RETRIES = 1000

PLAYERS = "{rel}:player:"
BADGES = "{rel}:badge:"
BADGE_LINKS = BADGES + "#rel:players:"
PLAYER_LINKS = PLAYERS + "#rel:badges:"

AuditCheck = Callable[[], AuditReport]

# Every test here runs on the sync driver, then on the asyncio one (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("driver")


# --- helpers -------------------------------------------------------------------------


def _ms(seconds: Sequence[float], q: float) -> str:
    """The q-quantile of durations in seconds, in milliseconds (nearest rank)."""
    ordered = sorted(seconds)
    if not ordered:
        return "n/a"
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}ms"


def _start(target: Callable[..., None], args: list[tuple[Any, ...]]) -> list[Any]:
    procs = [CTX.Process(target=target, args=a, daemon=True) for a in args]
    for p in procs:
        p.start()
    return procs


def _collect(out: Any, n: int, procs: list[Any]) -> list[dict[str, Any]]:
    """n worker reports from `out`; fails with the worker's traceback if one failed."""
    results = []
    try:
        for _ in range(n):
            try:
                results.append(out.get(timeout=RESULT_TIMEOUT))
            except queue.Empty:
                pytest.fail(f"no report from a worker within {RESULT_TIMEOUT}s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "worker failed:\n" + "\n".join(errors)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    return results


def _reporting(work: Callable[..., dict[str, Any]], out: Any, *args: Any) -> None:
    """Run `work(*args)` and put its figures, or its traceback, on `out`."""
    try:
        out.put(work(*args))
    except BaseException:
        out.put({"error": traceback.format_exc()})


def _player_references(client: Any) -> dict[str, list[str]]:
    """Player id segment -> every key that names it, read directly from Redis.

    The object hash itself, `#all`, every `#ix`/`#zs`/`#fk` member, every `#uq` value,
    the player's own link zset and its membership in any badge's link zset.
    """
    refs: dict[str, list[str]] = defaultdict(list)
    for raw in client.scan_iter(match="{rel}:*", count=1000):
        key = raw.decode()
        if key == PLAYERS + "#seq":
            continue
        if key.startswith(PLAYER_LINKS):
            refs[key[len(PLAYER_LINKS) :]].append(key)
        elif key.startswith(BADGE_LINKS):
            for m in client.zrange(key, 0, -1):
                refs[m.decode()].append(key)
        elif key.startswith(PLAYERS + "#uq:"):
            refs[client.get(key).decode()].append(key)
        elif key.startswith(PLAYERS + "#"):
            kind = client.type(key)
            members = client.smembers(key) if kind == b"set" else client.zrange(key, 0, -1)
            for m in members:
                refs[m.decode()].append(key)
        elif key.startswith(PLAYERS):
            refs[key[len(PLAYERS) :]].append(key)
    return refs


def _seed_world(engine: Engine, rng: random.Random) -> dict[str, Any]:
    """Two teams, three badges, the contested player P and a bystander Q, all at v1.

    Q shares keys with P (the sorted index, often the name index, a team and badges),
    so removing P's references must leave Q's in place: the audit checks that.
    """
    with Session(engine, expire_on_commit=False) as s:
        teams = [Team(name="red"), Team(name="blue")]
        badges = [Badge(label=f"b{i}") for i in range(3)]
        p = Player(
            name=rng.choice(["ann", "bob"]),
            email="p@x",
            score=rng.randint(0, 50),
            bio=rng.choice([None, "hello"]),
            team=rng.choice([teams[0], teams[1], None]),
        )
        q = Player(name=rng.choice(["ann", "bob"]), email="q@x", score=10, team=teams[0])
        p.badges.extend(b for b in badges if rng.random() < 0.6)
        q.badges.extend(b for b in badges if rng.random() < 0.6)
        s.add_all([p, q, *teams, *badges])
        s.commit()
        return {
            "p": p.id,
            "q": q.id,
            "teams": [t.id for t in teams],
            "badges": [b.id for b in badges],
            "fields": {"name": p.name, "email": p.email, "score": p.score, "bio": p.bio},
            "team": p.team_id,
            "p_badges": {b.id for b in p.badges},
        }


# --- 2. lost updates -----------------------------------------------------------------


def _bump(url: str, tally_id: int, commits: int, start: Any) -> dict[str, Any]:
    """`commits` read-modify-write increments of one Tally through run_in_transaction."""
    engine = make_engine(url)
    counts = Counter[str]()

    def on_round_trip(commands: Sequence[tuple[Any, ...]]) -> None:
        if commands and commands[0][0] == "WATCH":
            counts["watch_round_trips"] += 1

    engine.add_listener(on_round_trip)

    class CountingSession(Session):
        def commit(self) -> None:
            try:
                super().commit()
            except StaleDataError:
                counts["conflicts"] += 1
                raise

    factory = sessionmaker(engine, class_=CountingSession)

    def bump(s: Session) -> None:
        counts["attempts"] += 1
        t = s.get(Tally, tally_id)
        assert t is not None
        t.value += 1

    latencies = []
    start.wait(BARRIER_TIMEOUT)
    started = time.perf_counter()
    for _ in range(commits):
        t0 = time.perf_counter()
        try:
            run_in_transaction(bump, factory, retries=RETRIES)
        except StaleDataError:
            counts["give_ups"] += 1
            continue
        latencies.append(time.perf_counter() - t0)
        counts["commits"] += 1
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {**counts, "latencies": latencies, "elapsed": elapsed}


def _tally_worker(url: str, tally_id: int, commits: int, start: Any, out: Any) -> None:
    _reporting(_bump, out, url, tally_id, commits, start)


def _race_tallies(
    engine: Engine, redis_url: str, procs: int, commits: int, *, disjoint: bool
) -> tuple[list[int], Counter[str], list[float], float]:
    """Run `procs` bumping processes on one Tally (or one each).

    Returns the final values, the summed counts, every commit's latency and the
    longest worker's time from the barrier to its last commit.
    """
    n_tallies = procs if disjoint else 1
    with Session(engine, expire_on_commit=False) as s:
        tallies = [Tally() for _ in range(n_tallies)]
        s.add_all(tallies)
        s.commit()
    ids = [t.id for t in tallies]
    start, out = CTX.Barrier(procs), CTX.Queue()
    workers = _start(
        _tally_worker,
        [(redis_url, ids[i % n_tallies], commits, start, out) for i in range(procs)],
    )
    results = _collect(out, procs, workers)
    wall = max(r.pop("elapsed") for r in results)
    latencies = [x for r in results for x in r.pop("latencies")]
    totals = Counter[str]()
    for r in results:
        totals.update(r)
    # Every attempt is one flush: its first WATCH round trip, plus one per EXEC that a
    # watched key aborted (the flush then re-runs its checks).
    totals["exec_rechecks"] = totals["watch_round_trips"] - totals["attempts"]
    totals["retries"] = totals["attempts"] - totals["commits"] - totals["give_ups"]
    with Session(engine) as s:
        finals = [t.value for t in s.get_many(Tally, ids) if t is not None]
    return finals, totals, latencies, wall


@pytest.mark.parametrize(
    ("procs", "commits"), [(4, 50), pytest.param(8, 500, marks=pytest.mark.soak, id="soak")]
)
def test_lost_updates_one_counter(
    engine: Engine, redis_url: str, assert_audit_clean: AuditCheck, procs: int, commits: int
) -> None:
    """N processes x M increments of one counter through run_in_transaction end at N*M."""
    finals, t, lat, wall = _race_tallies(engine, redis_url, procs, commits, disjoint=False)
    report = assert_audit_clean()
    print(
        f"\nlost-updates: {procs}x{commits} on 1 counter: final={finals[0]} "
        f"(expected {procs * commits}) commits={t['commits']} conflicts={t['conflicts']} "
        f"retries={t['retries']} exec_rechecks={t['exec_rechecks']} "
        f"give_ups={t['give_ups']} p50={_ms(lat, 0.5)} "
        f"p99={_ms(lat, 0.99)} wall={wall:.1f}s audit: {report.summary()}"
    )
    assert t["give_ups"] == 0
    assert t["commits"] == procs * commits
    assert finals == [procs * commits]
    assert t["conflicts"] == t["retries"]
    assert t["conflicts"] >= 1, "the writers never conflicted: no race was tested"


@pytest.mark.parametrize(
    ("procs", "commits"), [(4, 50), pytest.param(8, 500, marks=pytest.mark.soak, id="soak")]
)
def test_lost_updates_disjoint_objects_never_conflict(
    engine: Engine, redis_url: str, assert_audit_clean: AuditCheck, procs: int, commits: int
) -> None:
    """Writers of disjoint objects never conflict: WATCH covers only what a flush touches."""
    finals, t, lat, wall = _race_tallies(engine, redis_url, procs, commits, disjoint=True)
    report = assert_audit_clean()
    print(
        f"\nlost-updates-disjoint: {procs}x{commits} on {procs} objects: finals={set(finals)} "
        f"commits={t['commits']} conflicts={t['conflicts']} retries={t['retries']} "
        f"exec_rechecks={t['exec_rechecks']} commits/s={t['commits'] / wall:.0f} "
        f"p50={_ms(lat, 0.5)} p99={_ms(lat, 0.99)} "
        f"audit: {report.summary()}"
    )
    assert finals == [commits] * procs
    assert t["commits"] == procs * commits
    assert (t["conflicts"], t["retries"], t["exec_rechecks"], t["give_ups"]) == (0, 0, 0, 0)


# --- 3. stale writers ----------------------------------------------------------------

# Changes B's flush may carry besides the one that makes it stale (see _apply_b).
_B_EXTRAS = ("badge_add", "badge_remove", "badge_new", "bystander", "team_rename")
_P_COLUMNS = ("name", "email", "score", "bio", "team")


def _new_value(rng: random.Random, field: str, current: Any, tag: str) -> Any:
    """A value for `field` different from `current` (emails are unique to `tag`)."""
    if field == "email":
        return f"{tag}@x"
    values: dict[str, list[Any]] = {
        "name": ["ann", "bob", "cy", "dee"],
        "score": list(range(0, 120, 7)),
        "bio": [None, "hello", "a longer bio", ""],
    }
    choices = values[field]
    return rng.choice([c for c in choices if c != current])


def _set_team(rng: random.Random, s: Session, p: Player, team_ids: list[int]) -> str:
    """Move P to another team (or none) through either side of the relationship."""
    current = p.team
    targets: list[Team | None] = [s.get(Team, i) for i in team_ids]
    target = rng.choice([t for t in [*targets, None] if t is not current])
    if target is not None and rng.random() < 0.5:
        target.players.append(p)
        return "team_via_collection"
    if target is None and current is not None and rng.random() < 0.5:
        current.players.remove(p)
        return "team_via_collection"
    p.team = target
    return "team"


def _apply_b(
    rng: random.Random,
    s: Session,
    p: Player,
    q: Player,
    world: dict[str, Any],
    race: int,
    *,
    p_gone: bool,
    force: str | None = None,
) -> tuple[str, list[str]]:
    """B's randomized changes, as (mode, changes).

    Each mode includes a change that needs P as B loaded it: P's columns ("columns"),
    P's deletion ("delete") or, when A deleted P, new links to P ("links"; a link
    does not version its ends, but it needs both to exist). Other changes ride
    along (links, a bystander player, a team) and must not land either. `force` picks
    the mode instead of the rng.
    """
    done: list[str] = []
    extras = [e for e in _B_EXTRAS if rng.random() < 0.4]
    mode = rng.choice(["columns", "columns", "delete", *(["links"] if p_gone else [])])
    mode = force or mode
    if mode == "delete":
        s.delete(p)
        done.append("delete")
        extras = [e for e in extras if e in ("bystander", "team_rename")]
    elif mode == "links":
        links = ["badge_new"] + (["badge_add"] if len(p.badges) < len(world["badges"]) else [])
        extras = [
            *rng.sample(links, rng.randint(1, len(links))),
            *(e for e in extras if e in ("bystander", "team_rename")),
        ]
    else:
        for field in rng.sample(_P_COLUMNS, rng.randint(1, 3)):
            if field == "team":
                done.append(_set_team(rng, s, p, world["teams"]))
            else:
                setattr(p, field, _new_value(rng, field, getattr(p, field), f"b{race}"))
                done.append(field)
    badges = [b for b in s.get_many(Badge, world["badges"]) if b is not None]
    for extra in extras:
        if extra == "badge_add" and len(p.badges) < len(badges):
            p.badges.append(rng.choice([b for b in badges if b not in p.badges]))
        elif extra == "badge_remove" and p.badges:
            p.badges.remove(rng.choice(list(p.badges)))
        elif extra == "badge_new":
            s.add(Badge(label=f"new{race}", players=[p]))
        elif extra == "bystander":
            q.score += 1
        elif extra == "team_rename":
            team = s.get(Team, world["teams"][0])
            assert team is not None
            team.name = f"renamed{race}"
        else:
            continue
        done.append(extra)
    return mode, done


def _load_v1(s: Session, world: dict[str, Any]) -> tuple[Player, Player]:
    """Load P, Q and every relationship B may touch, so B's whole view is v1."""
    p, q = s.get(Player, world["p"]), s.get(Player, world["q"])
    assert p is not None and q is not None
    for team in s.get_many(Team, world["teams"]):
        assert team is not None
        _ = list(team.players)
    for badge in s.get_many(Badge, world["badges"]):
        assert badge is not None
        _ = list(badge.players)
    _ = p.team, list(p.badges), q.team, list(q.badges)
    return p, q


def _changed(before: dict[bytes, bytes | None], after: dict[bytes, bytes | None]) -> list[bytes]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.mark.parametrize("races", [100, pytest.param(1000, marks=pytest.mark.soak, id="soak")])
def test_stale_writer_gets_stale_data_error_and_writes_nothing(
    engine: Engine, redis_client: Any, assert_audit_clean: AuditCheck, seed: int, races: int
) -> None:
    """Both sessions load v1, A commits, B flushes random changes: B gets StaleDataError
    every time, and a DUMP of every key shows that B's flush changed 0 bytes."""
    rng = random.Random(seed)
    a_kinds: Counter[str] = Counter()
    b_modes: Counter[str] = Counter()
    b_ops: Counter[str] = Counter()
    stale, audits = 0, 0
    changed_keys, changed_bytes = 0, 0
    failures: list[str] = []
    for race in range(races):
        redis_client.flushall()
        world = _seed_world(engine, rng)
        with Session(engine) as a, Session(engine) as b:
            pa = a.get(Player, world["p"])
            assert pa is not None
            pb, qb = _load_v1(b, world)
            kind = ("columns", "team", "delete")[race % 3]  # each a third of the races
            a_kinds[kind] += 1
            if kind == "delete":
                a.delete(pa)
            elif kind == "team":
                _set_team(rng, a, pa, world["teams"])
            else:
                for field in rng.sample(["name", "email", "score", "bio"], rng.randint(1, 4)):
                    setattr(pa, field, _new_value(rng, field, getattr(pa, field), f"a{race}"))
            a.commit()
            version = redis_client.hget(PLAYERS + str(world["p"]), VERSION_FIELD)
            assert version == (None if kind == "delete" else b"2")
            before = dump_keys(redis_client)
            # Every other race after A's delete makes B add links to the gone P.
            force = "links" if race % 6 == 2 else None
            with b.no_autoflush:
                mode, ops = _apply_b(
                    rng, b, pb, qb, world, race, p_gone=kind == "delete", force=force
                )
            b_modes[mode] += 1
            b_ops.update(ops)
            try:
                b.flush()
                outcome = "flushed without error"
            except StaleDataError as exc:
                outcome = "stale" if any(o is pb for o in exc.objects) else f"stale: {exc}"
            diff = _changed(before, dump_keys(redis_client))
            # A refused flush keeps P's pending change, ready for rollback or retry.
            kept = {"delete": pb in b.deleted, "columns": b.is_modified(pb)}.get(mode, True)
            if not kept:
                outcome += ", pending changes lost"
        if outcome == "stale":
            stale += 1
        changed_keys += len(diff)
        changed_bytes += sum(len(before.get(k) or b"") for k in diff)
        if outcome != "stale" or diff:
            failures.append(f"race {race}: A {kind}, B {mode} {ops}: {outcome}, changed {diff}")
        assert_audit_clean()
        audits += 1
    print(
        f"\nstale-writers: {races} races (seed={seed}): StaleDataError {stale}/{races}, "
        f"keys changed by the loser {changed_keys}, bytes {changed_bytes}, "
        f"audits clean {audits}/{races}; A: {dict(sorted(a_kinds.items()))}; "
        f"B: {dict(sorted(b_modes.items()))}, ops {dict(sorted(b_ops.items()))}"
    )
    assert not failures, f"seed={seed}\n" + "\n".join(failures[:20])
    assert stale == races and changed_keys == 0
    # Every kind of A's change, every mode of B and every extra of B occurred.
    assert set(a_kinds) == {"columns", "team", "delete"}, a_kinds
    assert set(b_modes) == {"columns", "delete", "links"}, b_modes
    assert set(_B_EXTRAS) <= set(b_ops), b_ops


# --- 4. unique races -----------------------------------------------------------------


def _claim(
    url: str, worker: int, rounds: int, team_id: int, badge_id: int, barrier: Any
) -> dict[str, Any]:
    """Each round, insert a player whose email every other worker inserts too."""
    engine = make_engine(url)
    won: list[int] = []
    lost = 0
    for r in range(rounds):
        with Session(engine) as s:
            team, badge = s.get(Team, team_id), s.get(Badge, badge_id)
            assert badge is not None
            p = Player(name=f"w{worker}", email=f"round{r}@race", score=r, team=team)
            p.badges.append(badge)
            s.add(p)
            barrier.wait(BARRIER_TIMEOUT)
            try:
                s.commit()
                won.append(r)
            except IntegrityError as exc:
                assert exc.field == "email" and exc.value == f"round{r}@race", exc
                lost += 1
    engine.dispose()
    return {"won": won, "lost": lost}


def _claim_worker(
    url: str, worker: int, rounds: int, ids: tuple[int, int], barrier: Any, out: Any
) -> None:
    _reporting(_claim, out, url, worker, rounds, *ids, barrier)


@pytest.mark.parametrize(
    ("procs", "rounds"), [(4, 20), pytest.param(16, 100, marks=pytest.mark.soak, id="soak")]
)
def test_unique_race_has_one_winner_per_value(
    engine: Engine,
    redis_url: str,
    redis_client: Any,
    assert_audit_clean: AuditCheck,
    procs: int,
    rounds: int,
) -> None:
    """N processes insert the same unique email each round: exactly one wins, the others
    get IntegrityError, and no hash or index member is left behind by a loser."""
    with Session(engine, expire_on_commit=False) as s:
        team, badge = Team(name="t"), Badge(label="b")
        s.add_all([team, badge])
        s.commit()
    barrier, out = CTX.Barrier(procs), CTX.Queue()
    t0 = time.perf_counter()
    workers = _start(
        _claim_worker,
        [(redis_url, w, rounds, (team.id, badge.id), barrier, out) for w in range(procs)],
    )
    results = _collect(out, procs, workers)
    wall = time.perf_counter() - t0
    winners = Counter(r for res in results for r in res["won"])
    losers = sum(res["lost"] for res in results)

    refs = _player_references(redis_client)
    hashes = {seg for seg, ks in refs.items() if PLAYERS + seg in ks}
    orphan_members = sum(len(ks) for seg, ks in refs.items() if seg not in hashes)
    orphan_hashes = sum(
        1
        for seg in hashes
        if PLAYERS + "#all" not in refs[seg] or not any("#uq:email:" in k for k in refs[seg])
    )
    unique_keys = list(redis_client.scan_iter(match=PLAYERS + "#uq:email:*"))
    report = assert_audit_clean()
    print(
        f"\nunique-races: {procs}x{rounds}: winners={sum(winners.values())} "
        f"(expected {rounds}) IntegrityError={losers} (expected {(procs - 1) * rounds}) "
        f"unique keys={len(unique_keys)} hashes={len(hashes)} orphan hashes={orphan_hashes} "
        f"orphan index members={orphan_members} wall={wall:.1f}s audit: {report.summary()}"
    )
    assert sorted(winners) == list(range(rounds)) and set(winners.values()) == {1}
    assert losers == (procs - 1) * rounds
    assert len(unique_keys) == len(hashes) == rounds
    assert (orphan_hashes, orphan_members) == (0, 0)


# --- 5. delete vs update -------------------------------------------------------------


def _apply_update(s: Session, p: Player, spec: dict[str, Any]) -> None:
    for field, value in spec["fields"].items():
        setattr(p, field, value)
    if "team" in spec:
        p.team = None if spec["team"] is None else s.get(Team, spec["team"])
    for badge in s.get_many(Badge, spec["add"]):
        assert badge is not None
        p.badges.append(badge)
    for badge in s.get_many(Badge, spec["remove"]):
        assert badge is not None
        p.badges.remove(badge)
    if spec["new_badge"]:
        s.add(Badge(label=spec["new_badge"], players=[p]))


def _contend(url: str, role: str, tasks: Any, loaded: Any, out: Any) -> None:
    """Serve trials until told to stop: load P at v1, wait for the other side, then
    delete it (role "delete") or apply the trial's update, and flush."""
    engine = make_engine(url)
    while True:
        task = tasks.get(timeout=RESULT_TIMEOUT)
        if task is None:
            break
        trial, pid, spec = task
        try:
            with Session(engine) as s:
                p = s.get(Player, pid)
                assert p is not None
                # The update changes links it read before the race; the delete reads
                # them itself at flush when they were not loaded.
                if role == "update" or spec["preload"]:
                    _ = p.team, list(p.badges)
                loaded.wait(BARRIER_TIMEOUT)
                with s.no_autoflush:
                    if role == "delete":
                        s.delete(p)
                    else:
                        _apply_update(s, p, spec)
                try:
                    s.flush()
                    outcome = "ok"
                except StaleDataError:
                    outcome = "stale"
            out.put({"trial": trial, "role": role, "outcome": outcome})
        except BaseException:
            out.put({"trial": trial, "role": role, "error": traceback.format_exc()})
            loaded.abort()
    engine.dispose()


def _update_spec(rng: random.Random, world: dict[str, Any], trial: int) -> dict[str, Any]:
    """A random update of P that always changes at least one column (a stale update)."""
    fields = world["fields"]
    names = rng.sample(["name", "email", "score", "bio"], rng.randint(1, 4))
    spec: dict[str, Any] = {
        "fields": {n: _new_value(rng, n, fields[n], f"u{trial}") for n in names},
        "preload": rng.random() < 0.5,  # whether the deleter loads P's links before the race
        "add": [],
        "remove": [],
        "new_badge": f"new{trial}" if rng.random() < 0.3 else None,
    }
    if rng.random() < 0.5:
        spec["team"] = rng.choice([t for t in [*world["teams"], None] if t != world["team"]])
    if rng.random() < 0.5:
        spec["add"] = [b for b in world["badges"] if b not in world["p_badges"]][:1]
    if rng.random() < 0.5:
        spec["remove"] = sorted(world["p_badges"])[:1]
    return spec


def _outcome_in_redis(
    engine: Engine, client: Any, world: dict[str, Any], spec: dict[str, Any]
) -> str:
    """What Redis holds of P after a trial, read directly.

    "absent": no hash and no key naming P, and no badge the update would have made.
    "complete": the hash holds exactly the update's values and fields at version 2, and
    P's links are exactly the update's (that every index entry and link agrees with the
    hash is the audit's part). Anything else is described as "partial: ...".
    """
    pid = str(world["p"])
    refs = _player_references(client).get(pid, [])
    badge_hashes = [
        k for k in client.scan_iter(match=BADGES + "*") if not k.startswith(BADGES.encode() + b"#")
    ]
    made_badges = len(badge_hashes) - len(world["badges"])
    if not client.exists(PLAYERS + pid):
        if refs or made_badges:
            return f"partial: P deleted, still referenced by {refs}, {made_badges} new badge(s)"
        return "absent"
    want = {**world["fields"], **spec["fields"]}
    want_team = spec.get("team", world["team"])
    want_badges = (world["p_badges"] | set(spec["add"])) - set(spec["remove"])
    want_hash_fields = {"name", "email", "score", VERSION_FIELD, INCARNATION_FIELD}
    want_hash_fields |= {"bio"} if want["bio"] is not None else set()
    want_hash_fields |= {"team_id"} if want_team is not None else set()
    with Session(engine) as s:
        p = s.get(Player, world["p"])
        assert p is not None
        have = {n: getattr(p, n) for n in want}
        have_team = p.team_id
        have_badges = {b.id for b in p.badges if b.label != spec["new_badge"]}
        made = sum(1 for b in p.badges if b.label == spec["new_badge"])
    problems = []
    version = client.hget(PLAYERS + pid, VERSION_FIELD)
    if version != b"2":
        problems.append(f"version {version!r}")
    hash_fields = {f.decode() for f in client.hkeys(PLAYERS + pid)}
    if hash_fields != want_hash_fields:
        problems.append(f"hash fields {sorted(hash_fields)} != {sorted(want_hash_fields)}")
    if (have, have_team, have_badges) != (want, want_team, want_badges):
        problems.append(f"values {have, have_team, have_badges} != {want, want_team, want_badges}")
    if made != made_badges or made != (1 if spec["new_badge"] else 0):
        problems.append(f"new badge {spec['new_badge']!r}: {made_badges} made, {made} linked")
    return "complete" if not problems else "partial: " + "; ".join(problems)


@pytest.mark.parametrize("trials", [100, pytest.param(1000, marks=pytest.mark.soak, id="soak")])
def test_delete_vs_stale_update_leaves_no_partial_object(
    engine: Engine,
    redis_url: str,
    redis_client: Any,
    assert_audit_clean: AuditCheck,
    seed: int,
    trials: int,
) -> None:
    """A delete and an update of the same v1 object flush at once: one wins, and the object
    is either absent with no reference left or complete at version 2 (rom#73)."""
    rng = random.Random(seed)
    loaded, out = CTX.Barrier(2), CTX.Queue()
    deleter, updater = CTX.Queue(), CTX.Queue()
    workers = _start(
        _contend,
        [(redis_url, "delete", deleter, loaded, out), (redis_url, "update", updater, loaded, out)],
    )
    outcomes: Counter[str] = Counter()
    winners: Counter[str] = Counter()
    failures: list[str] = []
    try:
        for trial in range(trials):
            redis_client.flushall()
            world = _seed_world(engine, rng)
            spec = _update_spec(rng, world, trial)
            for q in (deleter, updater):
                q.put((trial, world["p"], spec))
            got = {}
            for _ in range(2):
                try:
                    r = out.get(timeout=RESULT_TIMEOUT)
                except queue.Empty:
                    pytest.fail(f"trial {trial}: no report within {RESULT_TIMEOUT}s")
                assert "error" not in r, r.get("error")
                assert r["trial"] == trial
                got[r["role"]] = r["outcome"]
            won = sorted(role for role, o in got.items() if o == "ok")
            winners[",".join(won) or "none"] += 1
            state = _outcome_in_redis(engine, redis_client, world, spec)
            outcomes[state.split(":")[0]] += 1
            expected = {"delete": "absent", "update": "complete"}.get(",".join(won))
            if state != expected:
                failures.append(f"trial {trial}: {got}, spec {spec}: {state}")
            assert_audit_clean()
    finally:
        for q in (deleter, updater):
            q.put(None)
        for p in workers:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    print(
        f"\ndelete-vs-update: {trials} trials (seed={seed}): delete won {winners['delete']}, "
        f"update won {winners['update']}, other {trials - winners['delete'] - winners['update']}; "
        f"absent {outcomes['absent']}, complete at v2 {outcomes['complete']}, "
        f"partial {outcomes['partial']}; audits clean {trials}/{trials}"
    )
    assert not failures, f"seed={seed}\n" + "\n".join(failures[:20])
    assert outcomes["partial"] == 0
    assert winners["delete"] + winners["update"] == trials
    # Both outcomes occurred: the delete won (absent) and the update won (complete).
    assert winners["delete"] >= 1 and winners["update"] >= 1, winners
    assert outcomes["absent"] >= 1 and outcomes["complete"] >= 1, outcomes
