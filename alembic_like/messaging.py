"""The only printer of alembic_like; owns status lines, errors, progress and URL masking.

Called by `command`, `runtime` and `cli`, and by hosts' operation implementations for
progress over long batches (through the `Messaging` their `Config` carries).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["DEFAULT_LINE_INTERVAL", "Messaging", "Progress", "obfuscate_url_pw", "plural"]

_MASK = "***"
_BAR_WIDTH = 24
_TTY_REFRESH = 0.1  # seconds between redraws of a live bar
#: Off a terminal (a log file, CI), seconds between the lines a long operation prints
#: between its start and end lines; a short one prints those two only.
DEFAULT_LINE_INTERVAL = 30.0


def obfuscate_url_pw(url: str) -> str:
    """`url` with any password (in the authority or a `password=` query) replaced by `***`.

    >>> obfuscate_url_pw("redis://user:s3cret@localhost:6379/0")
    'redis://user:***@localhost:6379/0'
    """
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        masked = f"{userinfo.split(':', 1)[0]}:{_MASK}@{hostport}"
        url = url.replace(f"//{parts.netloc}", f"//{masked}", 1)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        # Edited in place: urlunsplit would drop the empty authority of unix:///path.
        query = urlencode([(k, _MASK if k == "password" else v) for k, v in pairs], safe="*")
        start = url.index("?" + parts.query) + 1
        url = url[:start] + query + url[start + len(parts.query) :]
    return url


def plural(count: int, noun: str) -> str:
    """`1 key`, `2 keys`: a count with its noun in the right number (nouns taking -s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"


class Messaging:
    """Where every line goes: `msg` (silenced by `quiet`), `err` (never silenced), progress.

    `stream` and `err_stream` default to the `sys.stdout`/`sys.stderr` of the moment
    the object is built; `clock` is injectable for tests; `line_interval` is the
    seconds between progress lines off a terminal.
    """

    def __init__(
        self,
        quiet: bool = False,
        stream: TextIO | None = None,
        *,
        err_stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        line_interval: float = DEFAULT_LINE_INTERVAL,
    ) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stdout
        self.err_stream = err_stream if err_stream is not None else sys.stderr
        self.clock = clock
        self.line_interval = line_interval

    def msg(self, text: str) -> None:
        """Print a status line unless quiet."""
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def err(self, text: str) -> None:
        """Print an error line to the error stream, even when quiet."""
        print(text, file=self.err_stream, flush=True)

    @property
    def is_tty(self) -> bool:
        """True when `stream` is a terminal, where progress is drawn as a live bar."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def progress(self, total: int | None, label: str) -> Progress:
        """A progress report for `total` objects (None when unknown), closed when done.

        A live bar with objects/s and ETA on a terminal. Elsewhere (a log) a start line
        and an end line, plus one line every `line_interval` seconds in between for a
        long operation. Nothing when quiet. Usable as a context manager.
        """
        mode = "quiet" if self.quiet else "bar" if self.is_tty else "lines"
        return Progress(self, total, label, mode)


class Progress:
    """Counts objects done and reports them as `Messaging.progress` describes."""

    def __init__(self, messaging: Messaging, total: int | None, label: str, mode: str) -> None:
        self._messaging = messaging
        self.total = total
        self.label = label
        self.mode = mode
        self.done = 0
        self.closed = False
        self._clock = messaging.clock
        self._started = self._last = self._clock()
        if mode == "lines":
            size = "" if total is None else f" ({plural(total, 'object')})"
            messaging.msg(f"{label}: started{size}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        """Count `n` more objects done."""
        self.done += n
        if self.mode == "quiet" or self.closed:
            return
        now = self._clock()
        if self.mode == "bar":
            if now - self._last >= _TTY_REFRESH:
                self._last = now
                self._draw(now)
            return
        if now - self._last >= self._messaging.line_interval:
            self._last = now
            self._messaging.msg(self._line(now))

    def close(self) -> None:
        """Report the final count once; later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        if self.mode == "quiet":
            return
        now = self._clock()
        if self.mode == "bar":
            self._draw(now)
            self._messaging.stream.write("\n")
            self._messaging.stream.flush()
        else:
            elapsed = now - self._started
            self._messaging.msg(
                f"{self.label}: done, {plural(self.done, 'object')} in {_duration(elapsed)}"
                f" ({self._rate(now):.0f} obj/s)"
            )

    def _percent(self) -> int | None:
        if not self.total:
            return None
        return min(100, self.done * 100 // self.total)

    def _rate(self, now: float) -> float:
        elapsed = now - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _eta(self, now: float) -> str:
        rate = self._rate(now)
        if self.total is None or rate <= 0:
            return "?"
        return _duration(max(0, self.total - self.done) / rate)

    def _line(self, now: float) -> str:
        rate = f"{self._rate(now):.0f} obj/s"
        percent = self._percent()
        if percent is None:
            return f"{self.label}: {plural(self.done, 'object')}, {rate}"
        return f"{self.label}: {self.done}/{self.total} ({percent}%), {rate}, ETA {self._eta(now)}"

    def _draw(self, now: float) -> None:
        percent = self._percent()
        if percent is None:
            text = f"{self.label} {plural(self.done, 'object')}, {self._rate(now):.0f} obj/s"
        else:
            filled = _BAR_WIDTH * percent // 100
            bar = "#" * filled + "." * (_BAR_WIDTH - filled)
            text = (
                f"{self.label} [{bar}] {percent:3d}% {self.done}/{self.total}"
                f" {self._rate(now):.0f} obj/s ETA {self._eta(now)}"
            )
        stream = self._messaging.stream
        stream.write("\r\x1b[K" + text)
        stream.flush()
