"""Tests for `redmap.validates`: validators on construction and assignment, never on load."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

from redmap import (
    ForeignKey,
    PrimaryKey,
    Session,
    Unique,
    event,
    inspect,
    registry,
    relationship,
    validates,
)
from redmap.asyncio import AsyncSession, create_async_engine
from redmap.engine import Engine
from redmap.exc import MappingError

reg = registry(prefix="va")

# Every call of a validator below, as (model, key, value).
CALLS: list[tuple[str, str, Any]] = []


class Normalized:
    """An unmapped base whose validator the mapped classes below inherit."""

    @validates("nick")
    def _strip_nick(self, key: str, value: str | None) -> str | None:
        CALLS.append((type(self).__name__, key, value))
        return None if value is None else value.strip()


@reg.mapped
@dataclass
class Account(Normalized):
    email: Annotated[str, Unique()]
    nick: str | None = None
    age: int = 0
    id: Annotated[int | None, PrimaryKey()] = None

    @validates("email")
    def check_email(self, key: str, value: str) -> str:
        CALLS.append(("Account", key, value))
        if "@" not in value:
            raise ValueError(f"not an email: {value!r}")
        return value.lower()

    @validates("age")
    def check_age(self, key: str, value: int) -> int:
        CALLS.append(("Account", key, value))
        if value < 0:
            raise ValueError("age cannot be negative")
        return value


@reg.mapped
@dataclass
class Club:
    name: str
    open: bool = True
    members: list[Member] = relationship(back_populates="club")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Member:
    name: str
    club_id: Annotated[int | None, ForeignKey("Club")] = None
    club: Club | None = relationship(back_populates="members")
    id: Annotated[int | None, PrimaryKey()] = None

    @validates("club")
    def check_club(self, key: str, value: Club | None) -> Club | None:
        CALLS.append(("Member", key, value))
        if value is not None and not value.open:
            raise ValueError(f"club {value.name} is closed")
        return value

    @validates("club_id")
    def check_club_id(self, key: str, value: int | None) -> int | None:
        CALLS.append(("Member", key, value))
        return value


@pytest.fixture(autouse=True)
def _calls() -> None:
    CALLS.clear()


class TestConstructionAndAssignment:
    def test_constructor_runs_validators(self) -> None:
        """The dataclass constructor's assignments go through the validators, defaults
        included, and the returned value is stored."""
        a = Account(email="Ann@Example.COM", nick="  ann ")
        assert a.email == "ann@example.com"
        assert a.nick == "ann"
        assert ("Account", "age", 0) in CALLS

    def test_constructor_refused(self) -> None:
        """A validator's exception propagates out of the constructor."""
        with pytest.raises(ValueError, match="not an email"):
            Account(email="nobody")

    def test_assignment_runs_validator(self, engine: Engine, redis_client: redis.Redis) -> None:
        """Every assignment is validated, and the flush writes the validated value."""
        with Session(engine) as s:
            a = Account(email="a@x")
            s.add(a)
            s.commit()
            a.email = "B@X"
            assert a.email == "b@x"
            s.commit()
        assert redis_client.hget("{va}:account:1", "email") == b"b@x"
        assert redis_client.get("{va}:account:#uq:email:b%40x") == b"1"

    def test_refused_assignment_leaves_the_attribute(self, engine: Engine) -> None:
        """A refused value is not stored and does not make the object dirty."""
        with Session(engine) as s:
            a = Account(email="a@x", age=3)
            s.add(a)
            s.commit()
            assert a.age == 3
            with pytest.raises(ValueError, match="negative"):
                a.age = -1
            assert a.age == 3
            assert not s.dirty
            assert not inspect(a).modified
            assert inspect(a).attrs["age"].history.unchanged == [3]

    def test_validator_runs_before_set_listeners(self) -> None:
        """A `set` listener sees the value the validator returned."""
        seen: list[Any] = []

        def on_set(target: Any, value: Any, old: Any, initiator: Any) -> None:
            seen.append(value)

        event.listen(Account.email, "set", on_set)
        try:
            Account(email="UP@X")
        finally:
            event.remove(Account.email, "set", on_set)
        assert seen == ["up@x"]
        assert Account.email.hooks is not None  # type: ignore[attr-defined]


