"""The models of the relationship state machine and its regression tests.

A one-to-many with ``cascade="all, delete-orphan"`` (`Parent.kids` / `Kid.parent`), a
plain one-to-many whose children are released when their owner goes
(`Team.members` / `Kid.team`) and a many-to-many (`Kid.tags` / `Tag.kids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from redmap import ForeignKey, Indexed, PrimaryKey, registry, relationship

reg = registry(prefix="pp")


@reg.mapped
@dataclass
class Parent:
    name: Annotated[str, Indexed()]
    kids: list[Kid] = relationship(back_populates="parent", cascade="all, delete-orphan")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Team:
    name: str
    members: list[Kid] = relationship(back_populates="team")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Kid:
    name: Annotated[str, Indexed()]
    parent_id: Annotated[int | None, ForeignKey("Parent")] = None
    parent: Parent | None = relationship(back_populates="kids")
    team_id: Annotated[int | None, ForeignKey("Team")] = None
    team: Team | None = relationship(back_populates="members")
    tags: list[Tag] = relationship(secondary="kid_tags", back_populates="kids")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    name: str
    kids: list[Kid] = relationship(secondary="kid_tags", back_populates="tags")
    id: Annotated[int | None, PrimaryKey()] = None
