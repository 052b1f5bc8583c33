"""Tests for several `order_by` terms (`redmap.query.ordering` and its use in `select`).

`select(Team).order_by(Team.rank.desc(), Team.name).limit(n).offset(k)` must give
exactly the page Python's `sorted` gives over the same rows, ties included, on a plain
and on a sharded model, on a standalone server and on a cluster, sync and async; the
round trips stay constant in the model's size and the fields read grow with the tie
groups the page touches only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import RedisCluster

import redmap
from redmap import Indexed, PrimaryKey, Session, Sorted, col, registry, select
from redmap.asyncio import AsyncSession, create_async_engine
from redmap.engine import Engine
from redmap.exc import QueryError
from redmap.query.expression import Ordering
from redmap.testing.assertions import count_round_trips
from redmap.testing.servers import ClusterProcesses

SHARDS = 4
reg = registry(prefix="obt", shards=SHARDS)

FIELDS = ("rank", "level", "name", "points", "kind", "id")


@reg.mapped
@dataclass
class Team:
    """Not sharded."""

    rank: Annotated[int, Sorted()]
    name: str
    level: Annotated[int | None, Sorted()] = None
    points: int | None = None
    kind: Annotated[str, Indexed()] = "x"
    data: dict[str, int] | None = None
    joined: dt.time | None = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class League:
    """Sharded by `region` over 4 shards: a query without a region condition fans out."""

    __shard_key__ = "region"
    region: Annotated[int, Indexed()]
    rank: Annotated[int, Sorted()]
    name: str
    level: Annotated[int | None, Sorted()] = None
    points: int | None = None
    kind: Annotated[str, Indexed()] = "x"
    id: Annotated[int | None, PrimaryKey()] = None


Model = type[Team] | type[League]
Row = dict[str, Any]


def reference(rows: Sequence[Row], terms: Sequence[tuple[str, bool]]) -> list[int]:
    """The ids in the documented order: each term with None smallest (first ascending,
    last descending), then the id ascending."""

    def cmp(a: Row, b: Row) -> int:
        for name, descending in [*terms, ("id", False)]:
            x, y = a[name], b[name]
            if x == y:
                continue
            r = -1 if x is None else 1 if y is None else (-1 if x < y else 1)
            return -r if descending else r
        return 0

    return [r["id"] for r in sorted(rows, key=functools.cmp_to_key(cmp))]


def seed(engine: Engine, model: Model, rows: Sequence[dict[str, Any]]) -> list[Row]:
    """Insert `rows` (field values) in one commit (slot by slot for a sharded model on a
    cluster); the rows with their generated ids."""
    with Session(engine, expire_on_commit=False, allow_cross_slot=True) as s:
        objs: list[Any] = []
        for i, r in enumerate(rows):
            values = dict(r)
            if model is League:
                values["region"] = i % 7
            objs.append(model(**values))
        s.add_all(objs)
        s.commit()
        return [{f: getattr(o, f) for f in FIELDS} for o in objs]


def order_terms(model: Model, terms: Sequence[tuple[str, bool]]) -> list[Ordering]:
    out = []
    for name, descending in terms:
        c = col(model, name)
        out.append(c.desc() if descending else c.asc())
    return out


def page_ids(
    engine: Engine,
    model: Model,
    terms: Sequence[tuple[str, bool]],
    offset: int,
    limit: int | None,
    *conds: Any,
) -> list[int]:
    stmt = select(model).where(*conds).order_by(*order_terms(model, terms))
    with Session(engine) as s:
        return [o.id for o in s.scalars(stmt.offset(offset).limit(limit))]


@pytest.fixture(params=["standalone", "cluster"])
def deployment(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Callable[[], None]]]:
    """An engine on an emptied standalone server, then on an emptied 3-node cluster, with
    a function emptying it again."""
    client: redis.Redis | RedisCluster
    if request.param == "standalone":
        request.getfixturevalue("clean_redis")
        url: str = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)

        def flush() -> None:
            client.flushall()
    else:
        cluster: ClusterProcesses = request.getfixturevalue("cluster")
        request.getfixturevalue("cluster_client")
        url = cluster.url
        client = cluster.client()

        def flush() -> None:
            client.flushall(target_nodes=RedisCluster.PRIMARIES)

    engine = redmap.create_engine(url)
    try:
        yield engine, flush
    finally:
        engine.dispose()
        client.close()


def _ranked_rows(n: int, ranks: int, seed_: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed_)
    return [
        {
            "rank": rng.randrange(ranks),
            "name": rng.choice(["ann", "bob", "Bob", "éva", "zed", ""]),
            "points": rng.choice([None, 1, 2, 3]),
            "level": rng.choice([None, 0, 1]),
        }
        for _ in range(n)
    ]


class TestExactPages:
    @pytest.mark.parametrize("model", [Team, League], ids=["plain", "sharded"])
    def test_a_thousand_objects_with_five_ranks(
        self, deployment: tuple[Engine, Callable[[], None]], model: Model
    ) -> None:
        """1,000 objects, 5 ranks: every page of rank desc, name, points matches sorted,
        including pages inside a tie group and straddling two."""
        engine, _ = deployment
        rows = seed(engine, model, _ranked_rows(1000, 5))
        terms = [("rank", True), ("name", False), ("points", True)]
        want = reference(rows, terms)
        for offset, limit in [(0, 10), (0, 250), (195, 10), (190, 30), (400, 250), (990, 20)]:
            got = page_ids(engine, model, terms, offset, limit)
            assert got == want[offset : offset + limit], (offset, limit)
        assert page_ids(engine, model, terms, 0, None) == want
        assert page_ids(engine, model, terms, 1000, 5) == []

    def test_none_is_smallest_in_every_term(self, engine: Engine) -> None:
        """None sorts first ascending and last descending, in the first term (a Sorted()
        index keeps it at -inf) as in the others."""
        rows = seed(
            engine,
            Team,
            [
                {"rank": 1, "name": "a", "points": None, "level": None},
                {"rank": 1, "name": "b", "points": 5, "level": 2},
                {"rank": 1, "name": "c", "points": None, "level": 2},
                {"rank": 1, "name": "d", "points": 1, "level": None},
            ],
        )
        ids = {r["name"]: r["id"] for r in rows}
        names = {v: k for k, v in ids.items()}
        asc = page_ids(engine, Team, [("rank", False), ("points", False)], 0, None)
        assert [names[i] for i in asc] == ["a", "c", "d", "b"]
        desc = page_ids(engine, Team, [("rank", False), ("points", True)], 0, None)
        assert [names[i] for i in desc] == ["b", "d", "a", "c"]
        first = page_ids(engine, Team, [("level", False), ("name", True)], 0, None)
        assert [names[i] for i in first] == ["d", "a", "c", "b"]
        first_desc = page_ids(engine, Team, [("level", True), ("name", False)], 0, None)
        assert [names[i] for i in first_desc] == ["b", "c", "a", "d"]

    def test_str_terms_compare_by_code_point(self, engine: Engine) -> None:
        """ "B" < "a" < "b" < "é": code points, not a locale."""
        seed(engine, Team, [{"rank": 0, "name": n} for n in ["é", "b", "a", "B", ""]])
        with Session(engine) as s:
            got = s.scalars(select(Team).order_by(col(Team, "rank"), col(Team, "name"))).all()
            assert [t.name for t in got] == ["", "B", "a", "b", "é"]

    def test_conditions_and_the_range_fast_path(self, engine: Engine) -> None:
        """A condition (compiled) and a lone range on the first term (read directly)."""
        data = [{**r, "kind": "xy"[i % 2]} for i, r in enumerate(_ranked_rows(300, 4, 3))]
        rows = seed(engine, Team, data)
        terms = [("rank", False), ("name", True)]
        want = reference([r for r in rows if r["kind"] == "y"], terms)
        got = page_ids(engine, Team, terms, 40, 50, col(Team.kind) == "y")
        assert got == want[40:90]
        want = reference([r for r in rows if r["rank"] >= 1], terms)
        got = page_ids(engine, Team, terms, 70, 30, col(Team, "rank") >= 1)
        assert got == want[70:100]
        with Session(engine) as s:
            stmt = select(Team).where(col(Team, "rank") >= 1).order_by(*order_terms(Team, terms))
            assert s.count(stmt.offset(70).limit(30)) == 30

    def test_first_term_on_the_primary_key_ignores_the_rest(self, engine: Engine) -> None:
        """The primary key is unique: later terms change nothing (the single-term path)."""
        rows = seed(engine, Team, _ranked_rows(20, 3))
        got = page_ids(engine, Team, [("id", True), ("name", False)], 2, 5)
        assert got == sorted((r["id"] for r in rows), reverse=True)[2:7]

    def test_primary_key_as_a_later_term(self, engine: Engine) -> None:
        """The primary key can be any later term, here descending."""
        rows = seed(engine, Team, _ranked_rows(60, 2))
        terms = [("rank", False), ("id", True)]
        assert page_ids(engine, Team, terms, 10, 25) == reference(rows, terms)[10:35]


class TestCost:
    def test_round_trips_are_constant_and_fields_read_follow_the_tie_group(
        self, engine: Engine
    ) -> None:
        """A page inside a tie group: 4 round trips (page, tie groups, HMGET, objects)
        for 100 objects as for 1,000; the HMGETs are the tie group's members only."""
        counts = []
        for n in (100, 1000):
            rows = seed(engine, Team, [{"rank": i % 5, "name": f"n{i % 7}"} for i in range(n)])
            group_size = n // 5
            terms = [("rank", True), ("name", False)]
            with Session(engine) as s, count_round_trips(engine) as rt:
                stmt = select(Team).order_by(*order_terms(Team, terms))
                got = s.scalars(stmt.offset(n - group_size + 3).limit(5)).all()
            assert [t.id for t in got] == reference(rows, terms)[n - group_size + 3 :][:5]
            counts.append(rt.round_trips)
            hmgets = [c for c in rt.commands if c[0] == "HMGET"]
            assert len(hmgets) == group_size
            assert all(c[2:] == ("name",) for c in hmgets)
            with Session(engine) as s:
                for t in s.scalars(select(Team)):
                    s.delete(t)
                s.commit()
        assert counts == [4, 4]

    def test_a_page_of_distinct_scores_reads_no_field(self, engine: Engine) -> None:
        """No tie on the page and none across its edges: ids and objects, as one term."""
        seed(engine, Team, [{"rank": i, "name": "n"} for i in range(50)])
        with Session(engine) as s, count_round_trips(engine) as rt:
            stmt = select(Team).order_by(col(Team, "rank").desc(), col(Team, "name"))
            got = s.scalars(stmt.offset(5).limit(10)).all()
        assert [t.rank for t in got] == list(range(44, 34, -1))
        assert rt.round_trips == 2 and "HMGET" not in rt.command_names

    def test_a_write_between_the_round_trips_restarts_the_read(
        self, redis_url: str, clean_redis: None
    ) -> None:
        """When another client changes the order between the page read and the tie-group
        read, the query reads again and returns the page of the new data."""
        engine = redmap.create_engine(redis_url)
        other = redmap.create_engine(redis_url)
        try:
            rows = seed(engine, Team, [{"rank": i % 3, "name": f"n{i}"} for i in range(30)])
            done = []

            def write_once(commands: Sequence[tuple[Any, ...]]) -> None:
                if not done and any(c[0] == "ZCOUNT" for c in commands):
                    done.append(True)
                    # 9 members before the page's first score (rank 0): the page
                    # (offset 8) now starts before what the tie-group read covers.
                    rows.extend(seed(other, Team, [{"rank": -1, "name": "zz"}] * 9))

            terms = [("rank", False), ("name", False)]
            engine.add_listener(write_once)
            with count_round_trips(engine) as rt:
                got = page_ids(engine, Team, terms, 8, 5)
            engine.remove_listener(write_once)
            assert done and got == reference(rows, terms)[8:13]
            assert rt.command_names.count("ZCOUNT") == 4  # two tie-group reads
        finally:
            engine.dispose()
            other.dispose()


