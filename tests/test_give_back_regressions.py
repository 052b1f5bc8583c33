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
