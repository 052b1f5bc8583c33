"""Settings from a `[tool.<name>]` table in pyproject.toml; owns `Config` and `add_table`.

Called by `cli` (which loads the config once per run), by `command` (paths, url,
`Messaging`) and by hosts (`url`, `models`). The file is only ever read with tomllib
and appended to as text, so comments and layout around the table survive.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic_like.exc import CommandError
from alembic_like.messaging import Messaging

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - only on Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["DEFAULT_MIGRATIONS", "Config", "add_table", "read_table"]

DEFAULT_MIGRATIONS = "migrations"
_KEYS = ("url", "models", "migrations")


@dataclass
class Config:
    """What a command needs to know: the file, the tool's table and where output goes.

    `path` is the pyproject.toml; `migrations` is relative to its directory.
    `table` holds the whole `[tool.<name>]` table, including keys alembic_like does
    not know, for hosts to read.
    """

    path: Path
    name: str = "alembic_like"
    url: str | None = None
    models: str | None = None
    migrations: str = DEFAULT_MIGRATIONS
    table: dict[str, Any] = field(default_factory=dict)
    messaging: Messaging = field(default_factory=Messaging)

    @classmethod
    def load(
        cls,
        path: str | Path = "pyproject.toml",
        name: str = "alembic_like",
        *,
        url: str | None = None,
        messaging: Messaging | None = None,
    ) -> Config:
        """Read `[tool.<name>]` from `path`; a missing file or table gives the defaults.

        `url`, when given (the CLI's `--url`), wins over the table's.
        """
        file = Path(path)
        table = read_table(file, name) or {}
        values: dict[str, str] = {}
        for key in _KEYS:
            value = table.get(key)
            if value is not None and not isinstance(value, str):
                raise CommandError(
                    f"{file}: tool.{name}.{key} must be a string, got {type(value).__name__}"
                )
            if value is not None:
                values[key] = value
        return cls(
            path=file,
            name=name,
            url=url if url is not None else values.get("url"),
            models=values.get("models"),
            migrations=values.get("migrations", DEFAULT_MIGRATIONS),
            table=dict(table),
            messaging=messaging if messaging is not None else Messaging(),
        )

    @property
    def root(self) -> Path:
        """The directory holding the pyproject.toml; relative paths start here."""
        return self.path.parent

    @property
    def migrations_dir(self) -> Path:
        """The migrations directory (holding `versions/` and `script.py.tmpl`)."""
        return self.root / self.migrations


def read_table(path: Path, name: str) -> dict[str, Any] | None:
    """The `[tool.<name>]` table of the TOML file at `path`; None when file or table is absent."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CommandError(f"Cannot read {path}: {exc}") from exc
    tool = data.get("tool")
    table = tool.get(name) if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise CommandError(f"{path}: tool.{name} must be a table")
    return table


def add_table(path: Path, name: str, values: Mapping[str, str]) -> bool:
    """Append `[tool.<name>]` with `values` to `path` (created if missing).

    Returns False, writing nothing, when the table is already there. The existing
    text is kept byte for byte; only new lines are added at the end.
    """
    if read_table(path, name) is not None:
        return False
    lines = [f"[tool.{name}]"] + [f"{key} = {_toml_string(v)}" for key, v in values.items()]
    block = "\n".join(lines) + "\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if old and not old.endswith("\n"):
        block = "\n\n" + block
    elif old.strip():
        block = "\n" + block
    with path.open("a", encoding="utf-8") as file:
        file.write(block)
    return True


def _toml_string(value: str) -> str:
    out = ['"']
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)
