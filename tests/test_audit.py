"""Tests for `redmap.audit`: a clean database audits clean, and planted faults are found."""

from __future__ import annotations

from typing import Any

from redmap import Session
from redmap.audit import audit
from redmap.engine import Engine
from tests import _fixtures, test_relationships
from tests._fixtures import Author
from tests.test_relationships import Message, Room, User, at


def _workload(engine: Engine) -> None:
    with Session(engine) as s:
        s.add_all([Author(name=f"n{i % 3}", email=f"{i}@x", age=i) for i in range(20)])
        room = Room(name="r")
        room.messages.extend([Message(text=str(i), sent_at=at(i)) for i in range(5)])
        users = [User(name=f"u{i}") for i in range(3)]
        room.members.extend(users)
        users[0].following.append(users[1])
        s.add(room)
        s.commit()
        a = s.get(Author, 3)
        assert a is not None
        a.name, a.age = "changed", 99
        s.delete(s.get(Author, 4))
        room.messages.pop()
        s.commit()


def test_clean_database_audits_clean(engine: Engine, redis_client: Any) -> None:
    """After inserts, updates, deletes and relationship changes the audit finds nothing."""
    _workload(engine)
    for reg in (_fixtures.reg, test_relationships.reg):
        report = audit(redis_client, reg)
        assert report.ok, report.mismatches + report.unexplained
    assert audit(redis_client, _fixtures.reg).objects == 19


def test_planted_faults_are_reported(engine: Engine, redis_client: Any) -> None:
    """Stray index members, lost unique keys, one-sided links and stray keys are found."""
    _workload(engine)
    redis_client.sadd("{t}:author:#ix:name:n0", "999")
    redis_client.delete("{t}:author:#uq:email:1%40x")
    redis_client.zrem("{r}:user:#rel:rooms:1", "1")
    redis_client.set("{t}:author:#junk", "x")
    report = audit(redis_client, _fixtures.reg)
    text = "\n".join(report.mismatches)
    assert "#ix:name:n0" in text and "#uq:email:1%40x" in text
    assert report.unexplained == ["{t}:author:#junk"]
    rel = audit(redis_client, test_relationships.reg)
    assert any("#rel:rooms:1" in m for m in rel.mismatches)
