"""Tests for `redmap.query.select`: index-backed select(), count() and index maintenance."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from math import inf
from typing import Annotated, Any, Optional

import pytest

from redmap import PrimaryKey, Session, Sorted, create_engine, or_, registry, select
from redmap.engine import Engine
from redmap.exc import IntegrityError, MultipleResultsFound, NoResultFound, QueryError
from redmap.testing.assertions import assert_round_trips, count_round_trips, dump_keys
from tests._fixtures import Author, Counter, Doc

none_reg = registry(prefix="qn")


@none_reg.mapped
@dataclass
class Runner:
    """A sorted field that may be None (Author.age cannot be)."""

    name: str
    best: Annotated[Optional[int], Sorted()] = None
    id: Annotated[Optional[int], PrimaryKey()] = None


PEOPLE = [
    ("ann", 41, "a@x"),
    ("bob", 30, "b@x"),
    ("ann", 25, "c@x"),
    ("cy", 50, "d@x"),
    ("dee", 30, "e@x"),
    ("ann", 60, "f@x"),
]


@pytest.fixture
def people(engine: Engine) -> Engine:
    with Session(engine) as s:
        s.add_all([Author(name=n, age=a, email=e) for n, a, e in PEOPLE])
        s.commit()
    return engine


def ids(objs: Any) -> list[int]:
    return [o.id for o in objs]


class TestOperators:
    def test_equality(self, people: Engine) -> None:
        """== on an Indexed field returns every match, ordered by primary key."""
        with Session(people) as s:
            assert ids(s.scalars(select(Author).where(Author.name == "ann"))) == [1, 3, 6]

    def test_not_equal(self, people: Engine) -> None:
        """!= returns the complement within the model."""
        with Session(people) as s:
            assert ids(s.scalars(select(Author).where(Author.name != "ann"))) == [2, 4, 5]

    def test_in(self, people: Engine) -> None:
        """in_() is a union of equality sets."""
        with Session(people) as s:
            got = s.scalars(select(Author).where(Author.name.in_(["bob", "cy", "zed"])))
            assert ids(got) == [2, 4]

    def test_unique_equality(self, people: Engine) -> None:
        """A Unique field answers equality lookups."""
        with Session(people) as s:
            assert s.scalars(select(Author).where(Author.email == "d@x")).one().name == "cy"

    @pytest.mark.parametrize(
        ("cond", "expected"),
        [
            (lambda: Author.age < 30, [3]),
            (lambda: Author.age <= 30, [2, 3, 5]),
            (lambda: Author.age > 41, [4, 6]),
            (lambda: Author.age >= 41, [1, 4, 6]),
            (lambda: Author.age.between(30, 41), [1, 2, 5]),
        ],
    )
    def test_ranges(self, people: Engine, cond: Any, expected: list[int]) -> None:
        """Range operators on a Sorted field include/exclude their bounds like SQL."""
        with Session(people) as s:
            assert sorted(ids(s.scalars(select(Author).where(cond())))) == expected

    def test_and_of_equality_and_range(self, people: Engine) -> None:
        """Several where() conditions are ANDed."""
        with Session(people) as s:
            stmt = select(Author).where(Author.name == "ann", Author.age.between(30, 50))
            assert ids(s.scalars(stmt)) == [1]

    def test_or(self, people: Engine) -> None:
        """or_() unions its branches."""
        with Session(people) as s:
            stmt = select(Author).where(or_(Author.name == "bob", Author.age > 55))
            assert ids(s.scalars(stmt)) == [2, 6]
            assert (
                s.count(select(Author).where(or_(Author.name == "ann", Author.name == "bob"))) == 4
            )

    def test_order_by_limit_offset(self, people: Engine) -> None:
        """order_by a Sorted field, descending, with limit and offset; ties by primary key."""
        with Session(people) as s:
            stmt = select(Author).order_by(Author.age.desc()).limit(3).offset(1)
            assert [a.age for a in s.scalars(stmt)] == [50, 41, 30]
            asc = select(Author).order_by(Author.age)
            assert [(a.age, a.id) for a in s.scalars(asc)][:3] == [(25, 3), (30, 2), (30, 5)]

    def test_default_order_is_primary_key(self, people: Engine) -> None:
        """Without order_by, results come in primary-key order."""
        with Session(people) as s:
            assert ids(s.scalars(select(Author))) == [1, 2, 3, 4, 5, 6]
            assert ids(s.scalars(select(Author).limit(2).offset(4))) == [5, 6]

    def test_string_primary_keys_order(self, engine: Engine) -> None:
        """Models with str keys list their objects in a deterministic key order."""
        with Session(engine) as s:
            s.add_all([Doc(slug=x) for x in ["b", "a", "c"]])
            s.commit()
            assert [d.slug for d in s.scalars(select(Doc))] == ["a", "b", "c"]

    def test_primary_key_conditions(self, people: Engine) -> None:
        """The primary key supports ==, in_() and ranges without a marker."""
        with Session(people) as s:
            assert ids(s.scalars(select(Author).where(Author.id.in_([5, 2, 99])))) == [2, 5]
            assert ids(s.scalars(select(Author).where(Author.id > 4))) == [5, 6]

    def test_results_api(self, people: Engine) -> None:
        """first, one, one_or_none and iteration behave as in SQLAlchemy."""
        with Session(people) as s:
            assert s.scalars(select(Author).where(Author.name == "zed")).first() is None
            assert s.scalars(select(Author).where(Author.name == "zed")).one_or_none() is None
            with pytest.raises(NoResultFound):
                s.scalars(select(Author).where(Author.name == "zed")).one()
            with pytest.raises(MultipleResultsFound):
                s.scalars(select(Author).where(Author.name == "ann")).one()
            with pytest.raises(MultipleResultsFound):
                s.scalars(select(Author).where(Author.name == "ann")).one_or_none()
            assert len(list(iter(s.scalars(select(Author))))) == 6

    def test_count_applies_offset_and_limit(self, people: Engine) -> None:
        """count() counts matches after offset and limit."""
        with Session(people) as s:
            assert s.count(select(Author)) == 6
            assert s.count(select(Author).where(Author.age >= 30).offset(2).limit(10)) == 3
            assert s.count(select(Author).limit(0)) == 0


class TestRefusals:
    def test_unindexed_field_is_query_error(self, people: Engine) -> None:
        """A condition on a field with no index names the field and the marker it needs."""
        with Session(people) as s, pytest.raises(QueryError) as err:
            s.scalars(select(Author).where(Author.bio == "x"))
        assert "Author.bio" in str(err.value) and "Indexed()" in str(err.value)
        assert err.value.field == "bio"

    def test_range_on_equality_index_is_query_error(self, people: Engine) -> None:
        """Ranges need Sorted(); an equality index is not enough."""
        with Session(people) as s, pytest.raises(QueryError) as err:
            s.scalars(select(Author).where(Author.name > "a"))
        assert "Sorted()" in str(err.value)

    def test_order_by_unsorted_is_query_error(self, people: Engine) -> None:
        """order_by needs a Sorted field."""
        with Session(people) as s, pytest.raises(QueryError):
            s.scalars(select(Author).order_by(Author.name))

    def test_condition_is_not_a_bool(self) -> None:
        """Using a condition as a bool is refused instead of silently true."""
        with pytest.raises(TypeError):
            bool(Author.name == "x")


class TestCost:
    def test_equality_query_of_100_is_two_round_trips(self, engine: Engine) -> None:
        """An equality query returning 100 objects costs 2 round trips."""
        with Session(engine) as s:
            s.add_all([Author(name="same", email=f"{i}@x") for i in range(100)])
            s.add_all([Author(name="other", email=f"o{i}@x") for i in range(50)])
            s.commit()
        with Session(engine) as s, assert_round_trips(engine, 2):
            assert len(s.scalars(select(Author).where(Author.name == "same")).all()) == 100

    def test_count_is_one_round_trip(self, people: Engine) -> None:
        """count() is a single MULTI/EXEC round trip."""
        with Session(people) as s, assert_round_trips(people, 1):
            s.count(select(Author).where(Author.age.between(0, 100), Author.name == "ann"))

    def test_range_query_cost_does_not_grow_with_database(self, engine: Engine) -> None:
        """A limited range query sends the same commands at 100 and at 2,000 objects."""
        shapes = []
        for total in (100, 2000):
            with Session(engine) as s:
                have = s.count(select(Author))
                s.add_all(
                    [Author(name="n", email=f"{total}-{i}@x", age=i) for i in range(have, total)]
                )
                s.commit()
            with Session(engine) as s, count_round_trips(engine) as rt:
                got = s.scalars(
                    select(Author).where(Author.age.between(10, 60)).order_by(Author.age).limit(10)
                ).all()
            assert [a.age for a in got] == list(range(10, 20))
            shapes.append((rt.round_trips, [c[0] for c in rt.commands]))
        assert shapes[0] == shapes[1]

    def test_loaded_objects_are_not_fetched_again(self, people: Engine) -> None:
        """Objects already in the session come from the identity map: 1 round trip."""
        with Session(people) as s:
            s.scalars(select(Author)).all()
            with assert_round_trips(people, 1):
                s.scalars(select(Author).where(Author.name == "ann")).all()


class TestSessionInteraction:
    def test_identity_map_keeps_pending_changes(self, people: Engine) -> None:
        """A queried object already in the session is the same object with its changes."""
        with Session(people) as s, s.no_autoflush:
            a = s.get(Author, 1)
            assert a is not None
            a.bio = "pending"
            got = s.scalars(select(Author).where(Author.name == "ann")).first()
            assert got is a and got.bio == "pending"

    def test_autoflush_makes_pending_visible(self, people: Engine) -> None:
        """Pending adds, changes and deletes are flushed before a query."""
        with Session(people) as s:
            s.add(Author(name="zed", email="z@x", age=1))
            b = s.get(Author, 2)
            assert b is not None
            b.name = "zed"
            s.delete(s.get(Author, 4))
            assert ids(s.scalars(select(Author).where(Author.name == "zed"))) == [2, 7]
            assert s.count(select(Author)) == 6

    def test_no_autoflush_hides_pending(self, people: Engine) -> None:
        """Inside no_autoflush a query sees only what Redis holds."""
        with Session(people) as s, s.no_autoflush:
            s.add(Author(name="zed", email="z@x"))
            assert s.scalars(select(Author).where(Author.name == "zed")).all() == []


class TestIndexMaintenance:
    def test_update_moves_index_entries(self, people: Engine, redis_client: Any) -> None:
        """Changing an indexed field removes the old entry and adds the new one."""
        with Session(people) as s:
            a = s.get(Author, 1)
            assert a is not None
            a.name, a.email, a.age = "zoe", "zoe@x", 99
            s.commit()
        assert redis_client.smembers("{t}:author:#ix:name:ann") == {b"3", b"6"}
        assert redis_client.smembers("{t}:author:#ix:name:zoe") == {b"1"}
        assert redis_client.get("{t}:author:#uq:email:a%40x") is None
        assert redis_client.get("{t}:author:#uq:email:zoe%40x") == b"1"
        assert redis_client.zscore("{t}:author:#zs:age", "1") == 99

    def test_none_values_are_indexed(self, engine: Engine, redis_client: Any) -> None:
        """None sorts first ascending (last descending) and is excluded from ranges."""
        bests = [5, None, -3, None, 10]
        with Session(engine) as s:
            s.add_all(Runner(name=f"r{i}", best=b) for i, b in enumerate(bests, start=1))
            s.commit()
        # The layout: None is held in the sorted index at -inf, values at their own score.
        zs = redis_client.zrange("{qn}:runner:#zs:best", 0, -1, withscores=True)
        assert zs == [(b"2", -inf), (b"4", -inf), (b"3", -3.0), (b"1", 5.0), (b"5", 10.0)]
        with Session(engine) as s:
            up = s.scalars(select(Runner).order_by(Runner.best)).all()
            assert [(r.id, r.best) for r in up] == [(2, None), (4, None), (3, -3), (1, 5), (5, 10)]
            down = s.scalars(select(Runner).order_by(Runner.best.desc())).all()
            assert [r.best for r in down] == [10, 5, -3, None, None]
            assert ids(s.scalars(select(Runner).where(Runner.best < 100))) == [1, 3, 5]
            assert ids(s.scalars(select(Runner).where(Runner.best <= 0))) == [3]
            assert s.count(select(Runner).where(Runner.best < 100)) == 3
            assert s.count(select(Runner).where(Runner.best.between(-(10**9), 10**9))) == 3
            assert ids(s.scalars(select(Runner).where(Runner.best == None))) == [2, 4]  # noqa: E711

    def test_unique_value_can_move_between_objects_in_one_flush(self, people: Engine) -> None:
        """One object releases a unique value and another takes it in the same flush."""
        with Session(people) as s:
            a, b = s.get(Author, 1), s.get(Author, 2)
            assert a is not None and b is not None
            a.email, b.email = "tmp@x", "a@x"
            s.commit()
        with Session(people) as s:
            assert s.scalars(select(Author).where(Author.email == "a@x")).one().id == 2

    def test_unique_violation_writes_nothing(self, people: Engine, redis_client: Any) -> None:
        """Taking a unique value that another object holds raises IntegrityError."""
        before = dump_keys(redis_client)
        with Session(people) as s:
            s.add(Author(name="x", email="b@x"))
            s.add(Counter(value=1))
            with pytest.raises(IntegrityError) as err:
                s.commit()
        assert err.value.field == "email" and err.value.value == "b@x"
        assert dump_keys(redis_client) == before

    def test_unique_duplicate_inside_one_flush(self, engine: Engine) -> None:
        """Two new objects with the same unique value in one flush are refused without I/O."""
        with Session(engine) as s:
            s.add_all([Author(name="x", email="same@x"), Author(name="y", email="same@x")])
            with assert_round_trips(engine, 0), pytest.raises(IntegrityError):
                s.flush()


def _claim_email(url: str, rounds: int, barrier: Any, results: Any) -> None:
    engine = create_engine(url)
    wins = 0
    losses = 0
    for r in range(rounds):
        barrier.wait()
        with Session(engine) as s:
            s.add(Author(name="racer", email=f"round{r}@x"))
            try:
                s.commit()
                wins += 1
            except IntegrityError:
                losses += 1
    results.put((wins, losses))
    engine.dispose()


class TestUniqueConcurrency:
    def test_concurrent_processes_one_winner_per_value(
        self, engine: Engine, redis_url: str, redis_client: Any
    ) -> None:
        """4 processes race to insert the same unique value 25 times: one winner each time."""
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(4)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_claim_email, args=(redis_url, 25, barrier, results))
            for _ in range(4)
        ]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert sum(w for w, _ in outcomes) == 25
        assert sum(lost for _, lost in outcomes) == 75
        with Session(engine) as s:
            assert s.count(select(Author)) == 25
        assert redis_client.zcard("{t}:author:#all") == 25
        assert redis_client.scard("{t}:author:#ix:name:racer") == 25
        assert len(redis_client.keys("{t}:author:#uq:email:*")) == 25


class TestEdgeCases:
    def test_empty_in_and_or_match_nothing(self, people: Engine) -> None:
        """in_([]) and or_() with no branches match no object."""
        with Session(people) as s:
            assert s.scalars(select(Author).where(Author.age.in_([]))).all() == []
            assert s.scalars(select(Author).where(Author.name.in_([]))).all() == []
            assert s.count(select(Author).where(or_())) == 0

    def test_range_on_explicit_int_primary_key(self, engine: Engine) -> None:
        """An int primary key supports ranges whether generated or given."""
        with Session(engine) as s:
            s.add_all([Counter(id=i, value=i) for i in (5, 10, 15)])
            s.commit()
            assert [c.id for c in s.scalars(select(Counter).where(Counter.id >= 10))] == [10, 15]
