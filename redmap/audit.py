"""`audit()`: recompute every index and link from the object hashes and compare with Redis.

Called by `redmap audit` and by the reliability tests. It SCANs the registry's keys
(an offline tool, like migrations: never on the hot path), decodes every object,
derives what each index, unique key, foreign-key zset and many-to-many zset must
hold, and reports every difference and every key under the prefix that nothing
explains.

The audit exists for damaged data, so nothing it reads may stop it: it asks each
key's TYPE before reading it, and a key of the wrong type, a counter that is not an
integer or an object without a canonical `#v` version becomes a finding (naming the
key, what was expected, what was found and how to repair it), never an exception.
References are checked too: a foreign key or a many-to-many link naming an object that
does not exist, and a link listed on one side only, are findings with their repair.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from typing import Any

from .exc import DecodeError, RedmapError
from .orm import keys
from .orm.expiry import SOFT_FIELD, SOFT_FIELD_BYTES, expect_deadlines
from .orm.loading import decode_hash
from .orm.mapper import VERSION_FIELD, ColumnProperty, Mapper
from .orm.relationships import Direction
from .orm.textindex import index_commands

__all__ = ["AuditReport", "BrokenReference", "WrongType", "audit"]

_BATCH = 500
_VERSION = VERSION_FIELD.encode()
# What the writer stores in `#v`: a decimal integer from 1, no sign, spaces or zeros in front.
_CANONICAL_VERSION = re.compile(rb"[1-9][0-9]*")


@dataclasses.dataclass(frozen=True)
class WrongType:
    """A key holding another Redis type (or content) than its name promises."""

    key: str
    expected: str
    found: str
    hint: str

    def __str__(self) -> str:
        return (
            f"{self.key}: wrong type: expected {self.expected}, found {self.found}; "
            f"repair: {self.hint}"
        )


@dataclasses.dataclass(frozen=True)
class BrokenReference:
    """A foreign key or a many-to-many link that names a missing object, or a link that
    only one of its two sides lists: `key` is the key to repair, `hint` how."""

    key: str
    problem: str
    hint: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}; repair: {self.hint}"


@dataclasses.dataclass
class AuditReport:
    """What an audit found; `ok` when there is nothing to report.

    `mismatches` holds one line per finding, wrong-typed keys and broken references
    included (their lines are also in `wrong_types` and `broken_references`, as
    structured records); `unexplained` lists keys under the prefix that no model
    accounts for.
    """

    objects: int = 0
    keys: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    unexplained: list[str] = dataclasses.field(default_factory=list)
    wrong_types: list[WrongType] = dataclasses.field(default_factory=list)
    broken_references: list[BrokenReference] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.unexplained

    def summary(self) -> str:
        kinds = [f"{len(self.wrong_types)} of the wrong type"] if self.wrong_types else []
        if self.broken_references:
            kinds.append(f"{len(self.broken_references)} broken references")
        detail = f" ({', '.join(kinds)})" if kinds else ""
        return (
            f"{self.objects} objects, {self.keys} keys: {len(self.mismatches)} mismatches"
            f"{detail}, {len(self.unexplained)} unexplained keys"
        )


class _Audit:
    """One audit run: the keys seen, their types, and what has been reported."""

    def __init__(self, client: Any, report: AuditReport):
        self.client = client
        self.report = report
        self.types: dict[str, str] = {}
        self.wrong: set[str] = set()
        self.unscored: dict[str, set[str]] = {}  # zset -> members with no computable score

    def wrong_type(self, key: str, expected: str, found: str, hint: str) -> None:
        if key in self.wrong:
            return
        self.wrong.add(key)
        finding = WrongType(key, expected, found, hint)
        self.report.wrong_types.append(finding)
        self.report.mismatches.append(str(finding))

    def broken(self, key: str, problem: str, hint: str) -> None:
        finding = BrokenReference(key, problem, hint)
        self.report.broken_references.append(finding)
        self.report.mismatches.append(str(finding))

    def existing(self, object_keys: Iterable[str]) -> set[str]:
        """Which of `object_keys` exist: every key the scan returned, and of the others
        those an EXISTS finds now (SCAN may miss a key created while it ran, such as a
        parent written with its child). Batched: the scan leaves only what is missing
        to ask about, so on sound data this costs no round trip at all."""
        wanted = set(object_keys)
        unseen = sorted(k for k in wanted if k not in self.types)
        found = wanted - set(unseen)
        for key, reply in zip(
            unseen, self.batched([("exists", k, ()) for k in unseen]), strict=True
        ):
            if isinstance(reply, Exception):
                self.report.mismatches.append(f"{key}: cannot tell whether it exists: {reply}")
                found.add(key)  # unknown: not reported as missing
            elif reply:
                found.add(key)
        return found

    def has_type(self, key: str, redis_type: str, expected: str, hint: str) -> bool:
        """Whether `key` is absent or of `redis_type`; reports it otherwise."""
        found = self.types.get(key, "none")
        if key in self.wrong:
            return False
        if found in ("none", redis_type):
            return True
        self.wrong_type(key, expected, found, hint)
        return False

    def batched(self, calls: list[tuple[str, str, tuple[Any, ...]]]) -> list[Any]:
        """Run (method, key, args) calls in pipelined batches; errors are returned, not raised."""
        out: list[Any] = []
        for i in range(0, len(calls), _BATCH):
            pipe = self.client.pipeline(transaction=False)
            for method, key, args in calls[i : i + _BATCH]:
                getattr(pipe, method)(key, *args)
            out.extend(pipe.execute(raise_on_error=False))
        return out

    def read_types(self, all_keys: list[str]) -> None:
        for key, reply in zip(
            all_keys, self.batched([("type", k, ()) for k in all_keys]), strict=True
        ):
            if isinstance(reply, Exception):
                self.report.mismatches.append(f"{key}: cannot read its type: {reply}")
                self.wrong.add(key)
                continue
            self.types[key] = reply.decode() if isinstance(reply, bytes) else str(reply)


def _scan(client: Any, pattern: str) -> Iterator[str]:
    for key in client.scan_iter(match=pattern, count=1000):
        yield key.decode(errors="backslashreplace") if isinstance(key, bytes) else str(key)


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
    run = _Audit(client, report)
    run.read_types(all_keys)
    by_space: dict[str, Mapper[Any]] = {m.keyspace: m for m in reg.mappers.values()}
    explained: set[str] = set()
    expected: dict[str, Any] = {}  # key -> expected content (set / dict of member->score / str)
    hints: dict[str, str] = {}  # key -> how to repair it
    objects: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {}

    for key in all_keys:
        rest = key.partition("}:")[2]
        if rest.startswith(("#flush:", "#meta:")):
            explained.add(key)
    for mapper in by_space.values():
        objs = _load_objects(run, mapper, all_keys)
        objects[mapper.keyspace] = objs
        report.objects += len(objs)
        live = {seg: o for seg, o in objs.items() if SOFT_FIELD not in o[1]}
        _expect_indexes(run, mapper, live, expected, hints)
        if mapper.expiry.tracked:
            explained.update(expect_deadlines(mapper, objs, expected, hints))
    links = _read_links(run, by_space, all_keys)
    explained.update(_check_references(run, by_space, objects, links))
    _compare(run, expected, hints)
    explained.update(expected)
    for mapper in by_space.values():
        _check_counter(run, mapper, objects[mapper.keyspace], explained)
        for seg, (pk, _) in objects[mapper.keyspace].items():
            explained.add(mapper.keys_for_pk(pk).object(seg))
    for key in all_keys:
        if key in explained or key in run.wrong:
            continue
        role = _role(key, by_space)
        if role is not None:
            hint = f"no object explains this key: DEL {key}"
            if not run.has_type(key, role[0], role[1], hint):
                continue  # reported as a wrong type, which says more than "unexplained"
        # Empty index containers are deleted by Redis itself, so any leftover key
        # that no object explains is reported.
        report.unexplained.append(key)
    return report


_ROLES = {
    "#ix:": ("set", "a set of ids"),
    "#uq:": ("string", "a string (the id owning the value)"),
    "#zs:": ("zset", "a zset of ids"),
    "#lx:": ("zset", "a zset of ordered-string members (score 0)"),
    "#sx:": ("zset", "a zset of reversed-string members (score 0)"),
    "#tx:": ("set", "a set of ids (one word)"),
    "#fk:": ("zset", "a zset of ids"),
    "#rel:": ("zset", "a zset (many-to-many links)"),
    "#all": ("zset", "a zset of ids"),
    "#dl": ("zset", "a zset of ids scored by their deadline"),
    "#dv": ("hash", "a hash of the keys the sweep cleans"),
    "#seq": ("string", "a string holding an integer (the id counter)"),
}


def _role(key: str, by_space: dict[str, Mapper[Any]]) -> tuple[str, str] | None:
    """The Redis type a key of a model's keyspace must have, judged by its name alone."""
    keyspace, _, rest = key.partition("}:")[2].partition(":")
    if keyspace not in by_space:
        return None
    if not rest.startswith("#"):
        return "hash", "a hash (an object)"
    for sigil, role in _ROLES.items():
        if rest == sigil or (sigil.endswith(":") and rest.startswith(sigil)):
            return role
    return None


