"""The documentation's examples run as tests, so the docs cannot rot.

Every ```python block of each page below runs in order, in one namespace per page,
against the standalone test server. The namespace starts with `engine` (an engine on
that server), which is also the default engine (`redmap.configure`). Blocks fenced
```python no-run are shown to the reader and never run (URLs of servers that do not
exist, for instance).
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import redmap
import redmap.engine

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["quickstart.md", "mapping.md", "session.md", "queries.md"]


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


def runnable_blocks(text: str) -> list[Block]:
    """The ```python blocks to run; ```python no-run blocks are left out."""
    out = []
    for block in fenced_blocks(text):
        words = block.info.split()
        if words[:1] == ["python"] and "no-run" not in words[1:]:
            out.append(block)
    return out


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


@pytest.mark.parametrize("page", PAGES)
def test_examples_run(page: str, redis_url: str, clean_redis: None, restore_logging: None) -> None:
    """Each page's runnable examples execute top to bottom without error."""
    path = DOCS / page
    blocks = runnable_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{page} has no runnable ```python block"
    # A real module, so that dataclasses and string annotations can find their globals.
    module = types.ModuleType(f"_redmap_docs_{path.stem.replace('-', '_')}")
    module.__file__ = str(path)
    engine = redmap.create_engine(redis_url)
    redmap.configure(engine)
    module.__dict__["engine"] = engine
    sys.modules[module.__name__] = module
    try:
        for block in blocks:
            # Pad with newlines so tracebacks point at the line in the Markdown file.
            code = compile("\n" * (block.line - 1) + block.source, str(path), "exec")
            exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
        redmap.engine._reset_default()
        engine.dispose()
