"""Tests for `redmap.orm.types`."""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import typing
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, NewType, Optional, Union

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from redmap.exc import DecodeError, MappingError, ValidationError
from redmap.orm.types import Codec, compile_codec


class Color(enum.Enum):
    RED = 1
    GREEN = 2
    CRIMSON = 1  # noqa: PIE796 -- an alias, stored under the canonical name


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mood(str, enum.Enum):
    HAPPY = "happy"
    SAD = "sad"


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1
    RW = 6


@dataclass
class Score:
    name: str
    score: int


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass
class Node:
    value: int
    children: list[Node] = field(default_factory=list)


@dataclass
class WithDefaults:
    a: int
    b: str = "b"
    c: list[int] = field(default_factory=list)
    d: int = field(default=0, init=False)


@dataclass
class Everything:
    s: str
    i: int
    f: float
    b: bool
    d: Decimal
    dt: datetime
    da: date
    t: time
    td: timedelta
    u: uuid.UUID
    e: Color
    raw: bytes
    opt: int | None
    scores: list[Score]
    weights: dict[str, float]
    anything: list  # type: ignore[type-arg]
    point: Point | None = None


UserId = NewType("UserId", int)
IST = timezone(timedelta(hours=5, minutes=30))
AWARE = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=IST)


def codec(tp: object) -> Codec:
    return compile_codec(tp, model="M", field="f")


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, down to float signs, Decimal exponents and UTC offsets."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, (datetime, time)):
        return a == b and a.utcoffset() == b.utcoffset() and a.isoformat() == b.isoformat()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


def round_trip(tp: object, value: Any) -> Any:
    c = codec(tp)
    c.validate(value, model="M", field="f")
    return c.decode(c.encode(value))


