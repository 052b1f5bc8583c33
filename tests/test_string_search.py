"""Tests for string search (`redmap.query.strings`, `redmap.orm.textindex`): ordered
strings, `startswith`, `endswith`, `match`, compared with a Python reference."""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import redmap
from redmap import Indexed, PrimaryKey, Session, Sorted, Suffix, Text, registry, select
from redmap.exc import MappingError, QueryError
from redmap.orm.textindex import code, member, words
from redmap.query.dml import delete, update
from redmap.query.expression import and_, col, or_
from redmap.testing.assertions import count_round_trips

reg = registry(prefix="strs")


class Tone(enum.Enum):
    """Ordered by member name, not value."""

    zeta = 1
    alpha = 2
    mid = 3


@reg.mapped
@dataclass
class Doc:
    title: Annotated[Optional[str], Sorted()] = None
    body: Annotated[Optional[str], Text()] = None
    email: Annotated[Optional[str], Suffix()] = None
    tone: Annotated[Tone, Sorted()] = Tone.mid
    group: Annotated[int, Indexed()] = 0
    id: Annotated[Optional[int], PrimaryKey()] = None


shreg = registry(prefix="strsh", shards=3)


@shreg.mapped
@dataclass
class Card:
    """Sharded by `group`: string queries fan out and merge in exact order."""

    __shard_key__ = "group"
    group: int
    title: Annotated[Optional[str], Sorted()] = None
    body: Annotated[Optional[str], Text()] = None
    email: Annotated[Optional[str], Suffix()] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


# Characters that stress the encoding: NUL, the escape byte, "#" (placeholders), the
# separator, non-ASCII (2, 3 and 4 UTF-8 bytes), case and casefolding ("ß" -> "ss").
ALPHABET = [
    "a",
    "b",
    "0",
    "1",
    "A",
    "\x00",
    "\x01",
    "#",
    " ",
    "é",
    "ß",
    "S",
    "語",
    "😀",
    "n",
    "e",
    "w",
]
TEXT = st.text(alphabet=st.sampled_from(ALPHABET), max_size=6)
# Few distinct values, so that many objects share one.
POOL = st.lists(TEXT, min_size=1, max_size=4, unique=True)


