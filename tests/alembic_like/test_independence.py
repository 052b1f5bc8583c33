"""Tests for `alembic_like` as a whole: no dependency on redmap, and its public names."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import alembic_like

PACKAGE_DIR = Path(alembic_like.__file__).parent
MODULES = sorted(f"alembic_like.{info.name}" for info in pkgutil.iter_modules([str(PACKAGE_DIR)]))


def test_importing_every_module_loads_no_redmap() -> None:
    """A fresh interpreter importing every alembic_like module has no redmap module loaded."""
    code = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(PACKAGE_DIR.parent)!r})\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'redmap' or m.startswith('redmap.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
    assert len(MODULES) >= 10


def test_no_source_file_mentions_redmap_imports() -> None:
    """No import statement anywhere in alembic_like, even inside a function, names redmap."""
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "redmap" for n in names), path


def test_all_matches_public_names() -> None:
    """`alembic_like.__all__` lists exactly the public names the package defines."""
    public = {name for name in vars(alembic_like) if not name.startswith("_")}
    public -= {name.rsplit(".", 1)[1] for name in MODULES}  # submodules, once imported
    public -= {"annotations"}
    assert set(alembic_like.__all__) == public
    assert sorted(alembic_like.__all__) == alembic_like.__all__
