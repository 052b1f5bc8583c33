"""Tests for `redmap.orm.keys`: escaping is injective and keys cannot escape their namespace."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from redmap.orm import keys

HOSTILE = st.one_of(
    st.text(),
    st.text(alphabet=":{}*?[]\\ \x00#%", max_size=20),
    st.text(min_size=1000, max_size=1100),
)


@settings(max_examples=2000, deadline=None)
@given(HOSTILE)
def test_escape_round_trips_and_is_safe(value: str) -> None:
    """escape/unescape invert each other; escaped text holds no special character."""
    raw = value.encode("utf-8", "surrogatepass")
    seg = keys.escape(raw)
    assert keys.unescape(seg) == raw
    assert not set(seg) & set(":{}*?[]\\ \x00#")


@settings(max_examples=2000, deadline=None)
@given(HOSTILE, HOSTILE)
def test_escape_is_injective(a: str, b: str) -> None:
    """Two different ids never give the same key."""
    ra, rb = a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    if ra != rb:
        assert keys.escape(ra) != keys.escape(rb)


def test_object_keys_never_collide_with_bookkeeping() -> None:
    """No id can produce the counter, id-set or index keys of its model."""
    ks = keys.KeySpace("p", "m")
    for hostile in ["#seq", "#all", "#ix:x:y", "seq", ""]:
        key = ks.object(keys.escape(hostile.encode()))
        assert key not in {ks.seq(), ks.all(), ks.index("x", "y"), ks.sorted("x")}
        assert ks.is_object_key(key)
    assert not ks.is_object_key(ks.seq())


def test_unescape_rejects_foreign_text() -> None:
    """Segments escape() cannot produce are refused rather than guessed."""
    for bad in ["a:b", "%4", "%zz", "{x}"]:
        try:
            keys.unescape(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