SCALARS: list[tuple[object, Any]] = [
    (str, ""),
    (str, "plain"),
    (str, "héllo wörld ✓ 🌍 \x00 \n \u2028 ℃"),
    (int, 0),
    (int, -1),
    (int, 2**64 + 1),
    (int, -(2**200)),
    (bool, True),
    (bool, False),
    (float, 0.0),
    (float, -0.0),
    (float, math.nan),
    (float, math.inf),
    (float, -math.inf),
    (float, 0.1),
    (float, 5e-324),
    (float, 1.7976931348623157e308),
    (Decimal, Decimal("1.10")),
    (Decimal, Decimal("-0")),
    (Decimal, Decimal("NaN")),
    (Decimal, Decimal("-Infinity")),
    (Decimal, Decimal("Infinity")),
    (Decimal, Decimal("1E+3")),
    (Decimal, Decimal("-1.000000000000000000000000000000000000001")),
    (Decimal, Decimal("0E-30")),
    (datetime, datetime(2024, 1, 2, 3, 4, 5, 6)),
    (datetime, AWARE),
    (datetime, datetime(2000, 1, 1, tzinfo=timezone(-timedelta(seconds=30)))),
    (datetime, datetime(2000, 1, 1, tzinfo=timezone(timedelta(microseconds=1)))),
    (datetime, datetime(1, 1, 1, tzinfo=timezone(-timedelta(hours=23, microseconds=1)))),
    (datetime, datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
    (date, date(2024, 2, 29)),
    (date, date.min),
    (time, time(0, 0)),
    (time, time(23, 59, 59, 999999)),
    (time, time(12, 30, tzinfo=timezone(-timedelta(seconds=30)))),
    (timedelta, timedelta(days=-3, seconds=5, microseconds=7)),
    (timedelta, timedelta.max),
    (timedelta, timedelta.min),
    (uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
    (Color, Color.GREEN),
    (Color, Color.CRIMSON),
    (Level, Level.HIGH),
    (Mood, Mood.SAD),
    (Perm, Perm.RW),
    (Perm, Perm.R | Perm.X),
    (Perm, Perm(0)),
    (bytes, b""),
    (bytes, bytes(range(256))),
    (bytes, b"\xff\xfe\x00 not utf-8 \xc3"),
]


def _id(case: tuple[object, Any]) -> str:
    return f"{getattr(case[0], '__name__', case[0])}-{case[1]!r}"[:60]


class TestRoundTrip:
    @pytest.mark.parametrize("case", SCALARS, ids=_id)
    def test_scalar_round_trips_value_and_type(self, case: tuple[object, Any]) -> None:
        """Every supported scalar reads back equal and of the same type."""
        tp, value = case
        assert same(round_trip(tp, value), value)

    @pytest.mark.parametrize("case", SCALARS, ids=_id)
    def test_scalar_round_trips_inside_json(self, case: tuple[object, Any]) -> None:
        """Inside lists, dicts and Optional, every scalar keeps its value and type too."""
        tp, value = case
        assert same(round_trip(list[tp], [value, value]), [value, value])  # type: ignore[valid-type]
        doc = {"k": value, "none": None}
        assert same(round_trip(dict[str, tp | None], doc), doc)  # type: ignore[valid-type]

    def test_aware_datetime_keeps_its_exact_offset(self) -> None:
        """Offsets with seconds and microseconds survive, as a fixed-offset timezone."""
        for offset in (
            timedelta(hours=5, minutes=30),
            -timedelta(seconds=30),
            timedelta(microseconds=1),
            -timedelta(microseconds=500000),
            timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
            timedelta(0),
        ):
            value = datetime(2020, 6, 1, 12, tzinfo=timezone(offset))
            back = round_trip(datetime, value)
            assert isinstance(back.tzinfo, timezone)
            assert back.utcoffset() == offset
            assert back == value

    def test_zoneinfo_datetime_reads_back_as_same_instant_and_offset(self) -> None:
        """A named zone comes back as a fixed offset equal to the one it had."""
        zoneinfo = pytest.importorskip("zoneinfo")
        try:
            paris = zoneinfo.ZoneInfo("Europe/Paris")
        except zoneinfo.ZoneInfoNotFoundError:
            pytest.skip("no tz database")
        value = datetime(2024, 7, 1, 12, tzinfo=paris)
        back = round_trip(datetime, value)
        assert back == value and back.utcoffset() == timedelta(hours=2)

    def test_huge_ints_round_trip_past_the_str_digit_limit(self) -> None:
        """Python refuses int/str conversions past 4300 digits; the int codec does not."""
        for value in (10**5000 + 7, -(10**6000)):
            assert round_trip(int, value) == value

    def test_float_field_accepts_int_and_reads_back_float(self) -> None:
        """An int in a float field is stored as a float, so it reads back as one."""
        back = round_trip(float, 3)
        assert back == 3.0 and type(back) is float
        assert codec(float).encode(3) == b"3.0"

    def test_bytearray_is_stored_and_reads_back_as_bytes(self) -> None:
        """A bytearray is accepted and reads back as bytes with the same content."""
        assert same(round_trip(bytes, bytearray(b"\x00\xff")), b"\x00\xff")

    def test_stored_forms_are_the_documented_ones(self) -> None:
        """Stored bytes are the plain, readable forms other programs can use."""
        assert codec(str).encode("") == b""
        assert codec(str).encode("é") == "é".encode()
        assert codec(int).encode(-42) == b"-42"
        assert codec(bool).encode(True) == b"1" and codec(bool).encode(False) == b"0"
        assert codec(float).encode(-0.0) == b"-0.0" and codec(float).encode(math.nan) == b"nan"
        assert codec(Decimal).encode(Decimal("1.10")) == b"1.10"
        assert codec(datetime).encode(AWARE) == b"2024-02-29T23:59:58.123456+05:30"
        assert codec(timedelta).encode(timedelta(seconds=1, microseconds=2)) == b"1000002"
        u = uuid.UUID(int=1)
        assert codec(uuid.UUID).encode(u) == b"00000000-0000-0000-0000-000000000001"
        assert codec(Color).encode(Color.CRIMSON) == b"RED"
        assert codec(Perm).encode(Perm.R | Perm.X) == b"R|X"
        assert codec(list[str]).encode(["é", "a"]) == '["é","a"]'.encode()
        assert codec(dict[str, bytes]).encode({"k": b"\xff"}) == b'{"k":"/w=="}'

    @pytest.mark.skipif(sys.version_info < (3, 11), reason="StrEnum is new in 3.11")
    def test_str_enum_round_trips_as_member(self) -> None:
        """A StrEnum is stored by member name and reads back as the member."""
        strenum = enum.StrEnum("Size", {"SMALL": "s", "LARGE": "l"})  # type: ignore[attr-defined]
        back = round_trip(strenum, strenum.LARGE)
        assert back is strenum.LARGE

    def test_nested_dataclass_with_every_type_round_trips(self) -> None:
        """A dataclass holding every supported type reads back field for field."""
        value = Everything(
            s="é\x00",
            i=-(2**70),
            f=-0.0,
            b=True,
            d=Decimal("-1.500"),
            dt=AWARE,
            da=date(2020, 1, 1),
            t=time(1, 2, 3, 4, tzinfo=timezone(timedelta(seconds=-30))),
            td=timedelta(days=1, microseconds=1),
            u=uuid.uuid4(),
            e=Color.RED,
            raw=bytes(range(256)),
            opt=None,
            scores=[Score("a", 1), Score("b", 2)],
            weights={"nan": math.nan, "inf": -math.inf},
            anything=[1, "x", None, 2.5, True, {"k": [False]}],
            point=Point(1, 2),
        )
        assert same(round_trip(Everything, value), value)
        assert same(round_trip(list[Everything], [value]), [value])

    def test_recursive_dataclass_round_trips(self) -> None:
        """A dataclass whose fields refer back to itself compiles and round-trips."""
        tree = Node(1, [Node(2), Node(3, [Node(4)])])
        assert same(round_trip(Node, tree), tree)

    def test_containers_round_trip(self) -> None:
        """list, dict, tuple, set, frozenset and bare list/dict keep their shape."""
        cases: list[tuple[object, Any]] = [
            (list[int], []),
            (list[list[int | None]], [[1, None], [], [2**60]]),
            (dict[str, list[Point]], {"a": [Point(1, 2)], "": []}),
            (tuple[int, ...], (1, 2, 3)),
            (set[str], {"b", "a", "ç"}),
            (frozenset[int], frozenset({3, 1})),
            (list, [1, "a", None, [1.5, -0.0, math.inf], {"k": {"n": None}}]),
            (dict, {"a": [], "b": {"c": "ü"}, "": 0}),
            (list[Any], [{"x": 1}]),
            (list[int] | None, [1]),
            (Point, Point(-1, 2**40)),
        ]
        for tp, value in cases:
            assert same(round_trip(tp, value), value), tp

    def test_set_encoding_does_not_depend_on_insertion_order(self) -> None:
        """Equal sets give equal bytes, so comparing stored forms is meaningful."""
        c = codec(set[str])
        words = [f"w{i}" for i in range(50)]
        assert c.encode(set(words)) == c.encode(set(reversed(words)))

    def test_dataclass_decoding_uses_defaults_and_ignores_unknown_keys(self) -> None:
        """Missing defaulted fields take their defaults; keys of removed fields are ignored."""
        c = codec(WithDefaults)
        back = c.decode(b'{"a":1,"gone":true}')
        assert back == WithDefaults(1) and back.d == 0
        full = WithDefaults(2, "x", [3])
        full.d = 9
        assert same(c.decode(c.encode(full)), full)

    def test_annotated_and_newtype_are_unwrapped(self) -> None:
        """Markers and NewType change nothing about storage."""
        assert round_trip(list[Annotated[UserId, "marker"]], [UserId(5)]) == [5]
        assert codec(Annotated[int | None, "x"]).nullable


class TestCodecFacts:
    @pytest.mark.parametrize(
        ("tp", "expected", "nullable", "mutable", "sortable"),
        [
            (int, "int", False, False, True),
            (Optional[int], "Optional[int]", True, False, True),
            (datetime | None, "Optional[datetime]", True, False, True),
            (date, "date", False, False, True),
            (Decimal, "Decimal", False, False, True),
            (bool, "bool", False, False, True),
            (float, "float", False, False, True),
            (str, "str", False, False, False),
            (bytes, "bytes", False, False, False),
            (time, "time", False, False, False),
            (Color, "Color", False, False, False),
            (list[int], "list[int]", False, True, False),
            (dict[str, int | None], "dict[str, Optional[int]]", False, True, False),
            (list, "list", False, True, False),
            (Score, "Score", False, True, False),
            (Point, "Point", False, False, False),
            (tuple[int, ...], "tuple[int, ...]", False, False, False),
        ],
    )
    def test_flags_and_names(
        self, tp: object, expected: str, nullable: bool, mutable: bool, sortable: bool
    ) -> None:
        """Each codec reports its type name, nullability, mutability and sortability."""
        c = codec(tp)
        assert (c.expected, c.nullable, c.mutable, c.sortable) == (
            expected,
            nullable,
            mutable,
            sortable,
        )


class TestValidation:
    @pytest.mark.parametrize(
        ("tp", "value", "expected", "actual"),
        [
            (int, "1", "int", "str"),
            (int, True, "int", "bool"),
            (int, 1.0, "int", "float"),
            (float, False, "float", "bool"),
            (float, "1.0", "float", "str"),
            (str, b"x", "str", "bytes"),
            (bytes, "x", "bytes", "str"),
            (bool, 1, "bool", "int"),
            (date, datetime(2020, 1, 1), "date", "datetime"),
            (datetime, date(2020, 1, 1), "datetime", "date"),
            (time, datetime(2020, 1, 1), "time", "datetime"),
            (timedelta, 5, "timedelta", "int"),
            (Decimal, 1.5, "Decimal", "float"),
            (uuid.UUID, "12345678-1234-5678-1234-567812345678", "UUID", "str"),
            (Color, 1, "Color", "int"),
            (Level, 1, "Level", "int"),
            (int | None, "x", "Optional[int]", "str"),
            (list[int], (1, 2), "list[int]", "tuple"),
            (dict[str, int], [], "dict[str, int]", "list"),
            (Point, {"x": 1, "y": 2}, "Point", "dict"),
            (list, (1,), "list", "tuple"),
            (int, None, "int", "NoneType"),
            (list[int], None, "list[int]", "NoneType"),
        ],
    )
    def test_wrong_type_is_refused(
        self, tp: object, value: Any, expected: str, actual: str
    ) -> None:
        """A value of the wrong type names model, field, expected and actual type."""
        with pytest.raises(ValidationError) as info:
            codec(tp).validate(value, model="M", field="f")
        e = info.value
        assert (e.model, e.field, e.expected, e.actual) == ("M", "f", expected, actual)
        assert f"expected {expected}, got {actual}" in str(e) and "M.f" in str(e)

    def test_optional_accepts_none(self) -> None:
        """None passes an Optional field and is never encoded."""
        codec(Optional[int]).validate(None, model="M", field="f")
        codec(int | None).validate(None, model="M", field="f")

    def test_nested_error_names_the_element_and_its_path(self) -> None:
        """A bad element deep in a container is reported with its own types and path."""
        value = [Score("a", 1), Score("b", 2), Score("c", "3")]
        with pytest.raises(ValidationError) as info:
            codec(list[Score]).validate(value, model="M", field="f")
        e = info.value
        assert (e.expected, e.actual, e.detail) == ("int", "str", "at [2].score")
        with pytest.raises(ValidationError) as info:
            codec(dict[str, list[int | None]]).validate({"k": [1, "x"]}, model="M", field="f")
        assert info.value.detail == "at ['k'][1]"

    @pytest.mark.parametrize(
        ("tp", "value", "reason"),
        [
            (str, "a\udc80", "surrogate"),
            (list[str], ["ok", "\ud800"], "surrogate"),
            (dict[str, int], {1: 1}, "keys"),
            (dict[str, int], {"\udc80": 1}, "surrogate"),
            (dict, {1: 1}, "keys"),
            (list, [1, (2,)], "[1]"),
            (list, [Level.LOW], "[0]"),
            (list, ["\udc80"], "surrogate"),
            (float, 10**400, "too large"),
            (list[int], [10**5000], "digits"),
            (Perm, Perm(0) | Perm.R, None),
        ],
    )
    def test_unstorable_values_are_refused(self, tp: object, value: Any, reason: str) -> None:
        """Values that could not be written back exactly are refused before anything is sent."""
        c = codec(tp)
        if reason is None:
            c.validate(value, model="M", field="f")
            return
        with pytest.raises(ValidationError) as info:
            c.validate(value, model="M", field="f")
        assert reason in (info.value.detail or "")

    def test_self_containing_list_is_refused_not_crashing(self) -> None:
        """A list that contains itself is a ValidationError, not a RecursionError."""
        value: list[Any] = []
        value.append(value)
        with pytest.raises(ValidationError):
            codec(list).validate(value, model="M", field="f")

    def test_unset_dataclass_attribute_is_refused(self) -> None:
        """A nested dataclass missing an attribute is refused with its path."""

        @dataclass
        class Later:
            n: int = field(init=False)

        with pytest.raises(ValidationError) as info:
            codec(Later).validate(Later(), model="M", field="f")
        assert info.value.detail == "at .n: attribute not set"


class TestMapping:
    @pytest.mark.parametrize(
        ("tp", "named"),
        [
            (complex, "complex"),
            (Union[int, str], "Union"),
            (int | str, "int | str"),
            (dict[int, str], "dict[int, str]"),
            (tuple[int, str], "tuple[int, str]"),
            (Any, "Any"),
            (type(None), "NoneType"),
            (list[complex], "complex"),
            (set, "set"),
            (typing.Callable[[], int], "Callable"),
        ],
    )
    def test_unsupported_type_is_a_mapping_error(self, tp: object, named: str) -> None:
        """An annotation no codec supports fails at compile time, naming type and field."""
        with pytest.raises(MappingError) as info:
            codec(tp)
        assert (info.value.model, info.value.field) == ("M", "f")
        assert named in str(info.value) and "M.f" in str(info.value)

    def test_unsupported_type_inside_a_nested_dataclass_names_its_field(self) -> None:
        """The error points at the nested dataclass field that cannot be stored."""

        @dataclass
        class Bad:
            z: complex

        with pytest.raises(MappingError, match=r"Bad\.z"):
            codec(list[Bad])


class TestScores:
    def test_numbers_score_as_themselves(self) -> None:
        """ints, floats, bools and Decimals score as their float value."""
        assert codec(int).to_score(-5) == -5.0
        assert codec(int).to_score(2**53) == 2.0**53
        assert codec(float).to_score(-0.0) == 0.0
        assert codec(float).to_score(math.inf) == math.inf
        assert codec(float).to_score(2) == 2.0
        assert codec(bool).to_score(True) == 1.0
        assert codec(Decimal).to_score(Decimal("1.25")) == 1.25

    @pytest.mark.parametrize(
        ("tp", "value"),
        [
            (int, 2**53 + 1),
            (int, -(2**53) - 1),
            (float, math.nan),
            (Decimal, Decimal("NaN")),
            (Decimal, Decimal("sNaN")),
            (int, "1"),
            (str, "a"),
            (list[int], [1]),
        ],
    )
    def test_unscorable_values_are_refused(self, tp: object, value: Any) -> None:
        """Values with no exact, ordered score raise ValidationError without a location."""
        with pytest.raises(ValidationError) as info:
            codec(tp).to_score(value)
        assert info.value.model is None and info.value.field is None

    def test_datetimes_score_as_utc_seconds_and_keep_order(self) -> None:
        """Aware datetimes score by instant, naive ones as UTC; order is preserved."""
        c = codec(datetime)
        assert c.to_score(datetime(1970, 1, 1)) == 0.0
        assert c.to_score(datetime(1970, 1, 1, 5, 30, tzinfo=IST)) == 0.0
        assert c.to_score(datetime(1970, 1, 1, 0, 0, 1, 500000)) == 1.5
        moments = [datetime(2024, 1, 1) + timedelta(microseconds=i) for i in range(0, 50, 7)]
        moments += [datetime.min, datetime.max, datetime(1969, 12, 31, 23, 59, 59, 999999)]
        moments.sort()
        scores = [c.to_score(m) for m in moments]
        assert scores == sorted(scores) and len(set(scores[:-1])) == len(scores) - 1

    def test_dates_score_as_days_since_1970(self) -> None:
        """A date scores as a whole number of days."""
        assert codec(date).to_score(date(1970, 1, 2)) == 1.0
        assert codec(date).to_score(date(1969, 12, 31)) == -1.0


class TestCopy:
    def test_mutable_values_are_copied_deeply(self) -> None:
        """Changing the original in place leaves the copy untouched."""
        nested = {"a": [[1], [2]]}
        c = codec(dict[str, list[list[int]]])
        snapshot = c.copy_value(nested)
        nested["a"][0].append(9)
        assert snapshot == {"a": [[1], [2]]}
        tree = Node(1, [Node(2)])
        copied = codec(Node).copy_value(tree)
        tree.children[0].children.append(Node(3))
        assert copied == Node(1, [Node(2)])
        plain = [{"k": [1]}]
        plain_copy = codec(list).copy_value(plain)
        plain[0]["k"].append(2)
        assert plain_copy == [{"k": [1]}]

    def test_immutable_values_are_returned_as_is(self) -> None:
        """Immutable values need no copy; None stays None."""
        text = "x" * 10
        assert codec(str).copy_value(text) is text
        assert codec(list[int] | None).copy_value(None) is None
        point = Point(1, 2)
        assert codec(Point).copy_value(point) is point

    def test_bytearray_snapshot_does_not_follow_changes(self) -> None:
        """A bytearray is snapshotted as bytes, so in-place changes show up as changes."""
        value = bytearray(b"ab")
        snapshot = codec(bytes).copy_value(value)
        value[0] = 0
        assert snapshot == b"ab"


class TestDecodeErrors:
    @pytest.mark.parametrize(
        ("tp", "raw", "detail"),
        [
            (int, b" 1", "decimal integer"),
            (int, b"1_000", "decimal integer"),
            (int, b"", "decimal integer"),
            (int, b"1.0", "decimal integer"),
            (bool, b"true", None),
            (float, b"one", None),
            (Decimal, b"1_0", "decimal number"),
            (Decimal, "１".encode(), "decimal number"),
            (datetime, b"2020-13-01", None),
            (datetime, b"2020-01-01T00:00+01:00+01:00", None),
            (datetime, b"2020-01-01T00:00+01:00+00:00:00.000001", "two UTC offsets"),
            (datetime, b"2020-01-01T00:00+24:00", None),
            (date, b"yesterday", None),
            (time, b"25:00", None),
            (timedelta, b"9" * 30, None),
            (uuid.UUID, b"not-a-uuid", None),
            (Color, b"PURPLE", None),
            (Perm, b"R|Q", None),
            (str, b"\xff", "utf-8"),
            (list[int], b"[1,", "invalid JSON"),
            (list[int], b'["a"]', "at [0]"),
            (list[int], b"[" * 100_000, None),
            (list[int], b"[" + b"1" * 5000 + b"]", None),
            (dict[str, int], b"[]", "got JSON list"),
            (list[Score], b'[{"name":"a"}]', "missing"),
            (list[Score], b'[{"name":"a","score":true}]', "at [0].score"),
            (Point, b'{"x":1,"y":"2"}', "at .y"),
            (list[bytes], b'["!!"]', "base64"),
            (list[datetime], b'["x"]', "datetime"),
            (set[str], b"[[]]", None),
        ],
    )
    def test_bad_stored_bytes_raise_decode_error(
        self, tp: object, raw: bytes, detail: str | None
    ) -> None:
        """Corrupt or foreign bytes give DecodeError carrying the raw bytes and the type."""
        c = codec(tp)
        with pytest.raises(DecodeError) as info:
            c.decode(raw)
        assert info.value.raw == raw and info.value.expected == c.expected
        if detail is not None:
            assert detail in (info.value.detail or "")

    def test_dataclass_whose_init_refuses_the_data_gives_decode_error(self) -> None:
        """An exception from the class's own __post_init__ becomes a DecodeError."""

        @dataclass
        class Positive:
            n: int

            def __post_init__(self) -> None:
                if self.n < 0:
                    raise ValueError("negative")

        with pytest.raises(DecodeError, match="negative"):
            codec(Positive).decode(b'{"n":-1}')


FUZZ_TYPES: list[object] = [
    str,
    int,
    bool,
    float,
    Decimal,
    datetime,
    date,
    time,
    timedelta,
    uuid.UUID,
    Color,
    Perm,
    bytes,
    list[int],
    dict[str, float | None],
    list,
    Everything,
    Node,
    set[datetime],
]
FUZZ_CODECS = [codec(tp) for tp in FUZZ_TYPES]

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
# Valid stored forms, to be cut and spliced: random bytes alone rarely get past a parser.
FUZZ_SEEDS = sorted(
    {codec(tp).encode(value) for tp, value in SCALARS}
    | {codec(list[tp]).encode([value]) for tp, value in SCALARS}  # type: ignore[valid-type]
    | {
        b'{"s":"x","i":1,"scores":[{"name":"a","score":2}],"anything":[{"k":null}]}',
        b'{"value":1,"children":[{"value":2,"children":[]}]}',
        b'{"k":NaN,"j":-Infinity,"l":-0.0,"m":1e999}',
    }
)


def _splice(parts: tuple[bytes, int, int, bytes]) -> bytes:
    seed, at, cut, junk = parts
    return seed[:at] + junk + seed[at + cut :]


_fuzz_bytes = st.one_of(
    st.binary(max_size=48),
    st.tuples(
        st.sampled_from(FUZZ_SEEDS), st.integers(0, 80), st.integers(0, 3), st.binary(max_size=3)
    ).map(_splice),
)


@settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(raw=_fuzz_bytes)
def test_decode_raises_only_decode_error(raw: bytes) -> None:
    """Whatever the bytes, every codec's decode returns a value or raises DecodeError."""
    for c in FUZZ_CODECS:
        try:
            c.decode(raw)
        except DecodeError:
            pass


_fixed_zones = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23)),
)


