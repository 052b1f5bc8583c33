"""Tests for `alembic_like.messaging`."""

from __future__ import annotations

import io

import pytest

from alembic_like.messaging import Messaging, obfuscate_url_pw


class Clock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_msg_and_err_streams() -> None:
    """msg goes to the stream, err to the error stream."""
    out, err = io.StringIO(), io.StringIO()
    messaging = Messaging(stream=out, err_stream=err)
    messaging.msg("hello")
    messaging.err("bad")
    assert out.getvalue() == "hello\n" and err.getvalue() == "bad\n"


def test_quiet_silences_msg_not_err() -> None:
    """quiet drops status lines and progress but still shows errors."""
    out, err = io.StringIO(), io.StringIO()
    messaging = Messaging(quiet=True, stream=out, err_stream=err)
    messaging.msg("hello")
    messaging.err("bad")
    with messaging.progress(10, "work") as progress:
        progress.advance(10)
    assert out.getvalue() == "" and err.getvalue() == "bad\n"


def test_off_a_terminal_a_short_operation_prints_a_start_and_an_end_line() -> None:
    """Off a terminal, an operation shorter than the line interval prints two lines only."""
    out, clock = io.StringIO(), Clock()
    messaging = Messaging(stream=out, clock=clock)
    with messaging.progress(100, "backfill") as progress:
        for _ in range(100):
            clock.now += 0.01
            progress.advance()
    assert out.getvalue().splitlines() == [
        "backfill: started (100 objects)",
        "backfill: done, 100 objects in 1.0s (100 obj/s)",
    ]


def test_off_a_terminal_a_long_operation_prints_a_line_per_interval() -> None:
    """A long operation adds a line each `line_interval` seconds, with count, rate and ETA."""
    out, clock = io.StringIO(), Clock()
    messaging = Messaging(stream=out, clock=clock, line_interval=30)
    with messaging.progress(100, "copy") as progress:
        for _ in range(100):
            clock.now += 1
            progress.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "copy: started (100 objects)"
    assert lines[1:4] == [
        "copy: 30/100 (30%), 1 obj/s, ETA 1m10s",
        "copy: 60/100 (60%), 1 obj/s, ETA 40s",
        "copy: 90/100 (90%), 1 obj/s, ETA 10s",
    ]
    assert lines[4:] == ["copy: done, 100 objects in 1m40s (1 obj/s)"]


def test_off_a_terminal_without_total() -> None:
    """With no total, the lines count objects and the rate."""
    out, clock = io.StringIO(), Clock()
    progress = Messaging(stream=out, clock=clock, line_interval=2).progress(None, "scan")
    for _ in range(10):
        clock.now += 0.5
        progress.advance(5)
    progress.close()
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "scan: started",
        "scan: 20 objects, 10 obj/s",
        "scan: 40 objects, 10 obj/s",
        "scan: done, 50 objects in 5.0s (10 obj/s)",
    ]


def test_live_bar_on_a_terminal() -> None:
    """On a terminal, progress redraws one line with a bar, rate and ETA."""
    out, clock = Terminal(), Clock()
    progress = Messaging(stream=out, clock=clock).progress(200, "copy")
    for _ in range(4):
        clock.now += 1
        progress.advance(50)
    progress.close()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n")
    assert "copy [############............]  50% 100/200 50 obj/s ETA 2.0s" in text
    assert "100% 200/200" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host/1", "redis://:***@host/1"),
        ("rediss://host:6380", "rediss://host:6380"),
        ("redis://user@host", "redis://user@host"),
        ("unix:///tmp/r.sock?db=2&password=s3cret", "unix:///tmp/r.sock?db=2&password=***"),
    ],
)
def test_obfuscate_url_pw(url: str, shown: str) -> None:
    """Passwords in the authority or the query are masked; the rest is kept."""
    assert obfuscate_url_pw(url) == shown
