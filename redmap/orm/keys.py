"""The only producer of Redis key strings; called by mapper, persistence, loading and migrations.

Layout (documented in `docs/key-layout.md`):

```
{P}:K:<id>                 object hash (one hash field per stored field, plus "#v", the version)
{P}:K:#seq                 per-model counter for generated integer primary keys
{P}:K:#all                 zset of every id of the model (default order, count)
{P}:K:#ix:<field>:<value>  equality index: set of ids ("#null" as value for None)
{P}:K:#uq:<field>:<value>  unique index: string holding the id that owns the value
{P}:K:#zs:<field>          sorted index: zset of ids scored by the field
{P}:K:#lx:<field>          sorted index of a str/Enum field: zset, score 0, members
                           `value code + NUL + id` in byte order (see `textindex`)
{P}:K:#sx:<field>          suffix index: as #lx, of the reversed string
{P}:K:#tx:<field>:<word>   word index: set of ids whose field contains the word
{P}:K:#fk:<field>:<id>     zset of the ids whose foreign key <field> holds <id> (one-to-many)
{P}:K:#rel:<name>:<id>     zset of the ids linked to one object by many-to-many <name>
{P}:K:#dl                  zset of the ids with a deadline (expiry, soft-delete purge), score ms
{P}:K:#dv                  hash: id -> the index keys the sweep cleans when the deadline passes
{P}:#flush:<token>         short-lived marker written by each flush, read back after a lost reply
{P}:#meta:<name>           registry-wide bookkeeping (migrations)
```

`P` is the registry prefix and `K` the model's keyspace; both are restricted to
`[A-Za-z0-9_.-]`. Every user-derived segment (ids, indexed values) is
percent-encoded: only `[A-Za-z0-9_.-]` stay as they are, every other byte becomes
`%XX`. So a segment never holds `:`, `#`, `{`, `}`, glob characters, spaces or NUL,
and encoding is injective: two different ids always give two different keys.

`{P}` is a Redis Cluster hash tag: by default every key of a registry hashes to
one slot, so any flush can be one atomic transaction on a cluster too.
"""

from __future__ import annotations

import re

__all__ = [
    "NULL_SEGMENT",
    "KeySpace",
    "escape",
    "shard_tag",
    "flush_token_key",
    "meta_key",
    "unescape",
    "valid_name",
]

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
# `\Z`, not `$`: "$" also matches before a trailing newline.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_HEX = "0123456789ABCDEF"
# A precomputed table keeps escaping one dict lookup per byte on the hot path.
_ESCAPE_TABLE = [chr(b) if b in _SAFE else f"%{_HEX[b >> 4]}{_HEX[b & 15]}" for b in range(256)]

# The sigil "#" starts every key part that is not an id; ids are escaped, so no id
# segment can begin with it and no id can collide with "#seq" or "#ix".
_SIGIL = "#"
# The index segment standing for None; escaping never produces "#", so no value collides.
NULL_SEGMENT = "#null"


def valid_name(name: str) -> bool:
    """Whether `name` can be used raw as a prefix, keyspace or field part of a key."""
    return bool(_NAME_RE.match(name))


def escape(raw: bytes) -> str:
    """Percent-encode a user-derived segment so it can hold nothing but `[A-Za-z0-9_.%-]`."""
    if all(b in _SAFE for b in raw):
        return raw.decode("ascii")
    table = _ESCAPE_TABLE
    return "".join([table[b] for b in raw])


def unescape(segment: str) -> bytes:
    """Invert `escape`; raises ValueError on a segment `escape` cannot have produced."""
    if "%" not in segment:
        if not _NAME_RE.match(segment) and segment != "":
            raise ValueError(f"not an escaped segment: {segment!r}")
        return segment.encode("ascii")
    out = bytearray()
    i = 0
    n = len(segment)
    while i < n:
        ch = segment[i]
        if ch == "%":
            pair = segment[i + 1 : i + 3]
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise ValueError(f"bad escape in {segment!r}")
            byte = int(pair, 16)
            if byte in _SAFE:
                # escape() keeps safe bytes as they are: "%41" is not how "A" is written,
                # and accepting it would let two segments stand for one id.
                raise ValueError(f"non-canonical escape in {segment!r}")
            out.append(byte)
            i += 3
        elif ch.isascii() and ord(ch) in _SAFE:
            out.append(ord(ch))
            i += 1
        else:
            raise ValueError(f"not an escaped segment: {segment!r}")
    return bytes(out)


def shard_tag(prefix: str, shard: int | None) -> str:
    """The hash tag of a registry (`{P}`), or of one of its shards (`{P|3}`).

    "|" cannot occur in a prefix, so no registry's tag equals another's shard tag.
    """
    return "{" + prefix + "}" if shard is None else "{" + prefix + "|" + str(shard) + "}"


