"""A JSON snapshot of a registry's key layout; owns `snapshot`, `load` and `record`.

Called by `env` (recorded in `{P}:#meta:migrate:layout` after each upgrade and stamp),
by `autogenerate` (which diffs two snapshots) and by `impl` (class names of models
that are no longer mapped). A snapshot holds, per model: keyspace, primary key,
fields with their type names, index kinds, foreign keys and a default that can be
written as a Python literal, and relationships (name, target, kind).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ..dialects.base import translate_errors
from ..exc import MigrationError
from ..orm import keys
from ..orm.registry import registry as Registry  # noqa: N812 - a class named like SQLAlchemy's

__all__ = ["FORMAT", "Layout", "layout_key", "literal", "load", "record", "snapshot"]

#: Version of the snapshot's JSON shape.
FORMAT = 1

#: `{"format": 1, "prefix": ..., "heads": [...], "models": {class name: model}}`
Layout = dict[str, Any]


def layout_key(prefix: str) -> str:
    """Where the layout recorded at the last upgrade is kept."""
    return keys.meta_key(prefix, "migrate:layout")


def literal(value: Any) -> str | None:
    """Python source for `value` when it is a plain literal (None, bool, int, float, str, bytes)."""
    if isinstance(value, str) and value.isprintable() and not set(value) & {'"', "\\"}:
        return f'"{value}"'  # double quotes, as formatters write them
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return None


def _default_of(cls: type[Any], name: str) -> str | None:
    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING:
            return literal(f.default)
    return None


def snapshot(reg: Registry, heads: tuple[str, ...] = ()) -> Layout:
    """The layout `reg` maps to, configuring it first; JSON-serialisable."""
    reg.configure()
    models: dict[str, Any] = {}
    for mapper in sorted(reg.mappers.values(), key=lambda m: m.name):
        fields: dict[str, Any] = {}
        for col in mapper.stored_columns():
            assert col.codec is not None
            entry: dict[str, Any] = {
                "type": col.codec.expected,
                "indexes": col.index_kinds,
            }
            if col.foreign_key is not None:
                target = col.foreign_key.target
                entry["foreign_key"] = getattr(target, "__name__", str(target))
            default = _default_of(mapper.class_, col.key)
            if default is not None:
                entry["default"] = default
            fields[col.key] = entry
        relationships = {
            name: {
                "target": getattr(prop.target, "__name__", str(prop.target)),
                "kind": getattr(getattr(prop, "direction", None), "value", None),
                "secondary": prop.secondary,
            }
            for name, prop in mapper.relationships.items()
        }
        pk = mapper.pk
        assert pk.codec is not None
        models[mapper.name] = {
            "keyspace": mapper.keyspace,
            "primary_key": {"name": pk.key, "type": pk.codec.expected},
            "fields": fields,
            "relationships": relationships,
        }
    return {"format": FORMAT, "prefix": reg.prefix, "heads": list(heads), "models": models}


def load(client: Any, prefix: str, *, url: str) -> Layout | None:
    """The layout recorded for `prefix`, or None when no upgrade has recorded one."""
    with translate_errors(url):
        raw = client.get(layout_key(prefix))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise MigrationError(f"{layout_key(prefix)} does not hold a layout ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MigrationError(
            f"{layout_key(prefix)} holds a layout of an unknown format "
            f"({data.get('format') if isinstance(data, dict) else type(data).__name__}); "
            f"upgrade redmap"
        )
    return data


def record(client: Any, layout: Layout, *, url: str) -> None:
    """Store `layout` as the one recorded at its heads."""
    with translate_errors(url):
        client.set(layout_key(layout["prefix"]), json.dumps(layout, sort_keys=False))
