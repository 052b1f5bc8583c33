"""`select()`: queries answered from indexes, never by scanning; run by `Session.scalars/count`.

A statement compiles into server-side set algebra on the model's index keys:
every condition becomes a temporary zset (an equality-index set, a score range of
a sorted index, a union for `in_`/`or_`), conditions are intersected with the
ordering zset (the sorted index of the `order_by` field, or the model's id zset),
and one ZRANGE reads the requested page. All of it runs in one MULTI/EXEC, so the
temporary keys never outlive the round trip and the result is a consistent
snapshot. A second round trip fetches the objects not already in the session.
Several `order_by` terms page through the first one's zset the same way and sort only
the tie groups the page touches by the others (`_ids_by_terms`, `query.ordering`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..commands import Read, Steps, Transactions
from ..exc import (
    DecodeError,
    MultipleResultsFound,
    NoResultFound,
    QueryError,
    RedmapConnectionError,
    RedmapError,
)
from ..orm import expiry, keys
from ..orm.attributes import FieldAttribute
from ..orm.keys import KeySpace
from ..orm.loading import ensure_loaded
from ..orm.mapper import ColumnProperty, Mapper, mapper_of
from ..orm.strategy_options import Load, LoadTree, build_tree
from . import deadlines, strings
from .expression import (
    BinaryExpression,
    BooleanClauseList,
    ColumnElement,
    ColumnOperators,
    Ordering,
    asc,
)
from .ordering import Candidate, Term, decode_values, score_text, secondary_terms, sort_candidates

if TYPE_CHECKING:
    from ..orm.context import SessionContext

__all__ = ["ScalarResult", "Select", "execute_count", "execute_select", "select"]

M = TypeVar("M")

_RANGE_OPS = {"<", "<=", ">", ">=", "between"}


class Select(Generic[M]):
    """A query for objects of one model; each method returns a new statement."""

    def __init__(self, model: type[M]):
        self.model = model
        self._where: tuple[Any, ...] = ()
        self._order_by: tuple[Ordering, ...] = ()
        self._limit: int | None = None
        self._offset: int = 0
        self._options: tuple[Load, ...] = ()

    def _copy(self) -> Select[M]:
        new: Select[M] = Select(self.model)
        new._where = self._where
        new._order_by = self._order_by
        new._limit = self._limit
        new._offset = self._offset
        new._options = self._options
        return new

    def where(self, *conditions: ColumnElement) -> Select[M]:
        """Add conditions, all of which must hold (`col(Model.field) == value`, `and_`, `or_`)."""
        new = self._copy()
        new._where = self._where + conditions
        return new

    filter = where

    def order_by(self, *terms: Ordering | ColumnOperators[Any]) -> Select[M]:
        """Order by a Sorted field (or the primary key); `col(Model.f).desc()` for descending."""
        new = self._copy()
        new._order_by = tuple(t if isinstance(t, Ordering) else asc(t) for t in terms)
        return new

    def options(self, *options: Load) -> Select[M]:
        """Loader options for the objects this statement returns (`selectinload(A.b)`,
        `lazyload`, `raiseload`, chained): they override the relationships' mapped
        `lazy=` for these objects only; checked against the mapping when it runs."""
        new = self._copy()
        new._options = self._options + options
        return new

    def limit(self, n: int | None) -> Select[M]:
        new = self._copy()
        if n is not None and n < 0:
            raise QueryError("limit must be >= 0")
        new._limit = n
        return new

    def offset(self, n: int | None) -> Select[M]:
        new = self._copy()
        if n is not None and n < 0:
            raise QueryError("offset must be >= 0")
        new._offset = n or 0
        return new

    def __repr__(self) -> str:
        return f"<Select {self.model.__name__} where={self._where!r} order_by={self._order_by!r}>"


def select(model: type[M]) -> Select[M]:
    """A statement selecting objects of `model`."""
    return Select(model)


class ScalarResult(Generic[M]):
    """The objects a statement returned, in order."""

    def __init__(self, objects: list[M]):
        self._objects = objects

    def __iter__(self) -> Iterator[M]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def all(self) -> list[M]:
        return list(self._objects)

    def first(self) -> M | None:
        return self._objects[0] if self._objects else None

    def one(self) -> M:
        if not self._objects:
            raise NoResultFound("no object matched the query")
        if len(self._objects) > 1:
            raise MultipleResultsFound(f"{len(self._objects)} objects matched, expected one")
        return self._objects[0]

    def one_or_none(self) -> M | None:
        if len(self._objects) > 1:
            raise MultipleResultsFound(f"{len(self._objects)} objects matched, expected one")
        return self._objects[0] if self._objects else None


class _Compiler:
    """Builds the commands computing one statement's ids into temporary zsets."""

    def __init__(self, mapper: Mapper[Any], ks: KeySpace | None = None):
        self.mapper = mapper
        self.ks = ks or mapper.keys
        self.commands: list[tuple[Any, ...]] = []
        self.temps: list[str] = []
        self._token = uuid.uuid4().hex
        # Ordered-index ranges already turned into id zsets (`strings._convert`).
        self.lex_temps: dict[tuple[str, bytes, bytes], str] = {}

    def temp(self) -> str:
        key = keys.meta_key(
            self.mapper.registry.prefix, f"tmp:{self._token}:{len(self.temps)}", tag=self.ks.tag
        )
        self.temps.append(key)
        return key

    def column(self, attr: Any) -> ColumnProperty:
        if not isinstance(attr, FieldAttribute):
            raise QueryError(f"{attr!r} is not a mapped field")
        if attr.mapper is not self.mapper:
            raise QueryError(
                f"{attr!r} belongs to {attr.mapper.name}, not {self.mapper.name}",
                model=self.mapper.name,
                field=attr.key,
            )
        return attr.column

    # -- leaves ----------------------------------------------------------------------

    def _value_segment(self, col: ColumnProperty, value: Any) -> str:
        codec = col.codec
        assert codec is not None
        if value is None:
            return keys.NULL_SEGMENT
        codec.validate(value, model=self.mapper.name, field=col.key)
        return keys.escape(codec.encode(value))

    def _score(self, col: ColumnProperty, value: Any) -> str:
        codec = col.codec
        assert codec is not None
        codec.validate(value, model=self.mapper.name, field=col.key)
        if value is None:
            raise QueryError(f"cannot compare {self.mapper.name}.{col.key} with None by order")
        return repr(codec.to_score(value))

    def _need(self, col: ColumnProperty, marker: str, op: str) -> QueryError:
        if marker == "Sorted()" and col.codec is not None and not col.codec.sortable:
            return QueryError(
                f"{self.mapper.name}.{col.key} {op} ... needs a Sorted() field, and a "
                f"{col.codec.expected} field cannot be Sorted(); use == or in_() on it "
                "(mark it Indexed()), or order and range over a numeric, date or datetime field",
                model=self.mapper.name,
                field=col.key,
            )
        return QueryError(
            f"{self.mapper.name}.{col.key} {op} ... needs an index: mark the field "
            f"{marker} (redmap never scans the keyspace)",
            model=self.mapper.name,
            field=col.key,
        )

    def _pk_set(self, values: tuple[Any, ...]) -> str:
        tmp = self.temp()
        members: list[Any] = []
        for v in values:
            self.mapper.validate_pk(v)
            if self.mapper.keys_for_pk(v) is not self.ks:
                continue  # an id of another shard cannot be in this one
            members.extend((0, self.mapper.pk_segment(v)))
        if members:
            self.commands.append(("ZADD", tmp, *members))
        # Keep only ids that exist.
        self.commands.append(("ZINTERSTORE", tmp, 2, tmp, self.ks.all(), "WEIGHTS", 0, 0))
        return tmp

    def _union_of(self, sources: list[str]) -> str:
        """A temporary zset holding every id in `sources` (index sets or zsets), score 0."""
        tmp = self.temp()
        if not sources:
            self.commands.append(("DEL", tmp))  # the empty set
            return tmp
        weights = [0] * len(sources)
        self.commands.append(("ZUNIONSTORE", tmp, len(sources), *sources, "WEIGHTS", *weights))
        return tmp

    def _equal_set(self, col: ColumnProperty, values: tuple[Any, ...]) -> str:
        if col.primary_key:
            return self._pk_set(values)
        if col.indexed or col.unique:
            return self._union_of(
                [self.ks.index(col.key, self._value_segment(col, v)) for v in values]
            )
        if col.foreign_key is not None and all(v is not None for v in values):
            # A foreign key's per-parent zsets (one-to-many upkeep) answer equality.
            return self._union_of(
                [self.ks.foreign(col.key, self._value_segment(col, v)) for v in values]
            )
        if col.sorted:
            parts = []
            for v in values:
                if v is None:
                    parts.append(self._range(col, "-inf", "-inf"))
                else:
                    s = self._score(col, v)
                    parts.append(self._range(col, s, s))
            return self._union(parts)
        raise self._need(col, "Indexed() or Unique()", "==")

    def _range(self, col: ColumnProperty, low: str, high: str) -> str:
        tmp = self.temp()
        src = self.ks.all() if col.primary_key else self.ks.sorted(col.key)
        self.commands.append(("ZRANGESTORE", tmp, src, low, high, "BYSCORE"))
        return tmp

    def _range_leaf(self, col: ColumnProperty, op: str, value: Any) -> str:
        low, high = self.bounds(col, op, value)
        return self._range(col, low, high)

    def range_source(self, col: ColumnProperty) -> str:
        """The zset a range on `col` reads (its sorted index, or the id zset)."""
        return self.ks.all() if col.primary_key else self.ks.sorted(col.key)

    def bounds(self, col: ColumnProperty, op: str, value: Any) -> tuple[str, str]:
        """ZRANGE BYSCORE bounds for one range condition."""
        int_pk = col.primary_key and col.codec is not None and "int" in col.codec.expected
        if not (col.sorted or int_pk):
            raise self._need(col, "Sorted()", op)
        # "(-inf" leaves out None, which sorted indexes hold at -inf.
        low, high = "(-inf", "+inf"
        if op == "between":
            lo, hi = value
            low, high = self._score(col, lo), self._score(col, hi)
        elif op == "<":
            high = "(" + self._score(col, value)
        elif op == "<=":
            high = self._score(col, value)
        elif op == ">":
            low = "(" + self._score(col, value)
        elif op == ">=":
            low = self._score(col, value)
        return low, high

    def _union(self, parts: list[str]) -> str:
        return parts[0] if len(parts) == 1 else self._union_of(parts)

    # -- tree --------------------------------------------------------------------------

    def leaf(self, expr: BinaryExpression) -> tuple[str, bool]:
        """A temp key for the condition and whether it is negated (for `!=`)."""
        col = self.column(expr.attribute)
        op = expr.op
        if strings.handles(col, op):
            return strings.leaf(self, col, op, expr.value)
        if op == "==":
            return self._equal_set(col, (expr.value,)), False
        if op == "!=":
            return self._equal_set(col, (expr.value,)), True
        if op == "in":
            return self._equal_set(col, tuple(expr.value)), False
        if op in _RANGE_OPS:
            return self._range_leaf(col, op, expr.value), False
        raise QueryError(f"unsupported operator {op!r}")

    def node(self, cond: Any) -> str:
        if isinstance(cond, BinaryExpression):
            key, negated = self.leaf(cond)
            return self._negate(key) if negated else key
        if isinstance(cond, BooleanClauseList):
            if cond.operator == "or":
                return self._union([self.node(c) for c in cond.clauses])
            return self.conjunction(cond.clauses)
        if isinstance(cond, bool):
            raise QueryError(
                f"where() got {cond}, not a condition: Python evaluated it before redmap saw "
                "it. `Model.field is None` is always False; write `col(Model.field) == None`. "
                "Compare fields of the model with ==, !=, <, <=, >, >=, in_() or between()"
            )
        raise QueryError(f"unsupported condition {cond!r}")

    def _negate(self, key: str) -> str:
        tmp = self.temp()
        self.commands.append(("ZDIFFSTORE", tmp, 2, self.ks.all(), key))
        return tmp

    def conjunction(self, conds: tuple[Any, ...]) -> str:
        positives: list[str] = []
        negatives: list[str] = []
        for c in conds:
            if isinstance(c, BinaryExpression) and c.op == "!=":
                key, _ = self.leaf(c)
                negatives.append(key)
            else:
                positives.append(self.node(c))
        if not positives:
            positives = [self.ks.all()]
        if len(positives) == 1 and not negatives:
            return positives[0]
        tmp = self.temp()
        self.commands.append(
            ("ZINTERSTORE", tmp, len(positives), *positives, "WEIGHTS", *([0] * len(positives)))
        )
        if negatives:
            self.commands.append(("ZDIFFSTORE", tmp, 1 + len(negatives), tmp, *negatives))
        return tmp

    def ordering(self, stmt: Select[Any]) -> tuple[str, bool]:
        """The zset giving the first `order_by` term's order, and its direction; the
        other terms are checked here and sorted by `query.ordering` (tie groups only)."""
        if not stmt._order_by:
            return self.ks.all(), False
        term = stmt._order_by[0]
        col = self.column(term.attribute)
        secondary_terms(self.mapper, stmt._order_by[1:])
        if col.primary_key:
            return self.ks.all(), term.descending
        if col.lexical:
            return strings.ordering(self, stmt, col), term.descending
        if not col.sorted:
            raise self._need(col, "Sorted()", "order_by")
        return self.ks.sorted(col.key), term.descending