def _words(text: str) -> set[str]:
    """The reference tokenizer: NFKC, casefold, runs of Unicode word characters."""
    return set(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


Row = dict[str, Any]


def _ref_order(rows: list[Row], desc: bool) -> list[int]:
    """`order_by(title)`: None first, then code-point order, ties by the id's text."""
    ordered = sorted(
        rows, key=lambda r: (r["title"] is not None, r["title"] or "", str(r["id"]).encode())
    )
    ids = [r["id"] for r in ordered]
    return ids[::-1] if desc else ids


def _condition(data: st.DataObject, pool: list[str]) -> tuple[Any, Callable[[Row], bool]]:
    """A random string condition and its Python meaning."""
    v = data.draw(st.one_of(st.sampled_from(pool), TEXT), label="operand")
    w = data.draw(st.one_of(st.sampled_from(pool), TEXT), label="operand2")
    kind = data.draw(
        st.sampled_from(
            [
                "<",
                "<=",
                ">",
                ">=",
                "==",
                "!=",
                "between",
                "startswith",
                "in",
                "null",
                "endswith",
                "match",
                "tone",
            ]
        ),
        label="op",
    )
    t = col(Doc.title)
    if kind == "<":
        return t < v, lambda r: r["title"] is not None and r["title"] < v
    if kind == "<=":
        return t <= v, lambda r: r["title"] is not None and r["title"] <= v
    if kind == ">":
        return t > v, lambda r: r["title"] is not None and r["title"] > v
    if kind == ">=":
        return t >= v, lambda r: r["title"] is not None and r["title"] >= v
    if kind == "==":
        return t == v, lambda r: r["title"] == v
    if kind == "!=":
        return t != v, lambda r: r["title"] != v
    if kind == "null":
        return t == None, lambda r: r["title"] is None  # noqa: E711
    if kind == "between":
        return t.between(v, w), lambda r: r["title"] is not None and v <= r["title"] <= w
    if kind == "startswith":
        return t.startswith(v), lambda r: r["title"] is not None and r["title"].startswith(v)
    if kind == "in":
        return t.in_([v, w]), lambda r: r["title"] in (v, w)
    if kind == "endswith":
        return (
            col(Doc.email).endswith(v),
            lambda r: r["email"] is not None and r["email"].endswith(v),
        )
    if kind == "tone":
        return col(Doc.tone) >= Tone.mid, lambda r: r["tone"].name >= "mid"
    q = " ".join(sorted(_words(v + " " + w))) or "a"
    need = _words(q)
    return col(Doc.body).match(q), lambda r: r["body"] is not None and need <= _words(r["body"])


def _row(d: Doc) -> Row:
    return {"id": d.id, "title": d.title, "body": d.body, "email": d.email, "tone": d.tone}


def _check(
    engine: redmap.Engine,
    rows: list[Row],
    cond: Any,
    keep: Callable[[Row], bool],
    page: tuple[int, int | None],
    desc: bool,
) -> None:
    """scalars (id order), count, and the ordered page agree with the reference."""
    want = [r for r in rows if keep(r)]
    off, lim = page
    with Session(engine) as s:
        got = [d.id for d in s.scalars(select(Doc).where(cond))]
        assert got == sorted(r["id"] for r in want), cond
        assert s.count(select(Doc).where(cond)) == len(want), cond
        t = col(Doc.title)
        stmt = select(Doc).where(cond).order_by(t.desc() if desc else t).offset(off).limit(lim)
        end = None if lim is None else off + lim
        assert [d.id for d in s.scalars(stmt)] == _ref_order(want, desc)[off:end], cond


def _run_reference(engine: redmap.Engine, max_examples: int) -> None:
    """`_reference_example` for `max_examples` random histories."""

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _reference_example(engine, data)

    run()


def test_string_operators_match_reference(driver: str, engine: redmap.Engine) -> None:
    """Every string operator, alone, and-ed and or-ed, ordered and paged, agrees with Python
    over random values and random updates (through the driver and flush of `driver`)."""
    _run_reference(engine, 40)


@pytest.mark.soak
def test_string_operators_match_reference_soak(driver: str, engine: redmap.Engine) -> None:
    """The same comparison over 500 random histories per driver."""
    _run_reference(engine, 500)


def _reference_example(engine: redmap.Engine, data: st.DataObject) -> None:
    """One random history: rows, rounds of updates, deletes and inserts, and after each
    round random conditions checked by `_check`."""
    pool = data.draw(POOL, label="pool")
    values = st.one_of(st.none(), st.sampled_from(pool))
    row = st.fixed_dictionaries(
        {"title": values, "body": values, "email": values, "tone": st.sampled_from(list(Tone))}
    )
    with Session(engine) as s:
        s.execute(delete(Doc))
        s.commit()
        docs = [Doc(**r) for r in data.draw(st.lists(row, max_size=10), label="rows")]
        s.add_all(docs)
        s.commit()
        rows = {d.id: _row(d) for d in docs}
    for _ in range(data.draw(st.integers(1, 3), label="rounds")):
        with Session(engine) as s:
            for pk in data.draw(st.lists(st.sampled_from(sorted(rows) or [0]), max_size=4)):
                obj = s.get(Doc, pk)
                if obj is None:
                    continue
                if data.draw(st.booleans(), label="delete"):
                    s.delete(obj)
                    rows.pop(pk)
                    continue
                change = data.draw(row, label="change")
                for k, v in change.items():
                    setattr(obj, k, v)
            new = [Doc(**r) for r in data.draw(st.lists(row, max_size=3), label="new")]
            s.add_all(new)
            s.commit()
            for pk in list(rows):
                obj = s.get(Doc, pk)
                assert obj is not None
                rows[pk] = _row(obj)
            for d in new:
                rows[d.id] = _row(d)
        all_rows = list(rows.values())
        for _ in range(3):
            c1, k1 = _condition(data, pool)
            combine = data.draw(st.sampled_from(["one", "and", "or"]), label="combine")
            if combine != "one":
                c2, k2 = _condition(data, pool)
                if combine == "and":
                    c1, k1 = and_(c1, c2), (lambda r, a=k1, b=k2: a(r) and b(r))
                else:
                    c1, k1 = or_(c1, c2), (lambda r, a=k1, b=k2: a(r) or b(r))
            page = (
                data.draw(st.integers(0, 3)),
                data.draw(st.one_of(st.none(), st.integers(1, 4))),
            )
            _check(engine, all_rows, c1, k1, page, data.draw(st.booleans(), label="desc"))
        with Session(engine) as s:
            # order_by alone and startswith("") read straight from the index.
            assert [d.id for d in s.scalars(select(Doc).order_by(Doc.title))] == _ref_order(
                all_rows, False
            )
            prefixed = [d.id for d in s.scalars(select(Doc).where(col(Doc.title).startswith("")))]
            assert prefixed == sorted(r["id"] for r in all_rows if r["title"] is not None)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_sharded_fan_out_merges_in_exact_order(sengine: redmap.Engine, data: st.DataObject) -> None:
    """A sharded model (standalone and cluster): string conditions and `order_by(title)`
    read every shard and merge pages in exactly the order one index would give."""
    pool = data.draw(POOL, label="pool")
    values = st.one_of(st.none(), st.sampled_from(pool))
    with Session(sengine, allow_cross_slot=True) as s:
        s.execute(delete(Card))
        s.commit()
        cards = [
            Card(group=g, title=t, body=b, email=e)
            for g, t, b, e in data.draw(
                st.lists(st.tuples(st.integers(0, 5), values, values, values), max_size=12)
            )
        ]
        s.add_all(cards)
        s.commit()
        rows = [
            {"id": c.id, "title": c.title, "body": c.body, "email": c.email, "group": c.group}
            for c in cards
        ]
    v = data.draw(st.sampled_from(pool))
    conds: list[tuple[Any, Callable[[Row], bool]]] = [
        (None, lambda r: True),
        (
            col(Card.title).startswith(v[:1]),
            lambda r: r["title"] is not None and r["title"].startswith(v[:1]),
        ),
        (col(Card.title) >= v, lambda r: r["title"] is not None and r["title"] >= v),
        (
            col(Card.email).endswith(v[-1:]),
            lambda r: r["email"] is not None and r["email"].endswith(v[-1:]),
        ),
    ]
    off, lim = data.draw(st.integers(0, 3)), data.draw(st.one_of(st.none(), st.integers(1, 4)))
    end = None if lim is None else off + lim
    with Session(sengine) as s:
        for cond, keep in conds:
            want = [r for r in rows if keep(r)]
            for desc in (False, True):
                t = col(Card.title)
                stmt = select(Card).order_by(t.desc() if desc else t).offset(off).limit(lim)
                if cond is not None:
                    stmt = stmt.where(cond)
                assert [c.id for c in s.scalars(stmt)] == _ref_order(want, desc)[off:end], cond
                # Then by group, descending: tie groups sorted across shards.
                g = col(Card.group).desc()
                stmt = select(Card).order_by(t.desc() if desc else t, g).offset(off).limit(lim)
                if cond is not None:
                    stmt = stmt.where(cond)
                ref = sorted(sorted(want, key=lambda r: r["id"]), key=lambda r: -r["group"])
                ref = sorted(
                    ref, key=lambda r: (r["title"] is not None, r["title"] or ""), reverse=desc
                )
                got = [c.id for c in s.scalars(stmt)]
                assert got == [r["id"] for r in ref][off:end], (cond, desc)
            count_stmt = select(Card) if cond is None else select(Card).where(cond)
            assert s.count(count_stmt) == len(want)


def test_code_keeps_order_and_prefixes() -> None:
    """The member code orders as code points and keeps prefixes, NUL and "#" included."""
    texts = [
        "",
        "\x00",
        "\x00\x00",
        "\x01",
        "\x01\x00",
        "#",
        "#new1",
        "a",
        "a\x00",
        "ab",
        "é",
        "😀",
    ]
    enc = [(_VALUE := "\x01" + code(t)).encode() for t in texts]
    for a, ea in zip(texts, enc, strict=True):
        assert b"\x00" not in ea[1:]
        for b, eb in zip(texts, enc, strict=True):
            assert (a < b) == (ea < eb)
            assert b.startswith(a) == eb.startswith(ea)
    assert member(None, "1") < member("", "1")
    assert "#new" not in member("#new3", "7")


def test_tokenizer_is_documented_one() -> None:
    """Words: NFKC, casefolded, runs of word characters, first appearance order."""
    assert words("Don't PANIC, straße straße ﬁne") == ["don", "t", "panic", "strasse", "fine"]
    assert words("  ,, ") == []


def test_query_errors_name_the_marker(engine: redmap.Engine) -> None:
    """A string operator on a field without its index names the marker to add."""
    with Session(engine) as s:
        with pytest.raises(QueryError, match=r"Text\(\)"):
            s.scalars(select(Doc).where(col(Doc.title).match("x"))).all()
        with pytest.raises(QueryError, match=r"Suffix\(\)"):
            s.scalars(select(Doc).where(col(Doc.title).endswith("x"))).all()
        with pytest.raises(QueryError, match=r"Sorted\(\)"):
            s.scalars(select(Doc).where(col(Doc.email).startswith("x"))).all()
        with pytest.raises(QueryError, match="no word"):
            s.scalars(select(Doc).where(col(Doc.body).match(" ,! "))).all()
        with pytest.raises(QueryError, match="takes a str"):
            s.scalars(select(Doc).where(col(Doc.email).endswith(3))).all()  # type: ignore[arg-type]


def test_text_and_suffix_need_str() -> None:
    """Text() and Suffix() on a non-str field are mapping errors."""
    r = registry()
    with pytest.raises(MappingError, match=r"Text\(\) needs a str"):

        @r.mapped
        @dataclass
        class Bad:
            n: Annotated[int, Text()] = 0


def test_round_trips_constant(engine: redmap.Engine) -> None:
    """Each string query is one round trip for the ids (plus one to load), whatever N."""
    with Session(engine) as s:
        s.add_all(
            Doc(title=f"t{i:03}", body=f"w{i % 7} common", email=f"u{i}@x.org") for i in range(120)
        )
        s.commit()
    with Session(engine) as s, count_round_trips(engine) as rt:
        assert s.count(select(Doc).where(col(Doc.title).startswith("t01"))) == 10
        assert s.count(select(Doc).where(col(Doc.email).endswith("9@x.org"))) == 12
        assert s.count(select(Doc).where(col(Doc.body).match("common w3"))) == 17
        assert (
            s.count(select(Doc).where(col(Doc.body).match("COMMON"), col(Doc.title) < "t050")) == 50
        )
    assert rt.round_trips == 4
    with Session(engine) as s, count_round_trips(engine) as rt:
        got = s.scalars(
            select(Doc).where(col(Doc.title) >= "t100").order_by(col(Doc.title).desc()).limit(3)
        ).all()
        assert [d.title for d in got] == ["t119", "t118", "t117"]
    assert rt.round_trips == 2
    assert "SCAN" not in rt.command_names


def test_values_spelling_placeholders(driver: str, engine: redmap.Engine) -> None:
    """Values that spell a generated-id placeholder (`#new0`) are indexed as written."""
    with Session(engine) as s:
        docs = [Doc(title=f"#new{i}", body="x", email=f"#new{i}") for i in range(3)]
        s.add_all(docs)
        s.commit()
        ids = [d.id for d in docs]
    with Session(engine) as s:
        got = s.scalars(select(Doc).where(col(Doc.title).startswith("#new")).order_by(Doc.title))
        assert [(d.id, d.title) for d in got] == [(i, f"#new{n}") for n, i in enumerate(ids)]
        assert s.count(select(Doc).where(col(Doc.email).endswith("new1"))) == 1


def test_audit_checks_string_indexes(engine: redmap.Engine) -> None:
    """The audit is clean over string indexes, and reports a missing member."""
    from redmap.audit import audit

    with Session(engine) as s:
        s.add_all([Doc(title="a\x00b", body="one two", email="x@y"), Doc(title=None)])
        s.commit()
    client = engine.dialect.client
    assert audit(client, reg).ok
    client.zrem("{strs}:doc:#lx:title", member("a\x00b", "1"))
    report = audit(client, reg)
    assert not report.ok
    assert any("#lx:title" in m for m in report.mismatches)
    client.zadd("{strs}:doc:#lx:title", {member("a\x00b", "1"): 0})
    client.sadd("{strs}:doc:#tx:body:bogus", "1")
    report = audit(client, reg)
    assert report.unexplained == ["{strs}:doc:#tx:body:bogus"] and not report.mismatches


def test_ordered_walk_crosses_chunks(engine: redmap.Engine) -> None:
    """`order_by(title)` under another condition walks the index in chunks (256 members):
    pages past the first chunk, ascending and descending, equal to the reference."""
    with Session(engine) as s:
        s.add_all(Doc(title=f"t{(i * 7) % 700:03}", group=i % 3) for i in range(700))
        s.commit()
    with Session(engine) as s:
        titles = sorted(f"t{(i * 7) % 700:03}" for i in range(700) if i % 3 == 1)
        t = col(Doc.title)
        for off, lim in ((0, 5), (250, 20), (100, None), (230, 3)):
            end = None if lim is None else off + lim
            stmt = select(Doc).where(col(Doc.group) == 1).offset(off).limit(lim)
            assert [d.title for d in s.scalars(stmt.order_by(t))] == titles[off:end]
            assert [d.title for d in s.scalars(stmt.order_by(t.desc()))] == titles[::-1][off:end]
        every = sorted(f"t{(i * 7) % 700:03}" for i in range(700))
        stmt = select(Doc).where(col(Doc.group) != 5).order_by(t).offset(250).limit(300)
        assert [d.title for d in s.scalars(stmt)] == every[250:550]
        stmt = select(Doc).where(col(Doc.group) != 5).order_by(t.desc()).offset(250).limit(300)
        assert [d.title for d in s.scalars(stmt)] == every[::-1][250:550]
        stmt = select(Doc).where(col(Doc.group) == 1, t >= "t300").order_by(t).limit(4)
        assert [d.title for d in s.scalars(stmt)] == [x for x in titles if x >= "t300"][:4]


def test_statements_and_both_deployments(sengine: redmap.Engine) -> None:
    """update()/delete() statements keep the string indexes, on standalone and cluster."""
    with Session(sengine) as s:
        s.add_all(
            Doc(title=f"{p}{i}", body=f"{p} word{i}", email=f"u{i}@{p}.org", group=i % 2)
            for i in range(6)
            for p in ("ab", "cd")
        )
        s.commit()
    with Session(sengine) as s:
        r = s.execute(update(Doc).where(col(Doc.title).startswith("ab")).values(title="zz"))
        assert r.rowcount == 6
        s.execute(delete(Doc).where(col(Doc.email).endswith("@cd.org"), col(Doc.group) == 1))
        s.commit()
    with Session(sengine) as s:
        t = col(Doc.title)
        assert s.count(select(Doc).where(t.startswith("ab"))) == 0
        assert s.count(select(Doc).where(t == "zz")) == 6
        got = s.scalars(select(Doc).where(col(Doc.body).match("CD")).order_by(t.desc()))
        assert [d.title for d in got] == ["cd4", "cd2", "cd0"]
        got = s.scalars(select(Doc).where(col(Doc.group) == 0).order_by(t).limit(2))
        assert [d.title for d in got] == ["cd0", "cd2"]


def test_count_ignores_string_order(engine: redmap.Engine) -> None:
    """count() of a statement ordered by a str field runs no ordering script."""
    with Session(engine) as s:
        s.add_all(Doc(title=f"t{i}", group=i % 2) for i in range(10))
        s.commit()
    t = col(Doc.title)
    with Session(engine) as s, count_round_trips(engine) as rt:
        assert s.count(select(Doc).where(col(Doc.group) == 1).order_by(t).limit(3)) == 3
        assert s.count(select(Doc).where(col(Doc.group) == 1, t > "t3").order_by(t)) == 3
    assert rt.round_trips == 2
    assert sum(1 for name in rt.command_names if name == "EVAL") == 1  # the `t > "t3"` range


def test_inspect_lists_string_indexes() -> None:
    """inspect() shows each string index with the keys it lives in."""
    from redmap import inspect

    found = {(i.field, i.kind): i.keys for i in inspect(Doc).indexes}
    assert found[("title", "sorted")] == ("{strs}:doc:#lx:title",)
    assert found[("body", "text")] == ("{strs}:doc:#tx:body:<word>",)
    assert found[("email", "suffix")] == ("{strs}:doc:#sx:email",)


def test_several_terms_after_a_string_field(engine: redmap.Engine) -> None:
    """order_by(title, group.desc()): ties of the string field ordered by the next term,
    then by id, across page edges."""
    with Session(engine) as s:
        s.add_all(Doc(title=f"v{i % 4}" if i % 5 else None, group=i % 3) for i in range(30))
        s.commit()
        rows = [(d.title, d.group, d.id) for d in s.scalars(select(Doc))]
    ref = sorted(rows, key=lambda r: (r[2],))
    ref = sorted(ref, key=lambda r: -r[1])
    ref = sorted(ref, key=lambda r: (r[0] is not None, r[0] or ""))
    t = col(Doc.title)
    with Session(engine) as s:
        for off, lim in ((0, None), (3, 7), (11, 5), (20, 20)):
            stmt = select(Doc).order_by(t, col(Doc.group).desc()).offset(off).limit(lim)
            end = None if lim is None else off + lim
            assert [d.id for d in s.scalars(stmt)] == [r[2] for r in ref][off:end], (off, lim)
            cond = select(Doc).where(col(Doc.group) != 1, t >= "v1")
            want = [r[2] for r in ref if r[1] != 1 and r[0] is not None and r[0] >= "v1"]
            stmt = cond.order_by(t, col(Doc.group).desc()).offset(off).limit(lim)
            assert [d.id for d in s.scalars(stmt)] == want[off:end], (off, lim)
