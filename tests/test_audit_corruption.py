"""`redmap.audit` on a damaged keyspace: it reports, never crashes.

The keyspace is corrupted with raw redis-py commands, as another program or an
incident would: a key of the wrong Redis type in every role redmap gives keys (object
hash, id zset, equality index, unique claim, sorted index, foreign-key zset,
many-to-many zset, id counter), a counter that is not an integer, and object hashes
whose `#v` version is missing or not in the canonical form the writer uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import pytest

import redmap
from redmap import ForeignKey, Indexed, PrimaryKey, Session, Sorted, Unique, registry
from redmap import relationship as rel
from redmap.audit import AuditReport, audit
from redmap.orm.mapper import mapper_of
from redmap.testing.servers import ClusterProcesses

ROOT = Path(__file__).resolve().parent.parent
SHARDS = 4
areg = registry(prefix="ac", shards=SHARDS)


@areg.mapped
@dataclass
class Team:
    name: str
    people: list[Person] = rel(back_populates="team")
    id: Annotated[Optional[int], PrimaryKey()] = None


@areg.mapped
@dataclass
class Person:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    age: Annotated[int, Sorted()] = 0
    team_id: Annotated[Optional[int], ForeignKey("Team")] = None
    team: Optional[Team] = rel(back_populates="people")
    clubs: list[Club] = rel(secondary="person_clubs", back_populates="people")
    id: Annotated[Optional[int], PrimaryKey()] = None


@areg.mapped
@dataclass
class Club:
    title: str
    people: list[Person] = rel(secondary="person_clubs", back_populates="clubs")
    id: Annotated[Optional[int], PrimaryKey()] = None


@areg.mapped
@dataclass
class Visit:
    __shard_key__ = "room"
    room: int
    who: Annotated[str, Indexed()]
    id: Annotated[Optional[int], PrimaryKey()] = None


def _seed(engine: redmap.Engine) -> None:
    """Two people of one team in one club (ids 1 and 2), and visits in room 3."""
    with Session(engine) as s:
        team = Team(name="red")
        club = Club(title="chess")
        people = [Person(name="ann", email="ann@x", age=30), Person(name="bob", email="bob@x")]
        team.people.extend(people)
        club.people.extend(people)
        s.add_all([team, club])
        s.commit()
    with Session(engine) as s:
        s.add_all([Visit(room=3, who="ann"), Visit(room=3, who="bob")])
        s.commit()


def _visit_tag() -> str:
    return mapper_of(Visit).keys_for_shard(mapper_of(Visit).shard_of_value(3)).tag


def _as_string(client: Any, key: str) -> None:
    client.delete(key)
    client.set(key, "junk")


def _as_set(client: Any, key: str) -> None:
    client.delete(key)
    client.sadd(key, "1")


def _as_list(client: Any, key: str) -> None:
    client.delete(key)
    client.rpush(key, "1")


def _as_hash(client: Any, key: str) -> None:
    client.delete(key)
    client.hset(key, "1", "1")


Corrupt = Callable[[Any, str], None]
# (key, how it is corrupted, the Redis type then found, words the expectation must use)
CASES: list[tuple[str, Corrupt, str, str]] = [
    ("{ac}:person:2", _as_string, "string", "hash"),
    ("{ac}:person:#all", _as_set, "set", "zset"),
    ("{ac}:person:#ix:name:ann", _as_string, "string", "set"),
    ("{ac}:person:#ix:email:bob%40x", _as_list, "list", "set"),
    ("{ac}:person:#uq:email:ann%40x", _as_set, "set", "string"),
    ("{ac}:person:#zs:age", _as_set, "set", "zset"),
    ("{ac}:person:#fk:team_id:1", _as_hash, "hash", "zset"),
    ("{ac}:person:#rel:clubs:1", _as_string, "string", "zset"),
    ("{ac}:club:#rel:people:1", _as_list, "list", "zset"),
    ("{ac}:person:#seq", _as_set, "set", "integer"),
    ("{ac}:team:#seq", _as_string, "string 'junk'", "integer"),
    ("VISIT:#ix:who:ann", _as_string, "string", "set"),
    ("VISIT:#all", _as_hash, "hash", "zset"),
]


def _key(name: str) -> str:
    return name.replace("VISIT", _visit_tag() + ":visit")


def _only_finding(report: AuditReport, key: str) -> None:
    """The report holds exactly one finding about `key`, and `key` is not also unexplained."""
    assert [w.key for w in report.wrong_types].count(key) == 1, report.mismatches
    assert key not in report.unexplained
    assert not report.ok


@pytest.mark.parametrize(
    ("name", "corrupt", "found", "expected"), CASES, ids=[c[0] + "-" + c[2] for c in CASES]
)
def test_wrong_typed_key_is_a_finding(
    engine: redmap.Engine,
    redis_client: Any,
    name: str,
    corrupt: Corrupt,
    found: str,
    expected: str,
) -> None:
    """A key of the wrong type is reported with what was expected, what was found and a
    repair hint, and nothing else in the keyspace is misreported because of it."""
    _seed(engine)
    key = _key(name)
    assert redis_client.exists(key), f"the layout changed: {key} was not written"
    assert audit(redis_client, areg).ok
    corrupt(redis_client, key)
    report = audit(redis_client, areg)
    _only_finding(report, key)
    finding = next(w for w in report.wrong_types if w.key == key)
    assert finding.found == found
    assert expected in finding.expected
    assert key in finding.hint and any(v in finding.hint for v in ("DEL", "SET", "RENAME"))
    line = str(finding)
    assert line in report.mismatches
    assert line.startswith(f"{key}: wrong type: expected ") and f"found {found}" in line
    if name != "{ac}:person:2":
        # The other keys still hold what the objects say: the finding is the only one.
        assert report.mismatches == [line], report.mismatches
        assert report.unexplained == []
    else:
        # The object is gone; its index entries are now extra and reported as such.
        assert "{ac}:person:#ix:name:bob" in report.unexplained
        assert any(
            m.startswith("{ac}:person:#all: expected {('1', 1.0)}") for m in report.mismatches
        )
    assert report.objects == (5 if name == "{ac}:person:2" else 6)
    assert "of the wrong type" in report.summary()


def test_every_wrong_typed_key_at_once(engine: redmap.Engine, redis_client: Any) -> None:
    """All corruptions in one keyspace: one audit run reports each of them."""
    _seed(engine)
    keys = [_key(c[0]) for c in CASES]
    for (_, corrupt, _, _), key in zip(CASES, keys, strict=True):
        corrupt(redis_client, key)
    report = audit(redis_client, areg)
    assert sorted(w.key for w in report.wrong_types) == sorted(keys), report.mismatches
    assert not set(keys) & set(report.unexplained)


def test_stray_keys_of_the_wrong_type(engine: redmap.Engine, redis_client: Any) -> None:
    """A key no object explains is unexplained; if its name also promises another type
    than it holds, it is reported as that wrong type, with DEL as the repair."""
    _seed(engine)
    redis_client.set("{ac}:person:#ix:name:zed", "1")
    redis_client.sadd("{ac}:person:#ix:name:amy", "9")
    redis_client.set("{ac}:person:#allx", "1")
    report = audit(redis_client, areg)
    assert [str(w) for w in report.wrong_types] == [
        "{ac}:person:#ix:name:zed: wrong type: expected a set of ids, found string; "
        "repair: no object explains this key: DEL {ac}:person:#ix:name:zed"
    ]
    assert report.unexplained == ["{ac}:person:#allx", "{ac}:person:#ix:name:amy"]


def test_unscorable_value_is_a_finding(engine: redmap.Engine, redis_client: Any) -> None:
    """A Sorted int beyond 2**53 in a hash (which the flush refuses) is reported as
    such, not raised, and its zset member is not reported a second time."""
    _seed(engine)
    redis_client.hset("{ac}:person:1", "age", str(2**60))
    report = audit(redis_client, areg)
    assert report.mismatches == [
        f"{{ac}}:person:1: Person.age holds {2**60}, which a sorted index cannot score "
        "(expected int, got int (integers beyond ±2**53 have no exact score)); "
        "repair: store a value the model accepts"
    ]


def test_unique_value_held_twice_is_a_finding(engine: redmap.Engine, redis_client: Any) -> None:
    """Two hashes holding one Unique value (written around redmap) are named together."""
    _seed(engine)
    redis_client.hset("{ac}:person:2", "email", "ann@x")
    report = audit(redis_client, areg)
    assert (
        "{ac}:person:#uq:email:ann%40x: the unique value is held by two objects, 1 and 2; "
        "repair: change the value of one of them"
    ) in report.mismatches
    assert "{ac}:person:#uq:email:bob%40x" in report.unexplained


def test_key_names_that_are_not_utf8(engine: redmap.Engine, redis_client: Any) -> None:
    """Keys under the prefix whose names are not UTF-8 (no escaped id or value is) are
    listed as unexplained, shown with backslash escapes, instead of a UnicodeDecodeError."""
    _seed(engine)
    redis_client.set(b"{ac}:person:\xff", "x")
    redis_client.set(b"{ac}:\xfe", "y")
    report = audit(redis_client, areg)
    assert report.unexplained == ["{ac}:\\xfe", "{ac}:person:\\xff"]
    assert report.mismatches == []


def test_counter_below_highest_id_names_the_repair(
    engine: redmap.Engine, redis_client: Any
) -> None:
    """A counter behind the ids it handed out is reported with the value to SET."""
    _seed(engine)
    redis_client.set("{ac}:person:#seq", "1")
    report = audit(redis_client, areg)
    assert report.mismatches == [
        "{ac}:person:#seq: counter 1 is below the highest id 2; repair: SET {ac}:person:#seq 2 "
        "(the counter of the highest id)"
    ]


def test_missing_version_is_reported(engine: redmap.Engine, redis_client: Any) -> None:
    """An object hash without `#v` is a finding naming the key; its indexes still audit."""
    _seed(engine)
    redis_client.hdel("{ac}:person:1", "#v")
    report = audit(redis_client, areg)
    assert len(report.mismatches) == 1, report.mismatches
    line = report.mismatches[0]
    assert line.startswith("{ac}:person:1: no version field #v")
    assert "HSET {ac}:person:1 #v 1" in line and "DEL {ac}:person:1" in line
    assert report.unexplained == [] and report.objects == 6


def test_partial_resurrected_hash_is_reported(engine: redmap.Engine, redis_client: Any) -> None:
    """A deleted object's hash recreated with one field and no `#v` (what a stale update
    of a deleted object leaves) is reported as missing its version and its fields."""
    _seed(engine)
    with Session(engine) as s:
        bob = s.get(Person, 2)
        assert bob is not None
        bob.clubs.clear()
        s.delete(bob)
        s.commit()
    assert audit(redis_client, areg).ok
    redis_client.hset("{ac}:person:2", "age", "5")
    report = audit(redis_client, areg)
    about = [m for m in report.mismatches if m.startswith("{ac}:person:2:")]
    assert len(about) == 2, report.mismatches
    assert "no version field #v" in about[0]
    assert "name" in about[1]  # a required field is missing
    assert report.unexplained == ["{ac}:person:2"]  # no object explains the leftover


@pytest.mark.parametrize("raw", ["01", "abc", "0", "-1", " 1", "1.0", "+3", "", "007"])
def test_non_canonical_version_is_reported(
    engine: redmap.Engine, redis_client: Any, raw: str
) -> None:
    """A `#v` the writer would never write ("01", "abc", ...) is a finding with the value
    to set; the object's fields still audit, so it is the only finding."""
    _seed(engine)
    redis_client.hset("{ac}:person:1", "#v", raw)
    report = audit(redis_client, areg)
    assert len(report.mismatches) == 1, report.mismatches
    line = report.mismatches[0]
    assert line.startswith(f"{{ac}}:person:1: version field #v is {raw!r}, not canonical")
    digits = raw.strip().lstrip("+-")
    fixed = max(int(raw), 1) if digits.isdigit() else 1
    assert line.endswith(f"repair: HSET {{ac}}:person:1 #v {fixed}")
    assert report.unexplained == [] and report.objects == 6