def _first_lone_surrogate(value: Any, path: str = "") -> tuple[str, int] | None:
    """Where the first lone surrogate of a value is: (path like `[1]['k']`, index in its
    string), looking at dict keys before their values; None when there is none."""
    if isinstance(value, str):
        for i, ch in enumerate(value):
            if 0xD800 <= ord(ch) <= 0xDFFF:
                return path, i
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _first_lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    if isinstance(value, dict):
        for k, v in value.items():
            found = _first_lone_surrogate(k, f"{path}[{k!r}]")
            if found is None:
                found = _first_lone_surrogate(v, f"{path}[{k!r}]")
            if found is not None:
                return found
    return None


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.tuples(st.just(float), st.floats()),
        st.tuples(st.just(int), st.integers()),
        st.tuples(st.just(str), st.text()),
        st.tuples(st.just(bytes), st.binary()),
        st.tuples(st.just(Decimal), st.decimals()),
        st.tuples(st.just(datetime), st.datetimes(timezones=st.none() | _fixed_zones)),
        st.tuples(st.just(time), st.times(timezones=st.none() | _fixed_zones)),
        st.tuples(st.just(timedelta), st.timedeltas()),
        st.tuples(st.just(list), st.lists(_json_values, max_size=3)),
    )
)
def test_generated_values_round_trip(case: tuple[object, Any]) -> None:
    """Generated values of every scalar kind read back exactly, alone and inside JSON."""
    tp, value = case
    bad = _first_lone_surrogate(value)
    try:
        codec(tp).validate(value, model="M", field="f")
    except ValidationError as err:
        # Only lone surrogates cannot be stored, and the error says where the first one is.
        assert bad is not None, f"{value!r} refused: {err}"
        path, index = bad
        where = f"lone surrogate at index {index}"
        assert (err.model, err.field, err.expected, err.actual) == ("M", "f", "str", "str")
        assert err.detail == (f"at {path}: {where}" if path else where), err.detail
        return
    assert bad is None, f"{value!r} holds a lone surrogate, yet was accepted"
    assert same(round_trip(tp, value), value)
    if tp is not list:
        assert same(round_trip(list[tp], [value]), [value])  # type: ignore[valid-type]
