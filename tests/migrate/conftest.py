"""Fixtures for the migration tests: a temporary project driven through the real CLI.

`project` is a folder with a pyproject.toml (`[tool.redmap]` naming `models:reg`) and a
models module; `project.run(...)` runs `python -m redmap.cli migrate ...` in it against
the test server (URL in `REDMAP_URL`), and `project.models()` imports the same models
into the test process to read and write objects through redmap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

import redmap

REPO = Path(__file__).resolve().parents[2]

PYPROJECT = """\
[project]
name = "demo"

[tool.redmap]
models = "models:reg"
"""

REVISION = '''\
"""{message}"""

revision = {rev!r}
down_revision = {down!r}


def upgrade(op):
{upgrade}


def downgrade(op):
{downgrade}
'''


@dataclass
class Result:
    """What one CLI run returned."""

    code: int
    out: str
    err: str


@dataclass
class Project:
    """A temporary redmap project with a migrations folder, run through the CLI."""

    root: Path
    url: str
    client: redis.Redis
    env: dict[str, str] = field(default_factory=dict)
    _engine: redmap.Engine | None = None

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env["REDMAP_URL"] = self.url
        env.update(self.env)
        env.update(extra or {})
        return env

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "redmap.cli", "migrate", *args]

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
        """Run `redmap migrate *args` to completion."""
        done = subprocess.run(
            self.command(*args),
            cwd=self.root,
            env=self.environ(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run and assert exit code 0; returns stdout."""
        result = self.run(*args, env=env)
        assert result.code == 0, f"{args}: exit {result.code}\n{result.out}\n{result.err}"
        return result.out

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start `redmap migrate *args` without waiting; stdout is a line-buffered pipe."""
        return subprocess.Popen(
            self.command(*args),
            cwd=self.root,
            env=self.environ(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def write_models(self, source: str) -> None:
        """Replace models.py (the module `[tool.redmap] models` names)."""
        (self.root / "models.py").write_text(textwrap.dedent(source))

    def models(self) -> ModuleType:
        """models.py imported into this process under a fresh module name."""
        return self.models_from(self.root / "models.py")

    def models_from(self, path: Path) -> ModuleType:
        """A models file imported into this process under a fresh module name."""
        name = f"_migrate_models_{uuid.uuid4().hex}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclass annotations resolve through sys.modules
        spec.loader.exec_module(module)
        return module

    def write_revision(
        self,
        rev: str,
        down: str | None,
        upgrade: str,
        downgrade: str = "op.reverse_of(upgrade)",
        *,
        header: str = "",
        message: str = "",
    ) -> Path:
        """Write migrations/versions/<rev>.py with these function bodies."""
        versions = self.root / "migrations" / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        text = REVISION.format(
            message=message or rev,
            rev=rev,
            down=down,
            upgrade=textwrap.indent(textwrap.dedent(upgrade).strip(), "    "),
            downgrade=textwrap.indent(textwrap.dedent(downgrade).strip(), "    "),
        )
        path = versions / f"{rev}.py"
        path.write_text(textwrap.dedent(header) + text)
        return path

    @property
    def engine(self) -> redmap.Engine:
        if self._engine is None:
            self._engine = redmap.create_engine(self.url)
        return self._engine

    def heads(self) -> list[str]:
        """The heads stored in Redis (prefix `app`)."""
        raw = self.client.get("{app}:#meta:migrate:heads")
        return [] if raw is None else list(json.loads(raw)["heads"])


@pytest.fixture
def project(tmp_path: Path, redis_client: redis.Redis, redis_url: str) -> Iterator[Project]:
    """An empty server and a project folder whose pyproject names `models:reg`."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    proj = Project(tmp_path, redis_url, redis_client)
    try:
        yield proj
    finally:
        if proj._engine is not None:
            proj._engine.dispose()


def stored(client: redis.Redis, match: str = "{app}:*") -> dict[bytes, Any]:
    """Every data key with its contents, object versions and incarnations (`#v`, `#i`)
    left out: compares values only."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match=match, count=1000):
        if b"#meta:" in key or b"#flush:" in key:
            continue
        kind = client.type(key)
        if kind == b"hash":
            out[key] = {k: v for k, v in client.hgetall(key).items() if k not in (b"#v", b"#i")}
        elif kind == b"set":
            out[key] = client.smembers(key)
        elif kind == b"zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = client.get(key)
    return out