def test_canonical_versions_audit_clean(engine: redmap.Engine, redis_client: Any) -> None:
    """Any version the writer could have written (1, 2, ... 10, 1000) is not a finding."""
    _seed(engine)
    for i, v in enumerate(("1", "2", "10", "1000")):
        redis_client.hset("{ac}:person:1", "#v", v)
        report = audit(redis_client, areg)
        assert report.ok, (i, report.mismatches)


def test_cli_reports_wrong_types_and_versions(
    engine: redmap.Engine, redis_client: Any, redis_url: str
) -> None:
    """`redmap audit` prints each finding and exits 1; no traceback reaches the user."""
    _seed(engine)
    _as_string(redis_client, "{ac}:person:#ix:name:ann")
    _as_set(redis_client, "{ac}:person:#seq")
    redis_client.hset("{ac}:person:1", "#v", "01")
    redis_client.hdel("{ac}:person:2", "#v")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "redmap.cli",
            "audit",
            "--url",
            redis_url,
            "--models",
            "tests.test_audit_corruption:areg",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr == ""
    out = proc.stdout
    assert (
        "mismatch: {ac}:person:#ix:name:ann: wrong type: expected a set of ids, found string" in out
    )
    assert "mismatch: {ac}:person:#seq: wrong type: expected a string holding an integer" in out
    assert "{ac}:person:1: version field #v is '01', not canonical" in out
    assert "{ac}:person:2: no version field #v" in out
    assert "4 mismatches (2 of the wrong type)" in out


def test_wrong_types_on_a_cluster(cluster: ClusterProcesses, cluster_client: Any) -> None:
    """On a 3-node cluster the audit reads every node and reports wrong types in the
    registry's slot and in a shard's slot alike."""
    engine = redmap.create_engine(cluster.url)
    try:
        _seed(engine)
    finally:
        engine.dispose()
    assert audit(cluster_client, areg).ok
    keys = ["{ac}:person:#zs:age", _key("VISIT:#ix:who:bob"), _key("VISIT:#all")]
    _as_string(cluster_client, keys[0])
    _as_list(cluster_client, keys[1])
    _as_set(cluster_client, keys[2])
    cluster_client.hset("{ac}:club:1", "#v", "x1")
    report = audit(cluster_client, areg)
    assert sorted(w.key for w in report.wrong_types) == sorted(keys)
    assert [w.found for w in report.wrong_types if w.key == keys[1]] == ["list"]
    assert sum("not canonical" in m for m in report.mismatches) == 1
    assert len(report.mismatches) == 4 and report.unexplained == []