class TestErrors:
    def test_fields_without_an_order_are_refused_before_any_round_trip(
        self, engine: Engine
    ) -> None:
        """A JSON or time field has no order to promise; another model's field neither."""
        with Session(engine) as s, count_round_trips(engine) as rt:
            for bad, field in [(Team.data, "data"), (Team.joined, "joined")]:
                with pytest.raises(QueryError, match=f"order_by Team.{field}") as err:
                    s.scalars(select(Team).order_by(col(Team, "rank"), col(bad)))
                assert (err.value.model, err.value.field) == ("Team", field)
            with pytest.raises(QueryError, match="belongs to League"):
                s.scalars(select(Team).order_by(col(Team, "rank"), col(League, "name")))
            with pytest.raises(
                QueryError, match=r"Team.name order_by ... needs a Sorted\(\) field"
            ):
                s.scalars(select(Team).order_by(col(Team, "name"), col(Team, "rank")))
        assert rt.round_trips == 0


class TestAsync:
    def test_same_pages_and_round_trips_as_the_sync_api(
        self, redis_url: str, clean_redis: None
    ) -> None:
        """The AsyncSession runs the same steps: same ids, same round trips."""
        sync_engine = redmap.create_engine(redis_url)
        try:
            rows = seed(sync_engine, League, _ranked_rows(400, 4, 5))
            terms = [("rank", True), ("name", False), ("points", False)]
            stmt = select(League).order_by(*order_terms(League, terms)).offset(90).limit(40)
            with Session(sync_engine) as s, count_round_trips(sync_engine) as rt:
                sync_ids = [o.id for o in s.scalars(stmt)]
        finally:
            sync_engine.dispose()
        assert sync_ids == reference(rows, terms)[90:130]

        async def main() -> tuple[list[int | None], int]:
            engine = create_async_engine(redis_url)
            try:
                async with AsyncSession(engine) as s:
                    with count_round_trips(engine) as art:
                        got = (await s.scalars(stmt)).all()
                return [o.id for o in got], art.round_trips
            finally:
                await engine.dispose()

        assert asyncio.run(main()) == (sync_ids, rt.round_trips)


