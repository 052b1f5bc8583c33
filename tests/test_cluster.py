"""Tests for `redmap.dialects.cluster` on a real local 3-master Redis Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

import redmap
from redmap import PrimaryKey, Session, registry, select
from redmap.exc import CrossSlotError, IntegrityError, RedmapConnectionError, StaleDataError
from redmap.testing.servers import ClusterProcesses
from tests._fixtures import Author, Counter
from tests.test_relationships import Message, Room, User, at

pytestmark = pytest.mark.cluster

other_reg = registry(prefix="other")


@other_reg.mapped
@dataclass
class Note:
    text: str = ""
    id: Annotated[Optional[int], PrimaryKey()] = None


@pytest.fixture
def cengine(cluster_client: RedisCluster, cluster: ClusterProcesses) -> Iterator[redmap.Engine]:
    """A redmap engine on an emptied cluster."""
    eng = redmap.create_engine(cluster.url)
    assert eng.dialect.supports_cluster
    try:
        yield eng
    finally:
        eng.dispose()


def _node_of(client: RedisCluster, key: str) -> Any:
    return client.get_node_from_key(key)


class TestBasics:
    def test_insert_get_update_delete(self, cengine: redmap.Engine) -> None:
        """The foundation's key cases work unchanged on a cluster."""
        with Session(cengine) as s:
            s.add_all([Author(name=f"a{i}", email=f"{i}@x", age=i) for i in range(20)])
            s.commit()
        with Session(cengine) as s:
            got = s.get_many(Author, range(1, 21))
            assert [a.age for a in got if a] == list(range(20))
            got[0].age = 100  # type: ignore[union-attr]
            s.delete(got[1])
            s.commit()
        with Session(cengine) as s:
            assert s.get(Author, 2) is None and s.get(Author, 1).age == 100  # type: ignore[union-attr]

    def test_stale_and_unique_errors(self, cengine: redmap.Engine) -> None:
        """Version checks and unique constraints hold on a cluster."""
        with Session(cengine) as s:
            s.add(Author(name="a", email="same@x"))
            s.commit()
        with Session(cengine) as a, Session(cengine) as b:
            x, y = a.get(Author, 1), b.get(Author, 1)
            assert x is not None and y is not None
            x.age, y.age = 1, 2
            a.commit()
            with pytest.raises(StaleDataError):
                b.commit()
        with Session(cengine) as s:
            s.add(Author(name="b", email="same@x"))
            with pytest.raises(IntegrityError):
                s.commit()

    def test_queries_match_standalone(self, cengine: redmap.Engine) -> None:
        """Queries with conditions, order, limit and count give the standalone answers."""
        with Session(cengine) as s:
            s.add_all([Author(name=f"n{i % 3}", email=f"{i}@x", age=i) for i in range(30)])
            s.commit()
        with Session(cengine) as s:
            stmt = (
                select(Author)
                .where(Author.name == "n1", Author.age.between(5, 25))
                .order_by(Author.age.desc())
                .limit(3)
                .offset(1)
            )
            assert [a.age for a in s.scalars(stmt)] == [22, 19, 16]
            assert s.count(select(Author).where(Author.age >= 10)) == 20

    def test_relationships(self, cengine: redmap.Engine) -> None:
        """One-to-many with ordering and many-to-many work on a cluster."""
        with Session(cengine) as s:
            room = Room(name="r")
            room.messages.extend([Message(text=str(i), sent_at=at(-i)) for i in range(3)])
            room.members.append(User(name="u"))
            s.add(room)
            s.commit()
        with Session(cengine) as s:
            room2 = s.get(Room, 1)
            assert room2 is not None
            assert [m.text for m in room2.messages] == ["2", "1", "0"]
            assert [u.name for u in room2.members] == ["u"]


