"""The tour `redmap demo` prints; also run by the test suite so that it cannot rot."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Optional

from .engine import Engine, create_engine, default_engine
from .exc import StaleDataError
from .expression import desc
from .query import select
from .registry import registry
from .schema import Indexed, PrimaryKey, Sorted
from .session import Session, run_in_transaction, sessionmaker
from .testing.assertions import count_round_trips

__all__ = ["run_demo"]


def run_demo(url: str | None = None, *, out: Callable[[str], None] = print) -> None:
    """Define models, commit, reload, update one field, and resolve a conflict."""
    engine: Engine = create_engine(url) if url else default_engine()
    # A fresh prefix per run keeps the demo's keys apart from earlier runs and user data.
    reg = registry(prefix=f"demo-{uuid.uuid4().hex[:8]}")

    @reg.mapped
    @dataclass
    class Player:
        name: Annotated[str, Indexed()]
        score: Annotated[int, Sorted()] = 0
        id: Annotated[Optional[int], PrimaryKey()] = None  # noqa: UP045 - shown as in the docs

    out(f"redmap demo on {engine.url}")
    out("")
    out("1. Add three players and commit them in one transaction")
    with Session(engine) as s, count_round_trips(engine) as rt:
        s.add_all(
            [Player(name="ann", score=10), Player(name="bob", score=7), Player(name="cy", score=12)]
        )
        s.commit()
    out(f"   committed 3 players in {rt.round_trips} round trips ({len(rt.commands)} commands)")

    out("2. Reload in a fresh session")
    with Session(engine) as s:
        players = s.get_many(Player, [1, 2, 3])
        for p in players:
            assert p is not None
            out(f"   {p}")
        assert s.get(Player, 1) is players[0], "identity map: one object per key"
        out("   s.get(Player, 1) is the same object again, and sent no command")

    out("3. Change one field: only that field is written")
    with Session(engine) as s:
        ann = s.get(Player, 1)
        assert ann is not None
        ann.score += 5
        with count_round_trips(engine) as rt:
            s.commit()
        hset = [c for c in rt.commands if c[0] == "HSET"]
        out(f"   wrote {hset[0][2:]} to {hset[0][1]}")

    out("4. Query the sorted index: players with score >= 10, best first")
    with Session(engine) as s:
        stmt = select(Player).where(Player.score >= 10).order_by(desc(Player.score))
        out(f"   {[(p.name, p.score) for p in s.scalars(stmt)]}")

    out("5. Two sessions update the same player: the second gets StaleDataError")
    with Session(engine) as a, Session(engine) as b:
        pa, pb = a.get(Player, 2), b.get(Player, 2)
        assert pa is not None and pb is not None
        pa.score += 1
        a.commit()
        pb.score += 100
        try:
            b.commit()
        except StaleDataError as exc:
            out(f"   StaleDataError: {exc}")
            b.rollback()

    out("6. run_in_transaction retries on conflict until it commits")
    factory: sessionmaker[Session] = sessionmaker(engine)

    def bump(s: Session) -> int:
        p = s.get(Player, 2)
        assert p is not None
        p.score += 100
        return p.score

    out(f"   bob's score is now {run_in_transaction(bump, factory)}")
    out("")
    out(f"done; the demo's keys are under the hash tag {{{reg.prefix}}}")
