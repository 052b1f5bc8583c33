"""Data types shared by the I/O-free core and the drivers: no redis import here.

A `Command` is one Redis command as a tuple of its words (`("HSET", key, f, v)`);
planning builds them, drivers send them. Keeping this module free of redis-py lets
the planner (`persistence`, `flushplan`) and the flush protocol (`flushprotocol`)
be imported and tested without the driver (see docs/design/layers.md).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

__all__ = [
    "Command",
    "FetchHashes",
    "Flush",
    "LoneReply",
    "LoneScript",
    "Read",
    "Request",
    "RoundTripHook",
    "Steps",
    "Transactions",
]

T = TypeVar("T")

Command = tuple[Any, ...]
# Called with the commands of every round trip before they are sent (echo, counting).
RoundTripHook = Callable[[Sequence[Command]], None]


# -- what the core asks of a driver ----------------------------------------------------------
#
# The ORM's reads and flushes are written once, as generators ("steps") that yield one of
# these requests where they need Redis and receive the reply: the sync `Engine.run` and
# the async `AsyncEngine.run` perform them (blocking or awaited) and send the replies
# back, or throw what the I/O raised into the generator, so its `try`/`finally` blocks
# (a failed flush putting the session back) run exactly as in plain code.


@dataclass(frozen=True, slots=True)
class Read:
    """Send `commands` in one pipelined round trip; the reply is the list of their
    replies, an error reply as its exception object in place. Re-sent after a cut
    connection (reads only: see `dialects._retry`)."""

    commands: Sequence[Command]


@dataclass(frozen=True, slots=True)
class FetchHashes:
    """HGETALL of each key in one round trip; the reply is a dict per key (empty when
    the key is absent) or the error Redis answered for it."""

    keys: Sequence[str]


@dataclass(frozen=True, slots=True)
class Transactions:
    """Run each group of commands in its own MULTI/EXEC (a query, per shard); the reply
    is each group's EXEC replies. A command error raises."""

    groups: Sequence[Sequence[Command]]


@dataclass(frozen=True, slots=True)
class Flush:
    """Run one flush: the driver drives `redmap.orm.flushprotocol.FlushProtocol` for `job`
    (a `FlushJob`); the reply is None once it was applied, else the error is thrown."""

    job: Any


@dataclass(slots=True)
class LoneScript:
    """One invocation of the flush script to send alone, on a flush connection of the
    node holding `route` (the counter lane, `redmap.orm.counterlane`): not a request
    of the steps, but what the sync `Engine.lone_script` is handed. Answered by a
    `LoneReply`, or None when the driver did not send it (the script not known to be
    loaded, no connection to be had, or a driver that declines the lane): the flush
    then takes the general path."""

    route: str
    command: Command


@dataclass(slots=True)
class LoneReply:
    """What became of a `LoneScript`: the script's reply (its error reply as the
    exception object, a `flushprotocol.Lost` when the connection failed) and when it was
    sent (monotonic seconds). `interrupt`: the KeyboardInterrupt that stopped the round
    trip (the reply is then `Lost`), for the caller to raise once the flush is settled."""

    reply: Any
    sent_at: float
    interrupt: BaseException | None = None


Request = Read | FetchHashes | Transactions | Flush
#: A core generator: yields requests, receives their replies, returns a `T`.
Steps: TypeAlias = Generator[Request, Any, T]
