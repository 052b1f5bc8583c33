"""redmap for asyncio: `AsyncEngine`, `AsyncSession`, `async_sessionmaker`,
`run_in_transaction` (API.md section 8).

The same mapped classes, unit of work, flush protocol and query compilation as the
sync API serve these; only the I/O differs (`redis.asyncio`, awaited). See
docs/asyncio.md.
"""

from __future__ import annotations

from .engine import AsyncEngine, create_async_engine
from .session import AsyncSession, async_sessionmaker, run_in_transaction

__all__ = [
    "AsyncEngine",
    "AsyncSession",
    "async_sessionmaker",
    "create_async_engine",
    "run_in_transaction",
]
