"""`FlushPlan`: what one flush sends (watched keys, checks, writes), and what the check
replies mean; no I/O.

Built by `persistence.plan_flush`, sent by the flush protocol (`flushprotocol`), which
asks the plan whether its checks passed (`evaluate`) and how to word a refusal. The concurrency
argument behind the checks: `docs/design/flush-concurrency.md`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..commands import Command
from ..exc import FlushError, IntegrityError, StaleDataError
from . import keys
from .keys import KeySpace

if TYPE_CHECKING:
    from .state import InstanceState

__all__ = [
    "MAX_DISTINCT_ERRORS",
    "TOKEN_TTL_MS",
    "ZADD_INCREMENTED",
    "Check",
    "FlushPlan",
    "IdsTaken",
    "NeedsScript",
    "guard_write",
    "id_guard_key",
    "summarise_errors",
]

# How long a flush's token outlives it. Settling a lost reply normally takes one
# socket timeout; a read-back that only succeeds after this long cannot tell "applied
# and expired" from "never applied" and reports the outcome as unknown instead.
TOKEN_TTL_MS = 120_000

# A pseudo-command of a plan's writes, `(ZADD_INCREMENTED, zset, i, member)`: set the
# member's score to the value the plan's i-th increment returned. Only the flush
# script runs it (flushes with increments are always scripted).
ZADD_INCREMENTED = "#ZADD-INCREMENTED"

# How many distinct error texts a FlushError quotes (a refused transaction of N commands
# can answer N copies of one error, e.g. out of memory).
MAX_DISTINCT_ERRORS = 5


def id_guard_key(ks: KeySpace) -> str:
    """The key a flush inserting an explicit id at or below the model's counter writes,
    and every flush inserting generated ids of the model watches: such an explicit id
    may have been handed out to a flush that has not written it yet.

    A short-lived flush marker under the keyspace's tag (one per shard), so the audit
    and keyspace dumps treat it as bookkeeping. See docs/design/flush-concurrency.md.
    """
    return keys.flush_token_key(ks.tag, "ids:" + ks.keyspace)


def summarise_errors(errors: Sequence[str]) -> tuple[str, list[str]]:
    """A bounded description of many error replies: the count and the first distinct
    texts (each cut to 200 characters), and that list of distinct texts."""
    distinct: list[str] = []
    for e in errors:
        text = e if len(e) <= 200 else e[:200] + "..."
        if text not in distinct:
            distinct.append(text)
            if len(distinct) == MAX_DISTINCT_ERRORS:
                break
    more = "" if len(set(errors)) <= len(distinct) else "; and others"
    return "; ".join(distinct) + more, distinct


class NeedsScript(Exception):
    """A unique value this flush claims is held by another object of a model with
    deadlines: whether that holder is gone is read and acted on atomically by the flush
    script, so the protocol sends the plan again as a script (docs/expiry.md)."""


class IdsTaken(Exception):
    """Generated ids handed to this flush are held by objects someone inserted with
    those ids explicitly: the unit of work takes new ids and plans again."""

    def __init__(self, keys_: Sequence[str]):
        self.keys = list(keys_)
        super().__init__(f"generated ids already taken: {self.keys[:3]}")


@dataclasses.dataclass
class Check:
    """One command sent after WATCH whose reply must match before MULTI is sent."""

    kind: str  # "version" | "absent" | "fresh" | "unique" | "type" | "seqmax" | ...
    key: str
    command: Command
    expected: Any = None
    state: InstanceState | None = None
    field: str | None = None
    value: Any = None
    # seqmax: the id guard to write when an explicit id is at or below the counter.
    guard: str | None = None
    # unique, on a model with deadlines: (the deadline zset, now in ms). A value held by
    # an object whose deadline passed may be taken over; only the flush script decides
    # that (`NeedsScript`), since it reads the holder's deadline at the commit point.
    takeover: tuple[str, int] | None = None


def _version_matches(reply: Any, expected: tuple[int | None, bytes | None]) -> bool:
    """Whether a stored (`#v`, `#i`) is what the session loaded: the version compared as
    numbers ("01" is 1), the incarnation as bytes (absent matches only absent: data
    written before incarnations existed)."""
    version, incarnation = reply
    want_version, want_incarnation = expected
    if incarnation != want_incarnation:
        return False
    if version is None or want_version is None:
        return version is None and want_version is None
    return isinstance(version, bytes) and version.isdigit() and int(version) == want_version


@dataclasses.dataclass
class FlushPlan:
    """Everything one flush sends, as data."""

    token_key: str
    token_ttl_ms: int
    watch: list[str]
    checks: list[Check]
    writes: list[Command]
    states: list[InstanceState]
    # Writes decided by the check replies (raising a counter past an explicit id,
    # writing an id guard).
    extra_writes: list[Command] = dataclasses.field(default_factory=list)
    # Counters moved for this flush ("'<key>' handed out 1..3"): ids are never given
    # back, so a refusal after they moved names them.
    # (counter key, first id, last id) per INCRBY, oldest first.
    moved_counters: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    # The last check replies said an explicit insert holds one of this flush's ids:
    # then they must never be given back (`give_back`).
    ids_taken: bool = False
    # Planned for a session opened with allow_cross_slot=True (one part of a flush
    # split by hash tag): a refusal must not advise setting it.
    cross_slot_allowed: bool = False
    # The plan's first writes are increments: the state and field (None: `#v`) of each,
    # in order; once applied, `replies` holds what Redis computed for them (None when
    # the reply was lost and the flush settled as applied: the values are unknown).
    incremented: list[tuple[InstanceState, str | None]] = dataclasses.field(
        default_factory=list
    )
    replies: list[Any] | None = None
    # Bounded sweeps queued after the writes in the same MULTI (`sweep.piggyback`):
    # their replies are not the flush's, and their failures never fail it.
    sweep: list[Command] = dataclasses.field(default_factory=list)
    # Made only of increments (`persistence.plan_increments`): nothing to watch but the
    # token, so one script invocation is the whole transaction (no WATCH/MULTI/EXEC).
    blind: bool = False

    def give_back(self) -> dict[str, tuple[int, int]]:
        """The ids a refused flush may return to their counters: the last range handed
        out per counter, unless an explicit insert holds one of the flush's ids. The
        protocol returns them only if the counter still ends the range and nothing this
        flush watches (its id guards among them) changed since its checks."""
        if self.ids_taken:
            return {}
        return {key: (first, last) for key, first, last in self.moved_counters}

    @property
    def check_commands(self) -> list[Command]:
        return [c.command for c in self.checks]

    @property
    def transaction(self) -> list[Command]:
        """The commands between MULTI and EXEC."""
        return [*self.writes[:-1], *self.extra_writes, self.writes[-1]]

    def counters_note(self) -> str:
        """What a refused flush moved although it wrote nothing ("" when nothing)."""
        if not self.moved_counters:
            return ""
        return (
            f" (the id counter moved: "
            f"{', '.join(f'{k!r} handed out {a}..{b}' for k, a, b in self.moved_counters)}; "
            f"ids handed out are "
            f"never reused)"
        )

    def refused_at_queue(self, errors: Sequence[str], queued: int) -> FlushError:
        """The error for a transaction Redis discarded (EXECABORT): short whatever the
        number of refusals (out of memory answers one per queued command)."""
        summary, distinct = summarise_errors(errors)
        return FlushError(
            f"Redis refused the flush before running it ({len(errors)} of {queued} queued "
            f"commands refused: {summary}); nothing was written{self.counters_note()}",
            errors=distinct,
        )

    def evaluate(self, replies: Sequence[Any]) -> Exception | None:
        """The error that stops this flush given the check replies, or None to go ahead.

        Staleness wins: when any object changed or vanished, the error is
        StaleDataError (retryable) whatever else failed, since the other failures may
        be consequences of the same concurrent change.
        """
        return self.evaluate_pairs(list(zip(self.checks, replies, strict=True)), classic=True)

    def evaluate_pairs(
        self, pairs: Sequence[tuple[Check, Any]], *, classic: bool = False
    ) -> Exception | None:
        """`evaluate` over some checks and their replies (a scripted flush reports the
        checks of its refusing invocations only: a check that held adds nothing)."""
        stale: list[Check] = []
        refused: Exception | None = None  # an error reply: the key cannot be used
        conflict: Exception | None = None  # a taken primary key or unique value
        wrong_type: Exception | None = None
        taken: list[str] = []  # generated ids held by explicit inserts
        maybe_gone = False  # a unique holder that may have passed its deadline
        self.extra_writes = []
        self.ids_taken = False
        for check, reply in pairs:
            if isinstance(reply, Exception):
                if refused is None:
                    refused = FlushError(
                        f"key {check.key!r} cannot be used by this flush ({reply}); nothing "
                        f"was written",
                        key=check.key,
                        errors=[str(reply)],
                    )
            elif check.kind == "version":
                if not _version_matches(reply, check.expected):
                    stale.append(check)
            elif check.kind == "absent":
                if reply and conflict is None:
                    st = check.state
                    name = st.mapper.name if st else "?"
                    conflict = IntegrityError(
                        f"{name} with primary key {check.value!r} already exists; nothing was "
                        f"written",
                        model=name,
                        field=st.mapper.pk.key if st else None,
                        value=check.value,
                        key=check.key,
                    )
            elif check.kind == "fresh":
                if reply:
                    taken.append(check.key)
            elif check.kind == "unique":
                if (
                    classic
                    and check.takeover is not None
                    and reply is not None
                    and reply not in check.expected
                ):
                    maybe_gone = True
                elif reply is not None and reply not in check.expected and conflict is None:
                    st = check.state
                    name = st.mapper.name if st else "?"
                    conflict = IntegrityError(
                        f"{name}.{check.field} value {check.value!r} is already taken (unique); "
                        f"nothing was written",
                        model=name,
                        field=check.field,
                        value=check.value,
                        key=check.key,
                    )
            elif check.kind == "unswept":
                # Says more than the "already exists" of the same key's absence check.
                if reply is not None and (
                    conflict is None or getattr(conflict, "key", None) == check.key
                ):
                    st = check.state
                    name = st.mapper.name if st else "?"
                    conflict = IntegrityError(
                        f"{name} with primary key {check.value!r} expired or was deleted, "
                        f"and its index entries await the sweep: run `redmap sweep` (or "
                        f"Engine.sweep) before inserting it again; nothing was written",
                        model=name,
                        field=st.mapper.pk.key if st else None,
                        value=check.value,
                        key=check.key,
                    )
            elif check.kind == "incarnation":
                if reply != check.expected:
                    stale.append(check)
            elif check.kind in ("exists", "target"):
                if not reply:
                    stale.append(check)
            elif check.kind == "members":
                if set(reply) != check.expected:
                    stale.append(check)
            elif check.kind == "seqmax":
                # An explicit id above the counter would later collide with a generated
                # one: raise the counter. One at or below it may be handed out already:
                # write the guard that generated flushes watch.
                if reply is not None and not (isinstance(reply, bytes) and reply.isdigit()):
                    if refused is None:
                        refused = FlushError(
                            f"key {check.key!r} is not an id counter ({reply!r}); nothing "
                            f"was written",
                            key=check.key,
                        )
                    continue
                current = 0 if reply is None else int(reply)
                if current < check.value:
                    self.extra_writes.append(("SET", check.key, check.value))
                if check.expected <= current and check.guard is not None:
                    self.extra_writes.append(guard_write(check.guard))
            elif check.kind == "type":
                kind = reply.decode() if isinstance(reply, bytes) else str(reply)
                if kind not in ("none", check.expected) and wrong_type is None:
                    wrong_type = FlushError(
                        f"key {check.key!r} holds a {kind}, not a {check.expected}; nothing "
                        f"was written",
                        key=check.key,
                    )
        self.ids_taken = bool(taken)
        if stale:
            return self._stale(stale)
        for failure in (refused, conflict, wrong_type):
            if failure is not None:
                return failure
        if maybe_gone:
            return NeedsScript()
        if taken:
            return IdsTaken(taken)
        return None

    @staticmethod
    def _stale(stale: list[Check]) -> StaleDataError:
        objs = list({id(c.state): c.state.obj for c in stale if c.state is not None}.values())
        desc = ", ".join(
            dict.fromkeys(
                str(c.value)  # a replace_all guard: what it lists
                if c.state is None
                else f"the {c.expected}({c.value!r}) that {c.state.mapper.name}.{c.field} "
                f"points at"
                if c.kind == "target"
                else f"{c.state.mapper.name}({c.value!r})"
                for c in stale
            )
        )
        return StaleDataError(
            f"{desc} changed or was deleted since it was loaded; nothing was written",
            objects=objs,
            keys=list(dict.fromkeys(c.key for c in stale)),
        )

    def check_exec_reply(self, replies: list[Any]) -> None:
        """Raise FlushError if a command failed inside EXEC (then Redis applied the rest)."""
        errors = [(i, r) for i, r in enumerate(replies) if isinstance(r, Exception)]
        if not errors:
            return
        first_cmd = self.transaction[errors[0][0]]
        key = str(first_cmd[1]) if len(first_cmd) > 1 else None
        for st in self.states:
            st.in_doubt = True
        summary, distinct = summarise_errors([str(e) for _, e in errors])
        raise FlushError(
            f"Redis rejected {len(errors)} command(s) inside EXEC, first on key {key!r}: "
            f"{summary}; the other commands were applied: roll the session back so the "
            f"objects reload from what Redis holds",
            key=key,
            errors=distinct,
        )


def guard_write(guard: str) -> Command:
    # Any write of the guard aborts the generated flushes watching it; the TTL keeps it
    # from piling up (its expiry also aborts them, harmlessly: they check again).
    return ("SET", guard, b"1", "PX", TOKEN_TTL_MS)
