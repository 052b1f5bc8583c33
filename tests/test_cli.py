"""Tests for `redmap.cli`: the demo, audit and --help/--version, run as a user runs them.

Every run is a child process (`python -m redmap.cli`), from the repository or from a
throwaway project folder, so that what is tested is what a user sees on the terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from alembic_like.command import COMMANDS
from redmap.dialects._server import ServerProcess
from redmap.testing import servers

ROOT = Path(__file__).resolve().parent.parent


def _redmap(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "REDMAP_URL"}
    return subprocess.run(
        [sys.executable, "-m", "redmap.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `redmap: error: ...` line a failed command printed (and nothing else)."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("redmap: error: "), proc.stderr
    return lines[0]


MODELS = """
from dataclasses import dataclass
from typing import Annotated, Optional
from redmap import Indexed, PrimaryKey, registry

reg = registry(prefix="shop")

@reg.mapped
@dataclass
class Item:
    name: Annotated[str, Indexed()]
    id: Annotated[Optional[int], PrimaryKey()] = None
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with its own models package, importable only from that folder."""
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "models.py").write_text(textwrap.dedent(MODELS))
    return tmp_path


@pytest.fixture(scope="module")
def password_server() -> Iterator[ServerProcess]:
    """A server that requires the password s3cret."""
    server = servers.start_standalone()
    client = redis.Redis.from_url(server.url)
    client.config_set("requirepass", "s3cret")  # set after start: the start pings without one
    try:
        yield server
    finally:
        client.execute_command("AUTH", "s3cret")
        client.config_set("requirepass", "")
        client.close()
        server.stop()


class TestDemo:
    def test_demo_runs_end_to_end(self, redis_url: str, clean_redis: None) -> None:
        """`redmap demo` commits, reloads, updates one field, queries and resolves a conflict."""
        proc = _redmap("demo", "--url", redis_url)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "committed 3 players in 3 round trips" in out
        assert "wrote ('score', b'15'" in out
        assert "StaleDataError" in out and "bob's score is now 108" in out

    def test_demo_shows_code_and_readable_objects(
        self, redis_url: str, redis_client: Any
    ) -> None:
        """Each step shows its code; objects print as Player(...); the demo ends at the docs."""
        out = _redmap("demo", "--url", redis_url).stdout
        assert "   >>> with Session(engine) as s:" in out
        assert ">>> stmt = select(Player).where(col(Player.score) >= 10)" in out
        assert "   Player(name='ann', score=10, id=1)" in out
        assert "<locals>" not in out
        assert out.rstrip().endswith(
            "docs/quickstart.md walks through the same steps in your own code."
        )

    def test_demo_deletes_its_keys_and_runs_again(
        self, redis_url: str, redis_client: Any
    ) -> None:
        """The demo leaves no key behind, so a second run prints the same tour."""
        redis_client.set("mine", "kept")
        first = _redmap("demo", "--url", redis_url)
        assert redis_client.keys("*") == [b"mine"]
        second = _redmap("demo", "--url", redis_url)
        assert second.returncode == 0, second.stderr
        assert second.stdout == first.stdout
        assert redis_client.keys("*") == [b"mine"]

    def test_demo_uses_redmap_url(self, redis_url: str, clean_redis: None) -> None:
        """Without --url the demo uses REDMAP_URL."""
        proc = _redmap("demo", env={"REDMAP_URL": redis_url})
        assert proc.returncode == 0, proc.stderr
        assert redis_url.split("@")[-1].split("/")[2] in proc.stdout

    def test_demo_reads_the_url_from_tool_redmap(
        self, project: Path, redis_url: str, clean_redis: None
    ) -> None:
        """Without --url or REDMAP_URL, `url` of [tool.redmap] in ./pyproject.toml is used."""
        (project / "pyproject.toml").write_text(f'[tool.redmap]\nurl = "{redis_url}"\n')
        proc = _redmap("demo", cwd=project)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == f"redmap demo on {redis_url}"
        assert not (project / ".redmap").exists()

    def test_demo_names_the_embedded_data_folder(self, tmp_path: Path) -> None:
        """With no URL anywhere the demo runs on the embedded server and names its folder."""
        proc = _redmap("demo", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        folder = (tmp_path / ".redmap").resolve()
        assert proc.stdout.splitlines()[0] == (
            f"redmap demo on the embedded Redis server, data folder {folder}"
        )

    def test_missing_password_says_to_put_it_in_the_url(
        self, password_server: ServerProcess
    ) -> None:
        """A server that wants a password: one line saying where the password goes."""
        line = _one_error_line(_redmap("demo", "--url", password_server.url))
        assert "the server requires a password: put it in the URL" in line
        assert "HELLO" not in line

    def test_database_number_out_of_range_names_the_url(
        self, password_server: ServerProcess
    ) -> None:
        """/99 on a 16-database server: the URL (password hidden) and the valid range."""
        url = password_server.url.replace("redis://", "redis://:s3cret@") + "/99"
        line = _one_error_line(_redmap("demo", "--url", url))
        assert "/0 to /15" in line and ":***@" in line and "/99" in line
        assert "s3cret" not in line


class TestAudit:
    def test_audit_command_exit_codes(
        self, engine: Any, redis_url: str, redis_client: Any
    ) -> None:
        """`redmap audit` exits 0 on a clean database and 1 with a planted fault, naming it."""
        from redmap import Session
        from tests._fixtures import Author

        with Session(engine) as s:
            s.add_all([Author(name="a", email=f"{i}@x") for i in range(3)])
            s.commit()
        ok = _redmap("audit", "--url", redis_url, "--models", "tests._fixtures:reg")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "0 mismatches" in ok.stdout
        redis_client.sadd("{t}:author:#ix:name:a", "77")
        bad = _redmap("audit", "--url", redis_url, "--models", "tests._fixtures:reg")
        assert bad.returncode == 1 and "#ix:name:a" in bad.stdout

    def test_audit_reads_tool_redmap_and_imports_from_the_project(
        self, project: Path, redis_url: str, clean_redis: None
    ) -> None:
        """url and models come from [tool.redmap]; the models import from the project folder."""
        (project / "pyproject.toml").write_text(
            f'[tool.redmap]\nurl = "{redis_url}"\nmodels = "shop.models:reg"\n'
        )
        proc = _redmap("audit", cwd=project)
        assert proc.returncode == 0, proc.stderr
        assert "0 mismatches, 0 unexplained keys" in proc.stdout

    def test_audit_defaults_to_the_projects_embedded_server(self, project: Path) -> None:
        """No URL anywhere: the audit runs on the embedded server in the project's .redmap/."""
        proc = _redmap("audit", "--models", "shop.models:reg", cwd=project)
        assert proc.returncode == 0, proc.stderr
        assert "0 objects" in proc.stdout
        assert (project / ".redmap").is_dir()

    def test_audit_embedded_url(self, project: Path) -> None:
        """--url redis+embedded:// is accepted like any other URL (no ValueError)."""
        proc = _redmap(
            "audit", "--url", "redis+embedded://", "--models", "shop.models:reg", cwd=project
        )
        assert proc.returncode == 0, proc.stderr

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            ((), "which models? give --models package.module:registry"),
            (("--models", "myapp.models:reg"), "cannot load the models 'myapp.models:reg'"),
            (("--models", "shop.models"), "models must look like 'package.module:registry'"),
            (("--models", "shop.models:reg", "--url", "nope://x"), "no dialect for URL scheme"),
            (
                ("--models", "shop.models:reg", "--url", "redis://127.0.0.1:1/0"),
                "cannot talk to Redis",
            ),
        ],
    )
    def test_audit_errors_are_one_line(
        self, project: Path, args: tuple[str, ...], expected: str
    ) -> None:
        """Each mistake is one `redmap: error:` line saying what to do, exit code 2."""
        proc = _redmap("audit", *args, cwd=project)
        assert proc.returncode == 2
        assert expected in _one_error_line(proc)
        assert "Traceback" not in proc.stderr


