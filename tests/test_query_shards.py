"""Which shards a query of a sharded model reads, and queries that can match nothing.

A condition on the shard key narrows a query to the shards its values live in; values
that contradict each other (`room == 1, room == 2`) or an empty `in_([])` leave no shard
at all, and such a query must return nothing (count 0) without a crash and without a
round trip. Every statement is also checked against a reference computed in Python from
the seeded rows, on a standalone server and on the 3-node cluster.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import pytest

import redmap
from redmap import Indexed, PrimaryKey, Session, Sorted, registry, select
from redmap.exc import QueryError, RedmapError, ValidationError
from redmap.orm.mapper import mapper_of
from redmap.query.expression import and_, or_
from redmap.testing.assertions import count_round_trips

SHARDS = 4
qreg = registry(prefix="qsh", shards=SHARDS)


@qreg.mapped
@dataclass
class Booking:
    """Sharded by an int field that is not its key; the key carries the shard."""

    __shard_key__ = "room"
    room: Annotated[int, Indexed()]
    guest: Annotated[str, Indexed()]
    nights: Annotated[int, Sorted()] = 1
    note: str = ""
    id: Annotated[Optional[int], PrimaryKey()] = None


@qreg.mapped
@dataclass
class Desk:
    """Sharded by its own str key (CRC32 of the key picks the shard)."""

    __shard_key__ = "code"
    code: Annotated[str, PrimaryKey()]
    floor: Annotated[int, Sorted()] = 0


@qreg.mapped
@dataclass
class Badge:
    """Sharded by its own UUID key."""

    __shard_key__ = "id"
    id: Annotated[uuid.UUID, PrimaryKey()]
    owner: Annotated[str, Indexed()] = ""


@qreg.mapped
@dataclass
class Plain:
    """Not sharded: the same statements must behave the same on one keyspace."""

    tag: Annotated[str, Indexed()]
    rank: Annotated[int, Sorted()] = 0
    id: Annotated[Optional[int], PrimaryKey()] = None


Row = tuple[int, int, str, int]  # id, room, guest, nights


def _seed(engine: redmap.Engine) -> list[Row]:
    """Bookings in rooms 0..7 (every shard twice over), one flush per room."""
    rng = random.Random(11)
    rows: list[Row] = []
    for room in range(8):
        with Session(engine, expire_on_commit=False) as s:
            made = [
                Booking(room=room, guest=rng.choice("abc"), nights=rng.randrange(1, 6))
                for _ in range(5)
            ]
            s.add_all(made)
            s.commit()
            rows.extend((b.id, b.room, b.guest, b.nights) for b in made if b.id is not None)
    with Session(engine) as s:
        s.add_all([Plain(tag=rng.choice("xy"), rank=i) for i in range(6)])
        s.commit()
    return rows


def _shard(room: int) -> int:
    return mapper_of(Booking).shard_of_value(room)


def _two_rooms_in_different_shards() -> tuple[int, int]:
    return next((a, b) for a in range(8) for b in range(8) if _shard(a) != _shard(b))


def _by_nights(rows: list[Row]) -> list[int]:
    """The order `order_by(Booking.nights)` gives: score, then the id's key text."""
    return [r[0] for r in sorted(rows, key=lambda r: (r[3], str(r[0]).encode()))]


def _by_id(rows: list[Row]) -> list[int]:
    return [r[0] for r in sorted(rows, key=lambda r: r[0])]


def _check(
    engine: redmap.Engine, rows: list[Row], conds: tuple[Any, ...], keep: Callable[[Row], bool]
) -> None:
    """scalars, count, order_by+limit and offset agree with the reference filter."""
    want = [r for r in rows if keep(r)]
    with Session(engine) as s:
        got = s.scalars(select(Booking).where(*conds)).all()
        assert [b.id for b in got] == _by_id(want), conds
        assert s.count(select(Booking).where(*conds)) == len(want), conds
        page = s.scalars(
            select(Booking).where(*conds).order_by(Booking.nights).offset(1).limit(3)
        ).all()
        assert [b.id for b in page] == _by_nights(want)[1:4], conds
        rev = s.scalars(
            select(Booking).where(*conds).order_by(Booking.nights.desc()).limit(2)
        ).all()
        assert [b.id for b in rev] == _by_nights(want)[::-1][:2], conds
        assert s.count(select(Booking).where(*conds).limit(2)) == min(2, len(want)), conds


