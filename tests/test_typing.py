"""The typed sample app (tests/typed_app/) runs, and the typed idioms catch real mistakes.

tests/test_docs.py runs `mypy --strict` over the app and the docs; here the app runs
against Redis (one-to-many, many-to-many, typed queries, a retried transaction), its
migration runs through `redmap migrate`, and mypy is shown to refuse the mistakes
the typing exists for.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import site
import subprocess
import sys
import textwrap
from datetime import date
from pathlib import Path

import redmap
from redmap import Session, select
from redmap.asyncio import create_async_engine
from tests.typed_app import todo
from tests.typed_app.models import Tag, Todo, TodoList

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - only on Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "typed_app"


def _migrate(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDMAP_URL", "PYTHONPATH")}
    return subprocess.run(
        [sys.executable, "-m", "redmap.cli", "migrate", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(ROOT)},
    )


def test_typed_app_runs_with_its_migration(
    redis_url: str, clean_redis: None, tmp_path: Path
) -> None:
    """The todo app's lists, tags, queries and retry work, and its migration backfills."""
    project = tmp_path / "project"
    shutil.copytree(APP, project / "typed_app", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [tool.redmap]
            url = "{redis_url}"
            models = "typed_app.models:reg"
            migrations = "typed_app/migrations"
            """
        )
    )
    first = _migrate(project, "upgrade", "a1")
    assert first.returncode == 0, first.stderr

    engine = redmap.create_engine(redis_url)
    try:
        factory = todo.make_factory(engine)
        home = todo.create_list(
            factory,
            "home",
            [
                Todo(title="taxes", priority=9, due=date(2026, 1, 31)),
                Todo(title="paint", priority=2, due=date(2026, 3, 1)),
                Todo(title="call mum", priority=5),
            ],
        )
        assert todo.tag(factory, 1, "money", "urgent") == ["money", "urgent"]
        assert todo.tag(factory, 3, "urgent") == ["urgent"]
        with Session(engine) as s:
            assert [t.title for t in todo.overdue(s, date(2026, 6, 1))] == ["taxes", "paint"]
            assert todo.urgent_or_undated(s, 5) == ["call mum", "taxes"]
            assert todo.titles_tagged(s, "urgent") == ["call mum", "taxes"]
            assert todo.titles_tagged(s, "nothing") == []
            the_list = s.get_one(TodoList, home)
            assert [t.title for t in the_list.todos] == ["paint", "call mum", "taxes"]
            assert s.count(select(Tag)) == 2
        assert todo.finish(factory, 1) == 2

        at_head = _migrate(project, "upgrade")
        assert at_head.returncode == 0, at_head.stderr
        assert "add_field Todo.notes" in at_head.stdout
        with Session(engine) as s:
            assert [t.notes for t in s.scalars(select(Todo))] == ["", "", ""]
        past = _migrate(project, "upgrade", "+1")
        assert past.returncode == 1
        assert past.stderr.strip() == (
            "redmap: error: already at head: +1 has no revision to move to"
        )
    finally:
        engine.dispose()


MISTAKES = '''
from datetime import date

from redmap import col, select, sessionmaker, create_engine
from typed_app.models import Todo

select(Todo).where(Todo.priority > 3)
select(Todo).where(col(Todo.due) < "tomorrow")
select(Todo).where(col(Todo.priority).in_(["high"]))
select(Todo).order_by(Todo.priority.desc())
select(Todo).where(col(Todo, "title") == "x")  # fine: a field without default, by name
Factory = sessionmaker(create_engine("redis://localhost"))
reveal_type(Factory)
reveal_type(col(Todo.due))
from redmap.asyncio import async_sessionmaker, create_async_engine
AsyncFactory = async_sessionmaker(create_async_engine("redis://localhost"))
reveal_type(AsyncFactory)
'''


def test_mypy_refuses_the_mistakes_typing_is_for(tmp_path: Path) -> None:
    """Bare fields in where(), wrong operand types and .desc() on an int are mypy errors;
    sessionmaker(engine) needs no annotation."""
    shutil.copytree(APP, tmp_path / "typed_app", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "mistakes.py").write_text(MISTAKES)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir",
         str(ROOT / ".mypy_cache" / "docs-check"), "mistakes.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")},
    )
    errors: dict[int, list[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("mistakes.py:"):
            errors.setdefault(int(line.split(":")[1]), []).append(line)
    text = proc.stdout
    assert errors, proc.stdout + proc.stderr
    assert 'Argument 1 to "where" of "Select" has incompatible type "bool"' in text, text
    assert 'Unsupported operand types for < ("ColumnOperators[date | None]" and "str")' in text
    assert 'List item 0 has incompatible type "str"; expected "int"' in text
    assert '"int" has no attribute "desc"' in text
    lines = MISTAKES.splitlines()
    by_name = next(i for i, line in enumerate(lines, 1) if 'col(Todo, "title")' in line)
    assert by_name not in errors, errors[by_name]
    assert 'Revealed type is "redmap.orm.session.sessionmaker[redmap.orm.session.Session]"' in text
    assert (
        'Revealed type is "redmap.query.expression.ColumnOperators[datetime.date | None]"'
    ) in text
    assert (
        'Revealed type is "redmap.asyncio.session.async_sessionmaker['
        'redmap.asyncio.session.AsyncSession]"'
    ) in text


def test_typed_async_app_runs(redis_url: str, clean_redis: None) -> None:
    """The asyncio twin of the todo app (tests/typed_app/atodo.py, checked by mypy
    --strict with the rest of the app in test_docs.py) runs: factory, begin(), queries,
    get_one and run_in_transaction, inferred types only."""
    from tests.typed_app import atodo

    async def main() -> None:
        engine = create_async_engine(redis_url)
        try:
            factory = atodo.make_factory(engine)
            home = await atodo.create_list(factory, "home", ["taxes", "paint"])
            async with factory() as s:
                the_list = await s.get_one(TodoList, home)
                await s.refresh(the_list, ["todos"])  # a lazy="select" list: load it first
                todos = list(the_list.todos)
                for t, (due, priority) in zip(
                    todos, [(date(2026, 1, 31), 9), (date(2026, 3, 1), 2)], strict=True
                ):
                    t.due, t.priority = due, priority
                await s.commit()
                assert await atodo.titles_due_before(s, date(2026, 6, 1)) == ["taxes", "paint"]
            first = todos[0].id
            assert first is not None
            assert await atodo.bump_priority(factory, first) == 10
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_the_editable_install_is_a_plain_path_entry() -> None:
    """The build backend installs `pip install -e` as a .pth path entry, which mypy and
    pyright follow, and ships the typing marker and templates (not an import-hook finder,
    which type checkers cannot see)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "hatchling.build"
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["redmap", "alembic_like"]
    assert project["project"]["scripts"] == {"redmap": "redmap.cli:main"}
    for marker in ("redmap/py.typed", "alembic_like/py.typed"):
        assert (ROOT / marker).is_file()
    assert (ROOT / "alembic_like" / "templates" / "revision.py.tmpl").is_file()
    for folder in map(Path, site.getsitepackages()):
        finders = list(folder.glob("__editable___redmap*finder.py"))
        assert not finders, f"an import-hook editable install: {finders}; reinstall with pip"
        for pth in folder.glob("*redmap*.pth"):
            entries = pth.read_text().split()
            assert entries and all((Path(e) / "redmap" / "py.typed").is_file() for e in entries)