def _single_condition(stmt: Select[Any]) -> BinaryExpression | None:
    if len(stmt._where) == 1 and isinstance(stmt._where[0], BinaryExpression):
        return stmt._where[0]
    return None


def _target_shards(stmt: Select[Any], mapper: Mapper[Any]) -> list[KeySpace]:
    """The keyspaces a statement must read: those its shard-key (or id) conditions allow,
    every shard when they allow any, and none when no object can match (an empty `in_`,
    two shard-key values of different shards): such a query is answered without Redis."""
    where = BooleanClauseList("and", stmt._where)
    if mapper.shard_key is None:
        return [] if _matches_nothing(where) else [mapper.keys]
    wanted = _shards_of(where, mapper)
    if wanted is None:
        wanted = set(range(mapper.shards))
    if not wanted or _matches_nothing(where):
        return []
    return [mapper.keys_for_shard(b) for b in sorted(wanted)]


def _matches_nothing(cond: Any) -> bool:
    """True when `cond` is empty whatever Redis holds: an `in_` of no values, and-ed with
    anything, or an `or_` all of whose branches are such (an `or_()` of none included)."""
    if isinstance(cond, BinaryExpression):
        return cond.op == "in" and not cond.value
    if isinstance(cond, BooleanClauseList):
        parts = [_matches_nothing(c) for c in cond.clauses]
        return all(parts) if cond.operator == "or" else any(parts)
    return False


