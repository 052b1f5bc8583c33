"""Diffs the layout recorded at head against the registry's; owns `compare`.

Called by `env.RedisEnvironment.compare`, for `revision --autogenerate` (the lines
become the upgrade body) and `check` (any line means the models drifted). Pure: both
layouts are `layout.snapshot` dicts. What cannot be decided from two layouts (a rename,
a type change) is written as a comment for the author to settle.
"""

from __future__ import annotations

from typing import Any

from .layout import Layout

__all__ = ["RENAME_HINT", "compare"]

RENAME_HINT = "# uncomment if this is a rename"
# Equality sets are shared by Indexed and Unique: dropping one kind deletes them, so a
# kind that stays is built again after the drop.
_SHARED = ("indexed", "unique")


def _q(name: str) -> str:
    # Class, field and keyspace names never hold quotes or backslashes.
    return f'"{name}"'


def compare(recorded: Layout | None, current: Layout) -> list[str]:
    """Lines of an upgrade body taking `recorded` to `current`; `[]` when they match.

    A body of comments only ends with `pass`, so that it is still a function body.
    """
    old_models: dict[str, Any] = (recorded or {}).get("models", {})
    new_models: dict[str, Any] = current["models"]
    removed = {n: m for n, m in old_models.items() if n not in new_models}
    added = {n: m for n, m in new_models.items() if n not in old_models}
    lines: list[str] = []
    # A class renamed in code with its keyspace kept: the same model under a new name.
    for new_name, new in sorted(added.items()):
        for old_name, old in list(removed.items()):
            if old["keyspace"] == new["keyspace"]:
                lines.append(f"# model {old_name} is now {new_name} (keyspace {new['keyspace']!r})")
                lines += _compare_model(new_name, old, new)
                del removed[old_name], added[new_name]
                break
    for name in sorted(set(old_models) & set(new_models)):
        lines += _compare_model(name, old_models[name], new_models[name])
    for name, new in sorted(added.items()):
        for old_name, old in sorted(removed.items()):
            if old["fields"] == new["fields"]:
                lines.append(
                    f"# op.rename_model({_q(old['keyspace'])}, {_q(new['keyspace'])})"
                    f"  # uncomment if {old_name} became {name}"
                )
        lines.append(f"# new model {name} (keyspace {new['keyspace']!r}): nothing to migrate")
    for name, old in sorted(removed.items()):
        lines.append(
            f"# model {name} (keyspace {old['keyspace']!r}) is no longer mapped; "
            f"its keys are left in place"
        )
    if lines and all(line.startswith("#") for line in lines):
        lines.append("pass")
    return lines


def _add_field(model: str, name: str, field: dict[str, Any]) -> str:
    default = field.get("default")
    if default is not None:
        return f"op.add_field({_q(model)}, {_q(name)}, default={default})"
    line = f"op.add_field({_q(model)}, {_q(name)}, default=None)"
    if str(field["type"]).startswith("Optional["):
        return line
    return f"{line}  # TODO: the value existing objects get ({field['type']}, required)"


def _drop_field(model: str, name: str, field: dict[str, Any]) -> str:
    default = field.get("default")
    suffix = f", default={default}" if default is not None else ""
    return f"op.drop_field({_q(model)}, {_q(name)}{suffix})"


def _index(verb: str, model: str, name: str, kind: str) -> str:
    return f'op.{verb}_index({_q(model)}, {_q(name)}, kind="{kind}")'


def _compare_model(model: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if old["keyspace"] != new["keyspace"]:
        lines.append(f"op.rename_model({_q(old['keyspace'])}, {_q(new['keyspace'])})")
    if old["primary_key"] != new["primary_key"]:
        lines.append(
            f"# {model} primary key changed ({old['primary_key']} -> {new['primary_key']}): "
            f"ids are not rewritten by migrations"
        )
    old_fields: dict[str, Any] = old["fields"]
    new_fields: dict[str, Any] = new["fields"]
    removed = [n for n in old_fields if n not in new_fields]
    added = [n for n in new_fields if n not in old_fields]
    for gone in removed:
        for came in added:
            if old_fields[gone]["type"] == new_fields[came]["type"]:
                lines.append(
                    f"# op.rename_field({_q(model)}, {_q(gone)}, {_q(came)})  {RENAME_HINT}"
                )
    for name in added:
        lines.append(_add_field(model, name, new_fields[name]))
        lines += [_index("create", model, name, k) for k in new_fields[name]["indexes"]]
        if new_fields[name].get("foreign_key"):
            lines.append(f"# {model}.{name} is a new foreign key: links are not backfilled")
    for name in removed:
        lines += [_index("drop", model, name, k) for k in old_fields[name]["indexes"]]
        lines.append(_drop_field(model, name, old_fields[name]))
    for name in (n for n in new_fields if n in old_fields):
        lines += _compare_field(model, name, old_fields[name], new_fields[name])
    lines += _compare_relationships(model, old.get("relationships", {}), new["relationships"])
    return lines


def _compare_field(model: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if old["type"] != new["type"]:
        lines.append(
            f"# {model}.{name} changed type {old['type']} -> {new['type']}: stored values are "
            f"not converted; write an op.transform({_q(model)}, fn) if they must be"
        )
    if old.get("foreign_key") != new.get("foreign_key"):
        lines.append(
            f"# {model}.{name} foreign key changed ({old.get('foreign_key')} -> "
            f"{new.get('foreign_key')}): links are not rebuilt by migrations"
        )
    before, after = set(old["indexes"]), set(new["indexes"])
    dropped = [k for k in old["indexes"] if k not in after]
    created = [k for k in new["indexes"] if k not in before]
    if any(k in _SHARED for k in dropped):
        created += [k for k in _SHARED if k in before and k in after and k not in created]
    lines += [_index("drop", model, name, k) for k in dropped]
    lines += [_index("create", model, name, k) for k in created]
    return lines


def _compare_relationships(model: str, old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name in [n for n in old if n not in new]:
        lines.append(f"# relationship {model}.{name} removed: its link keys are left in place")
    for name, rel in new.items():
        if name not in old:
            lines.append(
                f"# relationship {model}.{name} added ({rel['kind']} to {rel['target']}): "
                f"existing links are not backfilled"
            )
        elif old[name] != rel:
            lines.append(f"# relationship {model}.{name} changed: {old[name]} -> {rel}")
    return lines