class KeySpace:
    """The keys of one mapped model (in one shard, for sharded models); built at configure."""

    __slots__ = ("_base", "keyspace", "prefix", "shard", "tag")

    def __init__(self, prefix: str, keyspace: str, shard: int | None = None):
        self.prefix = prefix
        self.keyspace = keyspace
        self.shard = shard
        # The hash tag groups every key of the registry (or of one shard) into one slot.
        self.tag = shard_tag(prefix, shard)
        self._base = f"{self.tag}:{keyspace}:"

    def object(self, id_segment: str) -> str:
        """The hash holding one object's fields and version."""
        return self._base + id_segment

    @property
    def object_prefix(self) -> str:
        """What every object key of this model starts with (used by migrations' SCAN)."""
        return self._base

    def seq(self) -> str:
        """The counter that hands out generated integer primary keys."""
        return self._base + _SIGIL + "seq"

    def all(self) -> str:
        """The zset of every id of the model (score: the id when it is an int, else 0)."""
        return self._base + _SIGIL + "all"

    def deadlines(self) -> str:
        """The zset of the ids that have a deadline (an ExpiresAt moment, or the end of a
        soft delete's grace period), scored by it in ms since the epoch: what queries
        subtract and what the sweep walks (`redmap.orm.expiry`)."""
        return self._base + _SIGIL + "dl"

    def sweep_data(self) -> str:
        """The hash of what the sweep must clean for each id in `deadlines()`: the index,
        unique and foreign-key keys holding it ("\\n"-joined), readable after Redis
        removed the object's hash itself."""
        return self._base + _SIGIL + "dv"

    def index(self, field: str, value_segment: str) -> str:
        """The set of ids whose `field` equals the encoded value."""
        return f"{self._base}{_SIGIL}ix:{field}:{value_segment}"

    def index_prefix(self, field: str) -> str:
        """What every equality-index key of `field` starts with (migrations only)."""
        return f"{self._base}{_SIGIL}ix:{field}:"

    def unique(self, field: str, value_segment: str) -> str:
        """The string holding the id that owns one value of a unique `field`.

        One key per value (not one hash per field) so that a flush watches only
        the values it claims: inserts of different values never conflict.
        """
        return f"{self._base}{_SIGIL}uq:{field}:{value_segment}"

    def sorted(self, field: str) -> str:
        """The zset of ids scored by `field`."""
        return f"{self._base}{_SIGIL}zs:{field}"

    def lexical(self, field: str) -> str:
        """The lexicographic zset of a `Sorted()` str/Enum field (`textindex.member`)."""
        return f"{self._base}{_SIGIL}lx:{field}"

    def suffix(self, field: str) -> str:
        """The lexicographic zset of a `Suffix()` field's reversed values."""
        return f"{self._base}{_SIGIL}sx:{field}"

    def word(self, field: str, word_segment: str) -> str:
        """The set of ids whose `Text()` field holds the (escaped, casefolded) word."""
        return f"{self._base}{_SIGIL}tx:{field}:{word_segment}"

    def word_prefix(self, field: str) -> str:
        """What every word-set key of `field` starts with (migrations and audit only)."""
        return f"{self._base}{_SIGIL}tx:{field}:"

    def relation(self, name: str, id_segment: str) -> str:
        """The ids related to one object through relationship `name`."""
        return f"{self._base}{_SIGIL}rel:{name}:{id_segment}"

    def foreign(self, field: str, parent_segment: str) -> str:
        """The zset of ids whose foreign key `field` points at one parent (one-to-many)."""
        return f"{self._base}{_SIGIL}fk:{field}:{parent_segment}"

    def is_object_key(self, key: str) -> bool:
        """Whether `key` is an object hash of this model (and not an index or counter)."""
        return key.startswith(self._base) and not key[len(self._base) :].startswith(_SIGIL)

    def id_segment_of(self, key: str) -> str:
        """The escaped id segment of an object key."""
        return key[len(self._base) :]


def flush_token_key(tag: str, token: str) -> str:
    """The marker a flush writes, so a lost EXEC reply can be settled by reading it back.

    `tag` is the hash tag of the flush's keys (`KeySpace.tag`), so the token shares
    their slot.
    """
    return tag + ":" + _SIGIL + "flush:" + token


def meta_key(prefix: str, name: str, *, tag: str | None = None) -> str:
    """Registry-wide bookkeeping keys (migration version, lock, layout snapshot), or
    with `tag`, per-shard ones (temporary query keys)."""
    return (tag or "{" + prefix + "}") + ":" + _SIGIL + "meta:" + name
