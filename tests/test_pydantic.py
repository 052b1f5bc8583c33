"""`pydantic.dataclasses.dataclass` classes map like plain dataclasses (issue 17).

pydantic validates in its own `__init__`, before redmap's attribute descriptors see the
values; redmap then tracks, writes and loads the object as any mapped dataclass (loading
does not run pydantic's validation: it fills `__dict__`, as for every model).
"""

from __future__ import annotations

from typing import Annotated, Optional

import pydantic
import pydantic.dataclasses
import pytest

import redmap
from redmap import Indexed, PrimaryKey, Session, Sorted, registry, select

preg = registry(prefix="pyd")


@preg.mapped
@pydantic.dataclasses.dataclass
class Member:
    name: Annotated[str, Indexed()]
    age: Annotated[int, Sorted()] = 0
    id: Annotated[Optional[int], PrimaryKey()] = None


def test_a_pydantic_dataclass_maps_and_round_trips(engine: redmap.Engine) -> None:
    with Session(engine) as s:
        s.add_all([Member(name="a", age=30), Member(name="b", age=20)])
        s.commit()
        a = s.scalars(select(Member).where(Member.name == "a")).one()
        a.age = 31
        s.commit()
    with Session(engine) as s:
        youngest_first = s.scalars(select(Member).order_by(Member.age)).all()
        assert [(m.name, m.age) for m in youngest_first] == [("b", 20), ("a", 31)]
        assert isinstance(youngest_first[0], Member)


def test_pydantic_still_validates_construction(engine: redmap.Engine) -> None:
    with pytest.raises(pydantic.ValidationError):
        Member(name="c", age="not a number")  # type: ignore[arg-type]
    # pydantic's coercion applies before redmap sees the value.
    m = Member(name="d", age="7")  # type: ignore[arg-type]
    assert m.age == 7
    with Session(engine) as s:
        s.add(m)
        s.commit()
        assert s.get_one(Member, m.id).age == 7
