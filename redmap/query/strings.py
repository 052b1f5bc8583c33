"""String conditions and string order for `select()`: `startswith`, `endswith`, `match`,
ranges and `order_by` on a `Sorted()` str/Enum field; called by `query.select`.

Every condition becomes a temporary zset of ids, as the numeric ones do, so it takes part
in the same set algebra (`and`, `or_`, `!=`). A lexicographic range of an ordered or
suffix index (`orm.textindex`) holds members, not ids: `textindex.CONVERT_SCRIPT` turns
it into an id zset inside the query's MULTI, scored by rank in the range (equal values
share a score; `_ids_by_terms` pages several `order_by` terms through such scores). A
word condition is the intersection of its words' id sets. A page ordered by one string
field is read from the index itself (`page_ids`): directly, or by walking it in order.

Cost per condition (N objects, R members in the range, W words):
- a range or `startswith` on an ordered index, `endswith`: O(log N + R);
- `match`: Redis' ZINTERSTORE of W sets, O(W * size of the smallest set) at worst;
- `order_by(field)` alone or with one range/`startswith` on that same field: read
  straight from the index, O(log N + offset + limit), no temporary key; with other
  conditions, a walk of the index in order (within the field's first range condition,
  if any) until the page is complete: O(log N + members walked), at most O(R).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..commands import Read, Steps
from ..exc import QueryError
from ..orm import keys
from ..orm.keys import KeySpace
from ..orm.mapper import VERSION_FIELD, ColumnProperty, Mapper, mapper_of
from ..orm.textindex import (
    CONVERT_SCRIPT,
    NULL_MAX,
    NULL_MIN,
    id_of_member,
    member,
    prefix_bounds,
    range_bounds,
    words,
)
from .expression import BinaryExpression

if TYPE_CHECKING:
    from .select import Select, _Compiler

__all__ = [
    "all_ids",
    "count_command",
    "expiring_fan_out_ids",
    "handles",
    "leaf",
    "lex_ordered",
    "ordering",
    "page_ids",
    "unordered_for_count",
]

_STRING_OPS = {"startswith", "endswith", "match"}
_LEX_OPS = {"<", "<=", ">", ">=", "between", "==", "!=", "in"}
# Walks an ordered index in order and keeps the members whose id the statement matched:
# the page of `order_by(field)` under other conditions, read without converting the
# whole range. KEYS: the index, the statement's ids (a zset or a set); ARGV: min, max
# (BYLEX), "1" for descending, members to skip, members to return (-1: all), "1" to go
# on past the last one wanted while the value stays the same (a whole tie group, for
# the next `order_by` terms). Chunks move their bound past the last member read, so
# each costs O(log N + chunk).
_WALK_SCRIPT = r"""
if redis.call('EXISTS', KEYS[2]) == 0 then return {} end
local isset = redis.call('TYPE', KEYS[2]).ok == 'set'
local desc = ARGV[3] == '1'
local skip = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local ties = ARGV[6] == '1'
local lo, hi = ARGV[1], ARGV[2]
local out = {}
local chunk = 256
local last = nil
local done = false
while not done do
  local page
  if desc then
    page = redis.call('ZREVRANGEBYLEX', KEYS[1], hi, lo, 'LIMIT', 0, chunk)
  else
    page = redis.call('ZRANGEBYLEX', KEYS[1], lo, hi, 'LIMIT', 0, chunk)
  end
  for _, m in ipairs(page) do
    local cut = string.find(m, '%z[^%z]*$')
    if last ~= nil and string.sub(m, 1, cut) ~= last then
      done = true
      break
    end
    local id = string.sub(m, cut + 1)
    local hit
    if isset then hit = redis.call('SISMEMBER', KEYS[2], id) == 1
    else hit = redis.call('ZSCORE', KEYS[2], id) ~= false end
    if hit then
      if skip > 0 then
        skip = skip - 1
      else
        out[#out + 1] = m
        if want > 0 then
          want = want - 1
          if want == 0 then
            if ties then
              last = string.sub(m, 1, cut)
            else
              done = true
              break
            end
          end
        end
      end
    end
  end
  if #page < chunk then break end
  if desc then hi = '(' .. page[#page] else lo = '(' .. page[#page] end
end
return out
"""


def handles(col: ColumnProperty, op: str) -> bool:
    """Whether this module answers `op` on `col` (else the numeric/equality compiler)."""
    if op in _STRING_OPS:
        return True
    if not col.lexical or op not in _LEX_OPS:
        return False
    # An equality index answers ==, != and in_ with no conversion.
    return not (op in ("==", "!=", "in") and (col.indexed or col.unique))


def _text(c: _Compiler, col: ColumnProperty, value: Any, op: str) -> str:
    """The indexed text of a compared value (an Enum's name), validated as the field is."""
    if value is None:
        raise QueryError(
            f"{c.mapper.name}.{col.key} {op} None: compare with a string "
            f"(`== None` finds objects without a value)",
            model=c.mapper.name,
            field=col.key,
        )
    codec = col.codec
    assert codec is not None
    if op in _STRING_OPS:
        if not isinstance(value, str):
            raise QueryError(
                f"{c.mapper.name}.{col.key}.{op}() takes a str, not {type(value).__name__}",
                model=c.mapper.name,
                field=col.key,
            )
        return value
    codec.validate(value, model=c.mapper.name, field=col.key)
    return codec.encode(value).decode("utf-8")


def _need(c: _Compiler, col: ColumnProperty, marker: str, op: str) -> QueryError:
    what = "a str field" if marker in ("Text()", "Suffix()") else "a str or Enum field"
    return QueryError(
        f"{c.mapper.name}.{col.key} {op} ... needs {marker} on {what}: mark the field "
        f"Annotated[str, {marker}] (redmap never scans the keyspace)",
        model=c.mapper.name,
        field=col.key,
    )


def lex_bounds(c: _Compiler, col: ColumnProperty, op: str, value: Any) -> tuple[bytes, bytes]:
    """BYLEX bounds on the ordered index of `col` for one condition (not `in`/`!=`)."""
    if op == "startswith":
        if not col.lexical:
            raise _need(c, col, "Sorted()", "startswith()")
        return prefix_bounds(_text(c, col, value, op))
    if op == "==" and value is None:
        return NULL_MIN, NULL_MAX
    if op == "between":
        low, high = value
        return range_bounds(op, (_text(c, col, low, op), _text(c, col, high, op)))
    return range_bounds(op, _text(c, col, value, op))


def _convert(c: _Compiler, src: str, low: bytes, high: bytes) -> str:
    """A temporary id zset of the members of `src` within `low..high` (rank scores)."""
    cache: dict[tuple[str, bytes, bytes], str] = c.lex_temps
    found = cache.get((src, low, high))
    if found is not None:
        return found
    tmp = c.temp()
    # A DEL first: a cluster routes a query's transaction by its first command's key.
    c.commands.append(("DEL", tmp))
    c.commands.append(("EVAL", CONVERT_SCRIPT, 2, src, tmp, low, high))
    cache[(src, low, high)] = tmp
    return tmp


def leaf(c: _Compiler, col: ColumnProperty, op: str, value: Any) -> tuple[str, bool]:
    """The temporary (or stored) id set of one string condition, and whether negated."""
    if op == "match":
        if not col.text:
            raise _need(c, col, "Text()", "match()")
        found = words(_text(c, col, value, op))
        if not found:
            raise QueryError(
                f"{c.mapper.name}.{col.key}.match({value!r}) holds no word: give at least "
                "one word (letters or digits)",
                model=c.mapper.name,
                field=col.key,
            )
        sets = [c.ks.word(col.key, keys.escape(w.encode("utf-8"))) for w in found]
        if len(sets) == 1:
            return sets[0], False
        tmp = c.temp()
        c.commands.append(("ZINTERSTORE", tmp, len(sets), *sets, "WEIGHTS", *([0] * len(sets))))
        return tmp, False
    if op == "endswith":
        if not col.suffix:
            raise _need(c, col, "Suffix()", "endswith()")
        low, high = prefix_bounds(_text(c, col, value, op)[::-1])
        return _convert(c, c.ks.suffix(col.key), low, high), False
    if op == "in":
        values = tuple(value)
        parts = [_convert(c, c.ks.lexical(col.key), *lex_bounds(c, col, "==", v)) for v in values]
        if len(parts) == 1:
            return parts[0], False
        tmp = c.temp()
        if parts:
            c.commands.append(
                ("ZUNIONSTORE", tmp, len(parts), *parts, "WEIGHTS", *([0] * len(parts)))
            )
        else:
            c.commands.append(("DEL", tmp))
        return tmp, False
    negated = op == "!="
    low, high = lex_bounds(c, col, "==" if negated else op, value)
    return _convert(c, c.ks.lexical(col.key), low, high), negated


def _order_condition(stmt: Select[Any], col: ColumnProperty) -> BinaryExpression | None:
    """The first top-level range/`startswith`/`==` condition on `col`: it bounds the part
    of the ordered index the order of `col` needs (the rest of `where` filters it)."""
    for cond in stmt._where:
        if (
            isinstance(cond, BinaryExpression)
            and cond.op in ("startswith", "<", "<=", ">", ">=", "between", "==")
            and getattr(cond.attribute, "column", None) is col
            and handles(col, cond.op)
        ):
            return cond
    return None


def _order_range(c: _Compiler, stmt: Select[Any], col: ColumnProperty) -> tuple[bytes, bytes]:
    """The range of the ordered index the order of `col` reads (the whole index when
    `where` has no range on `col`)."""
    cond = _order_condition(stmt, col)
    if cond is None:
        return b"-", b"+"
    return lex_bounds(c, col, cond.op, cond.value)


def ordering(c: _Compiler, stmt: Select[Any], col: ColumnProperty) -> str:
    """A temporary id zset scored in the order of `col`'s ordered index."""
    return _convert(c, c.ks.lexical(col.key), *_order_range(c, stmt, col))


def lex_ordered(stmt: Select[Any]) -> ColumnProperty | None:
    """The column of the first `order_by` term when it is an ordered string field."""
    if not stmt._order_by:
        return None
    col = getattr(stmt._order_by[0].attribute, "column", None)
    if isinstance(col, ColumnProperty) and col.lexical:
        return col
    return None


def _direct(
    stmt: Select[Any], mapper: Mapper[Any], col: ColumnProperty
) -> tuple[bytes, bytes] | None:
    """BYLEX bounds when the page can be read straight from the ordered index: no
    condition, or one range/`startswith` on the ordering field itself."""
    from .select import _Compiler

    if not stmt._where:
        return b"-", b"+"
    cond = _order_condition(stmt, col)
    if len(stmt._where) != 1 or cond is None:
        return None
    return lex_bounds(_Compiler(mapper, mapper.keys), col, cond.op, cond.value)


def page_ids(stmt: Select[Any], spaces: Sequence[KeySpace]) -> Steps[list[bytes]]:
    """The ids of the requested page of a statement ordered by one ordered string field.

    One round trip. Read straight from the index when `_direct` allows; else, in one
    MULTI/EXEC per keyspace, the statement's ids are computed and `_WALK_SCRIPT` walks
    the index in order (within the field's first range condition) until it has the
    page: O(log N + members walked). A fan-out reads each shard's first offset+limit
    members and merges them by their bytes (the order one index would give)."""
    mapper = mapper_of(stmt.model)
    col = lex_ordered(stmt)
    assert col is not None
    desc = stmt._order_by[0].descending
    fanned = len(spaces) > 1
    start = 0 if fanned else stmt._offset
    count = -1 if stmt._limit is None else stmt._limit + (stmt._offset if fanned else 0)
    # Several terms (on a fan-out only: one keyspace pages them by rank scores in
    # `select._ids_by_terms`): each shard's walk completes its last tie group.
    ties = len(stmt._order_by) > 1
    bounds = None if ties else _direct(stmt, mapper, col)
    members: list[bytes] = []
    if bounds is not None:
        low, high = bounds
        cmds = []
        for ks in spaces:
            by = (high, low, "BYLEX", "REV") if desc else (low, high, "BYLEX")
            cmds.append(("ZRANGE", ks.lexical(col.key), *by, "LIMIT", start, count))
        replies = yield Read(cmds)
        for r in replies:
            if isinstance(r, Exception):
                raise QueryError(f"Redis refused the query: {r}")
            members.extend(r)
        if not fanned:
            return [id_of_member(m) for m in members]
    else:
        from .select import _Compiler, _run_all

        groups = []
        for ks in spaces:
            c = _Compiler(mapper, ks)
            # First: a cluster routes a query's transaction by its first command's key.
            c.commands.append(("EXISTS", ks.lexical(col.key)))
            # The walk stays within the range condition on the field: the others filter.
            bound = _order_condition(stmt, col)
            rest = tuple(w for w in stmt._where if w is not bound)
            base = c.conjunction(rest) if rest else ks.all()
            low, high = _order_range(c, stmt, col)
            index = ks.lexical(col.key)
            walk = (
                "EVAL",
                _WALK_SCRIPT,
                2,
                index,
                base,
                low,
                high,
                int(desc),
                start,
                count,
                int(ties),
            )
            groups.append((c, [walk]))
        tails = yield from _run_all(groups)
        for tail in tails:
            members.extend(tail[0])
        if not fanned:
            return [id_of_member(m) for m in members]
    members.sort(reverse=desc)
    end = None if stmt._limit is None else stmt._offset + stmt._limit
    if ties:
        return (yield from _by_terms(stmt, mapper, members, desc, end))
    return [id_of_member(m) for m in members[stmt._offset : end]]


def expiring_fan_out_ids(
    stmt: Select[Any], spaces: Sequence[KeySpace], col: ColumnProperty
) -> Steps[list[bytes]]:
    """The page of a fan-out ordered first by the string field `col`, on a model with
    ExpiresAt (whose pages leave expired ids out: `select._read_live_ranges`).

    Each shard's page comes from a temporary id zset scored by rank *within that shard*
    (`ordering`), which does not compare across shards; so the members the index holds
    are rebuilt from the stored values (one more round trip: HMGET of the field and the
    version of each candidate; one whose hash is gone by then is left out) and merged by
    their bytes, the order one index would give. With more `order_by` terms, every live
    match of each shard is read (a tie group may run past any page end), O(N); the tie
    groups are then sorted by the other terms (`_by_terms`)."""
    from .select import _read_ranges

    mapper = mapper_of(stmt.model)
    desc = stmt._order_by[0].descending
    end = None if stmt._limit is None else stmt._offset + stmt._limit
    ties = len(stmt._order_by) > 1
    stop = -1 if end is None or ties else end - 1
    per_space, _ = yield from _read_ranges(stmt, list(spaces), 0, stop, True)
    ids = [m for page in per_space for m, _ in page]
    cmds = [("HMGET", mapper.object_key(mapper.pk_from_segment(i)), col.key, VERSION_FIELD)
            for i in ids]
    replies = (yield Read(cmds)) if cmds else []
    members = []
    for raw, reply in zip(ids, replies, strict=True):
        if isinstance(reply, Exception):
            raise QueryError(f"Redis refused the query: {reply}")
        value, version = reply
        if version is None:
            continue  # gone since its shard's page was read
        segment = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        text = None if value is None else value.decode("utf-8")
        members.append(member(text, segment).encode("utf-8"))
    members.sort(reverse=desc)
    if ties:
        return (yield from _by_terms(stmt, mapper, members, desc, end))
    return [id_of_member(m) for m in members[stmt._offset : end]]


def _value_of(member: bytes) -> bytes:
    """The value part of an ordered-index member (through its NUL)."""
    return member[: member.rindex(b"\x00") + 1]


def _by_terms(
    stmt: Select[Any], mapper: Mapper[Any], members: list[bytes], desc: bool, end: int | None
) -> Steps[list[bytes]]:
    """The page of a fan-out ordered by a string field, then other terms: `members` are
    every shard's first `end` matches in the field's order plus the rest of each
    shard's last tie group, merged. Every match of a value before the page end's value
    is among them (fewer than `end` precede it in all), and so is every match of that
    value; the tie groups are sorted by the other terms (`select._sort_by_terms`)."""
    from .ordering import secondary_terms
    from .select import _sort_by_terms

    terms = secondary_terms(mapper, stmt._order_by[1:])
    if end is not None and len(members) > end:
        edge = _value_of(members[end - 1])
        stop = end
        while stop < len(members) and _value_of(members[stop]) == edge:
            stop += 1
        members = members[:stop]
    ranks: dict[bytes, float] = {}
    for value in sorted({_value_of(m) for m in members}):
        ranks[value] = float(len(ranks))
    group = [(id_of_member(m), ranks[_value_of(m)]) for m in members]
    ordered = yield from _sort_by_terms(mapper, group, desc, terms)
    return [c.member for c in ordered[stmt._offset : end]]


def all_ids(stmt: Select[Any], spaces: Sequence[KeySpace]) -> Steps[list[bytes] | None]:
    """Every match of a lone string condition, in id order, read with one command and
    no transaction (None: not such a statement).

    Only when every match is returned (no `order_by`, `limit` or `offset`, one
    keyspace): the objects are then all loaded anyway, so reading their ids from the
    index and putting them in the id zset's order (integer ids by value, others by
    their bytes) costs no more than the loading, and skips the conversion script."""
    if stmt._order_by or stmt._limit is not None or stmt._offset or len(spaces) != 1:
        return None
    if len(stmt._where) != 1 or not isinstance(stmt._where[0], BinaryExpression):
        return None
    from .select import _Compiler

    cond = stmt._where[0]
    mapper = mapper_of(stmt.model)
    c = _Compiler(mapper, spaces[0])
    col = c.column(cond.attribute)
    if not handles(col, cond.op) or cond.op in ("!=", "in"):
        return None
    if cond.op == "match":
        key, _ = leaf(c, col, "match", cond.value)
        if c.commands:  # several words: `leaf` intersected their sets
            inter = c.commands[0]
            cmd: tuple[Any, ...] = ("SINTER", *inter[3 : 3 + int(inter[2])])
        else:
            cmd = ("SMEMBERS", key)
        bylex = False
    elif cond.op == "endswith":
        if not col.suffix:
            return None
        low, high = prefix_bounds(_text(c, col, cond.value, "endswith")[::-1])
        cmd, bylex = ("ZRANGE", c.ks.suffix(col.key), low, high, "BYLEX"), True
    else:
        low, high = lex_bounds(c, col, cond.op, cond.value)
        cmd, bylex = ("ZRANGE", c.ks.lexical(col.key), low, high, "BYLEX"), True
    (reply,) = yield Read([cmd])
    if isinstance(reply, Exception):
        raise QueryError(f"Redis refused the query: {reply}")
    ids = [id_of_member(m) for m in reply] if bylex else list(reply)
    if mapper.pk.codec is not None and "int" in mapper.pk.codec.expected:
        ids.sort(key=int)
    else:
        ids.sort()
    return ids


def unordered_for_count(stmt: Select[Any], mapper: Mapper[Any]) -> Select[Any]:
    """`stmt` without its order when it is ordered by a string field: a count needs no
    order, and that order would cost a conversion of the field's range. The order is
    still checked (a bad term raises as it would for the rows)."""
    if lex_ordered(stmt) is None:
        return stmt
    from .select import _Compiler

    _Compiler(mapper, mapper.keys).ordering(stmt)
    return stmt.order_by()


def count_command(c: _Compiler, cond: BinaryExpression) -> tuple[Any, ...] | None:
    """ZLEXCOUNT / SCARD for a lone string condition: no temporary keys."""
    col = c.column(cond.attribute)
    if not handles(col, cond.op) or cond.op in ("!=", "in"):
        return None
    if cond.op == "match":
        found = words(_text(c, col, cond.value, "match")) if col.text else []
        if len(found) != 1:
            return None  # compiled: the error, or an intersection
        return ("SCARD", c.ks.word(col.key, keys.escape(found[0].encode("utf-8"))))
    if cond.op == "endswith":
        if not col.suffix:
            return None
        low, high = prefix_bounds(_text(c, col, cond.value, "endswith")[::-1])
        return ("ZLEXCOUNT", c.ks.suffix(col.key), low, high)
    return ("ZLEXCOUNT", c.ks.lexical(col.key), *lex_bounds(c, col, cond.op, cond.value))