_TERM = st.tuples(st.sampled_from(["name", "points", "level", "rank", "id"]), st.booleans())
_ROW = st.fixed_dictionaries(
    {
        "rank": st.integers(0, 3),
        "level": st.one_of(st.none(), st.integers(0, 2)),
        "name": st.sampled_from(["", "a", "B", "b", "é"]),
        "points": st.one_of(st.none(), st.integers(-1, 1)),
        "kind": st.sampled_from("xy"),
    }
)


@pytest.mark.parametrize("model", [Team, League], ids=["plain", "sharded"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.lists(_ROW, max_size=45),  # 4 ranks: tie groups of about 11
    first=st.tuples(st.sampled_from(["rank", "level"]), st.booleans()),
    rest=st.lists(_TERM, min_size=1, max_size=3),
    offset=st.one_of(st.just(0), st.integers(0, 50)),
    limit=st.one_of(st.none(), st.integers(0, 20)),
    where=st.sampled_from(["none", "kind", "range"]),
)
def test_pages_match_sorted(
    deployment: tuple[Engine, Callable[[], None]],
    model: Model,
    data: list[dict[str, Any]],
    first: tuple[str, bool],
    rest: list[tuple[str, bool]],
    offset: int,
    limit: int | None,
    where: str,
) -> None:
    """Any terms, offset and limit over rows with many ties give Python's sorted page."""
    engine, flush = deployment
    flush()
    rows = seed(engine, model, data) if data else []
    terms = [first, *rest]
    conds: tuple[Any, ...] = ()
    keep: Callable[[Row], bool] = lambda r: True  # noqa: E731
    if where == "kind":
        conds, keep = (col(model, "kind") == "y",), lambda r: r["kind"] == "y"
    elif where == "range":
        conds = (col(model, first[0]) >= 1,)
        keep = lambda r: r[first[0]] is not None and r[first[0]] >= 1  # noqa: E731
    want = reference([r for r in rows if keep(r)], terms)
    end = None if limit is None else offset + limit
    assert page_ids(engine, model, terms, offset, limit, *conds) == want[offset:end]
