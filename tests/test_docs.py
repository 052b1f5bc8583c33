"""The documentation's examples run as tests, and type-check, so the docs cannot rot.

Every ```python block of every page in docs/ and of README.md runs in order, in one
namespace per page, with `REDMAP_URL` naming the standalone test server and a fresh
empty folder as the working directory: pages define their own `engine` as a reader
would. A block fenced ```python no-run is shown and never run; its first line must be a
comment saying why (`# Not run by the tests: ...`), so the reader sees it too.

The same blocks, one file per page, and the typed sample app in tests/typed_app/ are
then checked by `mypy --strict` from a folder outside the repository: that is what a
user's type checker sees after the README's `pip install -e ...`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import redmap
import redmap.engine
from redmap.orm import events as orm_events

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
TYPED_APP = Path(__file__).resolve().parent / "typed_app"
NO_RUN_REASON = re.compile(r"#\s*Not run by the tests( here)?: \S")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts, its info string and its source."""

    line: int  # 1-based line number of the first line of code
    info: str  # what follows the opening ``` ("python", "python no-run", "")
    source: str


def fenced_blocks(text: str) -> Iterator[Block]:
    """Every fenced block of a Markdown text, in order (``` fences, not indented code)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = lines[i].strip()
        if opening.startswith("```"):
            info = opening[3:].strip()
            body: list[str] = []
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                body.append(lines[j])
                j += 1
            if j == len(lines):
                raise AssertionError(f"unclosed code fence opened at line {i + 1}")
            yield Block(line=i + 2, info=info, source="\n".join(body) + "\n")
            i = j + 1
        else:
            i += 1


def _is_python(block: Block) -> bool:
    return block.info.split()[:1] == ["python"]


def runnable_blocks(text: str) -> list[Block]:
    """The ```python blocks to run; ```python no-run blocks are left out."""
    return [b for b in fenced_blocks(text) if _is_python(b) and "no-run" not in b.info.split()]


def page_module_source(text: str) -> str:
    """A page's runnable blocks as one module whose line numbers are the page's."""
    out: list[str] = []
    for block in runnable_blocks(text):
        out.extend([""] * (block.line - 1 - len(out)))
        out.extend(block.source.splitlines())
    return "\n".join(out) + "\n"


def _page_id(path: Path) -> str:
    return path.name


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what the examples do to logging (handlers on the root, the engine's level)."""
    root = logging.getLogger()
    engine_log = logging.getLogger("redmap.engine")
    handlers, root_level, engine_level = list(root.handlers), root.level, engine_log.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
        engine_log.setLevel(engine_level)


def test_fenced_blocks_are_found_with_their_line_numbers() -> None:
    """The block finder returns the info string, the first code line and the code."""
    text = "intro\n```python\nx = 1\n```\n\n```python no-run\ny\n```\n```\nplain\n```\n"
    blocks = list(fenced_blocks(text))
    assert [(b.line, b.info, b.source) for b in blocks] == [
        (3, "python", "x = 1\n"),
        (7, "python no-run", "y\n"),
        (10, "", "plain\n"),
    ]
    assert [b.source for b in runnable_blocks(text)] == ["x = 1\n"]
    assert page_module_source(text) == "\n\nx = 1\n"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_no_run_blocks_say_why(page: Path) -> None:
    """Every block left out of the run starts with a visible reason."""
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        if _is_python(block) and "no-run" in block.info.split():
            first = block.source.splitlines()[0].strip() if block.source.strip() else ""
            assert NO_RUN_REASON.match(first), (
                f"{page.name}:{block.line}: a no-run block must start with "
                "'# Not run by the tests: <why>'"
            )


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_examples_run(
    page: Path,
    redis_url: str,
    clean_redis: None,
    restore_logging: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each page's runnable examples execute top to bottom without error."""
    text = page.read_text(encoding="utf-8")
    blocks = runnable_blocks(text)
    if not blocks:
        assert "```python" not in text.replace("```python no-run", "")
        return
    monkeypatch.setenv("REDMAP_URL", redis_url)
    monkeypatch.chdir(tmp_path)
    redmap.engine._reset_default()
    # A real module, so that dataclasses and string annotations can find their globals.
    module = types.ModuleType(f"_redmap_docs_{page.stem.replace('-', '_').lower()}")
    module.__file__ = str(page)
    sys.modules[module.__name__] = module
    # Listeners a page registers (docs/events.md) are global: removed after it, so that
    # the event tests find the tables as a fresh process does.
    mapper_before = {k: {n: list(v) for n, v in d.items()} for k, d in orm_events._mapper.items()}
    session_before = {
        k: {n: list(v) for n, v in d.items()} for k, d in orm_events._session.items()
    }
    try:
        for block in blocks:
            # Pad with newlines so tracebacks point at the line in the Markdown file.
            code = compile("\n" * (block.line - 1) + block.source, str(page), "exec")
            exec(code, module.__dict__)
    finally:
        orm_events._mapper.clear()
        orm_events._mapper.update(mapper_before)
        orm_events._mapper_cache.clear()
        for target in list(orm_events._session.keys()):
            if target in session_before:
                orm_events._session[target] = session_before[target]
            else:
                del orm_events._session[target]
        del sys.modules[module.__name__]
        for value in list(module.__dict__.values()):
            if isinstance(value, redmap.Engine):
                value.dispose()
        redmap.engine._reset_default()


def test_examples_and_the_typed_app_pass_mypy_strict(tmp_path: Path) -> None:
    """mypy --strict, run outside the repository, accepts every page's examples and the
    typed sample app: the installed package is visible to type checkers and the documented
    idioms (col() in queries, sessionmaker, relationships) type-check."""
    work = tmp_path / "check"
    work.mkdir()
    checked: dict[str, Path] = {}
    for page in PAGES:
        source = page_module_source(page.read_text(encoding="utf-8"))
        if source.strip():
            name = f"docs_{page.stem.replace('-', '_').lower()}.py"
            (work / name).write_text(source, encoding="utf-8")
            checked[name] = page
    shutil.copytree(TYPED_APP, work / "typed_app", ignore=shutil.ignore_patterns("__pycache__"))
    cache = ROOT / ".mypy_cache" / "docs-check"
    proc = subprocess.run(
        # --warn-unreachable: code mypy believes unreachable would otherwise go unchecked.
        [sys.executable, "-m", "mypy", "--strict", "--warn-unreachable", "--cache-dir",
         str(cache), "--no-color-output", *sorted(checked), "typed_app"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "PYTHONPATH")},
    )
    report = proc.stdout
    for name, page in checked.items():  # point at the Markdown pages, whose lines they keep
        report = report.replace(name, str(page.relative_to(ROOT)))
    assert proc.returncode == 0, report + proc.stderr
