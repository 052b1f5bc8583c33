"""Tests for `alembic_like.config`."""

from __future__ import annotations

from pathlib import Path

import pytest

from alembic_like.config import Config, add_table, read_table
from alembic_like.exc import CommandError

PYPROJECT = """\
# keep this comment
[project]
name = "demo"

[tool.other]
x = 1
"""


def test_load_reads_the_table(tmp_path: Path) -> None:
    """url, models and migrations come from [tool.<name>]; unknown keys stay in `table`."""
    path = tmp_path / "pyproject.toml"
    path.write_text(
        PYPROJECT + '[tool.demo]\nurl = "redis://h/0"\nmodels = "app:reg"\n'
        'migrations = "db/migrations"\nextra = true\n'
    )
    config = Config.load(path, "demo")
    assert (config.url, config.models, config.migrations) == (
        "redis://h/0",
        "app:reg",
        "db/migrations",
    )
    assert config.migrations_dir == tmp_path / "db" / "migrations"
    assert config.table["extra"] is True


def test_defaults_without_file_or_table(tmp_path: Path) -> None:
    """A missing file or table gives the defaults; --url wins over the table."""
    config = Config.load(tmp_path / "pyproject.toml", "demo", url="redis://cli")
    assert config.url == "redis://cli" and config.migrations == "migrations"
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    assert Config.load(tmp_path / "pyproject.toml", "demo").table == {}


def test_bad_values_are_reported(tmp_path: Path) -> None:
    """A non-string setting or invalid TOML raises CommandError naming the file."""
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.demo]\nurl = 3\n")
    with pytest.raises(CommandError, match="tool.demo.url must be a string"):
        Config.load(path, "demo")
    path.write_text("[tool.demo\n")
    with pytest.raises(CommandError, match="Cannot read"):
        Config.load(path, "demo")


def test_add_table_appends_and_keeps_text(tmp_path: Path) -> None:
    """add_table appends the table, leaving every existing byte in place."""
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT.rstrip("\n"))
    assert add_table(path, "demo", {"url": 'redis://"q"\\', "migrations": "migrations"})
    text = path.read_text()
    assert text.startswith(PYPROJECT.rstrip("\n"))
    assert read_table(path, "demo") == {"url": 'redis://"q"\\', "migrations": "migrations"}
    assert read_table(path, "other") == {"x": 1}
    assert not add_table(path, "demo", {"url": "other"})
    assert path.read_text() == text


def test_add_table_creates_file(tmp_path: Path) -> None:
    """add_table creates a missing pyproject.toml holding only the table."""
    path = tmp_path / "pyproject.toml"
    assert add_table(path, "demo", {"migrations": "m"})
    assert path.read_text() == '[tool.demo]\nmigrations = "m"\n'
