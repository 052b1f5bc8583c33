"""Tests for `__shard_key__`: co-located shards, fan-out queries, on a server and a cluster."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
import redis
from redis.crc import key_slot

import redmap
from redmap import ForeignKey, Indexed, PrimaryKey, Session, Sorted, Unique, registry, select
from redmap.audit import audit
from redmap.exc import CrossSlotError, MappingError
from redmap.orm.mapper import mapper_of
from redmap.testing.assertions import count_round_trips
from redmap.testing.servers import ClusterProcesses

SHARDS = 8
sreg = registry(prefix="sh", shards=SHARDS)


@sreg.mapped
@dataclass
class Tenant:
    __shard_key__ = "id"
    name: Annotated[str, Indexed()]
    projects: list[Project] = redmap.relationship(back_populates="tenant")
    id: Annotated[Optional[int], PrimaryKey()] = None


@sreg.mapped
@dataclass
class Project:
    __shard_key__ = "tenant_id"
    title: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()] = 0
    tenant_id: Annotated[Optional[int], ForeignKey("Tenant")] = None
    tenant: Optional[Tenant] = redmap.relationship(back_populates="projects")
    id: Annotated[Optional[int], PrimaryKey()] = None


def _raw(engine: redmap.Engine) -> Any:
    return engine.dialect.client


def _seed(engine: redmap.Engine, tenants: int = 6, per: int = 7) -> list[tuple[int, int, int]]:
    """(tenant id, project id, score) of every project created, one flush per tenant."""
    rng = random.Random(7)
    rows = []
    for t in range(tenants):
        with Session(engine, expire_on_commit=False) as s:
            tenant = Tenant(name=f"t{t}")
            tenant.projects.extend(
                Project(title=f"p{t}-{i}", score=rng.randrange(100)) for i in range(per)
            )
            s.add(tenant)
            s.commit()  # one transaction: the tenant and its projects share a shard
            for p in tenant.projects:
                assert p.id is not None and tenant.id is not None
                rows.append((tenant.id, p.id, p.score))
    return rows


def test_tenant_and_projects_share_one_slot(sengine: redmap.Engine) -> None:
    """A tenant's objects, indexes and links live under one shard tag and commit together."""
    rows = _seed(sengine, tenants=3, per=4)
    mapper = mapper_of(Project)
    for tenant_id, project_id, _ in rows:
        assert mapper.shard_of_pk(project_id) == mapper_of(Tenant).shard_of_pk(tenant_id)
        tag = mapper.keys_for_pk(project_id).tag
        assert key_slot(tag.encode()) == key_slot(
            mapper_of(Tenant).keys_for_pk(tenant_id).tag.encode()
        )
    with Session(sengine) as s:
        t = s.get(Tenant, rows[0][0])
        assert t is not None and len(t.projects) == 4
        p = s.get(Project, rows[0][1])
        assert p is not None and p.tenant is t


def test_query_with_shard_key_reads_one_shard(sengine: redmap.Engine) -> None:
    """A condition on the shard key sends the query to that shard only."""
    rows = _seed(sengine)
    tenant_id = rows[0][0]
    tag = mapper_of(Project).keys_for_shard(mapper_of(Project).shard_of_value(tenant_id)).tag
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        got = s.scalars(
            select(Project).where(Project.tenant_id == tenant_id).order_by(Project.score)
        ).all()
    assert sorted(p.id for p in got) == sorted(pid for t, pid, _ in rows if t == tenant_id)
    assert rt.round_trips == 2
    keyed = [str(c[1]) for c in rt.commands if len(c) > 1 and str(c[0]) != "DEL"]
    assert keyed and all(k.startswith(tag) for k in keyed)


@pytest.mark.parametrize("desc", [False, True])
def test_fan_out_query_matches_reference(sengine: redmap.Engine, desc: bool) -> None:
    """Without the shard key a query reads every shard and merges: order, limit, offset
    and count equal the answer over all the data."""
    rows = _seed(sengine)
    ordered = sorted(rows, key=lambda r: (r[2], str(r[1]).encode()), reverse=desc)
    order = Project.score.desc() if desc else Project.score
    with Session(sengine) as s:
        page = s.scalars(select(Project).order_by(order).offset(5).limit(10)).all()
        assert [p.id for p in page] == [r[1] for r in ordered[5:15]]
        wide = s.scalars(
            select(Project).where(Project.score.between(20, 80)).order_by(order).limit(7)
        ).all()
        ref = [r for r in ordered if 20 <= r[2] <= 80][:7]
        assert [p.id for p in wide] == [r[1] for r in ref]
        assert s.count(select(Project)) == len(rows)
        assert s.count(select(Project).where(Project.score >= 50)) == sum(
            1 for r in rows if r[2] >= 50
        )
        assert s.count(select(Project).where(Project.title == "p2-3")) == 1
        both = select(Project).where(Project.title.in_(["p1-1", "p4-2"]), Project.score >= 0)
        assert len(s.scalars(both).all()) == 2


