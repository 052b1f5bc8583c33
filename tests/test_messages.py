"""Error messages a newcomer meets first: each says what went wrong and what to write instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest

from redmap import Indexed, PrimaryKey, Session, Sorted, col, registry, select
from redmap.exc import DecodeError, QueryError

reg = registry(prefix="msg")


@reg.mapped
@dataclass
class User:
    name: Annotated[str, Indexed()]
    age: Annotated[int, Sorted()] = 0
    nick: Optional[str] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


def test_is_none_in_where_suggests_equals_none(engine: Any) -> None:
    """`where(User.name is None)` passes False: the error says to write `== None`."""
    with Session(engine) as s, pytest.raises(QueryError) as err:
        s.scalars(select(User).where(User.name is None))  # type: ignore[arg-type]
    assert "where() got False, not a condition" in str(err.value)
    assert "col(Model.field) == None" in str(err.value)


def test_and_between_conditions_suggests_and_or_commas() -> None:
    """`a and b` asks a condition for its truth: the error names and_() and commas."""
    with pytest.raises(TypeError) as err:
        select(User).where(col(User.age) > 1 and col(User.age) < 9)
    assert "and_(a, b)" in str(err.value) and "separated by commas" in str(err.value)


def test_range_on_a_str_field_does_not_suggest_sorted(engine: Any) -> None:
    """A range on a str field says str cannot be Sorted() and what works instead."""
    with Session(engine) as s, pytest.raises(QueryError) as err:
        s.scalars(select(User).where(col(User, "name") > "m"))
    text = str(err.value)
    assert "a str field cannot be Sorted()" in text and "use == or in_()" in text
    with Session(engine) as s, pytest.raises(QueryError, match="cannot be Sorted"):
        s.scalars(select(User).order_by(col(User, "name")))


def test_col_refuses_what_is_not_a_mapped_field() -> None:
    """col() names the model's missing field, or the value that is not a field."""
    with pytest.raises(QueryError, match="User has no mapped field 'nmae'"):
        col(User, "nmae")
    with pytest.raises(QueryError, match=r"like col\(Player.score\); got 3"):
        col(3)


def test_model_ahead_of_its_data_suggests_a_migration(engine: Any, redis_client: Any) -> None:
    """An object written before a required field existed: the error points at migrate."""
    redis_client.hset("{msg}:user:1", mapping={"age": "3", "#v": "1"})
    redis_client.zadd("{msg}:user:#all", {"1": 1})
    with Session(engine) as s, pytest.raises(DecodeError) as err:
        s.get(User, 1)
    text = str(err.value)
    assert "nothing (field missing)" in text and "User.name" in text
    assert "redmap migrate upgrade" in text
