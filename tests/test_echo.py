"""`create_engine(url, echo=...)`: commands (and replies) on stdout, each line once.

Run in a child process, as a user's script runs: pytest's own logging handlers would
otherwise count as "logging is set up" and change what the echo does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import redmap
from redmap.exc import InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import logging, sys
from dataclasses import dataclass
from typing import Annotated, Optional
import redmap
from redmap import Indexed, PrimaryKey, Session, registry

if sys.argv[3] == "logging":
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="LOG %(message)s")
reg = registry(prefix="echo")

@reg.mapped
@dataclass
class Note:
    text: Annotated[str, Indexed()]
    id: Annotated[Optional[int], PrimaryKey()] = None

if sys.argv[2] == "later":
    engine = redmap.create_engine(sys.argv[1])
    engine.echo = True
else:
    echo = {"true": True, "debug": "debug", "false": False}[sys.argv[2]]
    engine = redmap.create_engine(sys.argv[1], echo=echo)
with Session(engine) as s:
    s.add(Note(text="hello"))
    s.commit()
with Session(engine) as s:
    print("loaded", s.get(Note, 1))
"""


def _run(redis_url: str, echo: str, logging_setup: str = "none") -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), redis_url, echo, logging_setup],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def test_echo_true_prints_each_command_once_without_logging_setup(
    redis_url: str, clean_redis: None
) -> None:
    """echo=True prints every command of the flush and the load on stdout, once each."""
    lines = _run(redis_url, "true")
    hset = [line for line in lines if " HSET {echo}:note:1 text 'hello'" in line]
    hgetall = [line for line in lines if line.endswith("HGETALL {echo}:note:1")]
    assert len(hset) == 1 and len(hgetall) == 1, lines
    assert "INFO redmap.engine" in hset[0]
    assert sum(" EXEC" in line for line in lines) == 1
    assert not any("->" in line for line in lines), "replies only with echo='debug'"
    assert lines[-1] == "loaded Note(text='hello', id=1)"


def test_echo_debug_prints_replies_too(redis_url: str, clean_redis: None) -> None:
    """echo='debug' adds each reply after its command (the loaded hash here)."""
    lines = _run(redis_url, "debug")
    replies = [line for line in lines if "DEBUG redmap.engine ->" in line]
    assert any("b'hello'" in line for line in replies), lines


def test_echo_goes_through_the_applications_logging_once(
    redis_url: str, clean_redis: None
) -> None:
    """With logging configured, the lines go through its handlers only: still once each."""
    lines = _run(redis_url, "true", "logging")
    (line,) = [line for line in lines if "HSET {echo}:note:1" in line]
    assert re.fullmatch(r"LOG HSET \{echo\}:note:1 text 'hello' #v '1' #i '[0-9a-f]{16}'", line)


def test_echo_switched_on_an_existing_engine(redis_url: str, clean_redis: None) -> None:
    """`engine.echo = True` after creation prints from then on, like echo=True."""
    lines = _run(redis_url, "later")
    assert sum(" HSET {echo}:note:1 text 'hello'" in line for line in lines) == 1


def test_echo_false_prints_nothing(redis_url: str, clean_redis: None) -> None:
    """Without echo only the script's own output appears."""
    assert _run(redis_url, "false") == ["loaded Note(text='hello', id=1)"]


def test_echo_refuses_other_values(redis_url: str) -> None:
    """A misspelt echo value is refused with the accepted values named."""
    with pytest.raises(InvalidRequestError, match="echo must be True, False or 'debug'"):
        redmap.create_engine(redis_url, echo="verbose")  # type: ignore[arg-type]
    engine = redmap.create_engine(redis_url)
    with pytest.raises(InvalidRequestError, match="not 2"):
        engine.echo = 2  # type: ignore[assignment]
    assert engine.echo is False