def _shards_of(cond: Any, mapper: Mapper[Any]) -> set[int] | None:
    """The shards that can hold a match of `cond`, or None when it does not narrow them.

    Only `==` and `in_` on the shard key (or on the id, which carries the shard) narrow;
    `and` intersects what its parts narrow, `or` unites them if every branch narrows.
    None values never narrow (no stored object has one, but fanning out stays correct).
    """
    if isinstance(cond, BooleanClauseList):
        parts = [_shards_of(c, mapper) for c in cond.clauses]
        if cond.operator == "or":
            if any(p is None for p in parts):
                return None
            return set().union(*(p for p in parts if p is not None))
        known = [p for p in parts if p is not None]
        return set.intersection(*known) if known else None
    if not isinstance(cond, BinaryExpression) or cond.op not in ("==", "in"):
        return None
    attr = cond.attribute
    if not isinstance(attr, FieldAttribute) or attr.mapper is not mapper:
        return None  # compiling the statement reports a field of another model
    values = tuple(cond.value) if cond.op == "in" else (cond.value,)
    if any(v is None for v in values):
        return None
    if attr.key == mapper.pk.key:
        shards = set()
        for v in values:
            mapper.validate_pk(v)
            shard = mapper.shard_of_pk(v)
            assert shard is not None  # the model is sharded
            shards.add(shard)
        return shards
    if attr.key != mapper.shard_key:
        return None
    codec = attr.column.codec
    assert codec is not None
    for v in values:
        codec.validate(v, model=mapper.name, field=attr.key)  # before computing its shard
    return {mapper.shard_of_value(v) for v in values}


