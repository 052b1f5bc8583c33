"""initial

Revision ID: a1
Revises:
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redmap.migrate import RedisOperations

revision: str = "a1"
down_revision: str | tuple[str, ...] | None = None


def upgrade(op: RedisOperations) -> None:
    pass  # new models need no data change; the upgrade records their layout


def downgrade(op: RedisOperations) -> None:
    pass