def _empty_without_round_trip(engine: redmap.Engine, *conds: Any) -> None:
    """The statement returns nothing, counts 0, and sends no command."""
    with Session(engine) as s, count_round_trips(engine) as rt:
        assert s.scalars(select(Booking).where(*conds)).all() == []
        assert (
            s.scalars(select(Booking).where(*conds).order_by(Booking.nights).limit(3)).all() == []
        )
        assert s.scalars(select(Booking).where(*conds).order_by(Booking.nights.desc())).all() == []
        assert s.scalars(select(Booking).where(*conds).offset(2)).first() is None
        assert s.count(select(Booking).where(*conds)) == 0
        assert s.count(select(Booking).where(*conds).order_by(Booking.nights).limit(5)) == 0
    assert rt.round_trips == 0, rt.batches


def test_empty_in_on_shard_key_returns_nothing(sengine: redmap.Engine) -> None:
    """`room.in_([])` matches no shard: an empty result and count 0, no round trip."""
    _seed(sengine)
    _empty_without_round_trip(sengine, Booking.room.in_([]))


def test_contradictory_shard_key_equalities_return_nothing(sengine: redmap.Engine) -> None:
    """`room == a, room == b` with a and b in different shards: nothing, no round trip."""
    _seed(sengine)
    a, b = _two_rooms_in_different_shards()
    _empty_without_round_trip(sengine, Booking.room == a, Booking.room == b)
    _empty_without_round_trip(sengine, and_(Booking.room == a, Booking.room == b))
    _empty_without_round_trip(sengine, Booking.room == a, Booking.room.in_([b]))
    _empty_without_round_trip(sengine, Booking.room.in_([a]), Booking.room.in_([b]))


def test_empty_in_combined_with_other_conditions(sengine: redmap.Engine) -> None:
    """An empty `in_` and-ed with anything, at any depth, still matches nothing."""
    _seed(sengine)
    _empty_without_round_trip(sengine, Booking.room.in_([]), Booking.guest == "a")
    _empty_without_round_trip(sengine, and_(Booking.room.in_([]), Booking.guest == "a"))
    _empty_without_round_trip(sengine, Booking.guest == "a", and_(Booking.room.in_([])))
    _empty_without_round_trip(sengine, Booking.room.in_([]), Booking.nights >= 2)
    _empty_without_round_trip(sengine, Booking.room.in_([]), Booking.guest != "a")
    _empty_without_round_trip(sengine, or_(Booking.room.in_([]), Booking.room.in_([])))
    _empty_without_round_trip(sengine, or_())


def test_same_shard_contradiction_is_answered_by_redis(sengine: redmap.Engine) -> None:
    """Two rooms of one shard narrow to that shard; Redis finds no object in both."""
    rows = _seed(sengine)
    a, b = 1, 1 + SHARDS
    assert _shard(a) == _shard(b)
    _check(sengine, rows, (Booking.room == a, Booking.room == b), lambda r: False)
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        assert s.scalars(select(Booking).where(Booking.room == a, Booking.room == b)).all() == []
    assert rt.round_trips == 1


def test_or_with_an_empty_branch_keeps_the_other(sengine: redmap.Engine) -> None:
    """`or_(room.in_([]), X)` is X: its matches, order, pages and count."""
    rows = _seed(sengine)
    a, b = _two_rooms_in_different_shards()
    _check(sengine, rows, (or_(Booking.room.in_([]), Booking.room == a),), lambda r: r[1] == a)
    _check(sengine, rows, (or_(Booking.room.in_([]), Booking.guest == "b"),), lambda r: r[2] == "b")
    _check(
        sengine,
        rows,
        (or_(Booking.room == a, Booking.room == b, Booking.room.in_([])),),
        lambda r: r[1] in (a, b),
    )
    _check(
        sengine,
        rows,
        (or_(Booking.room.in_([]), Booking.room == a), Booking.nights >= 3),
        lambda r: r[1] == a and r[3] >= 3,
    )
    _check(
        sengine,
        rows,
        (or_(and_(Booking.room.in_([]), Booking.guest == "a"), Booking.guest == "c"),),
        lambda r: r[2] == "c",
    )


