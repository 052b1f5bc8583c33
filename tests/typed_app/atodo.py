"""The todo app's operations on asyncio: the same models, typed the same way."""

from __future__ import annotations

from datetime import date

from redmap import col, select
from redmap.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, run_in_transaction

from .models import Todo, TodoList


def make_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """A session factory; no annotation needed where it is assigned."""
    factory = async_sessionmaker(engine)
    return factory


async def create_list(
    factory: async_sessionmaker[AsyncSession], name: str, titles: list[str]
) -> int:
    """A new list of todos (one-to-many), committed; returns its id."""
    async with factory.begin() as s:
        todo_list = TodoList(name=name)
        todo_list.todos.extend(Todo(title=t) for t in titles)
        s.add(todo_list)
        await s.flush()
        assert todo_list.id is not None
        return todo_list.id


async def titles_due_before(s: AsyncSession, day: date) -> list[str]:
    """Titles of open todos due before `day`, most urgent first."""
    stmt = (
        select(Todo)
        .where(col(Todo.done) == False, col(Todo.due) < day)  # noqa: E712 - builds a condition
        .order_by(col(Todo.priority).desc())
    )
    todos: list[Todo] = (await s.scalars(stmt)).all()
    return [t.title for t in todos]


async def bump_priority(factory: async_sessionmaker[AsyncSession], todo_id: int) -> int:
    """Raise a todo's priority by one, retried on conflicts; returns the new priority."""

    async def work(s: AsyncSession) -> int:
        todo = await s.get_one(Todo, todo_id)  # typed Todo, not Todo | None
        todo.priority += 1
        return todo.priority

    return await run_in_transaction(work, session_factory=factory)
