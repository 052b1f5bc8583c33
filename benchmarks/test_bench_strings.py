"""String search over 100,000 objects (issue 16): prefix, suffix and word queries, vs
raw redis-py doing the same work in the same run, and vs `rom` when it is installed.

Data: `title = "t%05d"` of a shuffled index (100,000 distinct, ordered values),
`email = "u{i}@d{i % 1000}.example"` (100 objects per domain) and `body` of three
words out of 300 (`w{i % 300} w{i % 7 + 300} common`). Queries and the raw floor:

* prefix: `title.startswith("t0042")` ordered by title, limit 10: raw reads
  `ZRANGE #lx:title [min (max BYLEX LIMIT 0 10`, then HGETALL per id;
* suffix: `email.endswith("@d7.example")` (100 matches): raw reads the reversed
  index's range, sorts the ids and HGETALLs them (redmap returns them in id order);
* word: `body.match("w7 w300")` (about 48 matches): raw SINTERs the two word sets,
  sorts, HGETALLs.

rom (`pip install rom`; not a dependency of redmap) is measured on the same questions
with its own indexes (`prefix=True, suffix=True`, FULL_TEXT keygen) when it imports.
Run:

    pytest benchmarks/test_bench_strings.py -p no:cacheprovider --benchmark-only -s
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis

import redmap
from redmap import PrimaryKey, Sorted, Suffix, Text, col, registry, select
from redmap.orm.mapper import mapper_of
from redmap.orm.textindex import id_of_member, prefix_bounds

reg = registry(prefix="bs")


@reg.mapped
@dataclass
class Doc:
    title: Annotated[str, Sorted()]
    email: Annotated[str, Suffix()]
    body: Annotated[str, Text()]
    id: Annotated[int | None, PrimaryKey()] = None


N = 100_000
BATCH = 10_000
ROUNDS = 30
KEYS = mapper_of(Doc).keys


def rows(n: int) -> list[tuple[str, str, str]]:
    order = list(range(n))
    random.Random(16).shuffle(order)
    return [
        (f"t{order[i]:05d}", f"u{i}@d{i % 1000}.example", f"w{i % 300} w{i % 7 + 300} common")
        for i in range(n)
    ]


def load(engine: redmap.Engine) -> list[tuple[str, str, str]]:
    data = rows(N)
    for start in range(0, N, BATCH):
        with redmap.Session(engine) as s:
            s.add_all(Doc(title=t, email=e, body=b) for t, e, b in data[start : start + BATCH])
            s.commit()
    return data


def fetch(raw: redis.Redis, ids: list[bytes]) -> list[dict[bytes, bytes]]:
    pipe = raw.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(KEYS.object(i.decode()))
    out: list[dict[bytes, bytes]] = pipe.execute()
    return out


def _time(fn: Callable[[], Any], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times)


QUERIES = {
    "prefix": (
        lambda: select(Doc).where(col(Doc.title).startswith("t0042")).order_by(Doc.title).limit(10),
        10,
    ),
    "suffix": (lambda: select(Doc).where(col(Doc.email).endswith("@d7.example")), 100),
    "word": (lambda: select(Doc).where(col(Doc.body).match("w7 w300")), None),
}


def _raw(kind: str, raw: redis.Redis) -> int:
    if kind == "prefix":
        low, high = prefix_bounds("t0042")
        members = raw.zrange(KEYS.lexical("title"), low, high, bylex=True, offset=0, num=10)
        ids = [id_of_member(m) for m in members]
    elif kind == "suffix":
        low, high = prefix_bounds("@d7.example"[::-1])
        members = raw.zrange(KEYS.suffix("email"), low, high, bylex=True)
        ids = sorted((id_of_member(m) for m in members), key=int)
    else:
        ids = sorted(raw.sinter(KEYS.word("body", "w7"), KEYS.word("body", "w300")), key=int)
    return len(fetch(raw, ids))


@pytest.mark.parametrize("kind", list(QUERIES))
def test_string_query(
    measure: Callable[..., Any], engine: redmap.Engine, raw: redis.Redis, kind: str
) -> None:
    """One string query over 100,000 objects in a fresh session, redmap beside raw."""
    load(engine)
    make, expected = QUERIES[kind]
    stmt = make()
    want = _raw(kind, raw)
    if expected is not None:
        assert want == expected

    def op(s: redmap.Session) -> None:
        assert len(s.scalars(stmt).all()) == want

    def raw_op() -> tuple[int, int]:
        assert _raw(kind, raw) == want
        return 2, 1 + want

    result = measure(
        name=f"string query[{kind}] -> {want} objects",
        n=N,
        op=op,
        setup=lambda: (redmap.Session(engine),),
        raw_op=raw_op,
        rounds=ROUNDS,
    )
    assert result.round_trips == 2
    assert result.ratio is not None and result.ratio <= 1.5, result.line()


def test_rom_same_queries(
    engine: redmap.Engine, raw: redis.Redis, note: Callable[[str], None]
) -> None:
    """rom answering the same three questions over the same 100,000 rows (its own keys)."""
    rom = pytest.importorskip("rom")
    rom.util.CONNECTION = raw

    class RomDoc(rom.Model):  # type: ignore[misc, name-defined]
        title = rom.String(prefix=True, index=True, keygen=rom.SIMPLE)
        email = rom.String(suffix=True, index=True, keygen=rom.SIMPLE)
        body = rom.Text(index=True, keygen=rom.FULL_TEXT)

    data = load(engine)
    for start in range(0, N, BATCH):
        for t, e, b in data[start : start + BATCH]:
            RomDoc(title=t, email=e, body=b)
        rom.session.commit(all=True)
        rom.session.rollback()
    questions = {
        "prefix": lambda: (
            RomDoc.query.startswith(title="t0042").order_by("title").limit(0, 10).all()
        ),
        "suffix": lambda: RomDoc.query.endswith(email="@d7.example").all(),
        "word": lambda: RomDoc.query.filter(body="w7").filter(body="w300").all(),
    }
    for kind, ask in questions.items():
        stmt = QUERIES[kind][0]()
        want = _raw(kind, raw)
        assert len(ask()) == want, kind

        def ours(stmt: Any = stmt, want: int = want) -> None:
            with redmap.Session(engine) as s:
                assert len(s.scalars(stmt).all()) == want

        def theirs(ask: Callable[[], Any] = ask) -> None:
            ask()
            rom.session.rollback()

        mine, rom_mean = _time(ours, ROUNDS), _time(theirs, ROUNDS)
        note(
            f"string query[{kind}] vs rom: N={N}, redmap mean={mine * 1e3:.2f} ms, "
            f"rom mean={rom_mean * 1e3:.2f} ms, ratio redmap/rom={mine / rom_mean:.2f}"
        )
