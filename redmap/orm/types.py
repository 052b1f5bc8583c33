"""Owns the conversion between field values and stored bytes: one codec per supported type.

Called by the mapper at configure time (`compile_codec`), by the unit of work and
persistence on flush (`validate`, `encode`, `to_score`), by loading (`decode`) and by
instance state for snapshots (`copy_value`).
"""

from __future__ import annotations

import abc
import base64
import copy
import dataclasses
import decimal
import enum
import functools
import json
import operator
import re
import types
import typing
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from redmap.exc import DecodeError, MappingError, ValidationError

__all__ = ["Codec", "compile_codec"]

_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1)
_EPOCH_UTC = _EPOCH.replace(tzinfo=timezone.utc)
_EPOCH_ORDINAL = _EPOCH.toordinal()
# A double holds every integer up to 2**53; beyond it two ints can share one score.
_MAX_EXACT_INT = 2**53
_INT_RE = re.compile(rb"-?[0-9]+")
# What `Decimal(str)` documents, without the whitespace, underscores and non-ASCII
# digits it also tolerates: stored text is `str(d)` or close to it. No two ways to
# split the digits (as "[0-9]+\.?[0-9]*" had): a failed match stays linear in length.
_DECIMAL_RE = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf(?:inity)?|s?nan[0-9]*)",
    re.ASCII | re.IGNORECASE,
)
# `fromisoformat` (3.11.7) drops an offset whose only non-zero part is microseconds,
# so an offset with microseconds is parsed here and attached by hand.
_MICRO_OFFSET_RE = re.compile(r"([+-])([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{6})")
# Past ~600 digits an int may hit `sys.get_int_max_str_digits` (640 at the lowest).
_JSON_INT_CHECK_BITS = 2000
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True)


class _PathError(Exception):
    """Raised inside a codec tree; `path` grows while unwinding so the top can say where."""

    path: list[str]


class _InvalidError(_PathError):
    """A value that does not fit; becomes a ValidationError at the top."""

    def __init__(self, expected: str, actual: str, reason: str | None = None) -> None:
        self.expected, self.actual, self.reason, self.path = expected, actual, reason, []


class _BadJsonError(_PathError):
    """A part of a stored JSON document that does not decode; becomes a DecodeError."""

    def __init__(self, detail: str) -> None:
        self.detail, self.path = detail, []


class _UnsupportedError(Exception):
    """An annotation no codec exists for; `compile_codec` turns it into a MappingError."""


def _each(fn: Callable[[Any], Any], pairs: Iterable[tuple[Any, Any]], at: str = "[{!r}]") -> Any:
    """`fn` over the items of (key, item) pairs; an error's path gains the item's key."""
    out = []
    for key, item in pairs:
        try:
            out.append(fn(item))
        except _PathError as e:
            e.path.append(at.format(key))
            raise
    return out


def _where(path: list[str], reason: str | None) -> str | None:
    if not path:
        return reason
    at = "at " + "".join(reversed(path))
    return f"{at}: {reason}" if reason else at


