"""Hostile input: ids and stored bytes chosen to break key building, glob patterns and decoders.

Three guarantees, each printed as one line of figures and checked against its threshold:

* 10,000 generated string ids (unicode, ``: { } * ? [ ] \\``, NUL, 1 KB ids, near-collisions
  of the escaping itself) round-trip through Redis via sessions: every id lands in its own
  key (0 collisions), reads back equal, and every key of the registry stays in one slot.
* SCAN MATCH patterns built from the escaped ids (glob metacharacters escaped) match
  exactly their own key: 0 foreign keys.
* 10,000 random byte strings fed to every field decoder raise nothing but ``DecodeError``;
  the same holds for corrupted hashes and index members loaded through a session.

The default run uses 10,000 of each (it takes well under 30 s); ``-m soak`` repeats the
whole file's checks with 50,000.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import random
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import pytest
import redis
from redis.crc import key_slot

from redmap import Indexed, PrimaryKey, Session, Sorted, Unique, registry, select
from redmap.audit import audit
from redmap.engine import Engine
from redmap.exc import DecodeError, RedmapError
from redmap.orm import keys
from redmap.orm.types import Codec, compile_codec

reg = registry(prefix="hx")


@reg.mapped
@dataclass
class Doc:
    """A model keyed by arbitrary strings, with every index kind fed hostile values too."""

    slug: Annotated[str, PrimaryKey()]
    body: str = ""
    label: Annotated[str, Indexed()] = ""
    code: Annotated[str | None, Unique()] = None
    rank: Annotated[int, Sorted()] = 0


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


@dataclass
class Point:
    x: int
    y: float = 0.0
    tags: list[str] = field(default_factory=list)


@dataclass
class Tree:
    name: str
    kids: list[Tree] = field(default_factory=list)


@reg.mapped
@dataclass
class Wide:
    """One stored field per supported type, for corruption through Redis."""

    s: str = ""
    i: int = 0
    f: float = 0.0
    b: bool = False
    raw: bytes = b""
    d: decimal.Decimal = decimal.Decimal(0)
    when: dt.datetime = dt.datetime(2000, 1, 1)
    day: dt.date = dt.date(2000, 1, 1)
    at: dt.time = dt.time(0, 0)
    span: dt.timedelta = dt.timedelta(0)
    u: uuid.UUID = uuid.UUID(int=0)
    color: Color = Color.RED
    perm: Perm = Perm.R
    maybe: int | None = None
    items: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    point: Point | None = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Slug:
    """Nothing but a string primary key: its keyspace is one key per id."""

    slug: Annotated[str, PrimaryKey()]


@reg.mapped
@dataclass
class ByUuid:
    id: Annotated[uuid.UUID | None, PrimaryKey()] = None


# Every annotation a field may carry, with sample values whose encodings seed mutations.
DECODER_TYPES: list[tuple[Any, list[Any]]] = [
    (str, ["", "héllo", "a\x00b", "😀" * 3]),
    (int, [0, -7, 2**70, 10**30]),
    (bool, [True, False]),
    (float, [0.0, -0.0, 1.5, float("inf"), float("nan"), 1e308]),
    (bytes, [b"", b"\x00\xff", bytes(range(256))]),
    (decimal.Decimal, [decimal.Decimal("1.10"), decimal.Decimal("-1e-30"), decimal.Decimal("NaN")]),
    (
        dt.datetime,
        [dt.datetime(2026, 1, 2, 3, 4, 5, 6), dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc)],
    ),
    (dt.date, [dt.date(2026, 1, 2), dt.date(9999, 12, 31)]),
    (
        dt.time,
        [dt.time(23, 59, 59, 999999), dt.time(1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-3)))],
    ),
    (dt.timedelta, [dt.timedelta(0), dt.timedelta(days=-3, microseconds=7)]),
    (uuid.UUID, [uuid.UUID(int=0), uuid.UUID("12345678-1234-5678-1234-567812345678")]),
    (Color, [Color.RED, Color.GREEN]),
    (Perm, [Perm.R, Perm.R | Perm.X, Perm(0)]),
    (int | None, [None, 5]),
    (list[int], [[], [1, -2, 3]]),
    (list[str], [["a", "b\x00"]]),
    (list[Any], [[1, "x", None, [2.5, {"k": True}]]]),
    (dict[str, Any], [{}, {"a": [1, {"b": None}], "c": 1.5}]),
    (dict[str, int], [{"a": 1}]),
    (dict[str, dt.datetime], [{"t": dt.datetime(2020, 5, 5)}]),
    (tuple[int, ...], [(1, 2, 3)]),
    (set[str], [{"x", "y"}]),
    (frozenset[int], [frozenset({1, 2})]),
    (list[bytes], [[b"\x00", b"ab"]]),
    (list[uuid.UUID | None], [[None, uuid.UUID(int=5)]]),
    (dict[str, decimal.Decimal], [{"p": decimal.Decimal("3.14")}]),
    (list[Color], [[Color.GREEN]]),
    (Point, [Point(1, 2.0, ["t"])]),
    (Point | None, [None, Point(0)]),
    (list[Point], [[Point(1), Point(2, 3.5)]]),
    (Tree, [Tree("r", [Tree("a"), Tree("b", [Tree("c")])])]),
    (list, [[1, "two"]]),
    (dict, [{"k": "v"}]),
]


def _soak(request: pytest.FixtureRequest) -> bool:
    return request.node.get_closest_marker("soak") is not None


# --- hostile ids -----------------------------------------------------------------------

GLOB = "*?[]\\"
HOSTILE_CHARS = ":{}*?[]\\\x00#% ^-!/\n\t"
CRAFTED = [
    "",
    " ",
    "\x00",
    "\x00\x00",
    "a:b",
    "a%3Ab",
    "a%3ab",
    "%",
    "%25",
    "%%",
    "%4",
    "%zz",
    "A",
    "%41",
    "#all",
    "#seq",
    "#ix:label:x",
    "#uq:code:x",
    "#zs:rank",
    "#flush:x",
    "#meta:x",
    "{hx}",
    "{",
    "}",
    "}{",
    "{}",
    "{a}b",
    "a{b}",
    "*",
    "**",
    "?",
    "[",
    "]",
    "[a-z]",
    "[^a]",
    "\\",
    "\\*",
    "\\\\",
    "a*b",
    "doc:1",
    "1:doc",
    ":",
    "::",
    "-",
    ".",
    "..",
    "_",
    "ü",
    "u\u0308",
    "\u00e9",
    "e\u0301",
    "😀",
    "\U0010ffff",
    "\ufeff",
    "\u202e",
    "x" * 1024,
    "*" * 1024,
    "%" * 1024,
    "\x00" * 1024,
]


def _random_text(rng: random.Random, alphabet: str | None, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    if alphabet is not None:
        return "".join(rng.choice(alphabet) for _ in range(n))
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            out.append(chr(rng.randint(0x20, 0x7E)))
        elif r < 0.55:
            out.append(rng.choice(HOSTILE_CHARS))
        elif r < 0.85:
            cp = rng.randint(0x80, 0xFFFF)
            out.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else cp - 0x800))
        else:
            out.append(chr(rng.randint(0x10000, 0x10FFFF)))
    return "".join(out)


def hostile_ids(n: int, seed: int = 20260101) -> list[str]:
    """`n` distinct ids: crafted near-collisions, hostile-alphabet, unicode and 1 KB ids."""
    rng = random.Random(seed)
    ids = dict.fromkeys(CRAFTED)
    recent = list(CRAFTED)
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.4:
            ident = _random_text(rng, HOSTILE_CHARS + "ab", 1, 12)
        elif kind < 0.75:
            ident = _random_text(rng, None, 0, 24)
        elif kind < 0.95:
            # The escaped form of another id, used as an id itself.
            ident = keys.escape(rng.choice(recent[-50:]).encode("utf-8"))
        else:
            ident = _random_text(rng, None, 1000, 1100)
        if ident not in ids:
            ids[ident] = None
            recent.append(ident)
    return list(ids)[:n]


def label_of(ident: str) -> str:
    """An indexed value derived from an id: its first character when ASCII (NUL, "*",
    "{" and friends included), so that index keys hold hostile values too."""
    return ident[:1] if ident[:1].isascii() else "non-ascii"


def code_of(ident: str) -> str | None:
    """A unique value for one id in four (the reversed id), None for the others."""
    return ident[::-1] if hash_of(ident) % 4 == 0 else None


def hash_of(ident: str) -> int:
    return sum(ident.encode("utf-8")) + len(ident)


def glob_escape(text: str) -> str:
    """`text` as a glob pattern matching only itself (Redis stringmatchlen syntax)."""
    return "".join("\\" + c if c in GLOB else c for c in text)


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _scan_all(client: redis.Redis, pattern: str) -> list[bytes]:
    return list(client.scan_iter(match=pattern, count=10_000))


def _id_round_trip(engine: Engine, client: redis.Redis, n: int) -> None:
    t0 = time.perf_counter()
    ids = hostile_ids(n)
    assert len(set(ids)) == n
    for batch in _batches(ids, 500):
        with Session(engine) as s:
            for k, ident in enumerate(batch):
                s.add(
                    Doc(slug=ident, body=ident, label=label_of(ident), code=code_of(ident), rank=k)
                )
            s.commit()  # one WATCH/MULTI/EXEC per 500 objects
    inserted = time.perf_counter() - t0

    mismatched = 0
    for batch in _batches(ids, 500):
        with Session(engine) as s:
            for ident, obj in zip(batch, s.get_many(Doc, batch), strict=True):
                if obj is None or (obj.slug, obj.body, obj.code) != (ident, ident, code_of(ident)):
                    mismatched += 1
    # Unique lookups with hostile values go through the index keys.
    sample = [i for i in random.Random(7).sample(ids, 800) if code_of(i) is not None][:200]
    with Session(engine) as s:
        for ident in sample:
            found = s.scalars(select(Doc).where(Doc.code == code_of(ident))).one()
            assert found.slug == ident
        for label in {label_of(ident) for ident in ids}:
            got = s.scalars(select(Doc).where(Doc.label == label)).all()
            assert {d.slug for d in got} == {i for i in ids if label_of(i) == label}, label

    ks = mapper_keys(Doc)
    all_keys = [k.decode() for k in _scan_all(client, glob_escape(ks.object_prefix) + "*")]
    object_keys = [k for k in all_keys if ks.is_object_key(k)]
    decoded = {keys.unescape(ks.id_segment_of(k)).decode("utf-8") for k in object_keys}
    collisions = n - len(object_keys)
    slots = {key_slot(k.encode()) for k in all_keys}
    unique_keys = [k for k in all_keys if k.startswith(ks.unique("code", ""))]

    elapsed = time.perf_counter() - t0

    report = audit(client, reg)
    print(
        f"\nhostile ids: {n} ids ({sum(len(i) >= 1000 for i in ids)} of 1 KB+, "
        f"{sum(1 for i in ids if chr(0) in i)} with NUL, "
        f"{sum(1 for i in ids if any(c in i for c in GLOB))} with glob characters); "
        f"inserted in {inserted:.1f}s; {len(object_keys)} object keys, {len(unique_keys)} unique "
        f"keys, {collisions} collisions, {mismatched} read-back mismatches, {len(slots)} slot(s); "
        f"audit: {report.summary()}; {elapsed:.1f}s"
    )
    assert collisions == 0 and len(object_keys) == n
    assert decoded == set(ids)
    assert len(unique_keys) == sum(1 for i in ids if code_of(i) is not None)
    assert mismatched == 0
    assert len(slots) == 1
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


def mapper_keys(model: type[Any]) -> keys.KeySpace:
    from redmap.orm.mapper import mapper_of

    return mapper_of(model).keys


@pytest.mark.parametrize("n", [10_000])
def test_hostile_ids_round_trip(engine: Engine, redis_client: redis.Redis, n: int) -> None:
    """10,000 hostile ids: own key each, equal read-back, one slot, exact SCAN MATCH."""
    _id_round_trip(engine, redis_client, n)


@pytest.mark.soak
def test_hostile_ids_round_trip_soak(engine: Engine, redis_client: redis.Redis) -> None:
    """The same with 50,000 ids."""
    _id_round_trip(engine, redis_client, 50_000)


def _scan_match(engine: Engine, client: redis.Redis, n: int) -> None:
    """Every id's escaped key, glob-escaped, as a SCAN MATCH pattern: only its own key.

    Each pattern is matched against the whole keyspace, so the cost grows as n squared
    (about 1 us per key and pattern on redis-server 6.2): the default run checks 2,000
    ids, the soak run 10,000. Objects have no index here, so the keyspace is the ids.
    """
    t0 = time.perf_counter()
    ids = hostile_ids(n, seed=4242)
    for batch in _batches(ids, 1000):
        with Session(engine) as s:
            s.add_all(Slug(slug=ident) for ident in batch)
            s.commit()
    ks = mapper_keys(Slug)
    total_keys = client.dbsize()
    foreign = own_missing = 0
    for batch in _batches(ids, 250):
        pipe = client.pipeline(transaction=False)
        for ident in batch:
            pattern = glob_escape(ks.object(keys.escape(ident.encode())))
            pipe.execute_command("SCAN", 0, "MATCH", pattern, "COUNT", 10 * total_keys)
        for ident, (cursor, found) in zip(batch, pipe.execute(), strict=True):
            assert int(cursor) == 0, "COUNT covers the whole keyspace in one call"
            own = ks.object(keys.escape(ident.encode())).encode()
            foreign += sum(1 for k in found if k != own)
            own_missing += own not in found
    # Contrast: the same patterns built from raw ids, as a library without escaping would.
    metachar_ids = [i for i in ids if any(c in i for c in GLOB)][:200]
    naive_foreign = 0
    pipe = client.pipeline(transaction=False)
    for ident in metachar_ids:
        pipe.execute_command("SCAN", 0, "MATCH", ks.object_prefix + ident, "COUNT", 10 * total_keys)
    for ident, (_, found) in zip(metachar_ids, pipe.execute(), strict=True):
        own = ks.object(keys.escape(ident.encode())).encode()
        naive_foreign += sum(1 for k in found if k != own)
    report = audit(client, reg)
    print(
        f"\nSCAN MATCH: {n} patterns from escaped ids x {total_keys} keys: {foreign} foreign "
        f"matches, {own_missing} own keys missed (the raw ids of {len(metachar_ids)} of them "
        f"would match {naive_foreign} foreign keys); audit: {report.summary()}; "
        f"{time.perf_counter() - t0:.1f}s"
    )
    assert foreign == 0 and own_missing == 0
    assert naive_foreign > 0, "the generator must produce ids that break unescaped patterns"
    assert report.ok, report.mismatches[:5] + report.unexplained[:5]


def test_scan_match_patterns_from_escaped_ids(engine: Engine, redis_client: redis.Redis) -> None:
    """2,000 hostile ids: each escaped-id pattern matches its own key and no other."""
    _scan_match(engine, redis_client, 2_000)


@pytest.mark.soak
def test_scan_match_patterns_from_escaped_ids_soak(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """The same with 10,000 ids (n squared: a few minutes)."""
    _scan_match(engine, redis_client, 10_000)


# --- decoder fuzz ----------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randint(0, len(b)) if b else 0
        if op < 0.3 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randint(0, 7)
        elif op < 0.55:
            b[pos:pos] = bytes([rng.choice(b'0123456789-+.:eEnN"[]{},T Z\x00\xff\\')])
        elif op < 0.75 and b:
            del b[min(pos, len(b) - 1)]
        elif op < 0.9:
            del b[pos:]
        else:
            b[pos:pos] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 8)))
    return bytes(b)


SPECIAL = [
    b"",
    b" ",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"-",
    b"+",
    b".",
    b"e",
    b"1e",
    b"nan",
    b"NaN",
    b"sNaN",
    b"inf",
    b"-Infinity",
    b"1e999999",
    b"-1e-999999",
    b"1_000",
    b" 1 ",
    b"\xd9\xa3",
    b"0x10",
    b"9" * 5000,
    b"-" + b"9" * 5000,
    b"1e" + b"9" * 30,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"true",
    b"null",
    b"[]",
    b"{}",
    b'""',
    b'"\\ud800"',
    b"[1,2",
    b'{"x":1,"x":2}',
    b"2026-13-01",
    b"2026-02-30T25:61:61",
    b"9999-12-31T23:59:59.999999+23:59",
    b"0001-01-01T00:00:00-00:00:00.000001",
    b"24:00",
    b"12:00:00+25:00",
    b"RED|GREEN",
    b"R|",
    b"|",
    b"R|R",
    b"X|Y",
    b"0",
    b"1",
    b"00",
    b"-0",
]


def fuzz_corpus(n: int, seed: int = 99) -> list[bytes]:
    """`n` byte strings: special cases, mutations of valid encodings, and random bytes."""
    rng = random.Random(seed)
    valid: list[bytes] = []
    for tp, samples in DECODER_TYPES:
        codec = compile_codec(tp, model="Fuzz", field="f")
        valid += [codec.encode(v) for v in samples if v is not None]
    corpus = list(SPECIAL)
    while len(corpus) < n:
        r = rng.random()
        if r < 0.55:
            corpus.append(_mutate(rng, rng.choice(valid)))
        elif r < 0.8:
            corpus.append(bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 40))))
        else:
            parts = [rng.choice(valid), rng.choice(SPECIAL[:24]), rng.choice(valid)]
            corpus.append(b"".join(rng.sample(parts, k=rng.randint(1, 3))))
    return corpus[:n]


def _fuzz_decoders(n: int) -> None:
    t0 = time.perf_counter()
    corpus = fuzz_corpus(n)
    codecs: list[tuple[str, Codec]] = [
        (repr(tp), compile_codec(tp, model="Fuzz", field="f")) for tp, _ in DECODER_TYPES
    ]
    pk_mappers = [mapper_of_model(m) for m in (Doc, Wide, ByUuid)]
    decoded = rejected = 0
    foreign: list[str] = []
    invalid: list[str] = []
    for raw in corpus:
        for name, codec in codecs:
            try:
                value = codec.decode(raw)
            except DecodeError:
                rejected += 1
                continue
            except Exception as exc:
                foreign.append(f"{name} on {raw[:40]!r}: {type(exc).__name__}: {exc}")
                continue
            decoded += 1
            try:
                codec.validate(value, model="Fuzz", field="f")
            except RedmapError as exc:
                invalid.append(f"{name} on {raw[:40]!r} gave {value!r}: {exc}")
        text = raw.decode("latin-1")
        # Key segments: only what `escape` produces decodes, so no two segments (and no
        # two keys) stand for one id.
        try:
            unescaped = keys.unescape(text)
        except ValueError:
            rejected += 1
        else:
            decoded += 1
            if keys.escape(unescaped) != text:
                invalid.append(f"segment {text[:40]!r} decodes to {unescaped[:40]!r}")
        for mapper in pk_mappers:
            for segment in (text, raw):
                try:
                    mapper.pk_from_segment(segment)
                    decoded += 1
                except DecodeError:
                    rejected += 1
                except Exception as exc:
                    foreign.append(
                        f"{mapper.name} pk on {segment[:40]!r}: {type(exc).__name__}: {exc}"
                    )
    elapsed = time.perf_counter() - t0
    calls = n * (len(codecs) + 1 + 2 * len(pk_mappers))
    print(
        f"\ndecoder fuzz: {n} byte strings x ({len(codecs)} field decoders + the key-segment "
        f"decoder + {len(pk_mappers)} primary-key decoders on text and bytes) = {calls} calls: "
        f"{decoded} decoded, "
        f"{rejected} DecodeError, {len(foreign)} other exceptions, {len(invalid)} decoded "
        f"values that fail validation; {elapsed:.1f}s"
    )
    assert not foreign, foreign[:10]
    assert not invalid, invalid[:10]


def mapper_of_model(model: type[Any]) -> Any:
    from redmap.orm.mapper import mapper_of

    return mapper_of(model)


def test_decoders_raise_only_decode_error() -> None:
    """10,000 random byte strings x every field decoder: only DecodeError escapes."""
    _fuzz_decoders(10_000)


@pytest.mark.soak
def test_decoders_raise_only_decode_error_soak() -> None:
    """The same with 50,000 byte strings."""
    _fuzz_decoders(50_000)


def _as_int(member: bytes) -> int | None:
    """What the int primary key codec reads: decimal digits of any length, optionally
    negative (ids past 40 digits stand for one huge id: no object has it)."""
    if not re.fullmatch(rb"-?[0-9]+", member):
        return None
    return int(member) if len(member) <= 40 else 10**40


def _corrupt_through_redis(engine: Engine, client: redis.Redis, n: int) -> None:
    """Random bytes written into stored hashes and index members, then loaded by sessions."""
    t0 = time.perf_counter()
    rng = random.Random(5)
    corpus = fuzz_corpus(n, seed=17)
    with Session(engine) as s:
        s.add_all(Wide() for _ in range(n))
        s.commit()
    stored = [f.name for f in dataclasses.fields(Wide) if f.name != "id"]
    ks = mapper_keys(Wide)
    pipe = client.pipeline(transaction=False)
    for pk, raw in enumerate(corpus, start=1):
        pipe.hset(ks.object(str(pk)), rng.choice(stored), raw)
    pipe.execute()
    loaded = 0
    refused_keys: set[str] = set()
    foreign: list[str] = []
    for batch in _batches(list(range(1, n + 1)), 1000):
        with Session(engine) as s:
            for pk in batch:
                try:
                    s.get(Wide, pk)
                    loaded += 1
                except DecodeError:
                    refused_keys.add(ks.object(str(pk)))
                except Exception as exc:
                    foreign.append(f"{pk}: {type(exc).__name__}: {exc}")
    # Index members are decoded as primary keys by queries. What each query must do is
    # worked out here from the zset itself: the first 3 members by (score, member); a
    # member that is not decimal digits is a DecodeError naming it; else a refused hash
    # among them is a DecodeError naming its key; else the objects, in zset order.
    # Half the members go first (score 0), half next to 3 objects that load (score p,
    # read by `id >= p`), so that every outcome occurs.
    members = 0
    outcomes = {"member refused": 0, "hash refused": 0, "loaded": 0}
    good = next(
        p for p in range(1, n) if not {ks.object(str(p + i)) for i in range(3)} & refused_keys
    )
    for t, raw in enumerate(corpus[:200]):
        if client.zscore(ks.all(), raw) is not None:
            continue  # an id already listed: adding it changes nothing, removing it would
        low = 0 if t % 2 else good
        client.zadd(ks.all(), {raw: low})
        members += 1
        scored = client.zrange(ks.all(), low, "+inf", byscore=True, withscores=True)
        window = [m for m, _ in sorted(scored, key=lambda p: (p[1], p[0]))[:3]]
        bad_members = [m for m in window if _as_int(m) is None]
        pks = [pk for pk in map(_as_int, window) if pk is not None]
        refused_here = {ks.object(str(pk)) for pk in pks} & refused_keys
        with Session(engine) as s:
            try:
                q = select(Wide).where(Wide.id >= low).limit(3)  # type: ignore[operator]
                got = [w.id for w in s.scalars(q).all()]
            except DecodeError as exc:
                if bad_members:
                    # (Not asserted: exc.model and exc.field, None when the int codec
                    # rather than unescape refuses the member, e.g. b"".)
                    assert exc.raw == bad_members[0], f"#all member {raw!r}: {exc!r}"
                    outcomes["member refused"] += 1
                else:
                    assert refused_here and exc.key in refused_here, f"{raw!r}: {exc!r}"
                    outcomes["hash refused"] += 1
            except Exception as exc:
                foreign.append(f"#all member {raw[:40]!r}: {type(exc).__name__}: {exc}")
            else:
                assert not bad_members and not refused_here, f"{raw!r} in {window}: {got}"
                assert got == [pk for pk in pks if 1 <= pk <= n], f"{raw!r}: {window} -> {got}"
                outcomes["loaded"] += 1
        client.zrem(ks.all(), raw)
    assert all(outcomes.values()), outcomes  # every branch above was taken
    refused = len(refused_keys)
    # The audit reads the same hashes: it reports each undecodable one by key (and the
    # id zset, which lists objects it could not decode).
    report = audit(client, reg)
    reported = {m.split(": ", 1)[0] for m in report.mismatches}
    print(
        f"\ncorrupt hashes: {n} objects with one field overwritten by random bytes: {loaded} "
        f"loaded, {refused} DecodeError, {len(foreign)} other exceptions; {members} corrupt "
        f"index members queried ({outcomes}); audit: {report.summary()}; "
        f"{time.perf_counter() - t0:.1f}s"
    )
    assert not foreign, foreign[:10]
    assert loaded + refused == n
    assert reported - {ks.all()} == refused_keys
    assert set(report.unexplained) == refused_keys


def test_corrupt_stored_values_raise_only_decode_error(
    engine: Engine, redis_client: redis.Redis
) -> None:
    """Random bytes in stored fields and index members: loads raise only DecodeError."""
    _corrupt_through_redis(engine, redis_client, 2_000)
