"""The todo app's operations: typed sessions, relationships and queries."""

from __future__ import annotations

from datetime import date

from redmap import Engine, Session, and_, col, or_, run_in_transaction, select, sessionmaker
from redmap.exc import NoResultFound

from .models import Tag, Todo, TodoList


def make_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory; no annotation needed where it is assigned."""
    factory = sessionmaker(engine, expire_on_commit=False)
    return factory


def create_list(factory: sessionmaker[Session], name: str, todos: list[Todo]) -> int:
    """A new list holding `todos` (one-to-many), committed; returns its id."""
    with factory.begin() as s:
        todo_list = TodoList(name=name)
        todo_list.todos.extend(todos)
        s.add(todo_list)
        s.flush()
        assert todo_list.id is not None
        return todo_list.id


def tag(factory: sessionmaker[Session], todo_id: int, *names: str) -> list[str]:
    """Attach tags by name (many-to-many), creating the missing ones; returns all its tags."""
    with factory.begin() as s:
        todo = s.get(Todo, todo_id)
        if todo is None:
            raise NoResultFound(f"no todo {todo_id}")
        for name in names:
            found = s.scalars(select(Tag).where(col(Tag, "name") == name)).one_or_none()
            todo.tags.append(found if found is not None else Tag(name=name))
        return sorted(t.name for t in todo.tags)


def overdue(s: Session, today: date) -> list[Todo]:
    """Open todos due before `today`, most urgent first."""
    stmt = (
        select(Todo)
        .where(col(Todo.done) == False, col(Todo.due) < today)  # noqa: E712 - builds a condition
        .order_by(col(Todo.priority).desc())
    )
    return s.scalars(stmt).all()


def urgent_or_undated(s: Session, min_priority: int) -> list[str]:
    """Titles of open todos that are urgent or have no due date, by priority."""
    stmt = (
        select(Todo)
        .where(
            and_(
                col(Todo.done) == False,  # noqa: E712
                or_(col(Todo.priority) >= min_priority, col(Todo.due) == None),  # noqa: E711
            )
        )
        .order_by(col(Todo.priority))
    )
    return [t.title for t in s.scalars(stmt)]


def titles_tagged(s: Session, name: str) -> list[str]:
    """Titles of the todos carrying the tag `name`, read through the relationship."""
    found = s.scalars(select(Tag).where(col(Tag, "name") == name)).one_or_none()
    return sorted(t.title for t in found.todos) if found is not None else []


def finish(factory: sessionmaker[Session], todo_id: int) -> int:
    """Mark a todo done, retrying on a conflict; returns how many are still open."""

    def work(s: Session) -> int:
        todo = s.get(Todo, todo_id)
        if todo is None:
            raise NoResultFound(f"no todo {todo_id}")
        todo.done = True
        s.flush()
        return s.count(select(Todo).where(col(Todo.done) == False))  # noqa: E712

    return run_in_transaction(work, factory)
