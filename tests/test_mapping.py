"""Tests for `redmap.orm.registry` and `redmap.orm.mapper`: declarations and their errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated

import pytest

from redmap import (
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    registry,
    relationship,
)
from redmap.engine import Engine
from redmap.exc import InvalidRequestError, MappingError
from redmap.orm.mapper import mapper_of


def test_non_dataclass_is_mapping_error() -> None:
    """@mapped on a plain class names the class."""
    reg = registry()
    with pytest.raises(MappingError) as err:

        @reg.mapped
        class Plain:
            x: int = 0

    assert err.value.model == "Plain" and "dataclass" in str(err.value)


def test_two_primary_keys_is_mapping_error() -> None:
    """Two PrimaryKey fields are refused, naming both."""
    reg = registry()
    with pytest.raises(MappingError) as err:

        @reg.mapped
        @dataclass
        class Two:
            a: Annotated[int, PrimaryKey()]
            b: Annotated[int, PrimaryKey()]

    assert "a, b" in str(err.value) and err.value.model == "Two"


def test_unsupported_type_names_field() -> None:
    """A field type redmap cannot store is refused at decoration time."""
    reg = registry()
    with pytest.raises(MappingError) as err:

        @reg.mapped
        @dataclass
        class Bad:
            handle: complex = 0j

    assert err.value.model == "Bad" and err.value.field == "handle"


def test_marker_class_without_parentheses() -> None:
    """Annotated[int, Indexed] (the class, not an instance) is a clear error."""
    reg = registry()
    with pytest.raises(MappingError, match=r"Indexed\(\)"):

        @reg.mapped
        @dataclass
        class Oops:
            n: Annotated[int, Indexed] = 0


def test_sorted_on_bytes_and_indexed_json_are_refused() -> None:
    """Sorted needs a numeric, date, str or Enum type; JSON fields cannot be indexed."""
    reg = registry()
    with pytest.raises(MappingError, match="Sorted"):

        @reg.mapped
        @dataclass
        class S1:
            name: Annotated[bytes, Sorted()] = b""

    with pytest.raises(MappingError, match="JSON"):

        @reg.mapped
        @dataclass
        class S2:
            tags: Annotated[list[str], Unique()] = dataclasses.field(default_factory=list)


def test_primary_key_type_is_checked() -> None:
    """A float primary key is refused."""
    reg = registry()
    with pytest.raises(MappingError, match="primary key"):

        @reg.mapped
        @dataclass
        class F:
            id: Annotated[float, PrimaryKey()] = 0.0


def test_slots_dataclass_is_refused() -> None:
    """slots=True dataclasses have no __dict__ for the object state."""
    reg = registry()
    with pytest.raises(MappingError, match="slots"):

        @reg.mapped
        @dataclass(slots=True)
        class Slotted:
            x: int = 0


def test_keyspace_override_and_validation(engine: Engine) -> None:
    """__keyspace__ renames the keys; a keyspace with separators is refused."""
    reg = registry(prefix="k")

    @reg.mapped
    @dataclass
    class Player:
        __keyspace__ = "players"
        name: str = ""

    with Session(engine) as s:
        s.add(Player(name="x"))
        s.commit()
    assert mapper_of(Player).keys.object("1") == "{k}:players:1"
    with pytest.raises(MappingError):

        @reg.mapped
        @dataclass
        class Bad:
            __keyspace__ = "a:b"

    with pytest.raises(MappingError, match="already used"):

        @reg.mapped
        @dataclass
        class Player2:
            __keyspace__ = "players"


def test_implicit_id(engine: Engine) -> None:
    """A model without a PrimaryKey gets an int `id` attribute filled at flush."""
    reg = registry(prefix="imp")

    @reg.mapped
    @dataclass
    class Note:
        text: str

    n = Note(text="hi")
    assert n.id is None  # type: ignore[attr-defined]
    with Session(engine) as s:
        s.add(n)
        s.commit()
        assert n.id == 1  # type: ignore[attr-defined]
        assert s.get(Note, 1) is n


def test_forward_references_resolve_at_configure() -> None:
    """A relationship annotation naming a class defined later resolves lazily."""
    reg = registry(prefix="fwd")

    @reg.mapped
    @dataclass
    class Parent:
        kids: list[Child] = relationship()

    @reg.mapped
    @dataclass
    class Child:
        name: str = ""
        parent_id: Annotated[int | None, ForeignKey("Parent")] = None

    reg.configure()
    prop = mapper_of(Parent).relationships["kids"]
    assert prop.target is Child and prop.uselist and prop.fk_column == "parent_id"


def test_foreign_key_may_name_the_primary_key_as_in_sqlalchemy() -> None:
    """`ForeignKey("Team.id")`, as a SQLAlchemy user writes "table.column", is the same
    as `ForeignKey("Team")`; naming another field is refused, saying what to write (it
    was "no mapped class named 'Team.id'", an outside-in probe, stop 17)."""
    reg = registry(prefix="fkdot")

    @reg.mapped
    @dataclass
    class Team:
        name: str = ""
        id: Annotated[int | None, PrimaryKey()] = None

    @reg.mapped
    @dataclass
    class Player:
        team_id: Annotated[int | None, ForeignKey("Team.id")] = None
        team: Team | None = relationship()

    reg.configure()
    col = mapper_of(Player).columns["team_id"]
    assert col.foreign_key is not None and col.foreign_key.target is Team
    assert mapper_of(Player).relationships["team"].target is Team

    bad = registry(prefix="fkdot2")

    @bad.mapped
    @dataclass
    class Club:
        name: str = ""
        id: Annotated[int | None, PrimaryKey()] = None

    @bad.mapped
    @dataclass
    class Member:
        club_name: Annotated[str | None, ForeignKey("Club.name")] = None

    with pytest.raises(MappingError, match=r"names 'name', but a foreign key holds the "
                       r"primary key of Club: write ForeignKey\('Club'\) or "
                       r"ForeignKey\('Club.id'\)"):
        bad.configure()


def test_relationship_without_foreign_key_is_mapping_error() -> None:
    """A one-to-many whose target has no foreign key back is refused at configure."""
    reg = registry(prefix="nofk")

    @reg.mapped
    @dataclass
    class P:
        kids: list[K] = relationship()

    @reg.mapped
    @dataclass
    class K:
        name: str = ""

    with pytest.raises(MappingError, match="ForeignKey"):
        reg.configure()


def test_relationship_is_a_dataclass_field() -> None:
    """relationship() returns a dataclasses.Field defaulting to None / an empty list."""
    reg = registry(prefix="rf")

    @reg.mapped
    @dataclass
    class A:
        things: list[B] = relationship(back_populates="owner")

    @reg.mapped
    @dataclass
    class B:
        owner_id: Annotated[int | None, ForeignKey("A")] = None
        owner: A | None = relationship(back_populates="things")

    f = {x.name: x for x in dataclasses.fields(A)}
    assert f["things"].default is None
    a = A()
    assert a.things == [] and B().owner is None


def test_unmapped_class_in_session_is_refused(engine: Engine) -> None:
    """Adding an instance of an unmapped class raises InvalidRequestError."""

    @dataclass
    class Loose:
        x: int = 0

    with Session(engine) as s, pytest.raises(InvalidRequestError):
        s.add(Loose())
