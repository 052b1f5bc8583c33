"""Models of the reliability suite, importable by spawned worker processes.

`Tally` is a bare counter. `Player` carries every kind of reference redmap keeps
outside the object hash: an equality index (`name`), a unique key (`email`), a
sorted index (`score`), a many-to-one/one-to-many pair with `Team` (the team's
foreign-key zset) and a many-to-many with `Badge` (link zsets on both sides).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, make_dataclass
from typing import Annotated, Any, Optional

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


# -- models built per configuration (tests/reliability/test_config_machine.py) ---------

PK_KINDS = ("gen_int", "int", "str", "gen_uuid", "uuid")
"""Primary key kinds the configuration machine draws: generated or explicit int, str,
generated or explicit UUID."""

_PK_TYPES: dict[str, Any] = {
    "gen_int": Optional[int],
    "int": Optional[int],
    "str": Optional[str],
    "gen_uuid": Optional[uuid.UUID],
    "uuid": Optional[uuid.UUID],
}


def config_models(
    prefix: str, *, pk: str, unique: bool, sharded: bool, orphans: bool
) -> tuple[registry, type[Any], type[Any]]:
    """A fresh registry holding `Team` and `Player` as one drawn configuration asks.

    `Team.players` / `Player.team` is a one-to-many through `Player.team_id`, with
    ``cascade="all, delete-orphan"`` when `orphans`; `Player.email` is `Unique()` when
    `unique` (never with `sharded`: a sharded model may only be unique on its shard key);
    `sharded` shards both models by their own primary key over 4 shards. The classes are
    built with `make_dataclass`, so that their annotations are the types themselves.
    """
    if unique and sharded:
        raise ValueError("Unique() is refused on a model sharded by another field")
    reg = registry(prefix=prefix, shards=4)
    pk_type = _PK_TYPES[pk]
    extra: dict[str, Any] = {"__shard_key__": "id"} if sharded else {}
    cascade = "all, delete-orphan" if orphans else "save-update"
    team = make_dataclass(
        "Team",
        [
            ("name", Annotated[str, Indexed()]),
            (
                "players",
                list["Player"],  # type: ignore[name-defined]
                relationship(back_populates="team", cascade=cascade),
            ),
            ("id", Annotated[pk_type, PrimaryKey()], field(default=None)),
        ],
        namespace=dict(extra),
    )
    email: Any = Annotated[Optional[str], Unique()] if unique else Optional[str]
    player = make_dataclass(
        "Player",
        [
            ("name", Annotated[str, Indexed()]),
            ("email", email, field(default=None)),
            ("score", Annotated[int, Sorted()], field(default=0)),
            ("team_id", Annotated[pk_type, ForeignKey("Team")], field(default=None)),
            ("team", Optional["Team"], relationship(back_populates="players")),
            ("id", Annotated[pk_type, PrimaryKey()], field(default=None)),
        ],
        namespace=dict(extra),
    )
    reg.mapped(team)
    reg.mapped(player)
    reg.configure()
    return reg, team, player