class TestSlots:
    def test_cross_slot_flush_is_refused(
        self, cengine: redmap.Engine, cluster_client: RedisCluster
    ) -> None:
        """Objects of two registries (two hash slots) in one flush raise before any write."""
        assert key_slot(b"{t}") != key_slot(b"{other}")
        with Session(cengine) as s:
            s.add(Counter(value=1))
            s.add(Note(text="n"))
            with pytest.raises(CrossSlotError) as err:
                s.commit()
        assert len(err.value.slots) == 2
        assert cluster_client.dbsize() == 0  # nothing at all was written

    def test_allow_cross_slot_commits_slot_by_slot(self, cengine: redmap.Engine) -> None:
        """With allow_cross_slot=True each registry's part commits in its own transaction."""
        with Session(cengine, allow_cross_slot=True) as s:
            s.add(Counter(value=1))
            s.add(Note(text="n"))
            s.commit()
        with Session(cengine) as s:
            assert s.get(Counter, 1) is not None and s.get(Note, 1) is not None

    def test_slot_migration_during_session(
        self, cengine: redmap.Engine, cluster_client: RedisCluster
    ) -> None:
        """Moving the registry's slot to another node (MOVED) does not break a session."""
        with Session(cengine, expire_on_commit=False) as s:
            c = Counter(value=1)
            s.add(c)
            s.commit()
            slot = key_slot(b"{t}")
            source = _node_of(cluster_client, "{t}")
            target = next(n for n in cluster_client.get_primaries() if n.name != source.name)
            _migrate_slot(cluster_client, slot, source, target)
            c.value = 2
            s.commit()  # the flush learns the new owner and retries
            s.add(Counter(value=3))
            s.commit()
        with Session(cengine) as s:
            assert [x.value for x in s.get_many(Counter, [1, 2]) if x] == [2, 3]
        moved = redis.Redis(host=target.host, port=target.port)
        try:
            assert moved.exists("{t}:counter:1", "{t}:counter:2") == 2  # the new owner has them
        finally:
            moved.close()

    def test_killed_connection_never_loses_concurrent_write(
        self, cengine: redmap.Engine, cluster: ClusterProcesses
    ) -> None:
        """A concurrent write plus a killed flush connection gives an error, never a lost update."""
        with Session(cengine) as s:
            s.add(Counter(value=0))
            s.commit()
        host, port = _owner_address(cluster, "{t}:counter:1")
        admin = redis.Redis(host=host, port=port)
        outcomes = []
        for _ in range(20):
            with Session(cengine) as s:
                c = s.get(Counter, 1)
                assert c is not None
                c.value += 1

                def sabotage(cmds: Any) -> None:
                    if cmds and cmds[0][0] == "MULTI":
                        admin.hincrby("{t}:counter:1", "value", 50)
                        admin.hincrby("{t}:counter:1", "#v", 1)
                        admin.client_kill_filter(_type="normal", skipme=True)

                cengine.add_listener(sabotage)
                try:
                    s.commit()
                    outcomes.append("committed")
                except (StaleDataError, RedmapConnectionError) as exc:
                    outcomes.append(type(exc).__name__)
                finally:
                    cengine.remove_listener(sabotage)
        admin.close()
        print(f"killed-connection outcomes: {sorted(set(outcomes))} x{len(outcomes)}")
        assert "committed" not in outcomes
        with Session(cengine) as s:
            assert s.get(Counter, 1).value == 50 * 20  # type: ignore[union-attr]


def _owner_address(cluster: ClusterProcesses, key: str) -> tuple[str, int]:
    client = cluster.client()
    try:
        node = client.get_node_from_key(key)
        return node.host, node.port
    finally:
        client.close()


def _migrate_slot(client: RedisCluster, slot: int, source: Any, target: Any) -> None:
    """Move one slot with its keys, as redis-cli --cluster reshard does."""
    src = redis.Redis(host=source.host, port=source.port)
    dst = redis.Redis(host=target.host, port=target.port)
    try:
        src_id = src.execute_command("CLUSTER MYID").decode()
        dst_id = dst.execute_command("CLUSTER MYID").decode()
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        while True:
            keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
            if not keys:
                break
            src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        for r in (src, dst):
            r.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        for node in client.get_primaries():
            if node.name not in (source.name, target.name):
                other = redis.Redis(host=node.host, port=node.port)
                other.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                other.close()
    finally:
        src.close()
        dst.close()
