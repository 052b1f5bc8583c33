"""Data types shared by the I/O-free core and the drivers: no redis import here.

A `Command` is one Redis command as a tuple of its words (`("HSET", key, f, v)`);
planning builds them, drivers send them. Keeping this module free of redis-py lets
the planner (`persistence`, `flushplan`) and the flush protocol (`flushprotocol`)
be imported and tested without the driver (see docs/design/layers.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Command", "RoundTripHook"]

Command = tuple[Any, ...]
# Called with the commands of every round trip before they are sent (echo, counting).
RoundTripHook = Callable[[Sequence[Command]], None]