def test_narrowed_queries_match_reference(sengine: redmap.Engine) -> None:
    """Shard-key conditions in any form give the same answer as a filter over all rows."""
    rows = _seed(sengine)
    a, b = _two_rooms_in_different_shards()
    cases: list[tuple[tuple[Any, ...], Callable[[Row], bool]]] = [
        ((Booking.room == a,), lambda r: r[1] == a),
        ((Booking.room.in_([a, b]),), lambda r: r[1] in (a, b)),
        ((Booking.room.in_([a, b]), Booking.room == b), lambda r: r[1] == b),
        (
            (Booking.room.in_([a, b, 99]), Booking.guest == "a"),
            lambda r: r[1] in (a, b) and r[2] == "a",
        ),
        ((and_(Booking.room == a, Booking.nights <= 3),), lambda r: r[1] == a and r[3] <= 3),
        ((or_(Booking.room == a, Booking.guest == "b"),), lambda r: r[1] == a or r[2] == "b"),
        ((Booking.room != a,), lambda r: r[1] != a),
        ((Booking.room.in_([a]), Booking.room != a), lambda r: False),
        ((Booking.guest.in_([]),), lambda r: False),
        ((Booking.id.in_([]),), lambda r: False),
        ((Booking.id.in_([rows[0][0], rows[-1][0]]),), lambda r: r[0] in (rows[0][0], rows[-1][0])),
        ((Booking.id == rows[3][0], Booking.room == rows[3][1]), lambda r: r[0] == rows[3][0]),
        ((Booking.id == rows[3][0], Booking.room == a), lambda r: r[0] == rows[3][0] and r[1] == a),
        ((Booking.room == None,), lambda r: False),  # noqa: E711
    ]
    for conds, keep in cases:
        _check(sengine, rows, conds, keep)


def test_narrowing_reads_only_the_named_shards(sengine: redmap.Engine) -> None:
    """`or_` of shard-key equalities reads the union of their shards, nothing else; an id
    condition reads the id's shard."""
    rows = _seed(sengine)
    a, b = _two_rooms_in_different_shards()
    mapper = mapper_of(Booking)
    tags = {mapper.keys_for_shard(_shard(a)).tag, mapper.keys_for_shard(_shard(b)).tag}
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        s.count(
            select(Booking).where(
                or_(Booking.room == a, Booking.room.in_([b])), Booking.guest == "a"
            )
        )
    keyed = {str(c[1]).partition(":")[0] for c in rt.commands if len(c) > 1}
    assert keyed == tags
    row = rows[0]
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        assert [b.id for b in s.scalars(select(Booking).where(Booking.id.in_([row[0]])))] == [
            row[0]
        ]
    keyed = {str(c[1]).partition(":")[0] for c in rt.commands if len(c) > 1}
    assert keyed == {mapper.keys_for_pk(row[0]).tag}  # the id carries its shard


