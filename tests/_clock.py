"""The clock expiry tests move by hand (`redmap.orm.expiry.use_clock`), shared by the
expiry, soft-delete and string-on-expiry modules through the `clock` fixture
(tests/conftest.py). No test sleeps for a deadline: it moves `now`."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["T0", "Clock"]

T0 = 1_900_000_000.0  # a fixed "now" (2030), moved by hand


class Clock:
    """A clock that says `now` (seconds since the epoch) until a test moves it."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float) -> datetime:
        """The aware moment `seconds` after T0."""
        return datetime.fromtimestamp(T0 + seconds, timezone.utc)
