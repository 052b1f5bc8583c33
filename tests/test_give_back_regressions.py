"""A flush refused before it sent anything gives back the ids it was handed.

Found by the configuration state machine (seed 1021204353): a flush that takes its ids
first (a new player of a new team: the foreign key needs the team's id) and then finds
the same `Unique` value on two of its objects raised IntegrityError ("nothing was
written"), but the two id counters had moved. The ids now go back, under a WATCH of the
models' id guards, as they do when the checks refuse a flush.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import pytest

from redmap import ForeignKey, PrimaryKey, Session, Unique, registry, relationship
from redmap.exc import IntegrityError

greg = registry(prefix="giveback")


@greg.mapped
@dataclass
class GTeam:
    name: str
    players: list[GPlayer] = relationship(back_populates="team")
    id: Annotated[int | None, PrimaryKey()] = None


@greg.mapped
@dataclass
class GPlayer:
    name: str
    email: Annotated[str, Unique()]
    team_id: Annotated[int | None, ForeignKey("GTeam")] = None
    team: GTeam | None = relationship(back_populates="players")
    id: Annotated[int | None, PrimaryKey()] = None


pytestmark = pytest.mark.usefixtures("driver")


def _counters(engine: Any) -> list[Any]:
    client = engine.dialect.client
    return [client.get("{giveback}:gteam:#seq"), client.get("{giveback}:gplayer:#seq")]


def test_a_unique_value_twice_in_an_ids_first_flush_moves_no_counter(engine: Any) -> None:
    with Session(engine) as s:
        s.add(GPlayer(name="a", email="a@x"))
        s.commit()
    before = _counters(engine)
    with Session(engine) as s:
        held = s.get(GPlayer, 1)
        assert held is not None
        held.email = "w"
        s.add(GPlayer(name="b", email="w", team=GTeam(name="t")))  # its team needs an id
        with pytest.raises(IntegrityError, match="set on two objects of this flush"):
            s.commit()
        assert _counters(engine) == before
        # Fixed, the same session commits, with the ids it would have had.
        held.email = "a2@x"
        s.commit()
        assert s.get(GPlayer, 2) is not None
    assert _counters(engine) == [b"1", b"2"]


def test_ids_an_explicit_insert_took_meanwhile_are_not_handed_out_again(
    engine: Any, redis_url: str
) -> None:
    """A refused ids-first flush must not give back a range in which an explicit insert
    took an id between its INCRBY and its give-back: the id would be handed out again to
    a generated insert, which does not check its new key and would overwrite that object.
    The give-back now checks every key of the range under its WATCH."""
    import redmap

    other = redmap.create_engine(redis_url)
    try:
        with Session(engine) as s:
            s.add(GPlayer(name="a", email="taken@x"))
            s.commit()  # player counter at 1
        fired: list[bool] = []

        def explicit_insert_meanwhile(commands: Any) -> None:
            # Just before the checks of the refused flush (its ids are handed out).
            if commands and commands[0][0] == "WATCH" and not fired:
                fired.append(True)
                with Session(other) as o:
                    # id 3: handed out to the flush but unused (the extra id its INCRBY
                    # took because the flush also inserts an explicit id).
                    o.add(GPlayer(name="explicit", email="e@x", id=3))
                    o.commit()

        engine.add_listener(explicit_insert_meanwhile)
        try:
            with Session(engine) as s:
                # A new team makes the flush take its ids first; the email is taken. The
                # explicit id 50 makes its INCRBY take 2 ids (2..3): 2 is used, 3 not.
                s.add(GPlayer(name="b", email="taken@x", team=GTeam(name="t")))
                s.add(GPlayer(name="c", email="c@x", id=50))
                with pytest.raises(IntegrityError, match="already taken"):
                    s.commit()
        finally:
            engine.remove_listener(explicit_insert_meanwhile)
        assert fired
        with Session(engine) as s:
            s.add_all([GPlayer(name="g1", email="g1@x"), GPlayer(name="g2", email="g2@x")])
            s.commit()
        with Session(other) as o:
            kept = o.get(GPlayer, 3)
            assert kept is not None and kept.name == "explicit"
            names = sorted(p.name for p in o.get_many(GPlayer, range(1, 8)) if p)
            assert names == ["a", "explicit", "g1", "g2"]
    finally:
        other.dispose()
