"""notes

Revision ID: b2
Revises: a1
Create Date: 2026-12-06 08:05:00
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redmap.migrate import RedisOperations

revision: str = "b2"
down_revision: str | tuple[str, ...] | None = "a1"


def upgrade(op: RedisOperations) -> None:
    op.add_field("Todo", "notes", default="")


def downgrade(op: RedisOperations) -> None:
    op.drop_field("Todo", "notes", default="")
