"""Migrations on a real 3-node Redis Cluster (SCAN on every master, per-object rewrites)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import RedisCluster

import redmap
from redmap.testing.servers import ClusterProcesses
from tests.migrate.conftest import PYPROJECT, Project

MODELS = """
from dataclasses import dataclass
from typing import Annotated, Optional
from redmap import Indexed, PrimaryKey, registry

reg = registry(prefix="app")

@reg.mapped
@dataclass
class Author:
    name: Annotated[str, Indexed()]
    {extra}
    id: Annotated[Optional[int], PrimaryKey()] = None
"""


@pytest.fixture
def cproject(
    tmp_path: Path, cluster: ClusterProcesses, cluster_client: RedisCluster
) -> Iterator[Project]:
    """A project whose REDMAP_URL is the cluster."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    proj = Project(tmp_path, cluster.url, cluster_client)  # type: ignore[arg-type]
    try:
        yield proj
    finally:
        if proj._engine is not None:
            proj._engine.dispose()


def test_add_and_rename_field_on_a_cluster(cproject: Project) -> None:
    """add_field and rename_field run on a cluster and reach every object, down and up."""
    cproject.write_models(MODELS.format(extra=""))
    module = cproject.models()
    with redmap.Session(cproject.engine) as s:
        s.add_all([module.Author(name=f"a{i}") for i in range(1200)])
        s.commit()
    cproject.write_revision("r1", None, 'op.add_field("Author", "bio", default="none")')
    cproject.write_revision("r2", "r1", 'op.rename_field("Author", "bio", "about")')
    out = cproject.ok("upgrade", "head")
    assert "r2" in out or "Running upgrade" in out
    client = cproject.client
    values = {client.hget(f"{{app}}:author:{i}", "about") for i in range(1, 1201)}
    assert values == {b"none"}
    assert not any(client.hexists(f"{{app}}:author:{i}", "bio") for i in (1, 600, 1200))
    cproject.ok("downgrade", "base")
    assert not any(client.hexists(f"{{app}}:author:{i}", "about") for i in (1, 600, 1200))
    assert cproject.ok("current").strip().endswith("<base>") or "<base>" in cproject.ok("current")
