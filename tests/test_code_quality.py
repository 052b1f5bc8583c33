"""The code checks CI must see: ruff and mypy --strict are clean, the public API is exact."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import redmap

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[dev]')"
    return [found]


def test_ruff_is_clean() -> None:
    """ruff check (including the pickle/eval rules S301/S307) reports nothing."""
    proc = subprocess.run(
        [
            *_tool("ruff"),
            "check",
            *[
                d
                for d in ("redmap", "alembic_like", "tests", "benchmarks")
                if ROOT.joinpath(d).is_dir()
            ],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_is_clean() -> None:
    """mypy --strict over redmap and alembic_like reports no error."""
    proc = subprocess.run(
        [*_tool("mypy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names_match_all() -> None:
    """redmap's __all__ lists exactly the public names it exports."""
    public = {n for n in vars(redmap) if not n.startswith("_") and n != "annotations"}
    modules = {n for n, v in vars(redmap).items() if type(v).__name__ == "module"}
    assert set(redmap.__all__) == public - modules


def test_no_pickle_or_eval_in_library() -> None:
    """Nothing read from Redis can be executed: no pickle, marshal or eval in the library."""
    for path in [
        *ROOT.joinpath("redmap").rglob("*.py"),
        *ROOT.joinpath("alembic_like").rglob("*.py"),
    ]:
        text = path.read_text()
        for banned in (
            r"\bimport pickle",
            r"\bimport marshal",
            r"(?<![\w.])eval\(",
            r"(?<![\w.])exec\(",
        ):
            assert not re.search(banned, text), f"{banned!r} in {path}"