class Codec(abc.ABC):
    """Converts one field's values to and from their stored bytes.

    A codec is compiled once per field and shared by every value, so it knows its type
    and checks it with one `isinstance`. `encode` trusts that `validate` ran; `decode`
    trusts nothing and raises only `DecodeError`, whatever the bytes. None is never
    encoded: the caller stores it as an absent hash field. Every codec also has a JSON
    form (`_to_json`/`_from_json`) so it can sit inside a list, dict or dataclass.
    Codecs are shared between fields: treat them as read-only.
    """

    expected: str
    nullable: bool = False
    mutable: bool = False
    sortable: bool = False
    _plain: bool = False  # `_to_json` is the identity: containers hand values to json as-is
    _score: Callable[[Any], float] | None = None

    def __init__(self, name: str) -> None:
        self.expected = name
        self._name = name  # without Optional[...]: what errors inside containers report

    def validate(self, value: Any, *, model: str | None, field: str | None) -> None:
        """Raise `ValidationError` unless `value` can be stored in this field.

        For a bad element inside a container, `expected`/`actual` describe that element
        and `detail` gives its path, e.g. "at [2].score".
        """
        if value is None and self.nullable:
            return
        expected, actual, detail = self.expected, type(value).__name__, None
        try:
            self._check(value)
            return
        except _InvalidError as e:
            expected = e.expected if e.path else expected
            actual, detail = e.actual, _where(e.path, e.reason)
        except RecursionError:
            detail = "nested too deeply, or contains itself"
        raise ValidationError(
            model=model, field=field, expected=expected, actual=actual, detail=detail
        )

    def encode_valid(self, value: Any, *, model: str | None, field: str | None) -> bytes | None:
        """`validate` then `encode` (None for None): the flush's call for every field it
        writes. Codecs with a cheap check override it with a fast path."""
        self.validate(value, model=model, field=field)
        return None if value is None else self.encode(value)

    @abc.abstractmethod
    def encode(self, value: Any) -> bytes:
        """The stored form of a validated, non-None value."""

    @abc.abstractmethod
    def decode(self, raw: bytes) -> Any:
        """The value stored as `raw`; `DecodeError` for anything else, never another error."""

    def to_score(self, value: Any) -> float:
        """The sorted-index score of `value`, for codecs with `sortable` set.

        Refused (`ValidationError` with no model/field) for nan, ints beyond ±2**53 and
        unsortable types. A Decimal scores as its nearest float (±inf past 1.8e308), so
        Decimals closer than a double can tell apart share a score; datetimes score as
        seconds since 1970 UTC (naive ones counted as UTC), dates as days since 1970-01-01.
        """
        actual = type(value).__name__
        if self._score is None:
            reason = f"{self._name} values cannot be kept in a sorted index"
            raise ValidationError(
                model=None, field=None, expected=self.expected, actual=actual, detail=reason
            )
        try:
            self._check(value)
            return self._score(value)
        except _InvalidError as e:
            actual, reason = e.actual, e.reason or ""
        except ValueError as e:
            reason = str(e)
        raise ValidationError(
            model=None, field=None, expected=self.expected, actual=actual, detail=reason
        )

    def copy_value(self, value: Any) -> Any:
        """A copy that later in-place changes to `value` cannot reach (for snapshots)."""
        if value is None or not self.mutable:
            return value
        return self._copy(value)

    def _copy(self, value: Any) -> Any:
        return value

    @abc.abstractmethod
    def _check(self, value: Any) -> None: ...

    @abc.abstractmethod
    def _to_json(self, value: Any) -> Any: ...

    @abc.abstractmethod
    def _from_json(self, obj: Any) -> Any: ...

    def _invalid(self, value: object, reason: str | None = None) -> _InvalidError:
        return _InvalidError(self._name, type(value).__name__, reason)

    def _bad_json(self, obj: object) -> _BadJsonError:
        return _BadJsonError(f"expected {self._name}, got JSON {type(obj).__name__}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.expected}>"


# --- scalars ---------------------------------------------------------------------------


class _Scalar(Codec):
    """A scalar type, described by a handful of functions (see `_SCALARS`).

    `json_types` are the JSON types its `_to_json` form may come back as; `dump`/`load`
    convert to and from that form (None: the value is its own JSON form).
    """

    def __init__(
        self,
        name: str,
        types: type | tuple[type, ...],
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        json_types: tuple[type, ...] = (str,),
        dump: Callable[[Any], Any] | None = None,
        load: Callable[[Any], Any] | None = None,
        *,
        score: Callable[[Any], float] | None = None,
        reject: tuple[type, ...] = (),
        extra: Callable[[Any], str | None] | None = None,
    ) -> None:
        super().__init__(name)
        self._types, self._reject, self._extra = types, reject, extra
        self._encode, self._decode = encode, decode
        self._json_types, self._dump, self._load = json_types, dump, load
        self._plain, self._score, self.sortable = dump is None, score, score is not None

    def _check(self, value: Any) -> None:
        if not isinstance(value, self._types) or isinstance(value, self._reject):
            raise self._invalid(value)
        if self._extra is not None:
            reason = self._extra(value)
            if reason is not None:
                raise self._invalid(value, reason)

    def encode(self, value: Any) -> bytes:
        return self._encode(value)

    def encode_valid(self, value: Any, *, model: str | None, field: str | None) -> bytes | None:
        # The check of `_check` inline (a flush of 10,000 objects makes 20,000 of these
        # calls); anything it refuses goes through `validate` for the full error.
        if value is None:
            if self.nullable:
                return None
        elif isinstance(value, self._types) and not isinstance(value, self._reject):
            extra = self._extra
            if extra is None or extra(value) is None:
                return self.encode(value)
        self.validate(value, model=model, field=field)
        return self.encode(value)

    def decode(self, raw: bytes) -> Any:
        try:
            return self._decode(raw)
        except Exception as e:  # stdlib parsers do not promise ValueError only
            detail = f"{type(e).__name__}: {e}"
        raise DecodeError(expected=self.expected, raw=raw, detail=detail)

    def _to_json(self, value: Any) -> Any:
        return value if self._dump is None else self._dump(value)

    def _from_json(self, obj: Any) -> Any:
        if type(obj) not in self._json_types:
            raise self._bad_json(obj)
        if self._load is None:
            return obj
        try:
            return self._load(obj)
        except Exception as e:
            raise _BadJsonError(f"not a valid {self._name}: {type(e).__name__}: {e}") from None


class _BytesScalar(_Scalar):
    def copy_value(self, value: Any) -> Any:
        # Not `mutable` (that would bar indexes), yet a bytearray can change under a snapshot.
        return bytes(value) if isinstance(value, bytearray) else value


def _check_text(value: str) -> str | None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"lone surrogate at index {e.start}"
    return None


def _check_json_int(value: int) -> str | None:
    if value.bit_length() > _JSON_INT_CHECK_BITS:
        try:
            int.__repr__(value)
        except ValueError:
            return "too many digits for an int inside JSON"
    return None


def _check_float(value: float) -> str | None:
    try:
        float(value)
    except OverflowError:
        return "int too large for a float"
    return None


def _encode_int(value: int) -> bytes:
    try:
        return b"%d" % value  # right for IntEnum too, whose str() is its name on 3.10
    except ValueError:  # beyond sys.get_int_max_str_digits; Decimal has no such limit
        return str(decimal.Decimal(value)).encode("ascii")


def _decode_int(raw: bytes) -> int:
    if not raw.isdigit() and _INT_RE.fullmatch(raw) is None:
        raise ValueError("not a decimal integer")
    try:
        return int(raw)
    except ValueError:
        return int(decimal.Decimal(raw.decode("ascii")))


def _score_int(value: int) -> float:
    if -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT:
        return float(value)
    raise ValueError("integers beyond ±2**53 have no exact score")


def _score_float(value: Any) -> float:
    score = float(value)  # ValueError for a signalling Decimal NaN
    if score != score:
        raise ValueError("NaN has no place in a sorted index")
    return score


def _load_decimal(text: str) -> decimal.Decimal:
    if _DECIMAL_RE.fullmatch(text) is None:
        raise ValueError("not a decimal number")
    return decimal.Decimal(text)


def _iso_loader(cls: type[datetime] | type[time]) -> Callable[[str], Any]:
    """`cls.fromisoformat`, except for offsets with microseconds (see `_MICRO_OFFSET_RE`)."""

    def load(text: str) -> Any:
        m = _MICRO_OFFSET_RE.fullmatch(text, len(text) - 16) if len(text) > 16 else None
        if m is None:
            return cls.fromisoformat(text)
        value = cls.fromisoformat(text[:-16])
        if value.tzinfo is not None:
            raise ValueError("two UTC offsets")
        hours, minutes, seconds, micros = map(int, m.groups()[1:])
        offset = timedelta(hours=hours, minutes=minutes, seconds=seconds, microseconds=micros)
        return value.replace(tzinfo=timezone(-offset if m[1] == "-" else offset))

    return load


def _score_datetime(value: datetime) -> float:
    # Correctly rounded, so order is kept; microseconds stay apart within about 1700-2240.
    epoch = _EPOCH if value.utcoffset() is None else _EPOCH_UTC
    return ((value - epoch) // _MICROSECOND) / 1_000_000


def _score_date(value: date) -> float:
    return float(value.toordinal() - _EPOCH_ORDINAL)


def _derived(
    name: str,
    types: type,
    dump: Callable[[Any], Any],
    load: Callable[[Any], Any],
    form: _Scalar,
    **kw: Any,
) -> _Scalar:
    """A scalar stored in the form of another (`form`), in a hash field and inside JSON alike."""
    encode, decode = form._encode, form._decode

    def encode_derived(value: Any) -> bytes:
        return encode(dump(value))

    def decode_derived(raw: bytes) -> Any:
        return load(decode(raw))

    return _Scalar(name, types, encode_derived, decode_derived, form._json_types, dump, load, **kw)


def _encode_float(value: float) -> bytes:
    # `repr` reads back bit for bit (-0.0, nan, inf); float() drops a subclass's own repr.
    return repr(float(value)).encode("ascii")


def _dump_bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _dump_timedelta(value: timedelta) -> int:
    return value // _MICROSECOND  # whole microseconds: exactly what a timedelta holds


def _load_timedelta(micros: int) -> timedelta:
    return timedelta(microseconds=micros)


_NUMBER = (float, int)
_NO_BOOL = (bool,)
_UTF8 = _Scalar(
    "str", str, operator.methodcaller("encode", "utf-8"), operator.methodcaller("decode", "utf-8")
)
_INT = _Scalar("int", int, _encode_int, _decode_int, (int,), score=_score_int, reject=_NO_BOOL)
# One line per type: name, accepted types, encode, decode, JSON types, to/from JSON, options.
# fmt: off
_SCALARS: dict[object, _Scalar] = {
    str: _Scalar("str", str, _UTF8._encode, _UTF8._decode, extra=_check_text),
    # Any size in a hash field; bool is refused although it subclasses int.
    int: _INT,
    bool: _Scalar("bool", bool, {True: b"1", False: b"0"}.__getitem__,
                  {b"1": True, b"0": False}.__getitem__, (bool,), score=float),
    # An int is accepted and stored as a float, so it reads back as a float.
    float: _Scalar("float", _NUMBER, _encode_float, float, _NUMBER, float, float,
                   score=_score_float, reject=_NO_BOOL, extra=_check_float),
    # Raw bytes in a hash field, base64 inside JSON; a bytearray reads back as bytes.
    bytes: _BytesScalar("bytes", (bytes, bytearray), bytes, bytes, (str,), _dump_bytes,
                        functools.partial(base64.b64decode, validate=True)),
    # `str(d)` keeps digits, exponent and sign exactly (1.10, -0, 1E+3, NaN).
    decimal.Decimal: _derived("Decimal", decimal.Decimal, decimal.Decimal.__str__, _load_decimal,
                              _UTF8, score=_score_float),
    # ISO 8601; an aware value reads back with a fixed-offset zone equal to its offset
    # (a ZoneInfo's name is not kept: same instant, same offset).
    datetime: _derived("datetime", datetime, datetime.isoformat, _iso_loader(datetime), _UTF8,
                       score=_score_datetime),
    # `datetime` subclasses `date`, so a datetime is refused explicitly.
    date: _derived("date", date, date.isoformat, date.fromisoformat, _UTF8,
                   score=_score_date, reject=(datetime,)),
    time: _derived("time", time, time.isoformat, _iso_loader(time), _UTF8),
    uuid.UUID: _derived("UUID", uuid.UUID, str, uuid.UUID, _UTF8),
    timedelta: _derived("timedelta", timedelta, _dump_timedelta, _load_timedelta, _INT),
}
# fmt: on
_JSON_INT = _Scalar(
    "int", int, _encode_int, _decode_int, (int,), reject=_NO_BOOL, extra=_check_json_int
)


def _enum_codec(cls: type[enum.Enum]) -> _Scalar:
    """Members are stored by name, so renumbering or reordering them keeps data valid.

    A combination of `Flag` members is stored as member names joined by "|" ("" for none).
    """
    by_name: dict[str, Any] = dict(cls.__members__)
    if not issubclass(cls, enum.Flag):
        return _derived(
            cls.__name__, cls, operator.attrgetter("_name_"), by_name.__getitem__, _UTF8
        )
    bits = [m for m in dict.fromkeys(by_name.values()) if m._value_ & (m._value_ - 1) == 0]

    def dump(value: Any) -> str:
        name: str = value._name_
        if by_name.get(name) is value:
            return name
        parts = [m for m in bits if m._value_ and m._value_ & value._value_ == m._value_]
        if functools.reduce(operator.or_, (m._value_ for m in parts), 0) != value._value_:
            raise ValueError("flag bits without member names")
        return "|".join(m._name_ for m in parts)

    def load(text: str) -> Any:
        if text in by_name:
            return by_name[text]
        members = [by_name[part] for part in text.split("|")] if text else []
        return functools.reduce(operator.or_, members, cls(0))

    def extra(value: Any) -> str | None:
        try:
            dump(value)
        except ValueError as e:
            return str(e)
        return None

    return _derived(cls.__name__, cls, dump, load, _UTF8, extra=extra)


# --- JSON documents --------------------------------------------------------------------


class _JsonCodec(Codec):
    """A value stored as one compact UTF-8 JSON document, built by its codec tree."""

    mutable = True

    def encode(self, value: Any) -> bytes:
        return _ENCODER.encode(self._to_json(value)).encode("utf-8")

    def decode(self, raw: bytes) -> Any:
        try:
            return self._from_json(json.loads(raw.decode("utf-8")))
        except _BadJsonError as e:
            detail = _where(e.path, e.detail)
        except RecursionError:
            detail = "nested too deeply"
        except Exception as e:  # JSONDecodeError, bad UTF-8, int digit limit, ...
            detail = f"invalid JSON: {e}"
        raise DecodeError(expected=self.expected, raw=raw, detail=detail)


def _check_key(key: Any) -> None:
    if not isinstance(key, str):
        raise _InvalidError("str", type(key).__name__, "JSON object keys must be str")
    reason = _check_text(key)
    if reason is not None:
        raise _InvalidError("str", "str", reason)


def _check_plain(value: Any) -> None:
    """Accept exactly what JSON gives back unchanged: no tuples, no int or str subclasses."""
    kind, reason = type(value), None
    if kind is str:
        reason = _check_text(value)
    elif kind is int:
        reason = _check_json_int(value)
    elif isinstance(value, list):
        _each(_check_plain, enumerate(value))
    elif isinstance(value, dict):
        _each(_check_key, ((key, key) for key in value))
        _each(_check_plain, value.items())
    elif kind is not float and kind is not bool and value is not None:
        raise _InvalidError("JSON value", kind.__name__)
    if reason is not None:
        raise _InvalidError(kind.__name__, kind.__name__, reason)


def _copy_plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy_plain(item) for key, item in value.items()}
    return value


class _AnyCodec(_JsonCodec):
    """`Any` inside a container, and the items of bare `list`/`dict`: any plain JSON value."""

    _plain = True

    def _check(self, value: Any) -> None:
        _check_plain(value)

    def _to_json(self, value: Any) -> Any:
        return value

    def _from_json(self, obj: Any) -> Any:
        return obj

    def _copy(self, value: Any) -> Any:
        return _copy_plain(value)


_ANY = _AnyCodec("Any")


class _OptionalJsonCodec(_JsonCodec):
    """Optional[X] inside JSON, where None is null (at the top it is an absent field)."""

    def __init__(self, inner: Codec) -> None:
        super().__init__(f"Optional[{inner._name}]")
        self._inner = inner
        self.mutable, self._plain = inner.mutable, inner._plain

    def _check(self, value: Any) -> None:
        if value is not None:
            self._inner._check(value)

    def _to_json(self, value: Any) -> Any:
        return None if value is None else self._inner._to_json(value)

    def _from_json(self, obj: Any) -> Any:
        return None if obj is None else self._inner._from_json(obj)

    def _copy(self, value: Any) -> Any:
        return self._inner.copy_value(value)


class _SeqCodec(_JsonCodec):
    """list[X], tuple[X, ...], set[X] and frozenset[X] as a JSON array.

    Sets are written sorted by their elements' JSON, so equal sets give equal bytes.
    """

    def __init__(self, name: str, kind: type[Any], item: Codec) -> None:
        super().__init__(name)
        self._kind, self._item = kind, item
        self._is_set = kind is set or kind is frozenset
        self.mutable = kind is list or kind is set or item.mutable

    def _check(self, value: Any) -> None:
        if not isinstance(value, self._kind):
            raise self._invalid(value)
        _each(self._item._check, enumerate(value))

    def _to_json(self, value: Any) -> Any:
        if self._is_set:
            return sorted(map(self._item._to_json, value), key=_ENCODER.encode)
        return value if self._item._plain else list(map(self._item._to_json, value))

    def _from_json(self, obj: Any) -> Any:
        if type(obj) is not list:
            raise self._bad_json(obj)
        out = _each(self._item._from_json, enumerate(obj))
        if self._kind is list:
            return out
        try:
            return self._kind(out)
        except TypeError as e:  # unhashable elements for a set
            raise _BadJsonError(str(e)) from None

    def _copy(self, value: Any) -> Any:
        if self._item.mutable:
            return self._kind(map(self._item.copy_value, value))
        return self._kind(value)


class _DictCodec(_JsonCodec):
    """dict[str, X] as a JSON object."""

    def __init__(self, name: str, item: Codec) -> None:
        super().__init__(name)
        self._item = item

    def _check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise self._invalid(value)
        _each(_check_key, ((key, key) for key in value))
        _each(self._item._check, value.items())

    def _to_json(self, value: Any) -> Any:
        if self._item._plain:
            return value
        to_json = self._item._to_json
        return {key: to_json(item) for key, item in value.items()}

    def _from_json(self, obj: Any) -> Any:
        if type(obj) is not dict:
            raise self._bad_json(obj)
        return dict(zip(obj, _each(self._item._from_json, obj.items()), strict=True))

    def _copy(self, value: Any) -> Any:
        if self._item.mutable:
            copy_item = self._item.copy_value
            return {key: copy_item(item) for key, item in value.items()}
        return dict(value)


class _DataclassCodec(_JsonCodec):
    """A nested dataclass as a JSON object of its fields, by name.

    Decoding calls the class with its `init` fields (so `__post_init__` runs) and sets
    the others afterwards. Missing fields with defaults take them; unknown keys are
    ignored, so data written before a field was removed still loads.
    """

    def __init__(self, cls: type) -> None:
        super().__init__(cls.__name__)
        self._cls = cls
        self._fields: list[tuple[str, Codec, bool, bool]] = []  # name, codec, init, required

    def _check(self, value: Any) -> None:
        if not isinstance(value, self._cls):
            raise self._invalid(value)
        for name, codec, _, _ in self._fields:
            if not hasattr(value, name):
                error = _InvalidError(codec._name, "nothing", "attribute not set")
                error.path.append(f".{name}")
                raise error
            _each(codec._check, [(name, getattr(value, name))], ".{}")

    def _to_json(self, value: Any) -> Any:
        return {name: codec._to_json(getattr(value, name)) for name, codec, _, _ in self._fields}

    def _from_json(self, obj: Any) -> Any:
        if type(obj) is not dict:
            raise self._bad_json(obj)
        kwargs: dict[str, Any] = {}
        late: list[tuple[str, Any]] = []
        for name, codec, init, required in self._fields:
            if name not in obj:
                if required:
                    raise _BadJsonError(f"{self._name} field {name!r} is missing")
                continue
            [item] = _each(codec._from_json, [(name, obj[name])], ".{}")
            if init:
                kwargs[name] = item
            else:
                late.append((name, item))
        try:
            value = self._cls(**kwargs)
            for name, item in late:
                object.__setattr__(value, name, item)  # also right for frozen classes
        except Exception as e:  # the class's own __init__/__post_init__ may refuse the data
            raise _BadJsonError(f"{self._name}() raised {type(e).__name__}: {e}") from None
        return value

    def _copy(self, value: Any) -> Any:
        new = copy.copy(value)
        for name, codec, _, _ in self._fields:
            if codec.mutable:
                object.__setattr__(new, name, codec.copy_value(getattr(value, name)))
        return new


# --- compiling annotations -------------------------------------------------------------

_SEQUENCES = (list, tuple, set, frozenset)


def _show(tp: object) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _unwrap(tp: object) -> object:
    """Strip `Annotated` and `NewType` layers, which change nothing about storage."""
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif isinstance(tp, typing.NewType):
            tp = tp.__supertype__
        else:
            return tp


def _split_optional(tp: object) -> tuple[object, bool]:
    tp = _unwrap(tp)
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp, False
    rest = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if len(rest) != 1:
        raise _UnsupportedError(f"{_show(tp)}: unions other than Optional[X] are not supported")
    return _unwrap(rest[0]), True


def _compile(tp: object, in_json: bool, seen: dict[type, _DataclassCodec]) -> Codec:
    """The codec tree for `tp`; `seen` lets a recursive dataclass compile to a cycle."""
    tp, nullable = _split_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict or origin in _SEQUENCES:
        codec = _generic(tp, origin, args, seen)
    elif tp is Any and in_json:
        codec = _ANY
    elif tp is int and in_json:
        codec = _JSON_INT
    elif isinstance(tp, type) and tp in _SCALARS:
        codec = _SCALARS[tp]
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        codec = _enum_codec(tp)
    elif tp is list:
        codec = _SeqCodec("list", list, _ANY)
    elif tp is dict:
        codec = _DictCodec("dict", _ANY)
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        codec = seen.get(tp) or _dataclass(tp, seen)
    else:
        raise _UnsupportedError(f"{_show(tp)} is not a supported type")
    if not nullable:
        return codec
    if in_json:
        return _OptionalJsonCodec(codec)
    codec = copy.copy(codec)
    codec.nullable, codec.expected = True, f"Optional[{codec._name}]"
    return codec


def _generic(
    tp: object, origin: object, args: tuple[Any, ...], seen: dict[type, _DataclassCodec]
) -> Codec:
    if not args and (origin is list or origin is dict):
        return _compile(origin, True, seen)  # typing.List, typing.Dict
    if origin is dict:
        if _unwrap(args[0]) is not str:
            raise _UnsupportedError(f"{_show(tp)}: dict keys must be str (JSON object keys)")
        item = _compile(args[1], True, seen)
        return _DictCodec(f"dict[str, {item._name}]", item)
    assert isinstance(origin, type)
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise _UnsupportedError(f"{_show(tp)}: only tuple[X, ...] is supported")
        item = _compile(args[0], True, seen)
        return _SeqCodec(f"tuple[{item._name}, ...]", tuple, item)
    if len(args) != 1:
        raise _UnsupportedError(f"{_show(tp)} needs one element type")
    item = _compile(args[0], True, seen)
    return _SeqCodec(f"{origin.__name__}[{item._name}]", origin, item)


def _dataclass(cls: type, seen: dict[type, _DataclassCodec]) -> Codec:
    codec = seen[cls] = _DataclassCodec(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # NameError for an unresolvable forward reference, ...
        raise _UnsupportedError(f"cannot resolve the annotations of {_show(cls)}: {e}") from e
    for f in dataclasses.fields(cls):
        try:
            item = _compile(hints.get(f.name, f.type), True, seen)
        except _UnsupportedError as e:
            raise _UnsupportedError(f"in {_show(cls)}.{f.name}: {e}") from None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        codec._fields.append((f.name, item, f.init, required))
    frozen = getattr(cls, "__dataclass_params__").frozen  # noqa: B009
    codec.mutable = not frozen or any(item.mutable for _, item, _, _ in codec._fields)
    return codec


def increment_command(codec: Codec) -> str | None:
    """The Redis command that adds to a field of this codec in place (`HINCRBY` for int,
    `HINCRBYFLOAT` for float and Decimal, whose stored forms it reads and writes), or
    None when the type cannot be incremented."""
    if not isinstance(codec, _Scalar) or codec._types is bool:
        return None
    name = codec._name
    if name == "int":
        return "HINCRBY"
    if name in ("float", "Decimal"):
        return "HINCRBYFLOAT"
    return None


def compile_codec(tp: object, *, model: str, field: str) -> Codec:
    """The codec for a resolved field annotation; `MappingError` naming the type if none fits.

    Called once per field at configure time. `Optional[X]` gives X's codec with
    `nullable` set: None is stored as an absent hash field, never encoded.
    """
    try:
        return _compile(tp, False, {})
    except _UnsupportedError as e:
        raise MappingError(
            f"unsupported field type {_show(tp)} ({e})", model=model, field=field
        ) from None
