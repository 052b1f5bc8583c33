"""String indexes kept by the flush: ordered strings, suffixes and words; pure functions.

Called by `mapper` (which fields may carry them), `persistence` (the commands that keep
them), `query.strings` (the ranges that read them), `migrate.impl` and `audit`.

**Ordered strings** (`Sorted()` on `str`/`Enum`) live in one zset per field
(`KeySpace.lexical`), every member at score 0, so Redis orders members by their bytes
(`ZRANGE ... BYLEX`). A member is

```
"\\x01" + code(value) + "\\x00" + id segment      a value (Enum: its name)
"\\x00" + id segment                              None (first, like -inf in a Sorted number)
```

`code` writes the value's UTF-8 bytes unchanged except three: NUL becomes `01 01`,
`01` becomes `01 02` and `#` becomes `23 01`. The code is prefix-free and keeps byte
order, and holds no NUL, so the NUL after it ends the value: members order by
(value in code-point order, then id bytes), and "value starts with p" is exactly
"member starts with `01` + code(p)". No code holds the byte FF (UTF-8 never does), so
`code(p) + FF` bounds every member starting with `code(p)`. `#` is coded so that no
value can spell a generated-id placeholder (`#new<n>`, bound in the member after it).

**Suffixes** (`Suffix()`) are the same zset of the reversed string (reversed by code
points): "ends with s" is "reversed starts with reversed s".

**Words** (`Text()`) are one set of ids per word (`KeySpace.word`). The tokenizer:
NFKC-normalise, casefold, then every maximal run of word characters (`\\w+` of Python's
Unicode `re`: letters, digits, marks... and `_`) is a word. "Don't panic!" gives
`don`, `t`, `panic`.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from typing import Any

from .keys import KeySpace, escape

__all__ = [
    "CONVERT_SCRIPT",
    "NULL_MIN",
    "VALUE_MIN",
    "code",
    "id_of_member",
    "index_commands",
    "is_string_type",
    "member",
    "prefix_bounds",
    "range_bounds",
    "suffix_member",
    "words",
]

# Lead byte of a member holding None / a value: None sorts first.
_NULL = "\x00"
_VALUE = "\x01"
_SEP = "\x00"
_CODE = str.maketrans({0: "\x01\x01", 1: "\x01\x02", 0x23: "#\x01"})
_WORD_RE = re.compile(r"\w+")

#: BYLEX bounds of every value member (None members are below it).
VALUE_MIN = b"[\x01"
#: BYLEX bounds of the None members only.
NULL_MIN, NULL_MAX = b"[\x00", b"(\x01"


def is_string_type(tp: Any) -> bool:
    """Whether a field of (non-Optional) type `tp` takes string indexes: `str` or an
    `Enum` (indexed by member name)."""
    return tp is str or (isinstance(tp, type) and issubclass(tp, enum.Enum))


def code(text: str) -> str:
    """The order-preserving, prefix-free, NUL-free code of `text` (module docstring)."""
    if "\x00" in text or "\x01" in text or "#" in text:
        return text.translate(_CODE)
    return text


def member(text: str | None, segment: str) -> str:
    """The ordered-index member of one object: its value (None first) and its id."""
    if text is None:
        return _NULL + segment
    return _VALUE + code(text) + _SEP + segment


def suffix_member(text: str, segment: str) -> str:
    """The suffix-index member of one object: its value reversed by code points."""
    return _VALUE + code(text[::-1]) + _SEP + segment


def id_of_member(raw: bytes) -> bytes:
    """The id segment a member ends with (after its last NUL)."""
    return raw.rpartition(b"\x00")[2]


def _coded(text: str) -> bytes:
    return (_VALUE + code(text)).encode("utf-8")


def prefix_bounds(prefix: str) -> tuple[bytes, bytes]:
    """BYLEX bounds of every value starting with `prefix` ("" : every non-None value)."""
    c = _coded(prefix)
    return b"[" + c, b"(" + c + b"\xff"


def range_bounds(op: str, value: Any) -> tuple[bytes, bytes]:
    """BYLEX bounds for `<, <=, >, >=, ==, between` on an ordered string index.

    Members of value v are `c(v) 00 id`, all below `c(v) 00 FF` (ids are ASCII) and
    above `c(v)`; every longer value w > v continues `c(v)` with a byte of at least 01.
    """
    if op == "between":
        low, high = value
        return b"[" + _coded(low), b"[" + _coded(high) + b"\x00\xff"
    c = _coded(value)
    if op == "==":
        return b"[" + c + b"\x00", b"(" + c + b"\x00\xff"
    if op == ">=":
        return b"[" + c, b"+"
    if op == ">":
        return b"(" + c + b"\x00\xff", b"+"
    if op == "<=":
        return VALUE_MIN, b"[" + c + b"\x00\xff"
    if op == "<":
        return VALUE_MIN, b"(" + c
    raise ValueError(f"not a range operator: {op!r}")


def words(text: str) -> list[str]:
    """The distinct words of `text`, in order of first appearance (module docstring)."""
    return list(dict.fromkeys(_WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())))


def index_commands(
    ks: KeySpace,
    field: str,
    *,
    lexical: bool,
    suffix: bool,
    text: bool,
    raw: bytes | None,
    segment: str,
    add: bool,
) -> list[tuple[Any, ...]]:
    """The commands adding (or removing) one object's entries of the string indexes of
    `field`, whose stored (encoded) value is `raw` (None: no value).

    The encoded value of a str is its UTF-8 text and of an Enum its member name, so the
    index works on the decoded text whatever the type.
    """
    out: list[tuple[Any, ...]] = []
    value = None if raw is None else raw.decode("utf-8")
    if lexical:
        m = member(value, segment)
        out.append(("ZADD", ks.lexical(field), 0, m) if add else ("ZREM", ks.lexical(field), m))
    if suffix and value is not None:
        m = suffix_member(value, segment)
        out.append(("ZADD", ks.suffix(field), 0, m) if add else ("ZREM", ks.suffix(field), m))
    if text and value is not None:
        for w in words(value):
            key = ks.word(field, escape(w.encode("utf-8")))
            out.append(("SADD" if add else "SREM", key, segment))
    return out


#: Turns a BYLEX range of an ordered index into a zset of the ids it holds, each scored
#: by the position of the first member of its value in the range (equal values share a
#: score; members of one score order by id bytes, as in the index). KEYS: the index,
#: the destination; ARGV: min, max. Runs inside the query's MULTI; cost O(range).
CONVERT_SCRIPT = r"""
local m = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[2])
local batch = {}
local prev = nil
local score = 0
for i, member in ipairs(m) do
  local cut = string.find(member, '%z[^%z]*$')
  local value = string.sub(member, 1, cut)
  if value ~= prev then score = i; prev = value end
  batch[#batch + 1] = score
  batch[#batch + 1] = string.sub(member, cut + 1)
  if #batch >= 4000 then
    redis.call('ZADD', KEYS[2], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('ZADD', KEYS[2], unpack(batch)) end
return #m
"""