class TestLoading:
    @pytest.mark.usefixtures("driver")
    def test_loading_does_not_validate(self, engine: Engine, redis_client: redis.Redis) -> None:
        """Values read from Redis are not validated again, even ones the validator
        would refuse now (written by another program, or before the rule existed)."""
        with Session(engine) as s:
            s.add(Account(email="a@x", age=1))
            s.commit()
        redis_client.hset("{va}:account:1", mapping={"email": "NOT-AN-EMAIL", "age": "-5"})
        CALLS.clear()
        with Session(engine) as s:
            a = s.get(Account, 1)
            assert a is not None
            assert (a.email, a.age) == ("NOT-AN-EMAIL", -5)
            s.refresh(a)
            s.expire(a)
            assert a.age == -5
        assert CALLS == []

    def test_asyncsession_validates_on_assignment_not_on_load(
        self, redis_url: str, clean_redis: None
    ) -> None:
        """Under an AsyncSession: constructing and assigning validate, `get` does not."""

        async def main() -> None:
            engine = create_async_engine(redis_url)
            try:
                async with AsyncSession(engine) as s:
                    s.add(Account(email="A@X", age=2))
                    await s.commit()
                CALLS.clear()
                async with AsyncSession(engine) as s:
                    a = await s.get(Account, 1)
                    assert a is not None and a.email == "a@x"
                    assert CALLS == []
                    with pytest.raises(ValueError):
                        a.age = -2
                    a.age = 4
                    await s.commit()
                async with AsyncSession(engine) as s:
                    again = await s.get(Account, 1)
                    assert again is not None and again.age == 4
            finally:
                await engine.dispose()

        asyncio.run(main())


class TestRelationships:
    def test_many_to_one_validator(self, engine: Engine) -> None:
        """A many-to-one validator sees the related object and can refuse it; the
        foreign key redmap sets to follow it is not validated (the ORM's own)."""
        with Session(engine) as s:
            open_club, closed = Club(name="open"), Club(name="closed", open=False)
            s.add_all([open_club, closed])
            s.commit()
            m = Member(name="m")
            s.add(m)
            CALLS.clear()
            m.club = open_club
            assert CALLS == [("Member", "club", open_club)]
            assert m.club_id == open_club.id
            with pytest.raises(ValueError, match="closed"):
                m.club = closed
            assert m.club is open_club and m.club_id == open_club.id
            s.commit()
            assert m.club_id == open_club.id

    def test_list_relationship_refused_at_mapping(self) -> None:
        """A validator on a list relationship is a MappingError at @registry.mapped."""
        other = registry(prefix="va2")

        @other.mapped
        @dataclass
        class Child:
            parent_id: Annotated[int | None, ForeignKey("Parent")] = None
            id: Annotated[int | None, PrimaryKey()] = None

        with pytest.raises(MappingError, match="list relationship"):

            @other.mapped
            @dataclass
            class Parent:
                children: list[Child] = relationship()
                id: Annotated[int | None, PrimaryKey()] = None

                @validates("children")
                def check(self, key: str, value: Any) -> Any:
                    return value


class TestDeclaration:
    def test_unknown_name_refused(self) -> None:
        """Naming no field or relationship is a MappingError naming the method."""
        other = registry(prefix="va3")
        with pytest.raises(MappingError, match="neither a field nor a relationship"):

            @other.mapped
            @dataclass
            class Thing:
                name: str = ""

                @validates("nmae")
                def check(self, key: str, value: str) -> str:
                    return value

    def test_two_validators_for_one_field_refused(self) -> None:
        """Two methods of one class validating the same field: MappingError."""
        other = registry(prefix="va4")
        with pytest.raises(MappingError, match="two @validates methods"):

            @other.mapped
            @dataclass
            class Thing:
                name: str = ""

                @validates("name")
                def first(self, key: str, value: str) -> str:
                    return value

                @validates("name")
                def second(self, key: str, value: str) -> str:
                    return value

    def test_subclass_overrides_a_base_validator(self) -> None:
        """A class's own validator for a name replaces the one of its base."""
        other = registry(prefix="va5")

        @other.mapped
        @dataclass
        class Thing(Normalized):
            nick: str | None = None

            @validates("nick")
            def shout(self, key: str, value: str | None) -> str | None:
                return None if value is None else value.upper()

        assert Thing(nick=" x ").nick == " X "
        assert inspect(Thing).validators["nick"] is Thing.__dict__["shout"]

    def test_validates_needs_names(self) -> None:
        """`@validates()` without a name is a TypeError at once."""
        with pytest.raises(TypeError):
            validates()

    def test_inspect_lists_validators(self) -> None:
        """`inspect(Model).validators` names each validated attribute's method."""
        assert set(inspect(Account).validators) == {"email", "age", "nick"}
        assert inspect(Member).validators["club"] is Member.__dict__["check_club"]
