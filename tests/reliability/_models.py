"""Models of the reliability suite, importable by spawned worker processes.

`Tally` is a bare counter. `Player` carries every kind of reference redmap keeps
outside the object hash: an equality index (`name`), a unique key (`email`), a
sorted index (`score`), a many-to-one/one-to-many pair with `Team` (the team's
foreign-key zset) and a many-to-many with `Badge` (link zsets on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Optional

from redmap import ForeignKey, Indexed, PrimaryKey, Sorted, Unique, registry, relationship

reg = registry(prefix="rel")


@reg.mapped
@dataclass
class Tally:
    value: int = 0
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Team:
    name: Annotated[str, Indexed()]
    players: list[Player] = relationship(back_populates="team")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Player:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    score: Annotated[int, Sorted()] = 0
    bio: Optional[str] = None
    team_id: Annotated[Optional[int], ForeignKey("Team")] = None
    team: Optional[Team] = relationship(back_populates="players")
    badges: list[Badge] = relationship(secondary="player_badges", back_populates="players")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Badge:
    label: str
    players: list[Player] = relationship(secondary="player_badges", back_populates="badges")
    id: Annotated[Optional[int], PrimaryKey()] = None
