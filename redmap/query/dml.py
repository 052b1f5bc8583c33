"""`update()` and `delete()` statements: data, run by `Session.execute` (API.md section 9).

A statement names a model, conditions (those `select().where()` takes) and, for an
update, the new values: constants or increments (`Player.score + 1`). Building one
touches no server; `Session.execute` runs it as one atomic flush (`redmap.orm.session`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..exc import InvalidRequestError
from .expression import ColumnElement, Increment

__all__ = ["Delete", "Result", "Update", "delete", "update"]

M = TypeVar("M")


class _Statement(Generic[M]):
    """What `update()` and `delete()` share: the model and the conditions."""

    def __init__(self, model: type[M], conditions: tuple[ColumnElement, ...] = ()) -> None:
        from ..orm.mapper import mapper_of  # the mapping layer, at run time only

        mapper_of(model)  # refuse an unmapped class at once
        self.model = model
        self.conditions = conditions

    def _with(self: Any, **changes: Any) -> Any:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


class Update(_Statement[M]):
    """`update(Model).where(...).values(field=value, ...)`."""

    values_: dict[str, Any]

    def __init__(self, model: type[M]) -> None:
        super().__init__(model)
        self.values_ = {}

    def where(self, *conditions: ColumnElement) -> Update[M]:
        """Only the objects matching every condition (as `select().where()`)."""
        updated: Update[M] = self._with(conditions=self.conditions + conditions)
        return updated

    def values(self, values: Mapping[str, Any] | None = None, **kw: Any) -> Update[M]:
        """The new values by field name: constants, or `Model.field + n` increments."""
        from ..orm.mapper import mapper_of

        given = {**(values or {}), **kw}
        mapper = mapper_of(self.model)
        for name, value in given.items():
            col = mapper.columns.get(name)
            if col is None:
                what = "a relationship" if name in mapper.relationships else "not a field"
                raise InvalidRequestError(
                    f"update({mapper.name}).values({name}=...): {name!r} is {what} of "
                    f"{mapper.name}; values() sets stored fields"
                )
            if col.primary_key:
                raise InvalidRequestError(
                    f"update({mapper.name}).values({name}=...): the primary key cannot be "
                    f"changed; delete the objects and add new ones"
                )
            if isinstance(value, Increment) and value.attribute.key != name:
                raise InvalidRequestError(
                    f"update({mapper.name}).values({name}={value!r}): an increment adds to "
                    f"the field it is given for"
                )
        updated: Update[M] = self._with(values_={**self.values_, **given})
        return updated


class Delete(_Statement[M]):
    """`delete(Model).where(...)`."""

    def where(self, *conditions: ColumnElement) -> Delete[M]:
        """Only the objects matching every condition (as `select().where()`)."""
        deleted: Delete[M] = self._with(conditions=self.conditions + conditions)
        return deleted


def update(model: type[M]) -> Update[M]:
    """An UPDATE of `model`'s objects, run by `Session.execute` (SQLAlchemy's `update`)."""
    return Update(model)


def delete(model: type[M]) -> Delete[M]:
    """A DELETE of `model`'s objects, run by `Session.execute` (SQLAlchemy's `delete`)."""
    return Delete(model)


@dataclass(frozen=True)
class Result:
    """What `Session.execute` of a statement returns: `rowcount`, the number of objects
    the statement matched (and updated or deleted)."""

    rowcount: int
