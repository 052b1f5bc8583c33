"""`audit()`: recompute every index and link from the object hashes and compare with Redis.

Called by `redmap audit` and by the reliability tests. It SCANs the registry's keys
(an offline tool, like migrations: never on the hot path), decodes every object,
derives what each index, unique key, foreign-key zset and many-to-many zset must
hold, and reports every difference and every key under the prefix that nothing
explains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from . import keys
from .exc import DecodeError
from .loading import decode_hash
from .mapper import VERSION_FIELD, Mapper
from .relationships import Direction

__all__ = ["AuditReport", "audit"]

_BATCH = 500


@dataclasses.dataclass
class AuditReport:
    """What an audit found; `ok` when there is nothing to report."""

    objects: int = 0
    keys: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    unexplained: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.unexplained

    def summary(self) -> str:
        return (
            f"{self.objects} objects, {self.keys} keys: {len(self.mismatches)} mismatches, "
            f"{len(self.unexplained)} unexplained keys"
        )


def _scan(client: Any, pattern: str) -> Iterator[str]:
    for key in client.scan_iter(match=pattern, count=1000):
        yield key.decode() if isinstance(key, bytes) else str(key)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def audit(client: Any, reg: Any) -> AuditReport:
    """Audit every model of registry `reg` in the Redis reached by raw redis-py `client`."""
    reg.configure()
    report = AuditReport()
    tag = "{" + reg.prefix + "}:"
    shard_tags = "{" + reg.prefix + "|"
    all_keys = sorted(
        set(_scan(client, _glob_escape(tag) + "*"))
        | set(_scan(client, _glob_escape(shard_tags) + "*"))
    )
    report.keys = len(all_keys)
    by_space: dict[str, Mapper[Any]] = {m.keyspace: m for m in reg.mappers.values()}
    explained: set[str] = set()
    expected: dict[str, Any] = {}  # key -> expected content (set / dict of member->score / str)
    objects: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {}

    for key in all_keys:
        rest = key.partition("}:")[2]
        if rest.startswith(("#flush:", "#meta:")):
            explained.add(key)
    for mapper in by_space.values():
        objs = _load_objects(client, mapper, all_keys, report)
        objects[mapper.keyspace] = objs
        report.objects += len(objs)
        _expect_indexes(mapper, objs, expected)
    _expect_links(client, by_space, objects, all_keys, expected, report)

    for key, want in expected.items():
        explained.add(key)
        have = _read(client, key, want)
        if have != want:
            report.mismatches.append(f"{key}: expected {_show(want)}, found {_show(have)}")
    for mapper in by_space.values():
        seq = mapper.keys.seq()
        if seq in all_keys:
            explained.add(seq)
            top = max(
                (pk for pk, _ in objects[mapper.keyspace].values() if isinstance(pk, int)),
                default=0,
            )
            current = int(client.get(seq) or 0)
            if mapper.shard_key is not None:
                top //= mapper.shards  # ids of sharded models are counter * shards + shard
            if mapper.pk.generated and current < top:
                report.mismatches.append(f"{seq}: counter {current} is below the highest id {top}")
        for seg, (pk, _) in objects[mapper.keyspace].items():
            explained.add(mapper.keys_for_pk(pk).object(seg))
    for key in all_keys:
        if key not in explained:
            # Empty index containers are deleted by Redis itself, so any leftover key
            # that no object explains is reported.
            report.unexplained.append(key)
    return report


def _load_objects(
    client: Any, mapper: Mapper[Any], all_keys: list[str], report: AuditReport
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """id segment -> (pk, decoded values) for every object hash of the model."""
    spaces = mapper.all_keyspaces()
    keys_ = [(k, ks) for k in all_keys for ks in spaces if ks.is_object_key(k)]
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    for i in range(0, len(keys_), _BATCH):
        batch = keys_[i : i + _BATCH]
        pipe = client.pipeline(transaction=False)
        for k, _ in batch:
            pipe.hgetall(k)
        for (k, ks), data in zip(batch, pipe.execute(raise_on_error=False), strict=True):
            seg = ks.id_segment_of(k)
            try:
                pk = mapper.pk_from_segment(seg)
                decoded = decode_hash(mapper, k, data)
            except DecodeError as exc:
                report.mismatches.append(f"{k}: {exc}")
                continue
            if decoded is None:
                continue
            if VERSION_FIELD.encode() not in data:
                report.mismatches.append(f"{k}: no version field")
            out[seg] = (pk, decoded[0])
    return out


def _score(mapper: Mapper[Any], field: str, value: Any) -> float:
    if value is None:
        return float("-inf")
    codec = mapper.columns[field].codec
    assert codec is not None
    return float(codec.to_score(value))


def _pk_score(pk: Any) -> float:
    return float(pk) if isinstance(pk, int) else 0.0


def _expect_indexes(
    mapper: Mapper[Any], objs: dict[str, tuple[Any, dict[str, Any]]], expected: dict[str, Any]
) -> None:
    for seg, (pk, _) in objs.items():
        expected.setdefault(mapper.keys_for_pk(pk).all(), {})[seg] = _pk_score(pk)
    for col in mapper.indexed_columns:
        codec = col.codec
        assert codec is not None
        for seg, (pk, values) in objs.items():
            ks = mapper.keys_for_pk(pk)
            value = values.get(col.key)
            vseg = keys.NULL_SEGMENT if value is None else keys.escape(codec.encode(value))
            if col.indexed or col.unique:
                expected.setdefault(ks.index(col.key, vseg), set()).add(seg)
            if col.unique and value is not None:
                expected[ks.unique(col.key, vseg)] = seg
            if col.sorted:
                expected.setdefault(ks.sorted(col.key), {})[seg] = _score(mapper, col.key, value)
            if col.foreign_key is not None and value is not None:
                order = col.order_column
                score = _score(mapper, order, values.get(order)) if order else _pk_score(pk)
                expected.setdefault(ks.foreign(col.key, vseg), {})[seg] = score


def _expect_links(
    client: Any,
    by_space: dict[str, Mapper[Any]],
    objects: dict[str, dict[str, tuple[Any, dict[str, Any]]]],
    all_keys: list[str],
    expected: dict[str, Any],
    report: AuditReport,
) -> None:
    """Every many-to-many link must be on both sides and join two existing objects.

    Links are data of their own (nothing in the hashes implies them), so the audit
    takes the union of what either side holds and expects each side to hold all of it.
    """
    for mapper in by_space.values():
        for prop in mapper.relationships.values():
            if prop.direction is not Direction.MANYTOMANY:
                continue
            rev = prop.reverse
            if rev is not None and (rev.parent.keyspace, rev.key) < (mapper.keyspace, prop.key):  # type: ignore[union-attr]
                continue  # the pair is audited once, from its first side
            target = next(m for m in by_space.values() if m.class_ is prop.target)
            a_prefixes = [ks.relation(prop.link_name, "") for ks in mapper.all_keyspaces()]
            b_prefixes = [ks.relation(prop.reverse_link_name, "") for ks in target.all_keyspaces()]
            links: set[tuple[str, str]] = set()
            for key in all_keys:
                for a_prefix in a_prefixes:
                    if key.startswith(a_prefix):
                        for m in client.zrange(key, 0, -1):
                            links.add((key[len(a_prefix) :], m.decode()))
                for b_prefix in b_prefixes:
                    if key.startswith(b_prefix):
                        for m in client.zrange(key, 0, -1):
                            links.add((m.decode(), key[len(b_prefix) :]))
            a_objs, b_objs = objects[mapper.keyspace], objects[target.keyspace]
            for a, b in sorted(links):
                if a not in a_objs or b not in b_objs:
                    report.mismatches.append(
                        f"{mapper.name}.{prop.key}: link {a} -> {b} names a missing object"
                    )
                    continue
                a_pk, b_pk = a_objs[a][0], b_objs[b][0]
                a_key = mapper.keys_for_pk(a_pk).relation(prop.link_name, a)
                b_key = target.keys_for_pk(b_pk).relation(prop.reverse_link_name, b)
                expected.setdefault(a_key, {})[b] = _pk_score(b_pk)
                expected.setdefault(b_key, {})[a] = _pk_score(a_pk)


def _read(client: Any, key: str, want: Any) -> Any:
    if isinstance(want, str):
        raw = client.get(key)
        return raw.decode() if raw is not None else None
    if isinstance(want, set):
        return {m.decode() for m in client.smembers(key)}
    return {m.decode(): float(s) for m, s in client.zrange(key, 0, -1, withscores=True)}


def _show(value: Any, limit: int = 6) -> str:
    if isinstance(value, (set, dict)):
        items = sorted(value.items()) if isinstance(value, dict) else sorted(value)
        shown = ", ".join(map(str, items[:limit]))
        more = f", ... ({len(items)} in all)" if len(items) > limit else ""
        return "{" + shown + more + "}"
    return repr(value)