def test_models_sharded_by_their_key(sengine: redmap.Engine) -> None:
    """Str and UUID keys that pick their shard: empty and contradictory sets return nothing."""
    for obj in [
        *(Desk(code=f"d{i}", floor=i) for i in range(6)),
        *(Badge(owner="o", id=uuid.UUID(int=i + 1)) for i in range(4)),
    ]:
        with Session(sengine) as s:  # one object, one shard, one transaction
            s.add(obj)
            s.commit()
    d_a, d_b = next(
        (f"d{i}", f"d{j}")
        for i in range(6)
        for j in range(6)
        if mapper_of(Desk).shard_of_value(f"d{i}") != mapper_of(Desk).shard_of_value(f"d{j}")
    )
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        assert s.scalars(select(Desk).where(Desk.code.in_([]))).all() == []
        assert s.scalars(select(Desk).where(Desk.code == d_a, Desk.code == d_b)).all() == []
        assert s.count(select(Desk).where(Desk.code.in_([]), Desk.floor > 1)) == 0
        assert s.scalars(select(Badge).where(Badge.id.in_([]))).all() == []
        assert s.count(select(Badge).where(Badge.id.in_([]), Badge.owner == "o")) == 0
    assert rt.round_trips == 0
    with Session(sengine) as s:
        got = s.scalars(select(Desk).where(Desk.code.in_([d_a, d_b])).order_by(Desk.floor)).all()
        assert [d.code for d in got] == sorted([d_a, d_b], key=lambda c: int(c[1:]))
        assert s.count(select(Badge).where(Badge.id.in_([uuid.UUID(int=2), uuid.UUID(int=9)]))) == 1


def test_unsharded_empty_in_returns_nothing(sengine: redmap.Engine) -> None:
    """An unsharded model answers an empty `in_` with nothing, and without a round trip."""
    _seed(sengine)
    with Session(sengine) as s, count_round_trips(sengine) as rt:
        assert s.scalars(select(Plain).where(Plain.tag.in_([]))).all() == []
        assert s.count(select(Plain).where(Plain.tag.in_([]), Plain.rank > 1)) == 0
        assert (
            s.scalars(select(Plain).where(Plain.id.in_([])).order_by(Plain.rank).limit(2)).all()
            == []
        )
    assert rt.round_trips == 0
    with Session(sengine) as s:
        got = s.scalars(select(Plain).where(or_(Plain.tag.in_([]), Plain.rank >= 4))).all()
        assert sorted(p.rank for p in got) == [4, 5]
        # Empty parts inside an or_ are sent to Redis: a Sorted field's, an or_() of none.
        for empty in (Plain.rank.in_([]), or_(), Plain.id.in_([])):
            got = s.scalars(select(Plain).where(or_(empty, Plain.rank <= 1))).all()
            assert sorted(p.rank for p in got) == [0, 1]
            stmt = select(Plain).where(or_(empty, Plain.rank <= 1)).order_by(Plain.rank.desc())
            assert s.count(stmt) == 2
            assert [p.rank for p in s.scalars(stmt.limit(1))] == [1]


def test_empty_query_still_validates(sengine: redmap.Engine) -> None:
    """A query that matches no shard still refuses bad fields and values, as redmap errors."""
    with Session(sengine) as s:
        with pytest.raises(QueryError, match="needs an index"):
            s.scalars(select(Booking).where(Booking.room.in_([]), Booking.note == "x"))
        with pytest.raises(QueryError, match=r"guest order_by .* Sorted\(\)"):
            s.count(select(Booking).where(Booking.room.in_([])).order_by(Booking.guest))
        with pytest.raises(ValidationError, match="nights"):
            s.scalars(select(Booking).where(Booking.room.in_([]), Booking.nights == "many"))
        with pytest.raises(QueryError, match="Plain"):
            s.scalars(select(Booking).where(Booking.room.in_([]), Plain.tag == "x"))


def test_wrong_typed_shard_key_value_is_a_redmap_error(sengine: redmap.Engine) -> None:
    """A shard-key value of the wrong type is refused with a ValidationError, not a TypeError."""
    with Session(sengine) as s:
        for conds in (
            (Booking.room == "two",),
            (Booking.room.in_([1, "two"]),),
            (or_(Booking.room == 1.5, Booking.guest == "a"),),
        ):
            with pytest.raises(ValidationError, match="room") as info:
                s.scalars(select(Booking).where(*conds))
            assert isinstance(info.value, RedmapError)
            with pytest.raises(ValidationError, match="room"):
                s.count(select(Booking).where(*conds))
        with pytest.raises(ValidationError, match="code"):
            s.scalars(select(Desk).where(Desk.code == 3))
