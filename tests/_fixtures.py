"""Models shared by the test modules (as SQLAlchemy's `_fixtures.py`)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any

from redmap import Indexed, PrimaryKey, Sorted, Unique, registry

reg = registry(prefix="t")


@reg.mapped
@dataclass
class Author:
    name: Annotated[str, Indexed()]
    email: Annotated[str, Unique()]
    age: Annotated[int, Sorted()] = 0
    bio: str | None = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Counter:
    value: int = 0
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Doc:
    slug: Annotated[str, PrimaryKey()]
    body: str = ""


@reg.mapped
@dataclass
class Token:
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None
    label: str = ""


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


@dataclass
class Point:
    x: int
    y: int


@reg.mapped
@dataclass
class Everything:
    s: str = ""
    i: int = 0
    f: float = 0.0
    b: bool = False
    raw: bytes = b""
    d: Decimal = Decimal("0")
    when: dt.datetime = dt.datetime(2000, 1, 1)
    day: dt.date = dt.date(2000, 1, 1)
    at: dt.time = dt.time(0, 0)
    span: dt.timedelta = dt.timedelta(0)
    u: uuid.UUID = uuid.UUID(int=0)
    color: Color = Color.RED
    maybe: int | None = None
    items: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    point: Point | None = None
    id: Annotated[int | None, PrimaryKey()] = None
