"""Owns when a read is sent again; called by the dialects' read paths, never by the flush.

A read (HGETALL, ZRANGE, a query's MULTI/EXEC of reads and temporary keys) changes
nothing that a second copy would change again, so it can be re-sent after its
connection was cut mid-flight, and while the server answers LOADING (it is replaying
its AOF or RDB after a restart). redmap does this itself rather than through redis-py's
retry policy: `Redis.from_url`, which redmap uses, leaves it at no retry (measured
with redis-py 5.0 and 8.2), and `Redis(...)`'s default differs between versions. A
flush is never re-sent: see `Dialect.execute_flush`. The asyncio dialects use the same
policy through `ReadRetry.acall`, which only pauses with `asyncio.sleep` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.exceptions as rex

from ..exc import RedmapConnectionError

__all__ = ["ReadRetry"]

log = logging.getLogger("redmap.engine")

T = TypeVar("T")

# Pauses before the 1st, 2nd, ... re-send after a cut connection: the first at once (a
# connection killed while idle or mid-read usually reconnects fine), then longer ones
# for a server that is restarting.
_BACKOFF = (0.0, 0.05, 0.2, 0.5)
# How often a read asks again while the server is loading its data set.
_LOADING_POLL = 0.05
# Connection errors that a second try would meet again.
_FINAL = (rex.TimeoutError, TimeoutError, rex.AuthenticationError, rex.AuthorizationError)


@dataclass(frozen=True)
class ReadRetry:
    """The retry policy of one dialect's reads.

    `retries`: re-sends after a cut connection (ConnectionError, broken pipe, reset)
    before the error is raised; a timeout is not retried (the server was reached and
    is slow: asking again multiplies the wait), nor a refused login. `loading_timeout`:
    seconds to keep asking while the server answers LOADING before raising
    RedmapConnectionError.
    """

    retries: int = len(_BACKOFF)
    loading_timeout: float = 60.0

    def call(self, read: Callable[[], T], *, url: str) -> T:
        """`read()`, sent again as the policy allows; `read` must leave a failed
        connection disconnected (it may hold unread replies). `url` is shown in errors
        and must carry no password."""
        attempts = _Attempts(self, url)
        while True:
            try:
                return read()
            except BaseException as exc:
                time.sleep(attempts.pause_after(exc))

    async def acall(self, read: Callable[[], Awaitable[T]], *, url: str) -> T:
        """`await read()`, sent again exactly as `call` would send `read()` again; the
        pauses are `asyncio.sleep`, so other tasks run meanwhile. A cancellation is
        never retried: it is not an error of the connection but the caller's wish."""
        attempts = _Attempts(self, url)
        while True:
            try:
                return await read()
            except BaseException as exc:
                await asyncio.sleep(attempts.pause_after(exc))


class _Attempts:
    """The policy's decisions for one read, shared by `ReadRetry.call` and `acall`
    (which differ only in how they wait): how long to pause before sending the read
    again, or the error to raise."""

    def __init__(self, policy: ReadRetry, url: str) -> None:
        self.policy, self.url = policy, url
        self.cuts = 0
        self.loading_since: float | None = None

    def pause_after(self, exc: BaseException) -> float:
        """The pause before the next attempt after `exc`; raises when there is none."""
        policy = self.policy
        if isinstance(exc, rex.BusyLoadingError):  # a ConnectionError subclass: first
            now = time.monotonic()
            if self.loading_since is None:
                self.loading_since = now
                log.info("Redis is loading its data set; waiting to read (%s)", self.url)
            if now - self.loading_since >= policy.loading_timeout:
                raise RedmapConnectionError(
                    f"Redis was still loading its data set into memory after "
                    f"{policy.loading_timeout:g}s (it answers LOADING after a restart "
                    f"until its AOF or RDB file is read); try again once INFO "
                    f"persistence shows loading:0",
                    url=self.url,
                ) from None
            return _LOADING_POLL
        # A timeout or a refused login: asking again would meet the same slow server or
        # the same refusal. Anything but a cut connection is not the policy's to retry.
        if isinstance(exc, _FINAL) or not isinstance(exc, (rex.ConnectionError, OSError)):
            raise exc
        if self.cuts >= policy.retries:
            raise exc
        pause = _BACKOFF[min(self.cuts, len(_BACKOFF) - 1)]
        self.cuts += 1
        log.info(
            "read cut (%s); sending it again (%d/%d)",
            type(exc).__name__,
            self.cuts,
            policy.retries,
        )
        return pause
