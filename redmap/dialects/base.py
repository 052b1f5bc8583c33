"""`Dialect`: how one kind of Redis deployment is reached; used by `Engine`.

This module is the one place where redis-py errors become `redmap.exc` errors
(`translate_errors`), and where a `FlushPlan` is sent as WATCH / checks, then
MULTI / writes / EXEC on one connection, never retried blindly.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions as rex

from ..exc import (
    FlushError,
    OutcomeUnknownError,
    RedmapConnectionError,
    RedmapError,
    StaleDataError,
)
from ._retry import ReadRetry


def _find_hiredis_pack() -> Callable[[Any], bytes] | None:
    """hiredis's command packer; hiredis is an optional speed-up (and may lack stubs)."""
    try:
        module = importlib.import_module("hiredis")
    except ImportError:
        return None
    pack: Callable[[Any], bytes] | None = getattr(module, "pack_command", None)
    return pack


_hiredis_pack = _find_hiredis_pack()

if TYPE_CHECKING:
    from redis.connection import ConnectionPool

    from ..persistence import FlushPlan

__all__ = [
    "Command",
    "Dialect",
    "Replan",
    "RetryFlush",
    "RoundTripHook",
    "safe_url",
    "send_and_read",
    "translate_errors",
]

log = logging.getLogger("redmap.engine")

Command = tuple[Any, ...]
RoundTripHook = Callable[[Sequence[Command]], None]

# A flush re-runs its checks when EXEC reports that a watched key changed; the
# checks then say why (stale version, unique value taken). Only a writer that keeps
# touching watched keys without changing what redmap checks exhausts this.
WATCH_RETRIES = 5


