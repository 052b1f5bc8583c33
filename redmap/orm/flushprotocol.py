"""The flush protocol as one I/O-free state machine; drivers only move its bytes.

`FlushProtocol.run()` is a generator. It yields requests (`RoundTrip` on the flush
connection, `ClientExecute` through the client, `Settle` on a fresh connection,
`Redirect` to learn a cluster's topology again) and receives the replies, or `Lost`
when the driver's connection failed; a driver also throws into it what its client
raised (`ClientExecute`). It returns when the flush was applied and raises the
`redmap.exc` error that ends it otherwise. Everything the protocol decides lives
here, once, for every driver: when to WATCH and check, when ids are handed out
and bound, when a refused flush gives its ids back, when the unit of work plans
again (`Replan`, `IdsTaken`), how a lost EXEC reply is settled, which objects are in
doubt, when a connection must be dropped instead of reused (`broken`).

The states and transitions are drawn in docs/design/layers.md; why the checks keep
concurrent writers out is docs/design/flush-concurrency.md. No redis import: this
module is tested by feeding it replies (tests/test_flush_protocol.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, NoReturn, Protocol

from ..commands import Command
from ..exc import (
    FlushError,
    OutcomeUnknownError,
    RedmapConnectionError,
    RedmapError,
    StaleDataError,
)
from . import flushscript, sweep
from .flushplan import FlushPlan, IdsTaken, NeedsScript, id_guard_key
from .gcpause import paused_gc
from .mapper import Mapper
from .persistence import InsertTask, bind_placeholders

__all__ = [
    "APPLIED_ATTR",
    "ID_RETRIES",
    "REDIRECT_RETRIES",
    "SCRIPT_THRESHOLD",
    "ScriptCache",
    "WATCH_RETRIES",
    "ClientExecute",
    "FlushJob",
    "FlushProtocol",
    "Lost",
    "Redirect",
    "Replan",
    "Reply",
    "Request",
    "RoundTrip",
    "Settle",
    "interrupted_outcome",
    "raise_interrupted",
]

log = logging.getLogger("redmap.engine")

# A flush re-runs its checks when EXEC reports that a watched key changed; the
# checks then say why (stale version, unique value taken). Only a writer that keeps
# touching watched keys without changing what redmap checks exhausts this.
WATCH_RETRIES = 5
# How many times a flush is planned again (ids handed out after the checks, or taken
# by explicit inserts).
ID_RETRIES = 5
# How many times one plan is started again after redirects (a slot migration in
# progress answers TRYAGAIN until its keys have moved).
REDIRECT_RETRIES = 50
# Flushes of more objects than this run as one script inside MULTI (`flushscript`):
# WATCH of every key they check would cost O(N^2) in the server.
SCRIPT_THRESHOLD = 64


# -- requests (what a driver is asked to do) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoundTrip:
    """Send `commands` in one write on the flush connection and read every reply (an
    error reply in its place). The driver checks a connection out of the pool of the
    node holding `route` on first use and keeps it until the protocol ends or asks for
    a `Redirect`. Reply: the list of replies, or `Lost`."""

    commands: list[Command]
    route: str


@dataclasses.dataclass(frozen=True)
class ClientExecute:
    """Send `commands` through the client (pipelined, routed per key, re-sent after a
    cut connection as reads are): for commands whose repetition is harmless (INCRBY of
    a counter: a repeated one only skips ids). Reply: the list of replies; what the
    client raised is thrown into the protocol."""

    commands: list[Command]


@dataclasses.dataclass(frozen=True)
class Settle:
    """One round trip on a fresh connection (outside the pool, which may share the
    fault) to the node holding `route`, disconnected afterwards. Reply: the list of
    replies, or `Lost` for any failure (refusals included)."""

    commands: list[Command]
    route: str


@dataclasses.dataclass(frozen=True)
class Redirect:
    """The cluster redirected the flush before it wrote anything: release the flush
    connection (disconnecting it if `FlushProtocol.broken`), pause, learn the topology
    again. The next `RoundTrip` checks out a connection anew. Reply: None."""

    attempt: int


Request = RoundTrip | ClientExecute | Settle | Redirect


@dataclasses.dataclass(frozen=True)
class Lost:
    """The reply of a round trip whose connection failed (cut, reset, timeout; for a
    `Settle`, any failure): `cause` names what the driver caught."""

    cause: str


Reply = list[Any] | Lost | None


class FlushJob(Protocol):
    """What the protocol asks of the unit of work: planning, no I/O."""

    @property
    def inserts(self) -> list[InsertTask]:
        """The inserts of the flush; generated ids are bound into them."""
        ...

    def ids_first(self) -> bool:
        """Whether generated ids must be handed out before the checks."""
        ...

    @property
    def size(self) -> int:
        """How many objects the flush writes (it picks the commit strategy)."""
        ...

    @property
    def has_increments(self) -> bool:
        """Whether a field is incremented (`Model.field + n`): only the flush script
        applies increments."""
        ...

    def plan(self) -> FlushPlan:
        """A plan of the flush with the ids handed out so far (placeholders for the
        others)."""
        ...


@dataclasses.dataclass
class ScriptCache:
    """Whether the server(s) of an engine are known to hold the flush script: kept by
    the driver across flushes; a NOSCRIPT reply (restart, failover, another node of a
    cluster) is handled whatever it says."""

    loaded: bool = False


class Replan(Exception):
    """A flush whose generated ids were handed out after its checks must check again
    (EXEC aborted, or a redirect): its plan did not check the ids' own keys, so the
    flush is planned again with the ids. Nothing was written."""


class _Redirected(Exception):
    """A reply said the slot lives elsewhere: nothing was written."""


def _no_script(reply: Any) -> bool:
    """Whether an EXEC reply says the server does not know the script (redis-py
    parses `NOSCRIPT` into `NoScriptError` and drops the prefix from its text)."""
    return isinstance(reply, Exception) and (
        type(reply).__name__ == "NoScriptError" or str(reply).startswith("NOSCRIPT")
    )


def _own_replies(plan: FlushPlan, replies: list[Any]) -> list[Any]:
    """The EXEC replies of the flush's own commands; those of the sweeps queued after
    them (`FlushPlan.sweep`) are only noted (`sweep.piggyback_replies`)."""
    if not plan.sweep:
        return replies
    cut = len(replies) - len(plan.sweep)
    sweep.piggyback_replies(replies[cut:])
    return replies[:cut]


def _no_check(plan: FlushPlan) -> None:
    """The default `check_plan`: every plan can be sent."""


# -- the state machine --------------------------------------------------------------------


class FlushProtocol:
    """One flush, from its first check to its outcome (see the module docstring).

    `url` (without a password) is named in errors. `is_redirect(reply)` says whether an
    error reply means the slot lives elsewhere (MOVED, ASK, TRYAGAIN, CLUSTERDOWN: the
    driver knows its client's error types). `check_plan` refuses a plan before it is
    sent (the cluster's single-slot rule). `clock` is monotonic seconds.
    """

    def __init__(
        self,
        job: FlushJob,
        *,
        url: str,
        is_redirect: Callable[[Any], bool],
        check_plan: Callable[[FlushPlan], None] = _no_check,
        clock: Callable[[], float] = time.monotonic,
        redirect_retries: int = REDIRECT_RETRIES,
        script_threshold: int | None = SCRIPT_THRESHOLD,
        script_cache: ScriptCache | None = None,
    ):
        self.job = job
        self.script_cache = script_cache if script_cache is not None else ScriptCache()
        self.url = url
        self.is_redirect = is_redirect
        self.check_plan = check_plan
        self.clock = clock
        self.redirect_retries = redirect_retries
        # The flush connection failed or may hold unread replies or a WATCH: the
        # driver must disconnect it instead of returning it to the pool.
        self.broken = False
        # Counters moved for this flush: (counter key, first id, last id), oldest first.
        self.moved: list[tuple[str, int, int]] = []
        # Checks and writes run as one script inside MULTI instead of WATCH + checks
        # (`flushscript`): flushes of more than `script_threshold` objects (None: never).
        self.scripted = job.has_increments or (
            script_threshold is not None and job.size > script_threshold
        )
        # The reply to this flush's lone script invocation, sent already by the counter
        # lane (`redmap.orm.counterlane`): read as the first round trip's (`_scripted`).
        self.first: tuple[Reply, float] | None = getattr(job, "first_reply", None)

    # -- the whole flush ----------------------------------------------------------

    def run(self) -> Generator[Request, Reply, None]:
        """Hand out ids, plan, check and commit; plan again while the protocol says so."""
        job = self.job
        if self.scripted:
            # The script checks the ids' own keys at the commit point: ids come first.
            if any(t.generated for t in job.inserts):
                yield from self._hand_out_ids()
        elif job.ids_first():
            yield from self._hand_out_ids()
        plan: FlushPlan | None = None
        for attempt in range(ID_RETRIES):
            pending = [t for t in job.inserts if t.generated and t.pk is None]
            try:
                plan = job.plan()
                plan.moved_counters = self.moved
                self.check_plan(plan)
            except Exception:
                # Refused before anything was sent (a unique value twice in the flush, a
                # plan spanning slots): ids handed out already go back as after a refused
                # check, so that a failed flush leaves the counters as they were.
                if self.moved:
                    yield from self._give_back_unsent()
                raise
            try:
                yield from self._send(plan, pending)
            except Replan:
                continue  # the ids are ours now: plan with them, their checks included
            except IdsTaken as taken:
                if attempt + 1 < ID_RETRIES:
                    # Someone inserted some of our ids explicitly: take others.
                    yield from self._hand_out_ids()
                    continue
                raise StaleDataError(
                    f"explicit inserts kept taking the ids handed out to this flush, "
                    f"{ID_RETRIES} times; nothing was written{plan.counters_note()}",
                    objects=[t.state.obj for t in job.inserts if t.generated],
                    keys=taken.keys,
                ) from None
            return
        assert plan is not None
        raise StaleDataError(
            "watched keys kept changing during the flush; nothing was written"
            f"{plan.counters_note()}",
            objects=[st.obj for st in plan.states],
            keys=list(plan.watch),
        )

    def _send(self, plan: FlushPlan, pending: list[InsertTask]) -> Generator[Request, Reply, None]:
        """One plan, started again after redirects while it wrote nothing."""
        late = _LateIds(pending)
        for attempt in range(self.redirect_retries):
            if late.bound:
                raise Replan()  # sent before (a redirect): plan again with the ids
            try:
                if self.scripted:
                    yield from self._scripted(plan)
                else:
                    yield from self._transaction(plan, late)
                return
            except NeedsScript:
                # A unique value is held by an object that may be gone: the script reads
                # its deadline and takes the value over at the commit point.
                self.scripted = True
                if late.pending and not late.bound:
                    yield from self._hand_out_ids()
                    raise Replan() from None
                continue
            except _Redirected:
                # The slot moved or is migrating: nothing was written. The driver
                # releases the connection and learns the new owner.
                yield Redirect(attempt + 1)
                self.broken = False  # released: the next round trip uses a new one
        raise RedmapConnectionError(
            "the cluster kept redirecting the flush (slot migration?); nothing was written",
            url=self.url,
        )

    def _redirected(self, replies: Sequence[Any]) -> bool:
        is_redirect = self.is_redirect
        return any(is_redirect(r) for r in replies)

    # -- WATCH + checks, ids, MULTI/EXEC ------------------------------------------

    def _transaction(self, plan: FlushPlan, late: _LateIds) -> Generator[Request, Reply, None]:
        """WATCH + checks, then MULTI/writes/EXEC, on one connection.

        Round trips: 2, plus 2 per retry after a watched key changed, plus the INCRBY
        when ids are handed out after the checks. Nothing is re-sent after EXEC may have
        reached the server: a lost reply is settled by reading back the token.
        """
        route = plan.token_key
        for _ in range(WATCH_RETRIES):
            replies = yield RoundTrip([("WATCH", *plan.watch), *plan.check_commands], route)
            if isinstance(replies, Lost):
                self.broken = True
                raise self._lost_before_sent(replies)
            assert replies is not None
            if self._redirected(replies):
                yield from self._unwatch(route)
                raise _Redirected()
            if isinstance(replies[0], Exception):
                yield from self._unwatch(route)
                raise FlushError(
                    f"Redis refused WATCH ({replies[0]}); nothing was written",
                    errors=[str(replies[0])],
                )
            failure = plan.evaluate(replies[1:])
            if isinstance(failure, NeedsScript):
                yield from self._unwatch(route)
                raise failure
            if failure is not None:
                give_back = plan.give_back()
                if give_back:
                    yield from self._give_back_ids(give_back, route)
                else:
                    yield from self._unwatch(route)
                raise failure
            if late.pending and not late.bound:
                # Every check passed: only now may counters move (a refused flush
                # never moves one).
                try:
                    yield from self._hand_out_ids()
                except GeneratorExit:
                    raise
                except BaseException:
                    # Refused (OOM, wrong type, lost connection): the connection goes
                    # back to the pool, so it must not keep this flush's WATCH (a later
                    # MULTI on it, such as a query's, would fail).
                    yield from self._unwatch(route)
                    raise
                with paused_gc(len(plan.writes)):
                    plan.writes = bind_placeholders(plan.writes, late.ids())
                late.bound = True
            sent_at = self.clock()
            replies = yield RoundTrip(
                [("MULTI",), *plan.transaction, *plan.sweep, ("EXEC",)], route
            )
            if isinstance(replies, Lost):
                self.broken = True
                yield from self._after_lost_exec(plan, replies, sent_at)
                return
            assert replies is not None
            exec_reply = replies[-1]
            if exec_reply is None:
                if late.bound:
                    raise Replan()
                continue  # a watched key changed: re-run the checks to learn why
            if isinstance(exec_reply, Exception):
                # EXECABORT: a command was refused while queuing (e.g. OOM, or MOVED
                # during a slot migration); Redis discarded the whole transaction.
                if self._redirected(replies[1:-1]):
                    raise _Redirected()
                queued = [str(r) for r in replies[1:-1] if isinstance(r, Exception)]
                raise plan.refused_at_queue(queued or [str(exec_reply)], len(replies) - 2)
            plan.check_exec_reply(_own_replies(plan, list(exec_reply)))
            return
        raise StaleDataError(
            "watched keys kept changing during the flush; nothing was written",
            objects=[s.obj for s in plan.states],
            keys=list(plan.watch),
        )

    def _scripted(self, plan: FlushPlan) -> Generator[Request, Reply, None]:
        """`WATCH token`, MULTI, the plan's script invocations, EXEC: one round trip
        (plus `SCRIPT LOAD` when the server does not know the script). A plan made only
        of increments (`FlushPlan.blind`) in one invocation sends that invocation alone.

        The script checks every precondition at the commit point and writes only when
        all hold (docs/design/flush-concurrency.md); the token is written by it, so a
        lost reply is settled as for the classic flush.
        """
        route = plan.token_key
        with paused_gc(len(plan.writes)):
            invocations = flushscript.encode(plan)
            evals: list[Command] = [
                ("EVALSHA", flushscript.SCRIPT_SHA, 1, plan.token_key, *inv.args)
                for inv in invocations
            ]
        # Until this engine saw the script run, the first invocation carries its body
        # (EVAL caches it), so that the first scripted flush needs no NOSCRIPT round trip.
        load = not self.script_cache.loaded
        # A plan made only of increments watches nothing but the token, which the script
        # checks itself: one invocation is then the whole transaction, atomic as a script
        # is, and WATCH/MULTI/EXEC around it would add three commands and no guarantee
        # (docs/design/flush-concurrency.md, "A flush made only of increments").
        alone = len(evals) == 1 and not plan.sweep and plan.blind
        for _ in range(WATCH_RETRIES):
            if load:
                evals[0] = ("EVAL", flushscript.SCRIPT, *evals[0][2:])
            commands = (
                evals
                if alone
                else [("WATCH", plan.token_key), ("MULTI",), *evals, *plan.sweep, ("EXEC",)]
            )
            replies: Reply
            if self.first is not None:
                # The counter lane sent `evals` alone (EVALSHA: it runs only once the
                # script is known to be loaded); its reply is this round trip's.
                assert alone and not load and len(evals) == 1
                (replies, sent_at), self.first = self.first, None
                if not isinstance(replies, Lost):
                    replies = [replies]
            else:
                sent_at = self.clock()
                replies = yield RoundTrip(commands, route)
            if isinstance(replies, Lost):
                self.broken = True
                yield from self._after_lost_exec(plan, replies, sent_at)
                return
            assert replies is not None
            if self._redirected(replies):
                raise _Redirected()
            if alone:
                # The script's reply, or Redis's refusal of it (NOSCRIPT, OOM): read as
                # the EXEC reply holding them would be.
                exec_reply: Any = replies
            else:
                # A refused WATCH does not stop the MULTI sent with it: the EXEC reply
                # says what happened (the script checks the token itself).
                exec_reply = replies[-1]
                if exec_reply is None:
                    continue  # the token changed under the WATCH: nothing ran
                if isinstance(exec_reply, Exception):
                    queued = [str(r) for r in replies[2:-1] if isinstance(r, Exception)]
                    raise plan.refused_at_queue(queued or [str(exec_reply)], len(replies) - 3)
            own = _own_replies(plan, list(exec_reply))
            if any(_no_script(r) for r in own):
                load = True  # nothing ran (a restart or failover emptied the cache)
                continue
            self.script_cache.loaded = True
            result = flushscript.outcome(plan, invocations, own)
            if result.error is None:
                plan.replies = result.wanted
                return
            if result.partial:
                for st in plan.states:
                    st.in_doubt = True
            elif result.by_checks and plan.give_back():
                # As after refusing checks on the classic path; a refused write (out of
                # memory) leaves the ids unused, as an EXEC refused at queue time does.
                yield from self._give_back_unsent()
            raise result.error
        raise StaleDataError(
            "the flush token kept changing during the flush; nothing was written",
            objects=[s.obj for s in plan.states],
            keys=[plan.token_key],
        )

    def _lost_before_sent(self, lost: Lost) -> RedmapConnectionError:
        return RedmapConnectionError(
            f"connection lost before the flush was sent; nothing was written ({lost.cause})",
            url=self.url,
        )

    def _unwatch(self, route: str) -> Generator[Request, Reply, None]:
        """UNWATCH; a failed connection is marked broken (disconnect, do not reuse)."""
        reply = yield RoundTrip([("UNWATCH",)], route)
        if isinstance(reply, Lost):
            self.broken = True

    def _give_back_unsent(self) -> Generator[Request, Reply, None]:
        """Give back the ids of a flush refused before its checks were sent: as
        `_give_back_ids`, watching the models' id guards itself (no flush WATCH holds
        them), so that an explicit insert of one of these ids since makes it keep them."""
        ranges = {key: (first, last) for key, first, last in self.moved}
        guards = {
            id_guard_key(t.ks if t.ks is not None else t.state.mapper.keys)
            for t in self.job.inserts
            if t.generated
        }
        yield from self._give_back_ids(ranges, next(iter(ranges)), also_watch=sorted(guards))

    def _give_back_ids(
        self,
        ranges: dict[str, tuple[int, int]],
        route: str,
        *,
        also_watch: Sequence[str] = (),
    ) -> Generator[Request, Reply, None]:
        """Return the ids of a flush its checks refused, so that a refused flush leaves
        its counters as they were.

        Still under the flush's WATCH (its id guards included): a counter is set back
        only if it still ends the range handed out (nobody took ids since) and EXEC
        finds nothing watched changed (no explicit insert took one of these ids). Any
        doubt leaves the ids unused, a harmless gap. Two round trips, on refusal only; every
        key of a range is probed (EXISTS), which costs its length, on refusal only.
        """
        keys_ = list(ranges)
        # Every key of a range handed out must still be absent: an explicit insert may
        # have taken one of these ids between the INCRBY and this WATCH (it then wrote
        # the id guard, but before the WATCH saw it), and a counter set back would hand
        # that id out again to a flush that does not check it. An id of a sharded model
        # may live in any shard: every shard's key is probed (on a cluster they span
        # slots, Redis refuses the probe, and the ids stay a gap).
        by_seq = {t.state.mapper.keys.seq(): t.state.mapper for t in self.job.inserts}
        probes: dict[str, Command] = {}
        for seq, (first, last) in ranges.items():
            mapper = by_seq.get(seq)
            if mapper is None:
                continue
            ids = range(first, last + 1)
            if mapper.shard_key is None:
                keys = [mapper.keys.object(str(n)) for n in ids]
            else:
                keys = [
                    ks.object(str(n if ks.shard is None else mapper.shard_id(n, ks.shard)))
                    for ks in mapper.all_keyspaces()
                    for n in ids
                ]
            probes[seq] = ("EXISTS", *keys)
        replies = yield RoundTrip(
            [("WATCH", *also_watch, *keys_), *[("GET", k) for k in keys_], *probes.values()],
            route,
        )
        if isinstance(replies, Lost):
            self.broken = True
            return
        assert replies is not None
        absent = {
            seq: reply == 0
            for seq, reply in zip(probes, replies[1 + len(keys_) :], strict=True)
        }
        undo: list[Command] = []
        for key, reply in zip(keys_, replies[1 : 1 + len(keys_)], strict=True):
            first, last = ranges[key]
            if not absent.get(key, False):
                continue
            if isinstance(reply, bytes) and reply.isdigit() and int(reply) == last:
                undo.append(("SET", key, first - 1) if first > 1 else ("DEL", key))
        # EXEC, aborted or not, ends the WATCH.
        done = yield RoundTrip([("MULTI",), *undo, ("EXEC",)] if undo else [("UNWATCH",)], route)
        if isinstance(done, Lost):
            self.broken = True

    # -- generated ids ------------------------------------------------------------

    def _hand_out_ids(self) -> Generator[Request, Reply, None]:
        """Give every generated-id insert its id: one pipelined INCRBY per model.

        Generated ids skip the explicit ids of the same model in this flush (the INCRBY
        asks for that many more). What moved goes to `self.moved`.
        """
        wanting: dict[Mapper[Any], list[InsertTask]] = {}
        explicit: dict[Mapper[Any], set[Any]] = {}
        for task in self.job.inserts:
            mapper = task.state.mapper
            if task.generated:
                task.pk = None  # a second allocation (ids taken): all new ones
                wanting.setdefault(mapper, []).append(task)
            else:
                explicit.setdefault(mapper, set()).add(task.pk)
        while wanting:
            groups = list(wanting.items())
            # Asking for as many more ids as the model has explicit ones here means one
            # INCRBY always suffices (the loop is a safety net).
            extra = {m: len(explicit.get(m, ())) for m, _ in groups}
            commands: list[Command] = [
                ("INCRBY", m.keys.seq(), len(ts) + extra[m]) for m, ts in groups
            ]
            try:
                replies = yield ClientExecute(commands)
            except RedmapConnectionError as exc:
                if isinstance(exc, OutcomeUnknownError) or not str(exc).startswith(
                    "cannot talk to Redis"
                ):
                    raise
                names = ", ".join(repr(cmd[1]) for cmd in commands)
                raise RedmapConnectionError(
                    f"connection lost before the flush was sent; nothing was written (it "
                    f"was handing out ids: {names} may have moved, and ids are never "
                    f"reused)",
                    url=exc.url,
                ) from None
            assert isinstance(replies, list)
            wanting = {}
            for (mapper, tasks), reply in zip(groups, replies, strict=True):
                seq = mapper.keys.seq()
                if isinstance(reply, Exception):
                    # Not only a wrong type: OOM, NOPERM, READONLY refuse INCRBY as well.
                    raise FlushError(
                        f"cannot hand out {mapper.name} ids: Redis refused INCRBY on "
                        f"{seq!r} ({type(reply).__name__}: {reply}); nothing was written",
                        key=seq,
                        errors=[str(reply)],
                    )
                last = int(reply)
                first = last - len(tasks) - extra[mapper] + 1
                self.moved.append((seq, first, last))
                taken = explicit.get(mapper, set())
                counter_values = iter(range(first, last + 1))
                for task in tasks:
                    for n in counter_values:
                        ks = task.ks or mapper.keys
                        pk = n if ks.shard is None else mapper.shard_id(n, ks.shard)
                        if pk in taken:
                            continue
                        task.pk = pk
                        # Generated keys are ints, whose segment is their decimal text
                        # (what `pk_segment` makes of them).
                        task.segment = str(pk)
                        task.key = ks.object(task.segment)
                        break
                    else:
                        wanting.setdefault(mapper, []).append(task)

    # -- a lost EXEC reply --------------------------------------------------------

    def _after_lost_exec(
        self, plan: FlushPlan, lost: Lost, sent_at: float
    ) -> Generator[Request, Reply, None]:
        """Settle a flush whose EXEC reply never came: return if applied, raise if not.

        The token key is watched by the flush and written by its EXEC. Creating it with
        SET NX either finds it (the flush was applied) or creates it, which also makes a
        late EXEC still queued on the old connection fail its WATCH. Creating it proves
        nothing once the token's lifetime has passed since the EXEC was sent: the
        flush's own token may have come and gone. OutcomeUnknownError, marking the
        plan's objects in doubt, when the read-back fails, is refused, or comes too late.
        """
        replies = yield Settle(
            [("SET", plan.token_key, b"settled", "NX", "PX", plan.token_ttl_ms)],
            plan.token_key,
        )
        if isinstance(replies, Lost):
            raise self._outcome_unknown(plan, replies.cause)
        assert replies is not None
        if isinstance(replies[0], Exception):
            # Refused (OOM, LOADING, READONLY, ...): the outcome is just as unknown.
            raise self._outcome_unknown(plan, type(replies[0]).__name__)
        applied = replies[0] is None
        if not applied and self.clock() - sent_at >= plan.token_ttl_ms / 1000:
            raise self._outcome_unknown(plan, "the read-back came after the token's lifetime")
        if applied:
            log.warning("flush reply lost (%s); read-back shows it was applied", lost.cause)
            return
        raise RedmapConnectionError(
            f"connection lost during the flush ({lost.cause}); read-back shows nothing was written",
            url=self.url,
        )

    def _outcome_unknown(self, plan: FlushPlan, reason: str) -> OutcomeUnknownError:
        """The error for an unsettled flush; marks the plan's objects as in doubt."""
        for st in plan.states:
            st.in_doubt = True
        return OutcomeUnknownError(
            f"the flush's EXEC was sent but its reply was lost and the outcome could not "
            f"be read back ({reason}); roll the session back and check",
            url=self.url,
            objects=[s.obj for s in plan.states],
        )


class _LateIds:
    """Inserts of one plan whose ids are handed out after its checks.

    Once bound, the checks sent did not cover the ids' own keys: a re-run of the checks
    must come from a new plan (`Replan`), not from this one.
    """

    def __init__(self, pending: list[InsertTask]):
        self.pending = pending
        # Placeholder segment (`#new<n>`) of each, taken before the ids replace them.
        self.placeholders = {t.segment: t for t in pending}
        self.bound = False

    def ids(self) -> dict[str, str]:
        return {ph: t.segment for ph, t in self.placeholders.items()}


#: The attribute a flush's interruption (`KeyboardInterrupt`, `asyncio.CancelledError`)
#: carries once the driver settled it: True applied, False nothing written, None unknown.
APPLIED_ATTR = "redmap_applied"


def interrupted_outcome(
    error: BaseException | None, interrupt: BaseException, *, after_end: bool = False
) -> bool | None:
    """Whether a flush the driver interrupted was applied, from how its protocol ended.

    The protocol returned (`error` None): applied, True. `OutcomeUnknownError`: None.
    Any other redmap error, or the interruption itself thrown back into the protocol
    (while ids were handed out or at a redirect, both before the EXEC): nothing written,
    False; the protocol raises nothing else after a lost reply. `after_end`: the
    interruption was taken up only once the protocol had ended (it came while the
    connection was given back, or its CancelledError was swallowed on the way), so a
    `FlushError` may be a command refused inside EXEC, the rest applied: None. An error
    that is none of these (a bug) is None: nothing is promised.
    """
    if error is None:
        return True
    if isinstance(error, OutcomeUnknownError):
        return None
    if after_end and isinstance(error, FlushError):
        return None
    if error is interrupt or isinstance(error, RedmapError):
        return False
    return None


def raise_interrupted(
    interrupt: BaseException, error: BaseException | None, *, after_end: bool = False
) -> NoReturn:
    """Raise the interruption a flush driver absorbed, now that the protocol has ended,
    with its outcome in `APPLIED_ATTR`; the protocol's own error, if any, is its cause."""
    setattr(interrupt, APPLIED_ATTR, interrupted_outcome(error, interrupt, after_end=after_end))
    if error is None or error is interrupt:
        raise interrupt
    raise interrupt from error
