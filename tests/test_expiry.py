"""Issue 15: objects that expire (`ExpiresAt`, `__ttl__`), timestamps, the sweep.

Every test runs on a real server, on the sync driver, the asyncio driver and the
scripted flush (`driver` fixture). Time is a clock the test moves (`expiry.use_clock`),
except in the one real-time test, which waits about two seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import pytest
import redis

from redmap import (
    CreatedAt,
    ExpiresAt,
    ForeignKey,
    Indexed,
    PrimaryKey,
    Session,
    Sorted,
    Unique,
    UpdatedAt,
    inspect,
    registry,
    relationship,
    select,
)
from redmap.audit import audit
from redmap.cli import main as cli_main
from redmap.engine import Engine
from redmap.exc import IntegrityError, MappingError, StaleDataError, ValidationError
from redmap.orm import expiry
from tests._async_driver import make_engine
from tests._clock import T0, Clock

reg = registry(prefix="exp")


@reg.mapped
@dataclass
class Token:
    __ttl__ = timedelta(minutes=30)
    value: Annotated[str, Unique()]
    kind: Annotated[str, Indexed()] = "a"
    rank: Annotated[int, Sorted()] = 0
    expires: Annotated[datetime | None, ExpiresAt()] = None
    created: Annotated[datetime | None, CreatedAt()] = None
    updated: Annotated[datetime | None, UpdatedAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Cart:
    owner: str
    items: list[Item] = relationship(back_populates="cart")
    tags: list[Label] = relationship(secondary="cart_labels", back_populates="carts")
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Item:
    name: Annotated[str, Indexed()]
    cart_id: Annotated[int | None, ForeignKey("Cart")] = None
    cart: Cart | None = relationship(back_populates="items")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@reg.mapped
@dataclass
class Label:
    name: str
    carts: list[Cart] = relationship(secondary="cart_labels", back_populates="tags")
    expires: Annotated[datetime | None, ExpiresAt()] = None
    id: Annotated[int | None, PrimaryKey()] = None


@pytest.fixture
def eng(engine: Engine) -> Engine:
    return engine


def raw(engine: Engine) -> redis.Redis:
    client: redis.Redis = engine.dialect.client
    return client


def _tokens(engine: Engine, clock: Clock, n: int = 10) -> None:
    """Tokens 1..n with rank i-1; the odd ranks expire at T0 + 10 * rank seconds."""
    with Session(engine) as s:
        for i in range(n):
            exp = clock.at(10 * i) if i % 2 else None
            s.add(Token(value=f"v{i}", rank=i, kind="odd" if i % 2 else "even", expires=exp))
        s.commit()


@pytest.mark.usefixtures("driver")
class TestReads:
    def test_gone_for_every_read_before_any_sweep(self, eng: Engine, clock: Clock) -> None:
        _tokens(eng, clock)
        clock.now = T0 + 35  # ranks 1 and 3 expired, 5, 7, 9 alive
        with Session(eng) as s:
            assert s.get(Token, 2) is None  # rank 1
            assert s.get(Token, 3) is not None
            assert [t and t.rank for t in s.get_many(Token, [1, 2, 4, 6])] == [0, None, None, 5]
            assert s.count(select(Token)) == 8
            assert s.count(select(Token).where(Token.kind == "odd")) == 3
            assert s.count(select(Token).where(Token.rank < 4)) == 2
            ranks = [t.rank for t in s.scalars(select(Token).order_by(Token.rank))]
            assert ranks == [0, 2, 4, 5, 6, 7, 8, 9]
            page = s.scalars(select(Token).order_by(Token.rank).offset(1).limit(3)).all()
            assert [t.rank for t in page] == [2, 4, 5]
            desc = s.scalars(select(Token).order_by(Token.rank.desc()).offset(5).limit(5))
            assert [t.rank for t in desc] == [4, 2, 0]
            odd = s.scalars(select(Token).where(Token.kind == "odd").order_by(Token.rank))
            assert [t.rank for t in odd] == [5, 7, 9]
            ranged = s.scalars(select(Token).where(Token.rank.between(1, 6)).limit(2))
            assert [t.rank for t in ranged] == [2, 4]
            assert s.count(select(Token).limit(3).offset(6)) == 2
            # A lone range on the ordering field reads the sorted zset directly.
            up = select(Token).where(Token.rank >= 1).order_by(Token.rank).offset(1).limit(3)
            assert [t.rank for t in s.scalars(up)] == [4, 5, 6]
            down = select(Token).where(Token.rank <= 8).order_by(Token.rank.desc()).offset(2)
            assert [t.rank for t in s.scalars(down.limit(3))] == [6, 5, 4]
            assert [t.rank for t in s.scalars(down)] == [6, 5, 4, 2, 0]
            assert s.count(select(Token).where(Token.rank > 0)) == 7
            assert s.scalars(select(Token).where(Token.value == "v1")).all() == []

    def test_many_expired_beyond_the_window_guess(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            for i in range(60):
                s.add(Token(value=f"w{i}", rank=i, expires=clock.at(1) if i < 50 else None))
            s.commit()
        clock.now = T0 + 2
        with Session(eng) as s:
            ranks = [t.rank for t in s.scalars(select(Token).order_by(Token.rank).limit(4))]
            assert ranks == [50, 51, 52, 53]
            assert s.count(select(Token)) == 10
            last = s.scalars(select(Token).order_by(Token.rank.desc()).offset(8).limit(5))
            assert [t.rank for t in last] == [51, 50]

    def test_pages_with_a_large_backlog_and_a_lost_script_cache(
        self, eng: Engine, clock: Clock
    ) -> None:
        """More expired ids than the plain-read path takes (64), deep offsets, and a
        SCRIPT FLUSH (as after a restart): every page equals the reference."""
        with Session(eng) as s:
            for i in range(400):
                gone = i % 4 != 0  # 300 expired, 100 live
                s.add(Token(value=f"b{i}", rank=i, expires=clock.at(1) if gone else None))
            s.commit()
        clock.now = T0 + 2
        live = list(range(0, 400, 4))
        cases = [(0, 10, False), (5, 7, True), (90, 20, False), (30, None, True), (300, 5, False)]
        for n, (offset, limit, desc) in enumerate(cases):
            if n == 2:
                raw(eng).script_flush()
            order = Token.rank.desc() if desc else Token.rank
            stmt = select(Token).where(Token.rank >= 0).order_by(order).offset(offset)
            stmt = stmt.limit(limit)
            want = (live[::-1] if desc else live)[
                offset : None if limit is None else offset + limit
            ]
            with Session(eng) as s:
                assert [t.rank for t in s.scalars(stmt)] == want, (offset, limit, desc)
                no_cond = select(Token).order_by(order).offset(offset).limit(limit)
                assert [t.rank for t in s.scalars(no_cond)] == want
                assert s.count(select(Token).where(Token.rank >= 0)) == 100

    def test_several_order_by_terms(self, eng: Engine, clock: Clock) -> None:
        """Tie groups of the first term, sorted by the second: expired members left out."""
        with Session(eng) as s:
            for i in range(24):
                gone = i % 3 == 1
                s.add(Token(value=f"t{i:02d}", rank=i // 4, expires=clock.at(1) if gone else None))
            s.commit()
        clock.now = T0 + 2
        live = [(i // 4, f"t{i:02d}") for i in range(24) if i % 3 != 1]
        want = sorted(live, key=lambda rv: (rv[0], [-ord(ch) for ch in rv[1]]))
        with Session(eng) as s:
            for offset, limit in [(0, 5), (3, 4), (7, 20)]:
                stmt = (
                    select(Token)
                    .order_by(Token.rank, Token.value.desc())
                    .offset(offset)
                    .limit(limit)
                )
                got = [(t.rank, t.value) for t in s.scalars(stmt)]
                assert got == want[offset : offset + limit], (offset, limit)

    def test_object_in_the_session_expires(self, eng: Engine, clock: Clock) -> None:
        _tokens(eng, clock, 4)
        with Session(eng) as s:
            t = s.get(Token, 2)
            assert t is not None
            clock.now = T0 + 11
            assert s.get(Token, 2) is None
            assert s.get_many(Token, [2]) == [None]
            assert t not in s.scalars(select(Token)).all()

    def test_expiring_between_id_lookup_and_hash_fetch(self, eng: Engine, clock: Clock) -> None:
        _tokens(eng, clock, 4)  # rank 3 (id 4) expires at T0 + 30

        def at_trip(commands: Any) -> None:
            if any(c[0] == "HGETALL" for c in commands):
                clock.now = T0 + 31  # after the ids were read, before the hashes come

        clock.now = T0 + 29
        eng.add_listener(at_trip)
        try:
            with Session(eng) as s:
                rows = s.scalars(select(Token).order_by(Token.rank)).all()
        finally:
            eng.remove_listener(at_trip)
        assert [t.rank for t in rows] == [0, 2]  # rank 1 expired at T0+10, rank 3 at T0+30

    def test_relationship_lists_leave_expired_objects_out(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            cart = Cart(owner="ann")
            cart.items = [Item(name="a"), Item(name="b", expires=clock.at(5))]
            cart.tags = [Label(name="x", expires=clock.at(5)), Label(name="y")]
            s.add(cart)
            s.commit()
        clock.now = T0 + 6
        with Session(eng) as s:
            c = s.get(Cart, 1)
            assert c is not None
            s.refresh(c, ["items", "tags"])
            assert [i.name for i in c.items] == ["a"]
            assert [t.name for t in c.tags] == ["y"]
        assert eng.sweep(reg) == 2
        report = audit(raw(eng), reg)
        assert report.ok, report.mismatches + report.unexplained


@pytest.mark.usefixtures("driver")
class TestWrites:
    def test_ttl_timestamps_and_moving_the_expiry(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            t = Token(value="a")
            s.add(t)
            s.commit()
            assert t.created == t.updated == clock.at(0)
            assert t.expires == clock.at(1800)
        r = raw(eng)
        key = "{exp}:token:1"
        # Redis 6.2 has no PEXPIRETIME: the remaining time says when (its clock is real).
        want = int((T0 + 1800) * 1000) + expiry.MARGIN_MS - int(time.time() * 1000)
        assert abs(r.pttl(key) - want) < 5000
        clock.now = T0 + 5
        with Session(eng) as s:
            t2 = s.get(Token, 1)
            assert t2 is not None
            t2.expires = clock.at(3600)
            s.commit()
            assert t2.updated == clock.at(5) and t2.created == clock.at(0)
        assert r.zscore("{exp}:token:#dl", "1") == (T0 + 3600) * 1000
        clock.now = T0 + 2000
        with Session(eng) as s:
            t3 = s.get(Token, 1)
            assert t3 is not None  # moved: still alive
            t3.expires = None
            s.commit()
        assert r.ttl(key) == -1
        assert r.zscore("{exp}:token:#dl", "1") is None
        assert not r.exists("{exp}:token:#dv")
        clock.now = T0 + 10**6
        with Session(eng) as s:
            assert s.get(Token, 1) is not None  # cancelled: never expires
        assert audit(r, reg).ok

    def test_unchanged_object_keeps_updated_at(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            s.add(Token(value="a"))
            s.commit()
        clock.now = T0 + 7
        with Session(eng) as s:
            t = s.get(Token, 1)
            assert t is not None
            s.commit()  # nothing changed: nothing written
            assert t.updated == clock.at(0)
            t.kind = "b"
            s.commit()
            assert t.updated == clock.at(7)

    def test_increments_with_the_updated_at_stamp_are_never_stale(
        self, eng: Engine, clock: Clock
    ) -> None:
        """An atomic counter on a model with UpdatedAt (and ExpiresAt): two sessions that
        loaded the same version both commit (issue 14's "never stale"); the stamp is the
        last write's moment and the Sorted score follows Redis's value."""
        with Session(eng) as s:
            s.add(Token(value="a", rank=10))
            s.commit()
        with Session(eng) as s1, Session(eng) as s2:
            a, b = s1.get(Token, 1), s2.get(Token, 1)
            assert a is not None and b is not None
            clock.now = T0 + 3
            a.rank = Token.rank + 5
            s1.commit()
            clock.now = T0 + 4
            b.rank = Token.rank - 2
            s2.commit()  # loaded before s1's commit: not stale
            assert (b.rank, b.updated) == (13, clock.at(4))
            assert inspect(b).version == 3 and not s2.dirty
        r = raw(eng)
        assert r.hget("{exp}:token:1", "rank") == b"13"
        assert r.zscore("{exp}:token:#zs:rank", "1") == 13
        with Session(eng) as s:
            t = s.get(Token, 1)
            assert t is not None and t.updated == clock.at(4) and t.created == clock.at(0)
        assert audit(r, reg).ok

    def test_naive_expiry_refused(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            s.add(Token(value="a", expires=datetime(2030, 1, 1)))
            with pytest.raises(ValidationError, match="aware datetime"):
                s.commit()
        assert raw(eng).keys("*") == []

    def test_update_of_an_expired_object_is_stale(self, eng: Engine, clock: Clock) -> None:
        _tokens(eng, clock, 2)
        with Session(eng) as s:
            t = s.get(Token, 2)
            assert t is not None
            clock.now = T0 + 11
            t.kind = "late"
            with pytest.raises(StaleDataError, match="expired"):
                s.commit()

    def test_unique_value_of_an_expired_holder_is_taken_over(
        self, eng: Engine, clock: Clock
    ) -> None:
        _tokens(eng, clock, 2)  # v1 held by id 2 until T0 + 10
        with Session(eng) as s:
            s.add(Token(value="v1"))
            with pytest.raises(IntegrityError, match="already taken"):
                s.commit()
        clock.now = T0 + 11
        with Session(eng) as s:
            s.add(Token(value="v1", rank=7))
            s.commit()
        r = raw(eng)
        new = r.get("{exp}:token:#uq:value:v1")
        assert new not in (None, b"2")
        with Session(eng) as s:
            assert s.scalars(select(Token).where(Token.value == "v1")).one().rank == 7
        eng.sweep(reg)
        assert r.get("{exp}:token:#uq:value:v1") == new  # the sweep leaves the new holder
        assert audit(r, reg).ok

    def test_racing_takeover_exactly_one_wins(self, eng: Engine, clock: Clock) -> None:
        _tokens(eng, clock, 2)
        clock.now = T0 + 11
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def claim(n: int) -> None:
            e = make_engine(eng.url)
            try:
                with Session(e) as s:
                    s.add(Token(value="v1", rank=100 + n))
                    barrier.wait()
                    try:
                        s.commit()
                        outcomes.append("won")
                    except IntegrityError:
                        outcomes.append("lost")
            finally:
                e.dispose()

        threads = [threading.Thread(target=claim, args=(n,)) for n in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert sorted(outcomes) == ["lost", "won"]
        with Session(eng) as s:
            assert len(s.scalars(select(Token).where(Token.value == "v1")).all()) == 1
        eng.sweep(reg)
        assert audit(raw(eng), reg).ok

    def test_explicit_id_of_an_unswept_object(self, eng: Engine, clock: Clock) -> None:
        _tokens(eng, clock, 2)
        clock.now = T0 + 11
        with Session(eng) as s:
            s.add(Token(value="z", id=2))
            with pytest.raises(IntegrityError, match="sweep"):
                s.commit()
        eng.sweep(reg)
        with Session(eng) as s:
            s.add(Token(value="z", id=2))
            s.commit()
        assert audit(raw(eng), reg).ok


@pytest.mark.usefixtures("driver")
class TestSweep:
    def test_sweep_leaves_no_key_and_a_clean_audit(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            for i in range(300):
                s.add(Token(value=f"v{i}", rank=i, kind=f"k{i % 7}", expires=clock.at(1 + i % 50)))
            s.commit()
        r = raw(eng)
        clock.now = T0 + 100
        with Session(eng) as s:
            assert s.count(select(Token)) == 0
        assert eng.sweep(reg, batch=64) == 300
        left = [k for k in r.keys("*") if b"#flush:" not in k and not k.endswith(b"#seq")]
        assert left == []
        assert audit(r, reg).ok

    def test_flush_piggybacks_a_bounded_sweep(self, eng: Engine, clock: Clock) -> None:
        with Session(eng) as s:
            for i in range(40):
                s.add(Token(value=f"v{i}", rank=i, expires=clock.at(1)))
            s.commit()
        clock.now = T0 + 2

        def insert_one(value: str) -> int:
            trips: list[Any] = []
            eng.add_listener(trips.append)
            try:
                with Session(eng) as s:
                    s.add(Token(value=value))
                    s.commit()
            finally:
                eng.remove_listener(trips.append)
            return len(trips)

        with_sweep = insert_one("fresh")
        r = raw(eng)
        # 16 of the 40 expired ids went with the flush (the new token joined the zset).
        assert r.zcard("{exp}:token:#dl") == 40 - expiry.PIGGYBACK_LIMIT + 1
        eng.sweep(reg)
        # The sweep rides in the flush's own MULTI: the same round trips as a flush
        # with nothing to sweep.
        assert insert_one("fresh2") == with_sweep
        assert audit(r, reg).ok

    def test_cli_sweep(self, eng: Engine, clock: Clock, capsys: pytest.CaptureFixture[str]) -> None:
        _tokens(eng, clock, 4)
        clock.now = T0 + 40
        assert cli_main(["sweep", "--models", "tests.test_expiry:reg", "--url", eng.url]) == 0
        assert "swept 2" in capsys.readouterr().out
        assert audit(raw(eng), reg).ok
        assert cli_main(["sweep", "--models", "tests.test_expiry:nothing", "--url", eng.url]) == 1
        err = capsys.readouterr().err
        assert err.startswith("redmap: error: ") and err.count("\n") == 1


@pytest.mark.usefixtures("clean_redis")
def test_real_time_expiry(redis_url: str) -> None:
    """No injected clock: Redis and the client agree within the margin."""
    e = make_engine(redis_url)
    try:
        soon = datetime.now(timezone.utc) + timedelta(seconds=1.5)
        with Session(e) as s:
            s.add(Token(value="rt", expires=soon))
            s.add(Token(value="stays", expires=None))
            s.commit()
        with Session(e) as s:
            assert s.count(select(Token)) == 2
        time.sleep(2)
        with Session(e) as s:
            assert s.get(Token, 1) is None
            assert s.count(select(Token)) == 1
            assert [t.value for t in s.scalars(select(Token))] == ["stays"]
        assert e.sweep(reg) == 1
        assert audit(e.dialect.client, reg).ok
    finally:
        e.dispose()


def test_mapping_errors() -> None:
    bad = registry(prefix="bad")
    with pytest.raises(MappingError, match=r"ExpiresAt\(\) must be Optional\[datetime\]"):

        @bad.mapped
        @dataclass
        class NotADate:
            when: Annotated[int | None, ExpiresAt()] = None

    bad2 = registry(prefix="bad2")

    @bad2.mapped
    @dataclass
    class NoField:
        __ttl__ = timedelta(seconds=5)
        name: str = ""

    with pytest.raises(MappingError, match="ExpiresAt"):
        bad2.configure()

    bad3 = registry(prefix="bad3")

    @bad3.mapped
    @dataclass
    class BadTtl:
        __ttl__ = 5
        when: Annotated[datetime | None, ExpiresAt()] = None

    with pytest.raises(MappingError, match="timedelta"):
        bad3.configure()


@pytest.mark.usefixtures("clean_redis")
def test_asyncio_api(redis_url: str, clock: Clock) -> None:
    """AsyncSession and AsyncEngine.sweep: the same rules through `redmap.asyncio`."""
    import asyncio

    from redmap.asyncio import AsyncSession, create_async_engine

    async def main() -> None:
        engine = create_async_engine(redis_url)
        try:
            async with AsyncSession(engine) as s:
                s.add(Token(value="a", expires=clock.at(10)))
                s.add(Token(value="b", expires=None))
                await s.commit()
            clock.now = T0 + 11
            async with AsyncSession(engine) as s:
                assert await s.get(Token, 1) is None
                assert await s.count(select(Token)) == 1
                s.add(Token(value="a"))  # taken over
                await s.commit()
            assert await engine.sweep(reg) >= 0
            async with AsyncSession(engine) as s:
                assert sorted(t.value for t in (await s.scalars(select(Token))).all()) == [
                    "a",
                    "b",
                ]
        finally:
            await engine.dispose()

    asyncio.run(main())
    client = redis.Redis.from_url(redis_url)
    try:
        report = audit(client, reg)
        assert report.ok, report.mismatches + report.unexplained
    finally:
        client.close()