def _validate(stmt: Select[Any], mapper: Mapper[Any]) -> None:
    """Compile without sending: a query that reads nothing still refuses what any would."""
    _compile(stmt, mapper.all_keyspaces()[0])


def _direct_range(
    stmt: Select[Any], ks: KeySpace, *, expiring_ok: bool = False
) -> tuple[str, str, str, bool] | None:
    """A lone range condition on the ordering field reads its zset directly:
    `ZRANGE key low high BYSCORE LIMIT`, cost O(log N + page) whatever the matches.
    (A model with ExpiresAt reads it so only through `_read_live_ranges`.)"""
    cond = _single_condition(stmt)
    if cond is None or cond.op not in _RANGE_OPS or (_expiring(stmt) and not expiring_ok):
        return None
    c = _Compiler(mapper_of(stmt.model), ks)
    col = c.column(cond.attribute)
    order_key, desc = c.ordering(stmt)
    if c.range_source(col) != order_key:
        return None
    low, high = c.bounds(col, cond.op, cond.value)
    return order_key, low, high, desc


def _compile(stmt: Select[Any], ks: KeySpace) -> tuple[_Compiler, str, bool]:
    mapper = mapper_of(stmt.model)
    c = _Compiler(mapper, ks)
    base = c.conjunction(stmt._where) if stmt._where else None
    order_key, desc = c.ordering(stmt)
    if base is None:
        return c, order_key, desc
    final = c.temp()
    # The ordering zset gives the scores; the condition zset only filters.
    c.commands.append(("ZINTERSTORE", final, 2, order_key, base, "WEIGHTS", 1, 0))
    return c, final, desc


