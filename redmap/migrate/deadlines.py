"""Migrations of an `ExpiresAt` field: the deadline bookkeeping follows the field.

`op.add_field(model, name, default=...)` on the model's ExpiresAt field, with a default,
gives every object its deadline as a flush would: `PEXPIREAT` on the hash, its id in the
deadline zset `#dl`, its index keys in the sweep data `#dv` (`track`). `op.drop_field` of
a field that was the model's ExpiresAt (the model no longer has one) takes every object
out of `#dl`/`#dv` and removes the hash's expiry (`untrack`). Both are idempotent, per
object and atomic, in batches, like every other migration rewrite (`batch.rewrite`).
"""

from __future__ import annotations

from ..orm import expiry
from .batch import Change, MigrationRun, RewriteResult, Row, Target, rewrite

__all__ = ["track", "untrack"]


def track(run: MigrationRun, target: Target, name: str) -> RewriteResult | None:
    """After `add_field` of the model's ExpiresAt field: every object holding a moment
    gets its deadline bookkeeping. None when `name` is not the model's ExpiresAt."""
    mapper = target.mapper
    if mapper is None or mapper.expiry.expires != name:
        return None
    ks = target.keys
    indexed = [c.key for c in mapper.indexed_columns]

    def plan(key: str, segment: str, row: Row) -> Change | None:
        raw = row.get(name)
        deadline = None if raw is None else expiry.decode_deadline(raw)
        if deadline is None:
            return None
        encoded: dict[str, bytes | None] = {k: row.get(k) for k in indexed}
        data = expiry.sweep_keys(mapper, ks, encoded)
        return Change(
            [
                ("ZADD", ks.deadlines(), deadline, segment),
                ("HSET", ks.sweep_data(), segment, data),
                ("PEXPIREAT", key, deadline + expiry.MARGIN_MS),
            ],
            bump=False,
        )

    return rewrite(run, target, f"deadlines of {target.name}.{name}", plan, fields=[name, *indexed])


def untrack(run: MigrationRun, target: Target, name: str) -> RewriteResult | None:
    """After `drop_field` of what was the model's ExpiresAt: no object has a deadline any
    more. None when the model still keeps deadlines (another ExpiresAt, a soft delete) or
    never kept any."""
    mapper = target.mapper
    if mapper is not None and mapper.expiry.tracked:
        return None
    ks = target.keys
    if not run.client.exists(ks.deadlines()):
        return None

    def plan(key: str, segment: str, row: Row) -> Change | None:
        return Change(
            [
                ("ZREM", ks.deadlines(), segment),
                ("HDEL", ks.sweep_data(), segment),
                ("PERSIST", key),
            ],
            bump=False,
        )

    return rewrite(run, target, f"deadlines of {target.name}.{name}", plan, fields=[])
