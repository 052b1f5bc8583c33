"""`AsyncDialect`: how one kind of Redis deployment is reached from asyncio; used by
`redmap.asyncio.AsyncEngine`.

The twin of `Dialect` on `redis.asyncio`, kept to moving bytes: the same `supports_*`
flags, the same hook call before every round trip (so round-trip counts match the sync
dialect's), the same read retry policy (`ReadRetry.acall`), the same error
translation (`translate_errors`: redis.asyncio raises `redis.exceptions` too) and the
same flush protocol (`redmap.orm.flushprotocol`), driven by awaiting each request. What
only asyncio has is cancellation, handled in `AsyncDialect.execute_flush`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis.asyncio
import redis.exceptions as rex

from ..commands import Command, LoneReply, LoneScript, RoundTripHook
from ..orm.flushprotocol import (
    SCRIPT_THRESHOLD,
    ClientExecute,
    FlushProtocol,
    Lost,
    Reply,
    Request,
    RoundTrip,
    ScriptCache,
    Settle,
)
from ..urls import safe_url
from ._retry import ReadRetry
from .base import (
    _CONNECTION_ERRORS,
    _is_redirect,
    _pack,
    default_client_options,
    exec_blocks,
    raise_interrupted,
    split_exec_blocks,
    translate_errors,
)

if TYPE_CHECKING:
    from ..orm.flushplan import FlushPlan
    from ..orm.flushprotocol import FlushJob

__all__ = ["AsyncDialect", "FlushConnection", "build_async_standalone_client", "send_and_read"]

#: What sends a flush's `ClientExecute` requests (the engine's `execute`).
AsyncExecute = Callable[[Sequence[Command]], Awaitable[list[Any]]]


# Replies read between two extensions of the read deadline (see send_and_read).
_DEADLINE_EVERY = 256


async def send_and_read(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """`base.send_and_read` on a `redis.asyncio` connection: `commands` in one write
    (hiredis packing), every reply read, an error reply as its exception in its place.

    With a socket timeout, redis.asyncio arms a timeout context around every reply it
    reads, which cost as much as the rest of a 10,000-key read. Here one
    `asyncio.timeout` covers the replies instead, its deadline pushed back by the
    socket timeout every 256 replies: the connection still fails when the server stops
    answering for that long, for a tenth of the cost. (Python 3.10 has no
    `asyncio.timeout`: there each reply is read under redis.asyncio's own timeout.)
    """
    await conn.send_packed_command(_pack(conn, commands))
    replies: list[Any] = []
    limit = conn.socket_timeout
    timeout = getattr(asyncio, "timeout", None)
    if limit is None or timeout is None:
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except rex.ResponseError as exc:
                replies.append(exc)
        return replies
    loop = asyncio.get_running_loop()
    conn.socket_timeout = None  # read_response then reads without a context of its own
    try:
        async with timeout(limit) as deadline:
            for i in range(len(commands)):
                if i % _DEADLINE_EVERY == 0:
                    deadline.reschedule(loop.time() + limit)
                try:
                    replies.append(await conn.read_response())
                except rex.ResponseError as exc:
                    replies.append(exc)
    finally:
        conn.socket_timeout = limit
    return replies


def _cancel_requests() -> int:
    """How many cancellations of the current task are pending (`Task.cancelling()`,
    Python 3.11+; 0 before, where nothing can tell a swallowed cancellation).

    A cancellation can be requested without its CancelledError ever reaching the
    driver: on Python 3.11, `asyncio.wait_for` (redis.asyncio sends through it when a
    socket timeout is set, redmap's default) returns normally when its inner write
    finished in the same loop turn as the cancellation. The count still tells.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return int(cancelling()) if cancelling is not None else 0


class FlushConnection:
    """A connection checked out for a flush and the way to give it back: a pool's
    `release` (a coroutine in redis.asyncio) or a cluster node's (plain, since the
    async cluster client keeps its connections per node, with no pool object)."""

    __slots__ = ("conn", "give_back")

    def __init__(self, conn: Any, give_back: Callable[[Any], Awaitable[None]]):
        self.conn = conn
        self.give_back = give_back


class AsyncDialect:
    """A way to reach Redis from asyncio: client construction, pipelined reads, and the
    flush transaction, every method a coroutine but `check_plan`.

    Creating one does no I/O and blocks on nothing: clients connect on first use (a
    cluster learns its topology, an embedded server starts, then). Use one dialect from
    one event loop, as redis.asyncio's clients require.
    """

    name = "base"
    # One WATCH/MULTI/EXEC can span every key of a flush.
    supports_multi_key_transactions = True
    # Keys live in several hash slots on several nodes.
    supports_cluster = False
    # The server is started and stopped by redmap itself.
    supports_embedded_server = False
    # When reads are sent again (cut connection, server loading); never the flush.
    read_retry = ReadRetry()

    def __init__(self, url: str, *, hook: RoundTripHook, **client_options: Any):
        self.url = url
        self.safe_url = safe_url(url)
        self._hook = hook
        # Whether the server is known to hold the flush script (`FlushProtocol`).
        self.script_cache = ScriptCache()
        # The redis.asyncio client; None until first use for the dialects that build it
        # late (`ready_client`).
        self.client: Any = self.create_client(url, **client_options)

    def create_client(self, url: str, **options: Any) -> Any:
        """The redis.asyncio client, built without I/O (None: built by `ready_client`)."""
        raise NotImplementedError

    async def ready_client(self) -> Any:
        """The client, ready to send: what a dialect must do first (learn a cluster's
        topology, start an embedded server) is done here, once, on first use."""
        return self.client

    async def dispose(self) -> None:
        """Close every pooled connection; the dialect reconnects if used again."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    # -- reads ----------------------------------------------------------------------

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one pipelined round trip; error replies come back as
        exceptions. Sent again like `Dialect.execute` (`read_retry`)."""
        if not commands:
            return []

        async def attempt() -> list[Any]:
            client = await self.ready_client()
            self._hook(commands)
            pipe = client.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        with translate_errors(self.url):
            return await self.read_retry.acall(attempt, url=self.safe_url)

    async def wait_until_loaded(self) -> None:
        """Return once the server (every primary, on a cluster) has loaded its data set;
        see `Dialect.wait_until_loaded`."""
        self._hook([("DBSIZE",)])

        async def attempt() -> Any:
            client = await self.ready_client()
            return await client.dbsize()

        with translate_errors(self.url):
            await self.read_retry.acall(attempt, url=self.safe_url)

    async def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """HGETALL of each key in one round trip: a dict per key (empty when absent), or
        the error Redis answered for it."""
        return await self.execute([("HGETALL", k) for k in keys])

    async def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """Run `commands` in one MULTI/EXEC (one round trip) and return their results; a
        command error raises. Sent again like reads (see `Dialect.execute_transaction`)."""

        async def attempt() -> list[Any]:
            client = await self.ready_client()
            self._hook([("MULTI",), *commands, ("EXEC",)])
            pipe = client.pipeline(transaction=True)
            for cmd in commands:
                pipe.execute_command(*cmd)
            results: list[Any] = await pipe.execute()
            return results

        with translate_errors(self.url):
            return await self.read_retry.acall(attempt, url=self.safe_url)

    async def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Run several MULTI/EXEC groups; one round trip each unless a dialect can do better."""
        return [await self.execute_transaction(g) for g in groups]

    async def _pipelined_transactions(
        self, client: Any, groups: Sequence[Sequence[Command]]
    ) -> list[list[Any] | None]:
        """Each group's EXEC replies, the groups sent as MULTI/EXEC blocks in one pipeline
        on `client` (one server); None for a block the cluster redirected (it ran nothing).
        """
        flat = exec_blocks(groups)

        async def attempt() -> list[Any]:
            self._hook(flat)
            pipe = client.pipeline(transaction=False)
            for cmd in flat:
                pipe.execute_command(*cmd)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        with translate_errors(self.url):
            replies = await self.read_retry.acall(attempt, url=self.safe_url)
        return split_exec_blocks(groups, replies)

    # -- the flush: a driver of `FlushProtocol` ----------------------------------------

    async def _checkout(self, route: str) -> FlushConnection:
        """A pooled connection to the server holding `route`, connected."""
        client = await self.ready_client()
        pool = client.connection_pool
        conn = await pool.get_connection()
        return FlushConnection(conn, pool.release)

    async def _fresh_connection(self, route: str) -> Any:
        """A new connection, outside any pool, to the server holding `route`."""
        client = await self.ready_client()
        pool = client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    def check_plan(self, plan: FlushPlan) -> None:
        """Refuse, before any I/O, a plan this deployment cannot run (none here)."""

    async def refresh_topology(self) -> None:
        """Learn where keys live again after a redirect (nothing to learn here)."""

    async def execute_flush(
        self,
        job: FlushJob,
        *,
        execute: AsyncExecute | None = None,
        script_threshold: int | None = SCRIPT_THRESHOLD,
    ) -> None:
        """Drive the flush protocol (`redmap.orm.flushprotocol`) on redis.asyncio connections.

        The loop of `Dialect.execute_flush`, awaited: it checks out the flush connection,
        sends each request's commands, feeds replies back (a failed connection as
        `Lost`, what `execute` raised by throwing it in) and gives the connection back,
        disconnected when the protocol says it is `broken`. Every decision is the
        protocol's. `execute` sends `ClientExecute` requests (default: `self.execute`).

        Cancellation is a lost reply. A task cancelled (or timed out) during a round
        trip may have sent its EXEC: the driver feeds `Lost("CancelledError")` to the
        protocol and drives it to its end (after a lost EXEC reply, the settle round
        trip on a fresh connection decides whether the flush applied), then raises the
        `asyncio.CancelledError` with `redmap_applied` set: True (applied), False
        (nothing written) or None (unknown: the objects are in doubt). The protocol's
        own error, if any, is its `__cause__`. Cancelled while ids are handed out or at
        a redirect (nothing written either way), the CancelledError is thrown into the
        protocol, which ends at once. A second cancellation during the settle makes
        the settle `Lost`: outcome unknown. Round trips asked for after a cancellation
        (none are, in practice) are answered `Lost` without I/O.
        """
        protocol = FlushProtocol(
            job,
            url=self.safe_url,
            is_redirect=_is_redirect,
            check_plan=self.check_plan,
            script_threshold=script_threshold,
            script_cache=self.script_cache,
        )
        run_client = execute or self.execute
        cancels_before = _cancel_requests()
        steps = protocol.run()
        held: FlushConnection | None = None
        # The cancellation absorbed while the protocol ran, raised once it has ended.
        cancel: asyncio.CancelledError | None = None
        error: BaseException | None = None
        try:
            request: Request = next(steps)
            while True:
                if cancel is None and _cancel_requests() > cancels_before:
                    # Cancelled, but the CancelledError never reached this loop (see
                    # `_cancel_requests`): it lands here, before the next request.
                    cancel = asyncio.CancelledError()
                reply: Reply
                if isinstance(request, RoundTrip):
                    if cancel is not None:
                        # Not sent: the connection went with the cancelled round trip
                        # (or the cancellation came between two requests).
                        reply = Lost("CancelledError")
                    else:
                        try:
                            if held is None:
                                with translate_errors(self.url):
                                    held = await self._checkout(request.route)
                            reply = await self._round_trip(held.conn, request.commands)
                        except _CONNECTION_ERRORS as exc:
                            reply = Lost(type(exc).__name__)
                        except asyncio.CancelledError as exc:
                            cancel = exc
                            reply = Lost("CancelledError")
                    request = steps.send(reply)
                elif isinstance(request, ClientExecute):
                    if cancel is not None:
                        request = steps.throw(cancel)
                        continue
                    try:
                        replies = await run_client(request.commands)
                    except BaseException as exc:
                        if isinstance(exc, asyncio.CancelledError):
                            cancel = exc
                        request = steps.throw(exc)
                    else:
                        request = steps.send(replies)
                elif isinstance(request, Settle):
                    try:
                        reply = await self._settle(request)
                    except asyncio.CancelledError as exc:
                        cancel = cancel or exc
                        reply = Lost("CancelledError")
                    request = steps.send(reply)
                else:
                    late = await self._give_back(held, broken=protocol.broken)
                    held = None
                    cancel = cancel or late
                    if cancel is not None:
                        request = steps.throw(cancel)  # nothing was written: stop here
                        continue
                    try:
                        await asyncio.sleep(
                            min(0.5, 0.01 * request.attempt) * random.uniform(0.5, 1.0)
                        )
                        with translate_errors(self.url):
                            await self.refresh_topology()
                    except asyncio.CancelledError as exc:
                        cancel = exc
                        request = steps.throw(exc)
                    else:
                        request = steps.send(None)
        except StopIteration:
            pass
        except BaseException as exc:
            error = exc
        late = await self._give_back(held, broken=protocol.broken)
        if cancel is not None:
            raise_interrupted(cancel, error)
        if late is not None:
            # Cancelled only while the connection was given back: the protocol's outcome
            # is complete; the cancellation still goes on, carrying it.
            raise_interrupted(late, error, after_end=True)
        if _cancel_requests() > cancels_before:
            # Cancelled during the last round trip, the CancelledError swallowed: raise
            # it now, with the outcome, as asyncio.timeout expects.
            raise_interrupted(asyncio.CancelledError(), error, after_end=True)
        if error is not None:
            raise error

    async def _give_back(
        self, held: FlushConnection | None, *, broken: bool
    ) -> asyncio.CancelledError | None:
        """Return the flush connection (disconnected first when `broken`), finishing even
        when cancelled meanwhile; returns that cancellation for the caller to raise."""
        if held is None:
            return None
        cancelled: asyncio.CancelledError | None = None
        if broken:
            try:
                with contextlib.suppress(Exception):  # failing to close it closes it too
                    await held.conn.disconnect()
            except asyncio.CancelledError as exc:
                cancelled = exc  # the socket is closed before disconnect awaits anything
        try:
            await held.give_back(held.conn)
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
        return cancelled

    def lone_script(self, request: LoneScript) -> LoneReply | None:
        """The counter lane (`redmap.orm.counterlane`) is the sync driver's: this driver
        declines it (None, nothing sent), so that every flush reaches `execute_flush`,
        where a cancellation is settled. Its AsyncSession never asks; an engine that
        runs the sync Session on this driver does."""
        return None

    async def _round_trip(self, conn: Any, commands: Sequence[Command]) -> list[Any]:
        self._hook(commands)
        return await send_and_read(conn, commands)

    async def _settle(self, request: Settle) -> Reply:
        """A `Settle` round trip on a fresh connection outside the pool (the pooled ones
        may share the fault); any failure, refusals included, is `Lost`."""
        conn = None
        try:
            conn = await self._fresh_connection(request.route)
            return await self._round_trip(conn, request.commands)
        except (rex.RedisError, OSError) as exc:
            return Lost(type(exc).__name__)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()


def build_async_standalone_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """`redis.asyncio.Redis.from_url` with redmap's default options (no I/O)."""
    opts = default_client_options()
    opts.update(options)
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(url, **opts)
    return client