def _transaction(c: _Compiler, tail: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    cmds: list[tuple[Any, ...]] = [*c.commands, *tail]
    if c.temps:
        cmds.append(("DEL", *c.temps))
    return cmds


def _run_all(groups: list[tuple[_Compiler, list[tuple[Any, ...]]]]) -> Steps[list[list[Any]]]:
    """Run each compiled statement's transaction; the replies of each one's `tail`."""
    try:
        results = yield Transactions([_transaction(c, t) for c, t in groups])
    except RedmapConnectionError:
        raise  # the server, not the query: keep the type callers retry on
    except RedmapError as exc:
        raise QueryError(f"Redis refused the query: {exc}") from None
    out = []
    for (c, tail), res in zip(groups, results, strict=True):
        n = len(c.commands)
        out.append(list(res[n : n + len(tail)]))
    return out


def _page(stmt: Select[Any], desc: bool, fanned: bool) -> tuple[int, int]:
    """ZRANGE start/stop for one keyspace: the page itself, or on a fan-out everything
    up to the page's end (each shard's best offset+limit, merged afterwards)."""
    if fanned:
        stop = -1 if stmt._limit is None else stmt._offset + stmt._limit - 1
        return 0, stop
    start = stmt._offset
    return start, -1 if stmt._limit is None else start + stmt._limit - 1


def _read_ranges(
    stmt: Select[Any], spaces: list[KeySpace], start: int, stop: int, scored: bool
) -> Steps[tuple[list[list[Any]], bool]]:
    """Each keyspace's members at positions `start..stop` (-1: to the end) of the
    statement's order (first term only), with their scores if `scored`; and whether
    that order is descending. One round trip: a lone range on the ordering field reads
    its zset directly, anything else runs in one MULTI/EXEC per keyspace."""
    if _expiring(stmt):
        return (yield from _read_live_ranges(stmt, spaces, start, stop, scored))
    withscores = ("WITHSCORES",) if scored else ()
    direct = [_direct_range(stmt, ks) for ks in spaces]
    per_space: list[list[Any]] = []
    desc = False
    if all(d is not None for d in direct):
        cmds = []
        for d in direct:
            assert d is not None
            key, low, high, desc = d
            count = -1 if stop == -1 else stop - start + 1
            by: tuple[Any, ...] = (high, low, "BYSCORE", "REV") if desc else (low, high, "BYSCORE")
            cmds.append(("ZRANGE", key, *by, "LIMIT", start, count, *withscores))
        replies = yield Read(cmds)
        for r in replies:
            if isinstance(r, Exception):
                raise QueryError(f"Redis refused the query: {r}")
            per_space.append(list(r))
        return per_space, desc
    groups = []
    for ks in spaces:
        c, final, desc = _compile(stmt, ks)
        rng: tuple[Any, ...] = ("ZRANGE", final, start, stop, *(("REV",) if desc else ()))
        groups.append((c, [(*rng, *withscores)]))
    return [tail[0] for tail in (yield from _run_all(groups))], desc


def _expiring(stmt: Select[Any]) -> bool:
    """Whether the model has an ExpiresAt field: its expired ids are left out
    server-side (`query.deadlines`)."""
    return mapper_of(stmt.model).expiry.expires is not None


def _read_live_ranges(
    stmt: Select[Any], spaces: list[KeySpace], start: int, stop: int, scored: bool
) -> Steps[tuple[list[list[Any]], bool]]:
    """`_read_ranges` for a model with ExpiresAt: the same positions of the order of its
    live matches (`query.deadlines`). One round trip (a plain read for a lone range, else
    the query's MULTI); one more each time more ids of the window had expired than it
    allowed for."""
    mapper = mapper_of(stmt.model)
    now = expiry.now_ms()
    allowance = deadlines.guess(mapper)
    while True:
        direct = [_direct_range(stmt, ks, expiring_ok=True) for ks in spaces]
        desc = False
        replies: list[Any]
        if all(d is not None for d in direct) and deadlines.pipelined(mapper, start, now):
            # A lone range, near the start of the order, and few expired ids in all:
            # plain reads, the expired ids dropped here (no script).
            cmds = []
            size = -1 if stop == -1 else stop + 1 + allowance
            for ks, d in zip(spaces, direct, strict=True):
                assert d is not None
                key, low, high, desc = d
                by: tuple[Any, ...] = (
                    (high, low, "BYSCORE", "REV") if desc else (low, high, "BYSCORE")
                )
                cmds.append(("ZRANGE", key, *by, "LIMIT", 0, size, "WITHSCORES"))
                cmds.append(deadlines.expired_ids(ks, now))
            replies = yield Read(cmds)
            for r in replies:
                if isinstance(r, Exception):
                    raise QueryError(f"Redis refused the query: {r}")
            cut = [
                deadlines.cut(mapper, replies[i], replies[i + 1], start, stop, size, scored, now)
                for i in range(0, len(replies), 2)
            ]
            if any(p is deadlines.BACKLOG for p in cut):
                continue  # too many expired ids to read: the script path (next turn)
            if all(isinstance(p, list) for p in cut):
                return [p for p in cut if isinstance(p, list)], desc
            allowance = deadlines.note(mapper, allowance)
        elif stop == -1:
            # No limit: every match is read anyway; the expired ones (found from the
            # deadline zset, O(k)) are dropped here.
            groups = []
            for ks in spaces:
                c, final, desc = _compile(stmt, ks)
                expired = deadlines.exclude(c, final, now)
                rev = ("REV",) if desc else ()
                withscores = ("WITHSCORES",) if scored else ()
                groups.append(
                    (
                        c,
                        [("ZRANGE", final, 0, -1, *rev, *withscores), ("ZRANGE", expired, 0, -1)],
                    )
                )
            out = []
            for everything, gone in (yield from _run_all(groups)):
                dropped = set(gone)
                if scored:
                    live = [(m, float(sc)) for m, sc in everything if m not in dropped]
                else:
                    live = [m for m in everything if m not in dropped]
                out.append(live[start:])
            return out, desc
        elif all(d is not None for d in direct) or not _compile(stmt, spaces[0])[0].commands:
            # The page script reads a stored zset (a lone range's sorted index, or the
            # ordering zset of a query without conditions): a plain read, no MULTI.
            cmds = []
            for ks, d in zip(spaces, direct, strict=True):
                if d is not None:
                    key, low, high, desc = d
                else:
                    _, key, desc = _compile(stmt, ks)
                    low, high = "-inf", "+inf"
                cmds.append(
                    deadlines.page_command(
                        key, ks.deadlines(), (low, high), desc, start, stop, allowance, now, scored
                    )
                )
            replies = yield Read(cmds)
            if any(deadlines.no_script(r) for r in replies):
                continue  # sent again with the script's body
            for r in replies:
                if isinstance(r, Exception):
                    raise QueryError(f"Redis refused the query: {r}")
        else:
            groups = []
            for ks in spaces:
                c, final, desc = _compile(stmt, ks)
                page = deadlines.page_command(
                    final, ks.deadlines(), ("-inf", "+inf"), desc, start, stop, allowance, now,
                    scored, load=True,
                )
                groups.append((c, [page]))
            replies = [t[0] for t in (yield from _run_all(groups))]
            if any(deadlines.no_script(r) for r in replies):
                continue  # sent again with the script's body
            for r in replies:
                if isinstance(r, Exception):
                    raise QueryError(f"Redis refused the query: {r}")
        pages = [deadlines.read_page(r, stop, allowance, scored) for r in replies]
        if all(p is not None for p in pages):
            return [p for p in pages if p is not None], desc
        allowance = deadlines.note(mapper, allowance)


def _ids_in(stmt: Select[Any], spaces: list[KeySpace]) -> Steps[list[bytes]]:
    """The ids of the requested page: read from one keyspace, or merged across shards."""
    # The string index's own paths read ids straight from the index; a model with
    # ExpiresAt takes the general paths, which leave expired ids out server-side.
    if not _expiring(stmt):
        every = yield from strings.all_ids(stmt, spaces)
        if every is not None:
            return every
        if strings.lex_ordered(stmt) is not None and (
            len(stmt._order_by) == 1 or len(spaces) > 1
        ):
            return (yield from strings.page_ids(stmt, spaces))
    elif len(spaces) > 1 and (lexical := strings.lex_ordered(stmt)) is not None:
        # Ranks within each shard do not compare across shards: merged by value.
        return (yield from strings.expiring_fan_out_ids(stmt, spaces, lexical))
    if len(stmt._order_by) > 1 and not _first_term_is_pk(stmt):
        return (yield from _ids_by_terms(stmt, spaces))
    fanned = len(spaces) > 1
    desc = bool(stmt._order_by) and stmt._order_by[0].descending
    start, stop = _page(stmt, desc, fanned)
    per_space, desc = yield from _read_ranges(stmt, spaces, start, stop, fanned)
    if not fanned:
        return per_space[0]
    merged = [(float(score), member) for ids in per_space for member, score in ids]
    # The order one zset would give: by score, then by member bytes (REV reverses both).
    merged.sort(reverse=desc)
    end = None if stmt._limit is None else stmt._offset + stmt._limit
    return [member for _, member in merged[stmt._offset : end]]


def _first_term_is_pk(stmt: Select[Any]) -> bool:
    """Ordered first by the primary key, which is unique: later terms change nothing."""
    attr = stmt._order_by[0].attribute
    return isinstance(attr, FieldAttribute) and attr.column.primary_key


# A tie group straddling a page edge is read in a second round trip; if a writer moved
# the scores in between so that the page is no longer inside what was read, start over.
_TERM_ATTEMPTS = 5


def _ids_by_terms(stmt: Select[Any], spaces: list[KeySpace]) -> Steps[list[bytes]]:
    """The page of a statement ordered by several terms (the first one a Sorted field).

    1. One round trip reads the first term's order around the page, one member either
       side, with scores (from position 0 on each shard of a fan-out).
    2. When a tie group (members sharing the first term's score) straddles an edge of
       the page, a second round trip reads, in one MULTI/EXEC per keyspace, how many
       members come before the page's first score, every member from the first to the
       last score of the page, and how many come after.
    3. When the page holds ties, one round trip of HMGET reads the other terms' fields
       of the tied members only; `query.ordering` sorts them.

    Round trips: 1 to 3 whatever the model's size; the work grows with the page and the
    tie groups it touches, not with the model.
    """
    mapper = mapper_of(stmt.model)
    terms = secondary_terms(mapper, stmt._order_by[1:])
    off = stmt._offset
    end = None if stmt._limit is None else off + stmt._limit
    fanned = len(spaces) > 1
    for _ in range(_TERM_ATTEMPTS):
        # (1) The page by first-term score, with a neighbour either side.
        first = 0 if fanned else max(off - 1, 0)
        stop = -1 if end is None else end
        per_space, desc = yield from _read_ranges(stmt, spaces, first, stop, True)
        ranked = sorted(
            ((float(score), member) for ids in per_space for member, score in ids),
            key=lambda x: x[0],
            reverse=desc,
        )
        lo = off - first
        if lo >= len(ranked):
            return []
        hi = len(ranked) if end is None else min(end - first, len(ranked))
        s_first, s_last = ranked[lo][0], ranked[hi - 1][0]
        clean_start = lo == 0 or ranked[lo - 1][0] != s_first
        clean_end = hi == len(ranked) or ranked[hi][0] != s_last
        if clean_start and clean_end:
            before = off
            group = [(member, score) for score, member in ranked[lo:hi]]
        else:
            # (2) The tie groups at the edges, whole, from one snapshot per keyspace.
            read = yield from _read_score_span(stmt, spaces, s_first, s_last)
            before, group, after = read
            inside = before <= off < before + len(group)
            if not inside or (end is not None and before + len(group) < end and after):
                continue
        ordered = yield from _sort_by_terms(mapper, group, desc, terms)
        stop_at = None if end is None else end - before
        return [c.member for c in ordered[off - before : stop_at]]
    raise QueryError(
        f"the order of {mapper.name} changed under the query {_TERM_ATTEMPTS} times in a "
        "row (other clients writing its first order_by field); retry it"
    )


def _read_score_span(
    stmt: Select[Any], spaces: list[KeySpace], s_first: float, s_last: float
) -> Steps[tuple[int, list[tuple[bytes, float]], int]]:
    """(members before `s_first`, every member from `s_first` to `s_last` with its score,
    members after `s_last`) in the statement's order, summed over the keyspaces."""
    mapper = mapper_of(stmt.model)
    groups = []
    desc = False
    for ks in spaces:
        d = _direct_range(stmt, ks)
        if d is not None:
            c = _Compiler(mapper, ks)
            key, low, high, desc = d
        else:
            c, key, desc = _compile(stmt, ks)
            low, high = "-inf", "+inf"
            if _expiring(stmt):
                key = deadlines.without_expired(c, key, expiry.now_ms())
        first, last = score_text(s_first), score_text(s_last)
        if desc:
            tail = [
                ("ZCOUNT", key, score_text(s_first, True), high),
                ("ZRANGE", key, first, last, "BYSCORE", "REV", "WITHSCORES"),
                ("ZCOUNT", key, low, score_text(s_last, True)),
            ]
        else:
            tail = [
                ("ZCOUNT", key, low, score_text(s_first, True)),
                ("ZRANGE", key, first, last, "BYSCORE", "WITHSCORES"),
                ("ZCOUNT", key, score_text(s_last, True), high),
            ]
        groups.append((c, tail))
    before = after = 0
    span: list[tuple[bytes, float]] = []
    for b, members, a in (yield from _run_all(groups)):
        before += int(b)
        after += int(a)
        span.extend((member, float(score)) for member, score in members)
    return before, span, after


def _sort_by_terms(
    mapper: Mapper[Any], group: list[tuple[bytes, float]], desc: bool, terms: list[Term]
) -> Steps[list[Candidate]]:
    """`group` in the statement's order; the fields of the other terms are read (one
    round trip of HMGET) for the members that share their first-term score only."""
    candidates = [
        Candidate(member, score, mapper.pk_from_segment(member), [None] * len(terms))
        for member, score in group
    ]
    per_score: dict[float, int] = {}
    for c in candidates:
        per_score[c.score] = per_score.get(c.score, 0) + 1
    fields = [t.column.key for t in terms if t.stored]
    tied = [c for c in candidates if per_score[c.score] > 1]
    if tied and fields:
        keys = [mapper.object_key(c.pk) for c in tied]
        replies = yield Read([("HMGET", key, *fields) for key in keys])
        for c, key, reply in zip(tied, keys, replies, strict=True):
            if isinstance(reply, Exception):
                raise QueryError(f"Redis refused to read {key!r} for order_by: {reply}")
            c.values = decode_values(mapper, terms, key, reply)
    return sort_candidates(candidates, desc, terms)


def execute_select(session: SessionContext, stmt: Select[M]) -> Steps[ScalarResult[M]]:
    """Ids in one round trip (per shard read, for a fan-out), then the objects in one."""
    mapper = mapper_of(stmt.model)
    tree = build_tree(mapper, stmt._options)
    if stmt._limit == 0:
        return ScalarResult([])
    spaces = _target_shards(stmt, mapper)
    if not spaces:
        _validate(stmt, mapper)
        return ScalarResult([])
    ids = yield from _ids_in(stmt, spaces)
    try:
        pks = [mapper.pk_from_segment(i) for i in ids]
    except DecodeError:
        # A corrupt id member: decode again naming the key it came from, when the ids
        # were read from one stored key (not a temporary intersection or a fan-out).
        direct = len(spaces) == 1 and (not stmt._where or _direct_range(stmt, spaces[0]))
        if not direct:
            raise
        source = _Compiler(mapper, spaces[0]).ordering(stmt)[0]
        pks = [mapper.pk_from_segment(i, source) for i in ids]
    return ScalarResult((yield from _objects_for(session, mapper, pks, tree)))


def _objects_for(
    session: SessionContext, mapper: Mapper[Any], pks: list[Any], tree: LoadTree
) -> Steps[list[Any]]:
    yield from ensure_loaded(session, mapper, pks)
    out = []
    now = expiry.now_ms() if mapper.expiry.expires is not None else None
    for pk in pks:
        st = session.identity_map.get((mapper.class_, pk))
        if st is not None and not st.deleted and (now is None or not expiry.gone(st, now)):
            out.append(st.obj)
    if mapper.relationships:
        from ..orm.strategies import selectin_for

        yield from selectin_for(session, out, tree, reset=True)
    return out


def _direct_count_command(stmt: Select[Any], ks: KeySpace) -> tuple[Any, ...] | None:
    """ZCOUNT for a lone range, SCARD for a lone equality: no temporary keys."""
    cond = _single_condition(stmt)
    if cond is None:
        return None
    c = _Compiler(mapper_of(stmt.model), ks)
    col = c.column(cond.attribute)
    if strings.handles(col, cond.op):
        # ZLEXCOUNT counts members, not ids: an ExpiresAt model's count is compiled
        # (its expired ids are subtracted from an id zset).
        return None if _expiring(stmt) else strings.count_command(c, cond)
    if cond.op in _RANGE_OPS:
        low, high = c.bounds(col, cond.op, cond.value)
        return ("ZCOUNT", c.range_source(col), low, high)
    if cond.op == "==" and (col.indexed or col.unique) and not col.primary_key:
        return ("SCARD", c.ks.index(col.key, c._value_segment(col, cond.value)))
    return None


def execute_count(session: SessionContext, stmt: Select[Any]) -> Steps[int]:
    """The number of matches after offset/limit: one round trip (per shard read)."""
    mapper = mapper_of(stmt.model)
    stmt = strings.unordered_for_count(stmt, mapper)
    spaces = _target_shards(stmt, mapper)
    if not spaces:
        _validate(stmt, mapper)
        return 0
    direct = [_direct_count_command(stmt, ks) for ks in spaces]
    if _expiring(stmt):
        now = expiry.now_ms()
        groups = []
        for ks, d in zip(spaces, direct, strict=True):
            if d is not None:
                # ZCOUNT / SCARD, less the expired ids among what it counts (O(k)).
                c = _Compiler(mapper, ks)
                expired = deadlines.exclude(c, d[1], now)
                less = ("ZCOUNT", expired, *d[2:]) if d[0] == "ZCOUNT" else ("ZCARD", expired)
                groups.append((c, [d, less]))
                continue
            c, final, _ = _compile(stmt, ks)
            expired = deadlines.exclude(c, final, now)
            groups.append((c, [("ZCARD", final), ("ZCARD", expired)]))
        card = sum(int(t[0]) - int(t[1]) for t in (yield from _run_all(groups)))
    elif all(d is not None for d in direct):
        replies = yield Read([d for d in direct if d is not None])
        for r in replies:
            if isinstance(r, Exception):
                raise QueryError(f"Redis refused the query: {r}")
        card = sum(int(r) for r in replies)
    else:
        groups = []
        for ks in spaces:
            c, final, _ = _compile(stmt, ks)
            groups.append((c, [("ZCARD", final)]))
        card = sum(int(tail[0]) for tail in (yield from _run_all(groups)))
    n = max(0, card - stmt._offset)
    if stmt._limit is not None:
        n = min(n, stmt._limit)
    return n
