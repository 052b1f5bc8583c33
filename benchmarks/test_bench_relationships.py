"""Relationship loading: children of 100 parents x 10 children, selectin vs lazy vs raw.

* selectin: one query for the parents, then one ZRANGE per parent pipelined in one
  round trip and one pipelined HGETALL for all children: constant round trips.
* lazy ("select", the N+1 way): touching each parent's list loads it, 2 round trips
  per parent.
* raw: redis-py fetching the same children hashes, given the ids, in one pipeline
  (the physical floor for "read these 1,000 hashes").
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import redis

import redmap
from redmap import ForeignKey, PrimaryKey, Session, registry, relationship, select

reg = registry(prefix="rb")


@reg.mapped
@dataclass
class Parent:
    name: str
    kids: list["Kid"] = relationship(back_populates="parent", lazy="selectin")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class LazyParent:
    name: str
    kids: list["LazyKid"] = relationship(back_populates="parent")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Kid:
    name: str
    parent_id: Annotated[Optional[int], ForeignKey("Parent")] = None
    parent: Optional[Parent] = relationship(back_populates="kids")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class LazyKid:
    name: str
    parent_id: Annotated[Optional[int], ForeignKey("LazyParent")] = None
    parent: Optional[LazyParent] = relationship(back_populates="kids")
    id: Annotated[Optional[int], PrimaryKey()] = None


PARENTS, KIDS = 100, 10


def _seed(engine: redmap.Engine, parent_cls: Any, kid_cls: Any) -> None:
    with Session(engine) as s:
        for p in range(PARENTS):
            parent = parent_cls(name=f"p{p}")
            parent.kids.extend(kid_cls(name=f"k{p}-{k}") for k in range(KIDS))
            s.add(parent)
        s.commit()


def _load_all(engine: redmap.Engine, parent_cls: Any) -> int:
    with Session(engine) as s:
        parents = s.scalars(select(parent_cls)).all()
        return sum(len(p.kids) for p in parents)


def test_selectin_children(engine: redmap.Engine, measure: Callable[..., Any],
                           raw: redis.Redis) -> None:
    """selectin: the children of 100 parents in a constant number of round trips."""
    _seed(engine, Parent, Kid)
    kid_keys = [f"{{rb}}:kid:{i}" for i in range(1, PARENTS * KIDS + 1)]

    def raw_op() -> tuple[int, int]:
        pipe = raw.pipeline(transaction=False)
        for k in kid_keys:
            pipe.hgetall(k)
        assert len(pipe.execute()) == PARENTS * KIDS
        return 1, len(kid_keys)

    result = measure(name="selectin load 100x10", n=PARENTS * KIDS,
                     op=lambda: _load_all(engine, Parent), setup=lambda: (),
                     raw_op=raw_op)
    assert result.round_trips == 4  # ids, parents, children ids, children


def test_lazy_children(engine: redmap.Engine, measure: Callable[..., Any]) -> None:
    """lazy: the N+1 way, two round trips per parent."""
    _seed(engine, LazyParent, LazyKid)
    result = measure(name="lazy load 100x10", n=PARENTS * KIDS,
                     op=lambda: _load_all(engine, LazyParent), setup=lambda: ())
    assert result.round_trips == 2 + 2 * PARENTS
