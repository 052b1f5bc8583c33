"""The todo app's models, as a user declares them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Annotated, Optional

from redmap import ForeignKey, Indexed, PrimaryKey, Sorted, registry, relationship

reg = registry(prefix="todo")


@reg.mapped
@dataclass
class TodoList:
    """A named list of todos."""

    name: Annotated[str, Indexed()]
    todos: list[Todo] = relationship(back_populates="todo_list", order_by="Todo.priority")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Todo:
    """One thing to do, in one list, with any number of tags."""

    title: str
    priority: Annotated[int, Sorted()] = 0
    done: Annotated[bool, Indexed()] = False
    due: Annotated[Optional[date], Sorted()] = None
    notes: Optional[str] = None  # added later: migrations/versions/b2_notes.py fills it in
    list_id: Annotated[Optional[int], ForeignKey("TodoList")] = None
    todo_list: Optional[TodoList] = relationship(back_populates="todos")
    tags: list[Tag] = relationship(secondary="todo_tags", back_populates="todos")
    id: Annotated[Optional[int], PrimaryKey()] = None


@reg.mapped
@dataclass
class Tag:
    """A label shared by many todos."""

    name: Annotated[str, Indexed()]
    todos: list[Todo] = relationship(secondary="todo_tags", back_populates="tags")
    id: Annotated[Optional[int], PrimaryKey()] = None
