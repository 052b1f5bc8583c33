"""Tests for `redmap.orm.dependency._unlink_hidden`: deleting the far end of a one-sided
many-to-many finds its owners through the hidden reverse set and loads them in one
round trip, whatever their number (issue 11 item 16: it was one HGETALL per owner)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest

from redmap import PrimaryKey, Session, registry, relationship
from redmap.audit import audit
from redmap.engine import Engine
from redmap.testing.assertions import count_round_trips

reg = registry(prefix="ul")


@reg.mapped
@dataclass
class Label:
    text: str
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Post:
    """Labels know nothing of posts: their side of the link is the hidden `~post.labels`."""

    title: str
    labels: list[Label] = relationship(secondary="ul_post_labels")
    id: Annotated[Optional[int], PrimaryKey()] = None


def _seed(engine: Engine, posts: int) -> tuple[int, int, list[int]]:
    with Session(engine) as s:
        gone, kept = Label(text="gone"), Label(text="kept")
        objs = [Post(title=f"p{i}", labels=[gone, kept]) for i in range(posts)]
        s.add_all(objs)
        s.commit()
        assert gone.id is not None and kept.id is not None
        return gone.id, kept.id, [p.id for p in objs if p.id is not None]


@pytest.mark.parametrize("posts", [1, 10, 300])
def test_deleting_a_label_loads_its_posts_in_one_round_trip(
    engine: Engine, redis_client: Any, posts: int
) -> None:
    """The flush deleting a label costs the same round trips for 1, 10 or 300 posts
    holding it, and every post's link to it is gone while the other link stays."""
    gone, kept, post_ids = _seed(engine, posts)
    with Session(engine) as s:
        label = s.get(Label, gone)
        assert label is not None
        s.delete(label)
        with count_round_trips(engine) as counter:
            s.commit()
        # ZRANGE of the hidden set, HGETALL of every post at once, WATCH + checks,
        # MULTI/EXEC.
        assert counter.round_trips == 4, counter.command_names
    with Session(engine) as s:
        for pid in post_ids:
            post = s.get(Post, pid)
            assert post is not None and [lb.id for lb in post.labels] == [kept]
    assert redis_client.exists(f"{{ul}}:label:{gone}") == 0
    report = audit(redis_client, reg)
    assert report.ok, report.mismatches + report.unexplained
