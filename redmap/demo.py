"""The tour `redmap demo` prints; also run by the test suite so that it cannot rot.

Each step prints the few lines of code it runs, then what happened. The model lives
at module level so that it prints as `Player(name='ann', score=10, id=1)`; its keys
sit under their own prefix, which the demo empties before and after the tour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

from .engine import Engine, create_engine, default_engine
from .exc import StaleDataError
from .orm.registry import registry
from .orm.schema import Indexed, PrimaryKey, Sorted
from .orm.session import Session, run_in_transaction, sessionmaker
from .query.expression import col
from .query.select import select
from .testing.assertions import count_round_trips

__all__ = ["PREFIX", "Player", "run_demo"]

#: Every key of the demo starts with this hash tag, apart from any data of yours.
PREFIX = "redmap-demo"

reg = registry(prefix=PREFIX)


@reg.mapped
@dataclass
class Player:
    """The demo's one model: an indexed name, a sorted score, a generated id."""

    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()] = 0
    id: Annotated[Optional[int], PrimaryKey()] = None  # noqa: UP045 - written as in the docs


_MODEL = """\
@reg.mapped
@dataclass
class Player:
    name: Annotated[str, Indexed()]
    score: Annotated[int, Sorted()] = 0
    id: Annotated[Optional[int], PrimaryKey()] = None"""


def _where(engine: Engine) -> str:
    """Where the data lives, in words: the embedded server's folder, or the server URL."""
    if engine.url.startswith("redis+embedded:"):
        from .dialects.embedded import datadir_of

        folder: Path = datadir_of(engine.url).resolve()
        return f"the embedded Redis server, data folder {folder}"
    return engine.url


def _clear(engine: Engine) -> None:
    """Delete every key under the demo's prefix (objects, indexes, counter, flush markers).

    A SCAN, as an offline tool may do: the prefix holds the demo's keys only.
    """
    from .dialects.base import translate_errors

    with translate_errors(engine.dialect.url):
        client = engine.dialect.client
        found = list(client.scan_iter(match=f"{{{PREFIX}}}:*", count=1000))
        for key in found:
            client.delete(key)  # one at a time: on a cluster, keys may sit on several nodes


def run_demo(url: str | None = None, *, out: Callable[[str], None] = print) -> None:
    """Define a model, commit, reload, update one field, query, and resolve a conflict."""
    engine: Engine = create_engine(url) if url else default_engine()

    def code(text: str) -> None:
        # As in Python's prompt: ">>>" starts a statement, "..." continues one.
        previous = ""
        for line in text.splitlines():
            more = line.startswith(" ") or previous.endswith((",", ":")) or previous.startswith("@")
            out(f"   {'...' if more else '>>>'} {line}")
            previous = line

    out(f"redmap demo on {_where(engine)}")
    out(f"(its keys start with {{{PREFIX}}}: and are deleted at the end)")
    _clear(engine)
    out("")
    out("0. The model: a dataclass, mapped; Annotated markers ask for indexes")
    code(_MODEL)
    out("")
    out("1. Add three players and commit them in one transaction")
    code(
        "with Session(engine) as s:\n"
        '    s.add_all([Player(name="ann", score=10), Player(name="bob", score=7),\n'
        '               Player(name="cy", score=12)])\n'
        "    s.commit()"
    )
    with Session(engine) as s, count_round_trips(engine) as rt:
        s.add_all(
            [Player(name="ann", score=10), Player(name="bob", score=7), Player(name="cy", score=12)]
        )
        s.commit()
    out(f"   committed 3 players in {rt.round_trips} round trips ({len(rt.commands)} commands)")
    out("")

    out("2. Reload in a fresh session")
    code("players = s.get_many(Player, [1, 2, 3])")
    with Session(engine) as s:
        players = s.get_many(Player, [1, 2, 3])
        for p in players:
            assert p is not None
            out(f"   {p!r}")
        assert s.get(Player, 1) is players[0], "identity map: one object per key"
        out("   s.get(Player, 1) is that same object again, and sends no command")
    out("")

    out("3. Change one field: only that field is written")
    code("ann = s.get(Player, 1)\nann.score += 5\ns.commit()")
    with Session(engine) as s:
        ann = s.get(Player, 1)
        assert ann is not None
        ann.score += 5
        with count_round_trips(engine) as rt:
            s.commit()
        hset = [c for c in rt.commands if c[0] == "HSET"]
        out(f"   wrote {hset[0][2:]} to {hset[0][1]}")
    out("")

    out("4. Query the sorted index: players with score >= 10, best first")
    code(
        "stmt = select(Player).where(col(Player.score) >= 10)"
        ".order_by(col(Player.score).desc())\n"
        "s.scalars(stmt).all()"
    )
    with Session(engine) as s:
        stmt = select(Player).where(col(Player.score) >= 10).order_by(col(Player.score).desc())
        out(f"   {s.scalars(stmt).all()!r}")
    out("")

    out("5. Two sessions update the same player: the second gets StaleDataError")
    code(
        "pa.score += 1; a.commit()      # a commits first\n"
        "pb.score += 100; b.commit()    # b read the old version"
    )
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
    out("")

    out("6. run_in_transaction retries on conflict until it commits")
    code(
        "def bump(s: Session) -> int:\n"
        "    p = s.get(Player, 2)\n"
        "    p.score += 100\n"
        "    return p.score\n"
        "run_in_transaction(bump, sessionmaker(engine))"
    )
    factory = sessionmaker(engine)

    def bump(s: Session) -> int:
        p = s.get(Player, 2)
        assert p is not None
        p.score += 100
        return p.score

    out(f"   bob's score is now {run_in_transaction(bump, factory)}")
    out("")

    _clear(engine)
    out(f"done: the demo deleted its keys ({{{PREFIX}}}:...).")
    out("Next: docs/quickstart.md walks through the same steps in your own code.")