def test_cross_shard_flush(sengine: redmap.Engine) -> None:
    """Changing two tenants at once is refused on a cluster unless allow_cross_slot."""
    rows = _seed(sengine, tenants=SHARDS * 2, per=1)
    mapper = mapper_of(Tenant)
    a, b = next(
        (x[0], y[0])
        for x in rows
        for y in rows
        if mapper.shard_of_pk(x[0]) != mapper.shard_of_pk(y[0])
    )
    clustered = sengine.dialect.supports_cluster
    with Session(sengine) as s:
        ta, tb = s.get(Tenant, a), s.get(Tenant, b)
        assert ta is not None and tb is not None
        ta.name, tb.name = "renamed-a", "renamed-b"
        if clustered:
            with pytest.raises(CrossSlotError):
                s.commit()
            s.rollback()
        else:
            s.commit()  # one server: one transaction, whatever the tags
    if clustered:
        with Session(sengine, allow_cross_slot=True) as s:
            ta, tb = s.get(Tenant, a), s.get(Tenant, b)
            assert ta is not None and tb is not None
            ta.name, tb.name = "renamed-a", "renamed-b"
            s.commit()
    with Session(sengine) as s:
        assert [t.name for t in s.get_many(Tenant, [a, b]) if t] == ["renamed-a", "renamed-b"]


def test_audit_is_clean_across_shards(sengine: redmap.Engine) -> None:
    """Inserts, updates, moves and deletes keep every shard's indexes exact."""
    rows = _seed(sengine, tenants=4, per=3)
    with Session(sengine) as s:
        p = s.get(Project, rows[0][1])
        assert p is not None
        p.score, p.title = 999, "changed"
        s.delete(s.get(Project, rows[1][1]))
        s.commit()
    raw = _raw(sengine)
    report = audit(raw, sreg)
    assert report.ok, report.mismatches + report.unexplained
    assert report.objects == 4 + 3 * 4 - 1


def test_unique_on_sharded_model_is_refused() -> None:
    """A unique constraint that would only hold per shard is a MappingError."""
    reg = registry(prefix="shu", shards=4)

    @reg.mapped
    @dataclass
    class Item:
        __shard_key__ = "owner"
        owner: int
        code: Annotated[str, Unique()] = ""
        id: Annotated[Optional[int], PrimaryKey()] = None

    with pytest.raises(MappingError, match="Unique"):
        reg.configure()


def test_shard_keys_spread_over_cluster_nodes(cluster: ClusterProcesses) -> None:
    """The shard tags of a registry land on more than one node of a 3-node cluster."""
    client = redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in cluster.startup_nodes]
    )
    try:
        nodes = {client.get_node_from_key(ks.tag).name for ks in mapper_of(Project).all_keyspaces()}
        assert len(nodes) > 1
    finally:
        client.close()


def test_fan_out_costs_one_round_trip_per_node(sengine: redmap.Engine) -> None:
    """A query without the shard key visits every shard, but each node's shards share one
    round trip (a pipeline of MULTI/EXEC blocks), so the cost follows nodes, not shards."""
    rows = _seed(sengine)
    client = _raw(sengine)
    nodes = len(client.get_primaries()) if sengine.dialect.supports_cluster else 1
    titles = [f"p{t}-1" for t in range(6)]
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        found = s.count(select(Project).where(Project.title.in_(titles)))
    assert found == 6
    assert rt.round_trips == nodes
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        got = s.scalars(
            select(Project).where(Project.title.in_(titles)).order_by(Project.score)
        ).all()
    assert sorted(p.title for p in got) == sorted(titles)
    assert [p.score for p in got] == sorted(p.score for p in got)
    assert len(rows) == 42
    assert rt.round_trips <= 2 * nodes  # ids per node, then the objects per node
