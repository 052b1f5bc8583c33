"""The counter lane: a flush made only of increments of one object, sent the short way.

A hot counter's commit (`p.score = Player.score + 1; session.commit()`) is the whole
workload of some applications: many processes, one object, one small change each time.
Its flush is `IncrementFlush` (no relationship work, no version check, one script
invocation sent alone), but the general path still builds a unit of work, a
`FlushPlan`, the plan's script encoding and the flush protocol's generators for it:
some 70 microseconds of Python per commit, three times what the round trip costs the
client (docs/performance.md, "A hot counter").

The lane builds the very invocation the general path sends for that flush, argument for
argument (tests/test_counter_lane.py compares it with `flushscript.encode` of
`plan_increments`), asks the sync driver to send it alone (`Engine.lone_script`) and, when
the script answers that it applied everything, records the values Redis computed as
`UOWTransaction.finalize` does (`unitofwork.record_increment`).

Anything else is the general path's: a refusal, `NOSCRIPT`, a redirect, a lost reply or
an interrupted round trip is handed, with the reply and the moment it was sent, to the
flush protocol as the first reply of the same flush (same token: `IncrementFlush` with
`first_reply`), which reads it as it reads its own. So errors, settling and objects in
doubt are worded and decided in one place. When the driver does not send the
invocation (the script not yet known to be loaded, an asyncio driver, no connection),
the general path runs the flush from the start.

The lane takes only what it can prove equal: one persistent object of a model without
shards, deadlines or `UpdatedAt`, every pending change an increment of a field that no
list is ordered by, no listener, nothing else pending in the session. No I/O here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..commands import LoneReply, LoneScript, Steps
from ..query.expression import Increment
from . import flushscript, keys
from .flushplan import TOKEN_TTL_MS
from .flushprotocol import raise_interrupted
from .mapper import Mapper
from .persistence import UpdateTask
from .types import increment_command
from .unitofwork import IncrementFlush, incrementable, only_changes_pending, record_increment

if TYPE_CHECKING:
    from .context import SessionContext
    from .state import InstanceState

__all__ = ["CounterLane", "increment_text"]


def increment_text(delta: Any) -> str:
    """A delta as the flush sends it (`repr` keeps every digit of a float)."""
    return repr(delta) if isinstance(delta, float) else str(delta)


class _Form:
    """What the lane needs of a model, worked out once: its hash tag, and per field the
    increment command (None: not incrementable), its Sorted zset (None: not sorted), and
    whether a list is ordered by it."""

    __slots__ = ("fields", "prefix", "tag", "token_prefix")

    def __init__(self, mapper: Mapper[Any]) -> None:
        ks = mapper.keys
        self.tag = ks.tag
        # Object keys are `prefix + segment` (`KeySpace.object`), token keys
        # `token_prefix + token` (`keys.flush_token_key`): built by concatenation.
        self.prefix = ks.object_prefix
        self.token_prefix = keys.flush_token_key(self.tag, "")
        assert keys.flush_token_key(self.tag, "t") == self.token_prefix + "t"
        assert ks.object("s") == self.prefix + "s"
        ordering = {c.order_column for c in mapper.indexed_columns}
        self.fields: dict[str, tuple[str | None, str | None, bool]] = {}
        for name, col in mapper.columns.items():
            command = None if col.codec is None else increment_command(col.codec)
            zset = ks.sorted(name) if col.sorted else None
            self.fields[name] = (command, zset, name in ordering)


# The lane's form of each model (None: the lane never takes it). Mappers live as long
# as their registry; a few entries per application.
_FORMS: dict[int, tuple[Mapper[Any], _Form | None]] = {}


def _form(mapper: Mapper[Any]) -> _Form | None:
    known = _FORMS.get(id(mapper))
    if known is not None and known[0] is mapper:
        return known[1]
    form = (
        None
        if mapper.shard_keys
        or mapper.shard_key is not None
        or mapper.expiry.tracked
        or mapper.expiry.updated is not None
        else _Form(mapper)
    )
    _FORMS[id(mapper)] = (mapper, form)
    return form


class CounterLane:
    """One object's increments as the lone script invocation that applies them."""

    __slots__ = ("changes", "command", "route", "state")

    def __init__(
        self,
        state: InstanceState,
        changes: dict[str, tuple[Any, bytes | None]],
        command: tuple[Any, ...],
        route: str,
    ) -> None:
        self.state = state
        self.changes = changes
        self.command = command
        self.route = route

    @classmethod
    def collect(cls, session: SessionContext) -> CounterLane | None:
        """The lane for what `session` has pending, or None (the general path then runs).
        No I/O, nothing in the session changes."""
        if not only_changes_pending(session):
            return None
        modified = session.identity_map.modified
        if len(modified) != 1:
            return None
        (st,) = modified
        if not incrementable(st, session):
            return None
        incarnation = st.incarnation
        key = st.key
        assert incarnation is not None and key is not None
        form = _form(st.mapper)
        if form is None or not key.startswith(form.prefix):
            return None
        d = st.obj.__dict__
        fields = form.fields
        changes: dict[str, tuple[Any, bytes | None]] = {}
        incs: list[Any] = []
        checks: list[Any] = ["n", key, incarnation]
        sorted_: list[Any] = []
        segment: str | None = None
        for name in st.modified:
            inc = d.get(name)
            if type(inc) is not Increment:
                return None
            verb, zset, ordering = fields[name]
            if verb is None or ordering:
                return None
            changes[name] = (inc, None)
            incs += (-4, verb, key, name, increment_text(inc.delta))
            if zset is not None:
                if segment is None:
                    segment = key[len(form.prefix) :]
                checks += ("t", zset, "zset")
                sorted_ += ("z", zset, segment, len(changes))
        token_key = form.token_prefix + os.urandom(16).hex()
        command = (
            "EVALSHA",
            flushscript.SCRIPT_SHA,
            1,
            token_key,
            "fl",
            len(checks) // 3,
            TOKEN_TTL_MS,
            *checks,
            *incs,
            -4,
            "HINCRBY",
            key,
            "#v",
            1,
            *sorted_,
        )
        return cls(st, changes, command, token_key)

    @property
    def request(self) -> LoneScript:
        """What the sync driver sends (`Engine.lone_script`)."""
        return LoneScript(self.route, self.command)

    def finish(self, session: SessionContext, sent: LoneReply | None) -> Steps[IncrementFlush]:
        """The flush when the invocation was not sent (`sent` None: the general path from
        the start) or not answered with the plain success: the flush protocol reads its
        reply as its own (`IncrementFlush.first_reply`, same token). An interrupted
        round trip is settled there, then the KeyboardInterrupt goes on carrying the
        outcome, as from the general driver. Returns the `IncrementFlush` that ran."""
        if sent is None:
            job = self.job(session, None)
            yield from job.execute_steps()
            return job
        job = self.job(session, (sent.reply, sent.sent_at))
        if sent.interrupt is None:
            yield from job.execute_steps()
            return job
        try:
            yield from job.execute_steps()
        except BaseException as error:
            raise_interrupted(sent.interrupt, error)
        raise_interrupted(sent.interrupt, None)

    def record(self, reply: Any) -> bool:
        """Record what Redis computed if the script applied everything: True; anything
        else (a refusal, an error, a lost reply): False, nothing recorded."""
        if type(reply) is not list or len(reply) != 2 or reply[0] != 1:
            return False
        wanted: Sequence[Any] = reply[1]
        changes = self.changes
        if type(wanted) is not list or len(wanted) != len(changes) + 1:
            return False
        st = self.state
        modified = st.modified
        for (name, (inc, _)), value in zip(changes.items(), wanted, strict=False):
            if record_increment(st, name, inc, value):
                modified.discard(name)
        st.version = int(wanted[-1])
        if not modified and st.session is not None:
            st.session.identity_map.modified.discard(st)
        return True

    def job(self, session: SessionContext, first: tuple[Any, float] | None) -> IncrementFlush:
        """The same flush for the general path: the same token when a reply is handed
        over with it, a fresh one (from `start`) when nothing was sent."""
        st = self.state
        assert st.key is not None
        flush = IncrementFlush(session)
        flush.updates = [
            UpdateTask(
                st,
                st.mapper.pk_segment(st.pk),
                st.key,
                dict(self.changes),
                st.mapper.keys_for_pk(st.pk),
            )
        ]
        if first is not None:
            flush.token_key = self.route
            flush.first_reply = first
        return flush
