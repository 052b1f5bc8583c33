"""Tests for `redmap.cli`: the demo tour and the audit command, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _redmap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redmap.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_demo_runs_end_to_end(redis_url: str, clean_redis: None) -> None:
    """`redmap demo` commits, reloads, updates one field and resolves a conflict."""
    proc = _redmap("demo", "--url", redis_url)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "committed 3 players in 3 round trips" in out
    assert "wrote ('score', b'15'" in out
    assert "StaleDataError" in out and "bob's score is now 108" in out


def test_demo_uses_redmap_url(redis_url: str, clean_redis: None) -> None:
    """Without --url the demo uses REDMAP_URL (the embedded server is the last resort)."""
    proc = _redmap("demo", env={"REDMAP_URL": redis_url})
    assert proc.returncode == 0, proc.stderr
    assert redis_url.split("@")[-1].split("/")[2] in proc.stdout


def test_audit_command_exit_codes(engine: Any, redis_url: str, redis_client: Any) -> None:
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