def safe_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"{creds}@{host}"
    query = parts.query
    if "password=" in query:
        query = "&".join(
            "password=***" if q.startswith("password=") else q for q in query.split("&")
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _password_of(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return parts.password
    for q in parts.query.split("&"):
        if q.startswith("password="):
            return q.split("=", 1)[1] or None
    return None


@contextlib.contextmanager
def translate_errors(url: str) -> Iterator[None]:
    """Turn redis-py errors into `redmap.exc` errors that name the URL without a password."""
    shown = safe_url(url)
    secret = _password_of(url)

    def clean(exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(secret, "***") if secret else text

    try:
        yield
    except RedmapError:
        raise
    except rex.AuthenticationError as exc:
        if secret is None:  # Redis answers HELLO or AUTH text that does not say this
            raise RedmapConnectionError(
                "the server requires a password: put it in the URL "
                "(redis://:PASSWORD@host:port/0, or redis://USER:PASSWORD@... for an ACL user)",
                url=shown,
            ) from None
        raise RedmapConnectionError(f"authentication failed ({clean(exc)})", url=shown) from None
    except rex.BusyLoadingError:
        raise RedmapConnectionError(
            "Redis is loading its data set into memory (after a restart, until its AOF or "
            "RDB file is read); try again once INFO persistence shows loading:0",
            url=shown,
        ) from None
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise RedmapConnectionError(f"cannot talk to Redis ({clean(exc)})", url=shown) from None
    except rex.RedisError as exc:
        if "DB index is out of range" in str(exc):
            raise RedmapConnectionError(
                "the database number at the end of the URL does not exist on this server "
                "(it has `databases` of them, 16 unless configured: /0 to /15)",
                url=shown,
            ) from None
        raise RedmapError(f"Redis refused a command ({clean(exc)}) (url: {shown})") from None


_REDIRECTS = (rex.AskError, rex.TryAgainError, rex.ClusterDownError)


def _pack(conn: Any, commands: Sequence[Command]) -> list[bytes]:
    """The commands in the Redis protocol, by hiredis's packer when it is installed.

    redis-py's own packing runs an encoder call per argument in Python, a third of a
    10,000-object flush. hiredis encodes str as UTF-8 and numbers by their repr, as
    redis-py's encoder does; anything else hiredis refuses (TypeError) goes to redis-py.
    """
    if _hiredis_pack is None or conn.encoder.encoding != "utf-8":
        packed: list[bytes] = conn.pack_commands(commands)
        return packed
    try:
        return [b"".join([_hiredis_pack(cmd) for cmd in commands])]
    except TypeError:
        packed = conn.pack_commands(commands)
        return packed


def send_and_read(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """Send `commands` on `conn` in one write and read every reply; an error reply comes
    back as its exception, in its place, so one refused command does not hide the rest."""
    conn.send_packed_command(_pack(conn, commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


def _wants_command_name(pool_class: Any) -> bool:
    """Whether `get_connection` of this pool class needs a command name (redis-py < 5.3;
    later versions deprecate passing one)."""
    try:
        param = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _checkout(pool: Any) -> Any:
    """A connection of `pool` for a flush, whichever redis-py the user installed."""
    if _wants_command_name(type(pool)):
        return pool.get_connection("MULTI")
    return pool.get_connection()


class Replan(Exception):
    """A flush whose generated ids were handed out after its checks must check again
    (EXEC aborted, or a redirect): its plan did not check the ids' own keys, so the
    unit of work plans again with the ids. Nothing was written."""


class RetryFlush(Exception):
    """The cluster redirected a command of a flush that wrote nothing: refresh and retry."""


def _redirected(replies: Sequence[Any]) -> bool:
    return any(isinstance(r, _REDIRECTS) for r in replies)


class Dialect:
    """A way to reach Redis: client construction, pipelined reads, and the flush transaction.

    Subclasses advertise what they can do with `supports_*` flags; tests skip by
    capability, never by dialect name.
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
        self.client: Any = self.create_client(url, **client_options)

    def create_client(self, url: str, **options: Any) -> Any:
        raise NotImplementedError

    def dispose(self) -> None:
        """Close every pooled connection."""
        with contextlib.suppress(Exception):
            self.client.close()

    # -- reads ----------------------------------------------------------------------

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one pipelined round trip; error replies come back as exceptions.

        The round trip is sent again when its connection is cut or the server is loading
        its data set (`read_retry`): for reads, and for commands whose repetition is
        harmless (the flush's counter INCRBYs: a repeated one only skips ids).
        """
        if not commands:
            return []

        def attempt() -> list[Any]:
            self._hook(commands)
            pipe = self.client.pipeline(transaction=False)
            for cmd in commands:
                pipe.execute_command(*cmd)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

        with translate_errors(self.url):
            return self.read_retry.call(attempt, url=self.safe_url)

    def fetch_hashes(self, keys: Sequence[str]) -> list[Any]:
        """HGETALL of each key in one round trip: a dict per key (empty when absent), or
        the error Redis answered for it. The loading path of get_many, selectin and
        query results."""
        return self.execute([("HGETALL", k) for k in keys])

    def execute_transaction(self, commands: Sequence[Command]) -> list[Any]:
        """Run `commands` in one MULTI/EXEC (one round trip) and return their results.

        For reads that need a consistent snapshot or temporary keys (queries); a
        command error raises. Sent again like `execute`'s reads: a second run of a
        query's transaction rebuilds and deletes the same temporary keys.
        """

        def attempt() -> list[Any]:
            self._hook([("MULTI",), *commands, ("EXEC",)])
            pipe = self.client.pipeline(transaction=True)
            for cmd in commands:
                pipe.execute_command(*cmd)
            results: list[Any] = pipe.execute()
            return results

        with translate_errors(self.url):
            return self.read_retry.call(attempt, url=self.safe_url)

    def execute_transactions(self, groups: Sequence[Sequence[Command]]) -> list[list[Any]]:
        """Run several MULTI/EXEC groups; one round trip each unless a dialect can do better."""
        return [self.execute_transaction(g) for g in groups]

    def _pipelined_transactions(
        self, client: Any, groups: Sequence[Sequence[Command]]
    ) -> list[list[Any] | None]:
        """Each group's EXEC replies, the groups sent as MULTI/EXEC blocks in one pipeline
        on `client` (one server); None for a block the cluster redirected (it ran nothing).
        """
        flat: list[Command] = []
        for g in groups:
            flat.extend([("MULTI",), *g, ("EXEC",)])

        def attempt() -> list[Any]:
            self._hook(flat)
            pipe = client.pipeline(transaction=False)
            for cmd in flat:
                pipe.execute_command(*cmd)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

        with translate_errors(self.url):
            replies = self.read_retry.call(attempt, url=self.safe_url)
        out: list[list[Any] | None] = []
        at = 0
        for g in groups:
            block = replies[at : at + len(g) + 2]
            at += len(g) + 2
            if _redirected(block):
                out.append(None)
                continue
            exec_reply = block[-1]
            if isinstance(exec_reply, Exception) or exec_reply is None:
                errors = [r for r in block if isinstance(r, Exception)]
                raise RedmapError(
                    f"Redis refused a transaction: {errors[0] if errors else exec_reply}"
                )
            for r in exec_reply:
                if isinstance(r, Exception):
                    raise RedmapError(f"Redis refused a command: {r}")
            out.append(list(exec_reply))
        return out

    # -- the flush --------------------------------------------------------------------

    def _flush_pool(self, plan: FlushPlan) -> ConnectionPool:
        """The pool of the server holding the plan's keys."""
        pool: ConnectionPool = self.client.connection_pool
        return pool

    def execute_flush(self, plan: FlushPlan) -> None:
        """Run `plan` as WATCH + checks, then MULTI/writes/EXEC, on one connection.

        Round trips: 2, plus 2 per retry after a watched key changed. Nothing is
        re-sent after EXEC may have reached the server: a lost reply is settled by
        reading back the plan's token (see `_settle`). Generated ids were handed out
        before (`UOWTransaction._run`): the plan holds real keys only.
        """
        if plan.bound_late:
            raise Replan()  # sent before (a cluster redirect): plan again with the ids
        pool = self._flush_pool(plan)
        with translate_errors(self.url):
            conn = _checkout(pool)
        broken = False
        try:
            for _ in range(WATCH_RETRIES):
                try:
                    replies = self._round_trip(conn, [("WATCH", *plan.watch), *plan.check_commands])
                except (rex.ConnectionError, rex.TimeoutError, OSError):
                    broken = True
                    raise
                if _redirected(replies):
                    self._unwatch_quietly(conn)
                    raise RetryFlush()
                if isinstance(replies[0], Exception):
                    broken = not self._unwatch_quietly(conn)
                    raise FlushError(
                        f"Redis refused WATCH ({replies[0]}); nothing was written",
                        errors=[str(replies[0])],
                    )
                failure = plan.evaluate(replies[1:])
                if failure is not None:
                    give_back = plan.give_back()
                    if give_back:
                        broken = not self._give_back_ids(conn, give_back)
                    else:
                        broken = not self._unwatch_quietly(conn)
                    raise failure
                if plan.allocate is not None:
                    # Every check passed: only now may counters move (see `FlushPlan`).
                    allocate, plan.allocate = plan.allocate, None
                    try:
                        allocate(plan)
                    except BaseException:
                        # Refused (OOM, wrong type, lost connection): the connection goes
                        # back to the pool, so it must not keep this flush's WATCH (a
                        # later MULTI on it, such as a query's, would fail).
                        broken = not self._unwatch_quietly(conn)
                        raise
                    plan.bound_late = True
                sent_at = time.monotonic()
                try:
                    replies = self._round_trip(conn, [("MULTI",), *plan.transaction, ("EXEC",)])
                except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                    broken = True
                    self._after_lost_exec(plan, exc, sent_at)
                    return
                exec_reply = replies[-1]
                if exec_reply is None:
                    if plan.bound_late:
                        raise Replan()
                    continue  # a watched key changed: re-run the checks to learn why
                if isinstance(exec_reply, Exception):
                    # EXECABORT: a command was refused while queuing (e.g. OOM, or MOVED
                    # during a slot migration); Redis discarded the whole transaction.
                    if _redirected(replies[1:-1]):
                        raise RetryFlush()
                    queued = [str(r) for r in replies[1:-1] if isinstance(r, Exception)]
                    raise plan.refused_at_queue(queued or [str(exec_reply)], len(replies) - 2)
                plan.check_exec_reply(list(exec_reply))
                return
            raise StaleDataError(
                "watched keys kept changing during the flush; nothing was written",
                objects=[s.obj for s in plan.states],
                keys=list(plan.watch),
            )
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            broken = True
            raise RedmapConnectionError(
                f"connection lost before the flush was sent; nothing was written "
                f"({type(exc).__name__})",
                url=self.safe_url,
            ) from None
        finally:
            if broken:
                with contextlib.suppress(Exception):
                    conn.disconnect()
            pool.release(conn)

    def _give_back_ids(self, conn: Any, ranges: dict[str, tuple[int, int]]) -> bool:
        """Return the ids of a flush its checks refused, so that a refused flush leaves
        its counters as they were; False when the connection failed.

        Still under the flush's WATCH (its id guards included): a counter is set back
        only if it still ends the range handed out (nobody took ids since) and EXEC
        finds nothing watched changed (no explicit insert took one of these ids). Any
        doubt leaves the ids unused, a harmless gap. Two round trips, on refusal only.
        """
        keys_ = list(ranges)
        try:
            replies = self._round_trip(conn, [("WATCH", *keys_), *[("GET", k) for k in keys_]])
            undo: list[Command] = []
            for key, reply in zip(keys_, replies[1:], strict=True):
                first, last = ranges[key]
                if isinstance(reply, bytes) and reply.isdigit() and int(reply) == last:
                    undo.append(("SET", key, first - 1) if first > 1 else ("DEL", key))
            # EXEC, aborted or not, ends the WATCH.
            self._round_trip(conn, [("MULTI",), *undo, ("EXEC",)] if undo else [("UNWATCH",)])
        except (rex.ConnectionError, rex.TimeoutError, OSError):
            return False
        return True

    def _unwatch_quietly(self, conn: Any) -> bool:
        """UNWATCH; False when the connection failed (disconnect it, do not reuse it)."""
        try:
            self._round_trip(conn, [("UNWATCH",)])
        except (rex.ConnectionError, rex.TimeoutError, OSError):
            return False
        return True

    def _round_trip(self, conn: Any, commands: Sequence[Command]) -> list[Any]:
        self._hook(commands)
        return send_and_read(conn, commands)

    def _after_lost_exec(self, plan: FlushPlan, cause: BaseException, sent_at: float) -> None:
        """Settle a flush whose EXEC reply never came: return if applied, raise if not."""
        if self._settle(plan, sent_at):
            log.warning(
                "flush reply lost (%s); read-back shows it was applied", type(cause).__name__
            )
            return
        raise RedmapConnectionError(
            f"connection lost during the flush ({type(cause).__name__}); read-back shows "
            f"nothing was written",
            url=self.safe_url,
        )

    def _settle(self, plan: FlushPlan, sent_at: float) -> bool:
        """Whether a flush whose reply was lost was applied, decided for good.

        The token key is watched by the flush and written by its EXEC. Creating it
        here with SET NX either finds it (the flush was applied) or creates it, which
        also makes a late EXEC still queued on the old connection fail its WATCH.
        Creating it proves nothing once the token's lifetime has passed since the EXEC
        was sent (`sent_at`, monotonic): the flush's own token may have come and gone.
        Raises OutcomeUnknownError, marking the plan's objects in doubt, when the
        read-back fails, is refused, or comes too late.
        """
        pool = self._flush_pool(plan)
        conn = None
        try:
            # A fresh connection outside the pool: the pooled ones may share the fault.
            conn = pool.connection_class(**pool.connection_kwargs)
            replies = self._round_trip(
                conn, [("SET", plan.token_key, b"settled", "NX", "PX", plan.token_ttl_ms)]
            )
            if isinstance(replies[0], Exception):
                # Refused (OOM, LOADING, READONLY, ...): the outcome is just as unknown.
                raise replies[0]
        except (rex.RedisError, OSError) as exc:
            raise self._outcome_unknown(plan, type(exc).__name__) from None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.disconnect()
        applied = replies[0] is None
        if not applied and time.monotonic() - sent_at >= plan.token_ttl_ms / 1000:
            raise self._outcome_unknown(plan, "the read-back came after the token's lifetime")
        return applied

    def _outcome_unknown(self, plan: FlushPlan, reason: str) -> OutcomeUnknownError:
        """The error for an unsettled flush; marks the plan's objects as in doubt."""
        for st in plan.states:
            st.in_doubt = True
        return OutcomeUnknownError(
            f"the flush's EXEC was sent but its reply was lost and the outcome could not "
            f"be read back ({reason}); roll the session back and check",
            url=self.safe_url,
            objects=[s.obj for s in plan.states],
        )


def default_client_options() -> dict[str, Any]:
    """Options redmap passes to redis-py unless the user overrides them."""
    return {"socket_connect_timeout": 10.0, "socket_timeout": 30.0}


def build_standalone_client(url: str, **options: Any) -> redis.Redis:
    opts = default_client_options()
    opts.update(options)
    return redis.Redis.from_url(url, **opts)