class TestHelp:
    def test_version(self) -> None:
        """`redmap --version` prints the package version."""
        import redmap

        proc = _redmap("--version")
        assert proc.returncode == 0 and proc.stdout == f"redmap {redmap.__version__}\n"

    @pytest.mark.parametrize(
        "args",
        [
            ("--help",),
            ("demo", "--help"),
            ("audit", "--help"),
            ("migrate", "--help"),
            *[("migrate", name, "--help") for name in COMMANDS],
        ],
    )
    def test_every_help_is_written_for_users(self, args: tuple[str, ...]) -> None:
        """Every --help exits 0 with a description and no internal words."""
        proc = _redmap(*args)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        usage, _, rest = text.partition("\n\n")
        assert usage.startswith("usage: redmap")
        assert rest.split("\n\n")[0].strip(), "a description under the usage line"
        for word in ("host", "template_vars", "<name>", "alembic_like", "op_import"):
            assert word not in text, f"{word!r} in {' '.join(args)}"

    def test_main_help_explains_where_the_database_comes_from(self) -> None:
        """`redmap --help` says how the URL is chosen, in order, and lists the subcommands."""
        text = " ".join(_redmap("--help").stdout.split())
        assert "--url, else by the REDMAP_URL environment variable" in text
        assert "[tool.redmap] table of pyproject.toml, else the embedded Redis server" in text
        for name in ("demo", "audit", "migrate"):
            assert f" {name} " in text
