"""Migrations on a real 3-node Redis Cluster (SCAN on every master, per-object rewrites)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


SHARDED = """
from dataclasses import dataclass
from typing import Annotated, Optional
from redmap import ForeignKey, Indexed, PrimaryKey, Sorted, registry

reg = registry(prefix="app", shards=4)

@reg.mapped
@dataclass
class Board:
    __shard_key__ = "id"
    name: str
    id: Annotated[Optional[int], PrimaryKey()] = None

@reg.mapped
@dataclass
class Card:
    __shard_key__ = "board_id"
    {text}: Annotated[str, Indexed()]
    rank: {rank} = 0
    board_id: Annotated[Optional[int], ForeignKey("Board")] = None
    {extra}
    id: Annotated[Optional[int], PrimaryKey()] = None
"""


def _seed_boards(
    proj: Project, module: Any, *, boards: int, per: int, text: Callable[[int, int], str]
) -> list[Any]:
    """`boards` boards of `module`'s models with `per` cards each (rank = position), one
    commit per board so that each board and its cards share a shard; the cards."""
    cards: list[Any] = []
    for b in range(boards):
        with redmap.Session(proj.engine, expire_on_commit=False) as s:
            board = module.Board(name=f"b{b}")
            s.add(board)
            s.flush()
            mine = [module.Card(text=text(b, i), rank=i, board_id=board.id) for i in range(per)]
            s.add_all(mine)
            s.commit()
            cards.extend(mine)
    return cards


@pytest.fixture(params=["standalone", "cluster"])
def any_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """A migration project on a standalone server, then on a 3-node cluster."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    if request.param == "standalone":
        client = request.getfixturevalue("redis_client")
        url = request.getfixturevalue("redis_url")
    else:
        client = request.getfixturevalue("cluster_client")
        url = request.getfixturevalue("cluster").url
    proj = Project(tmp_path, url, client)
    try:
        yield proj
    finally:
        if proj._engine is not None:
            proj._engine.dispose()


def test_sharded_model_migrates_in_every_shard(any_project: Project) -> None:
    """add_field, rename_field, a sorted index backfill and a transform (exactly once, its
    checkpoints in each shard's slot) visit every shard's objects, up and down."""
    from redmap.audit import audit

    proj = any_project
    proj.write_models(SHARDED.format(text="text", rank="int", extra=""))
    module = proj.models()
    cards = _seed_boards(proj, module, boards=8, per=5, text=lambda b, i: f"c{b}-{i}")
    ids = [(c.id, c.text, c.rank) for c in cards]
    proj.write_models(
        SHARDED.format(
            text="title", rank="Annotated[int, Sorted()]", extra="note: Optional[str] = None"
        )
    )
    proj.write_revision(
        "r1",
        None,
        """
        op.add_field("Card", "note", default="hello")
        op.rename_field("Card", "text", "title")
        op.create_index("Card", "rank", kind="sorted")
        op.transform(
            "Card",
            lambda f: {**f, "title": f["title"] + b"!"},
            lambda f: {**f, "title": f["title"][:-1]},
        )
        """,
    )
    proj.ok("upgrade", "head")
    # Each shard's exactly-once marks lived in that shard's slot and are gone with the step.
    assert not list(proj.client.scan_iter(match="*migrate:done*"))
    new = proj.models()
    with redmap.Session(proj.engine) as s:
        got = s.get_many(new.Card, [i for i, _, _ in ids])
        assert [(c.title, c.rank, c.note) for c in got if c] == [
            (text + "!", rank, "hello") for _, text, rank in ids
        ]
        top = s.scalars(redmap.select(new.Card).order_by(new.Card.rank.desc()).limit(8)).all()
        assert [c.rank for c in top] == [4] * 8
    report = audit(proj.client, new.reg)
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]
    proj.ok("downgrade", "base")
    assert not any(
        proj.client.hexists(new.reg.mappers[new.Card].keys_for_pk(i).object(str(i)), "note")
        for i, _, _ in ids
    )
    texts = [
        proj.client.hget(new.reg.mappers[new.Card].keys_for_pk(i).object(str(i)), "text")
        for i, _, _ in ids
    ]
    assert texts == [text.encode() for _, text, _ in ids]
    assert not list(proj.client.scan_iter(match="*migrate:done*"))


def test_sharded_model_renamed(any_project: Project) -> None:
    """rename_model moves a sharded model's keys in every shard (and its id counter under
    the registry's tag), up and down; each key keeps its hash tag, so nothing is cross-slot."""
    from redmap.audit import audit

    proj = any_project
    proj.write_models(SHARDED.format(text="text", rank="int", extra=""))
    module = proj.models()
    cards = _seed_boards(proj, module, boards=6, per=4, text=lambda b, i: f"t{i % 2}")
    ids = [(c.id, c.text, c.board_id) for c in cards]
    before = sorted(k for k in proj.client.scan_iter(match="*:card:*"))
    proj.write_models(SHARDED.format(text="text", rank="int", extra='__keyspace__ = "tile"'))
    proj.write_revision("r1", None, 'op.rename_model("card", "tile")')
    assert "would move" in proj.ok("upgrade", "head", "--dry-run")
    proj.ok("upgrade", "head")
    assert not list(proj.client.scan_iter(match="*:card:*"))
    after = sorted(k for k in proj.client.scan_iter(match="*:tile:*"))
    assert [k.replace(b":tile:", b":card:") for k in after] == before
    new = proj.models()
    with redmap.Session(proj.engine) as s:
        got = s.get_many(new.Card, [i for i, _, _ in ids])
        assert [(c.id, c.text, c.board_id) for c in got if c] == ids
        assert s.count(redmap.select(new.Card).where(new.Card.text == "t1")) == len(ids) // 2
        board = s.get(new.Board, ids[0][2])
        s.add(new.Card(text="t9", board_id=board.id))
        s.commit()  # the id counter moved too: no id is handed out twice
    report = audit(proj.client, new.reg)
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]
    proj.ok("downgrade", "base")
    assert not list(proj.client.scan_iter(match="*:tile:*"))
    assert len(list(proj.client.scan_iter(match="*:card:*"))) > len(before)
