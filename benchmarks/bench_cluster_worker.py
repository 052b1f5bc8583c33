"""A worker process for the cluster throughput benchmark (module-level for spawn)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import redmap
from redmap import ForeignKey, PrimaryKey, Session, Sorted, registry

reg = registry(prefix="cb", shards=16)


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
    text: str
    rank: Annotated[int, Sorted()] = 0
    board_id: Annotated[Optional[int], ForeignKey("Board")] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


def work(url: str, seconds: float, barrier: Any, out: Any) -> None:
    """Commit 'a board with 10 cards, then one card update' units for `seconds`."""
    engine = redmap.create_engine(url)
    barrier.wait()
    commits = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        with Session(engine, expire_on_commit=False) as s:
            board = Board(name="b")
            s.add(board)
            s.flush()
            s.add_all(Card(text=f"c{i}", rank=i, board_id=board.id) for i in range(10))
            s.commit()
        commits += 2
    out.put(commits)
    engine.dispose()