# -- objects --------------------------------------------------------------------------


def _load_objects(
    run: _Audit, mapper: Mapper[Any], all_keys: list[str]
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """id segment -> (pk, decoded values) for every object hash of the model."""
    spaces = mapper.all_keyspaces()
    found = [(k, ks) for k in all_keys for ks in spaces if ks.is_object_key(k)]
    hashes = []
    for k, ks in found:
        hint = (
            f"{k} is named like a {mapper.name} object but is not a hash: if its content "
            f"matters RENAME it out of the registry's keys, else DEL it"
        )
        if run.has_type(k, "hash", "a hash (an object)", hint):
            hashes.append((k, ks))
        # (A hash that does not decode is reported, and stays unexplained: no object is.)
    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    replies = run.batched([("hgetall", k, ()) for k, _ in hashes])
    for (k, ks), data in zip(hashes, replies, strict=True):
        if isinstance(data, Exception):
            run.report.mismatches.append(f"{k}: cannot read the object: {data}")
            continue
        if not data:
            continue  # deleted since the scan
        seg = ks.id_segment_of(k)
        data = _check_version(run, k, data)
        try:
            pk = mapper.pk_from_segment(seg)
            decoded = decode_hash(mapper, k, data)
        except (DecodeError, RedmapError) as exc:
            run.report.mismatches.append(f"{k}: {exc}")
            continue
        if decoded is None:
            continue
        values = decoded[0]
        if SOFT_FIELD_BYTES in data:  # soft-deleted: out of the query indexes (expect_deadlines)
            values = {**values, SOFT_FIELD: data[SOFT_FIELD_BYTES]}
        out[seg] = (pk, values)
    return out


def _check_version(run: _Audit, key: str, data: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """Report a missing or non-canonical `#v`; the fields are decoded all the same (with a
    stand-in version), so one bad version does not also misreport every index of it.

    The incarnation `#i` is not checked: any value is an opaque token, and a hash without
    one was written before incarnations existed (its version checks still hold)."""
    raw = data.get(_VERSION)
    if raw is None:
        run.report.mismatches.append(
            f"{key}: no version field {VERSION_FIELD} (redmap writes it with every object; "
            f"a hash without it is a partial leftover, such as a stale update of a deleted "
            f"object, or was written by another program); repair: if every field is right, "
            f"HSET {key} {VERSION_FIELD} 1, else DEL {key}"
        )
    elif not _CANONICAL_VERSION.fullmatch(raw):
        text = raw.decode(errors="backslashreplace")
        number = int(raw) if raw.strip().lstrip(b"+-").isdigit() else 0
        run.report.mismatches.append(
            f"{key}: version field {VERSION_FIELD} is {text!r}, not canonical (a decimal "
            f"integer from 1 without sign, spaces or leading zeros, as redmap writes it); "
            f"repair: HSET {key} {VERSION_FIELD} {max(number, 1)}"
        )
    else:
        return data
    return {**data, _VERSION: b"1"}


def _check_counter(
    run: _Audit,
    mapper: Mapper[Any],
    objs: dict[str, tuple[Any, dict[str, Any]]],
    explained: set[str],
) -> None:
    """The `#seq` counter is an integer string at or above every generated id."""
    seq = mapper.keys.seq()
    if seq not in run.types:
        return
    explained.add(seq)
    top = max((pk for pk, _ in objs.values() if isinstance(pk, int)), default=0)
    if mapper.shard_key is not None:
        top //= mapper.shards  # ids of sharded models are counter * shards + shard
    hint = f"SET {seq} {top} (the counter of the highest id)"
    expected = "a string holding an integer (the id counter)"
    if not run.has_type(seq, "string", expected, hint):
        return
    raw = run.batched([("get", seq, ())])[0]
    if isinstance(raw, Exception):
        run.report.mismatches.append(f"{seq}: cannot read the counter: {raw}")
        return
    if raw is None:
        return  # deleted since the scan
    try:
        current = int(raw)
    except ValueError:
        run.wrong_type(seq, expected, f"string {raw.decode(errors='backslashreplace')!r}", hint)
        return
    if mapper.pk.generated and current < top:
        run.report.mismatches.append(
            f"{seq}: counter {current} is below the highest id {top}; repair: {hint}"
        )


# -- indexes and links ------------------------------------------------------------------


def _score(mapper: Mapper[Any], field: str, value: Any) -> float:
    if value is None:
        return float("-inf")
    codec = mapper.columns[field].codec
    assert codec is not None
    return float(codec.to_score(value))


def _pk_score(pk: Any) -> float:
    return float(pk) if isinstance(pk, int) else 0.0


def _rerun(key: str, what: str) -> str:
    return f"DEL {key}, then audit again: it lists the {what} the key must hold"


def _index_hint(mapper: Mapper[Any], col: ColumnProperty, kind: str, key: str) -> str:
    if mapper.shard_key is not None:
        return _rerun(key, "members")
    return (
        f"DEL {key} and rebuild the index in a migration: op.drop_index({mapper.name!r}, "
        f"{col.key!r}, {kind!r}) then op.create_index({mapper.name!r}, {col.key!r}, {kind!r})"
    )


def _expect_indexes(
    run: _Audit,
    mapper: Mapper[Any],
    objs: dict[str, tuple[Any, dict[str, Any]]],
    expected: dict[str, Any],
    hints: dict[str, str],
) -> None:
    for seg, (pk, _) in objs.items():
        key = mapper.keys_for_pk(pk).all()
        expected.setdefault(key, {})[seg] = _pk_score(pk)
        hints[key] = _rerun(key, "ids (ZADD with score = the id for int ids, else 0)")
    for col in mapper.indexed_columns:
        codec = col.codec
        assert codec is not None
        kind = "unique" if col.unique else "indexed"
        for seg, (pk, values) in objs.items():
            ks = mapper.keys_for_pk(pk)
            value = values.get(col.key)
            vseg = keys.NULL_SEGMENT if value is None else keys.escape(codec.encode(value))
            if col.indexed or col.unique:
                key = ks.index(col.key, vseg)
                expected.setdefault(key, set()).add(seg)
                hints[key] = _index_hint(mapper, col, kind, key)
            if col.unique and value is not None:
                key = ks.unique(col.key, vseg)
                if key in expected and expected[key] != seg:
                    run.report.mismatches.append(
                        f"{key}: the unique value is held by two objects, {expected[key]} and "
                        f"{seg}; repair: change the value of one of them"
                    )
                expected.setdefault(key, seg)
                hints[key] = _index_hint(mapper, col, kind, key)
            if col.has_string_index:
                raw = None if value is None else codec.encode(value)
                for cmd in index_commands(
                    ks, col.key, lexical=col.lexical, suffix=col.suffix, text=col.text,
                    raw=raw, segment=seg, add=True,
                ):  # fmt: skip
                    if cmd[0] == "SADD":
                        expected.setdefault(cmd[1], set()).add(seg)
                    else:
                        expected.setdefault(cmd[1], {})[cmd[3]] = 0.0
                    hints[cmd[1]] = _rerun(cmd[1], "string index entries (textindex)")
            if col.sorted:
                key = ks.sorted(col.key)
                _expect_score(run, mapper, ks.object(seg), col.key, value, key, seg, expected)
                hints[key] = _index_hint(mapper, col, "sorted", key)
            if col.foreign_key is not None and value is not None:
                order = col.order_column
                key = ks.foreign(col.key, vseg)
                if order:
                    value = values.get(order)
                    _expect_score(run, mapper, ks.object(seg), order, value, key, seg, expected)
                else:
                    expected.setdefault(key, {})[seg] = _pk_score(pk)
                hints[key] = _rerun(key, "children (ZADD them with the scores listed)")


def _expect_score(
    run: _Audit,
    mapper: Mapper[Any],
    obj_key: str,
    field: str,
    value: Any,
    key: str,
    seg: str,
    expected: dict[str, Any],
) -> None:
    """`seg`'s expected score in zset `key`; a stored value no score can stand for (an
    int beyond 2**53, NaN: the flush refuses both) is a finding, and the member is then
    left out of the comparison rather than reported twice."""
    zset = expected.setdefault(key, {})
    try:
        zset[seg] = _score(mapper, field, value)
    except RedmapError as exc:
        run.report.mismatches.append(
            f"{obj_key}: {mapper.name}.{field} holds {value!r}, which a sorted index cannot "
            f"score ({exc}); repair: store a value the model accepts"
        )
        run.unscored.setdefault(key, set()).add(seg)


# -- references: foreign keys and many-to-many links ----------------------------------


@dataclasses.dataclass
class _Links:
    """The link zsets of one many-to-many relationship (side a: `prop`'s model, side b:
    its target), as read from Redis: (key, owner segment, on side a) per zset found,
    and each key's members with their scores."""

    a: Mapper[Any]
    b: Mapper[Any]
    a_name: str
    b_name: str
    entries: list[tuple[str, str, bool]]
    held: dict[str, dict[str, float]]


def _read_links(run: _Audit, by_space: dict[str, Mapper[Any]], all_keys: list[str]) -> list[_Links]:
    """Every many-to-many link zset under the prefix, read in one batched pass over all
    relationships (each pair of sides once, from its first side)."""
    pairs: list[_Links] = []
    for mapper in by_space.values():
        for prop in mapper.relationships.values():
            if prop.direction is not Direction.MANYTOMANY:
                continue
            rev = prop.reverse
            if rev is not None and (rev.parent.keyspace, rev.key) < (mapper.keyspace, prop.key):  # type: ignore[union-attr]
                continue  # the pair is audited once, from its first side
            target = next(m for m in by_space.values() if m.class_ is prop.target)
            pairs.append(_Links(mapper, target, prop.link_name, prop.reverse_link_name, [], {}))
    calls: list[tuple[str, str, tuple[Any, ...]]] = []
    read: list[tuple[_Links, str]] = []
    for pair in pairs:
        prefixes = [(ks.relation(pair.a_name, ""), True) for ks in pair.a.all_keyspaces()]
        prefixes += [(ks.relation(pair.b_name, ""), False) for ks in pair.b.all_keyspaces()]
        for key in all_keys:
            # (A relationship paired with itself has one prefix twice: side a is enough.)
            on = next(((p, a) for p, a in prefixes if key.startswith(p)), None)
            if on is None:
                continue
            hint = _rerun(key, "links (the far side still holds them)")
            if run.has_type(key, "zset", "a zset (many-to-many links)", hint):
                pair.entries.append((key, key[len(on[0]) :], on[1]))
                calls.append(("zrange", key, (0, -1, False, True)))  # desc=False, withscores
                read.append((pair, key))
    for (pair, key), raw in zip(read, run.batched(calls), strict=True):
        if isinstance(raw, Exception):
            run.report.mismatches.append(f"{key}: cannot read the links: {raw}")
            raw = []
        pair.held[key] = {m.decode(errors="backslashreplace"): float(sc) for m, sc in raw}
    return pairs


def _locate(mapper: Mapper[Any], segment: str) -> tuple[Any, str] | None:
    """(primary key, object key) of the object an escaped id names; None if no id of the
    model escapes to `segment`."""
    try:
        pk = mapper.pk_from_segment(segment)
    except RedmapError:
        return None
    return pk, mapper.keys_for_pk(pk).object(segment)


def _arg(text: str) -> str:
    """`text` as one argument of a redis-cli command line (quoted when it needs to be)."""
    if re.fullmatch(r"[A-Za-z0-9_.%#{}:|~@-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _num(score: float) -> str:
    return str(int(score)) if score.is_integer() else repr(score)


def _check_references(
    run: _Audit,
    by_space: dict[str, Mapper[Any]],
    objects: dict[str, dict[str, tuple[Any, dict[str, Any]]]],
    links: list[_Links],
) -> set[str]:
    """Report foreign keys and links naming missing objects, and links one side lacks.

    Whether an object exists is taken from the scan, and EXISTS is asked (batched) only
    for the keys the scan did not return, once for all references of all models.
    Returns the link keys accounted for (found where their owner's keys live).
    """
    foreign = _foreign_keys(by_space, objects)
    wanted = [ref[-1] for ref in foreign]
    located: dict[tuple[str, str], tuple[Any, str] | None] = {}
    for pair in links:
        for key, owner, on_a in pair.entries:
            model, far = (pair.a, pair.b) if on_a else (pair.b, pair.a)
            for mapper, seg in [(model, owner)] + [(far, m) for m in pair.held[key]]:
                where = located.setdefault((mapper.keyspace, seg), _locate(mapper, seg))
                if where is not None:
                    wanted.append(where[1])
    exists = run.existing(wanted)
    for child_key, mapper, col, value, fk_key, seg, target, target_key in foreign:
        if target_key in exists:
            continue
        problem = (
            f"{mapper.name}.{col.key} is {value!r}, but that {target.name} does not exist "
            f"({target_key} is missing)"
        )
        fix = f"re-parent it in the application (set {col.key} to an existing {target.name}"
        if col.codec is not None and col.codec.nullable:
            hint = f"{fix}), or detach it: HDEL {child_key} {col.key} and ZREM {fk_key} {seg}"
        else:
            hint = f"{fix}; the field is required), or restore {target_key}"
        run.broken(child_key, problem, hint)
    explained: set[str] = set()
    for pair in links:
        for key, owner, on_a in pair.entries:
            model, far = (pair.a, pair.b) if on_a else (pair.b, pair.a)
            name, far_name = (pair.a_name, pair.b_name) if on_a else (pair.b_name, pair.a_name)
            where = located[(model.keyspace, owner)]
            if where is None or model.keys_for_pk(where[0]).relation(name, owner) != key:
                continue  # no object of the model keeps its links here: unexplained
            explained.add(key)
            if where[1] not in exists:
                run.broken(
                    key,
                    f"holds the {name} links of {model.name} {owner}, which does not exist "
                    f"({where[1]} is missing)",
                    f"DEL {key}",
                )
                continue
            for member, score in sorted(pair.held[key].items()):
                _check_link(
                    run,
                    pair,
                    exists,
                    located,
                    (key, model, owner, where[0]),
                    (far, far_name, member, score),
                )
    return explained


def _check_link(
    run: _Audit,
    pair: _Links,
    exists: set[str],
    located: dict[tuple[str, str], tuple[Any, str] | None],
    side: tuple[str, Mapper[Any], str, Any],
    other: tuple[Mapper[Any], str, str, float],
) -> None:
    """One member of an existing object's link zset: it names an existing object, that
    object's zset lists the owner back, and its score is the one the writer gives."""
    key, model, owner, owner_pk = side
    far, far_name, member, score = other
    where = located[(far.keyspace, member)]
    if where is None or where[1] not in exists:
        named = f"({where[1]} is missing)" if where else f"(not an id of {far.name})"
        run.broken(
            key,
            f"member {member!r} names a {far.name} that does not exist {named}",
            f"ZREM {key} {_arg(member)}",
        )
        return
    far_key = far.keys_for_pk(where[0]).relation(far_name, member)
    if far_key not in run.wrong and owner not in pair.held.get(far_key, {}):
        run.broken(
            far_key,
            f"does not list {model.name} {owner} back, though {key} links it to "
            f"{far.name} {member}",
            f"ZADD {far_key} {_num(_pk_score(owner_pk))} {owner} to keep the link, or "
            f"ZREM {key} {member} to drop it",
        )
    want = _pk_score(where[0])
    if score != want:
        run.broken(
            key,
            f"member {member} has score {_num(score)}, expected {_num(want)} (its id, or 0 "
            f"for a str or UUID id)",
            f"ZADD {key} XX {_num(want)} {member}",
        )


def _foreign_keys(
    by_space: dict[str, Mapper[Any]],
    objects: dict[str, dict[str, tuple[Any, dict[str, Any]]]],
) -> list[tuple[str, Mapper[Any], ColumnProperty, Any, str, str, Mapper[Any], str]]:
    """(child key, child model, field, value, foreign-key zset, child id segment, target
    model, target object key) for every foreign key set in a stored object."""
    by_class = {m.class_: m for m in by_space.values()}
    out = []
    for mapper in by_space.values():
        for col in mapper.indexed_columns:
            if col.foreign_key is None:
                continue
            target = by_class[col.foreign_key.target]
            for seg, (pk, values) in objects[mapper.keyspace].items():
                value = values.get(col.key)
                if value is None:
                    continue
                ks = mapper.keys_for_pk(pk)
                codec = col.codec
                assert codec is not None
                fk_key = ks.foreign(col.key, keys.escape(codec.encode(value)))
                try:
                    target_key = target.object_key(value)
                except (RedmapError, TypeError, ValueError):
                    target_key = target.keys.object(keys.escape(codec.encode(value)))
                out.append((ks.object(seg), mapper, col, value, fk_key, seg, target, target_key))
    return out


# -- comparing ------------------------------------------------------------------------


def _redis_type(want: Any) -> tuple[str, str]:
    """The Redis type an expected content needs, and how a finding describes it."""
    if isinstance(want, str):
        return "string", "a string (the id owning the value)"
    if isinstance(want, set):
        return "set", "a set of ids"
    return "zset", "a zset of ids"


def _compare(run: _Audit, expected: dict[str, Any], hints: dict[str, str]) -> None:
    """Read every expected key whose type is right (in batches) and report differences."""
    calls: list[tuple[str, str, tuple[Any, ...]]] = []
    wanted: list[tuple[str, Any]] = []
    for key, want in expected.items():
        redis_type, described = _redis_type(want)
        if not run.has_type(key, redis_type, described, hints.get(key, _rerun(key, "members"))):
            continue
        if isinstance(want, str):
            calls.append(("get", key, ()))
        elif isinstance(want, set):
            calls.append(("smembers", key, ()))
        else:
            calls.append(("zrange", key, (0, -1, False, True)))  # desc=False, withscores
        wanted.append((key, want))
    for (key, want), raw in zip(wanted, run.batched(calls), strict=True):
        if isinstance(raw, Exception):
            run.report.mismatches.append(f"{key}: cannot read it: {raw}")
            continue
        have = _decode(raw, want)
        for member in run.unscored.get(key, ()):
            have.pop(member, None)
        if have != want:
            run.report.mismatches.append(f"{key}: expected {_show(want)}, found {_show(have)}")


def _decode(raw: Any, want: Any) -> Any:
    if isinstance(want, str):
        return raw.decode(errors="backslashreplace") if raw is not None else None
    if isinstance(want, set):
        return {m.decode(errors="backslashreplace") for m in raw}
    return {m.decode(errors="backslashreplace"): float(s) for m, s in raw}


def _show(value: Any, limit: int = 6) -> str:
    if isinstance(value, (set, dict)):
        items = sorted(value.items()) if isinstance(value, dict) else sorted(value)
        shown = ", ".join(map(str, items[:limit]))
        more = f", ... ({len(items)} in all)" if len(items) > limit else ""
        return "{" + shown + more + "}"
    return repr(value)
