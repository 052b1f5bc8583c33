"""`AsyncSession`, `async_sessionmaker` and `run_in_transaction` for asyncio code.

An `AsyncSession` wraps a plain `Session` (`sync_session`, as SQLAlchemy's does): the
identity map, change tracking, unit of work, flush plan and query compilation are that
session's, written once as generators of requests (`redmap.commands.Steps`). The
AsyncSession only awaits them on its `AsyncEngine`. The wrapped session never does I/O
by itself: an attribute or relationship that is not loaded raises
`InvalidRequestError` naming the ways to load it, instead of blocking the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ..exc import StaleDataError
from ..orm.session import RETRIES, Session, backoff
from .engine import AsyncEngine, default_async_engine

if TYPE_CHECKING:
    from ..orm.identity import IdentitySet
    from ..orm.strategy_options import Load
    from ..query.dml import Delete, Result, Update
    from ..query.select import ScalarResult, Select

__all__ = ["AsyncSession", "async_sessionmaker", "run_in_transaction"]

M = TypeVar("M")
R = TypeVar("R")
AS = TypeVar("AS", bound="AsyncSession")


class AsyncSession:
    """The unit of work for asyncio: the `Session` API with its I/O awaited.

    >>> async with AsyncSession(engine) as s:
    ...     s.add(Player(name="ann"))
    ...     await s.commit()

    `expire_on_commit` is False by default: after a commit the objects keep their
    values, since reloading them on access would need I/O. Not safe for concurrent use
    by several tasks; use one per task.

    Session events (`redmap.event`) registered on `Session`, on `AsyncSession`, on this
    session or on its `async_sessionmaker` fire for the flushes and commits of this
    session, and their listeners receive `sync_session`, as in SQLAlchemy.
    """

    # `redmap.event` accepts this class, its subclasses and their instances as targets of
    # session events (the listeners receive the wrapped `sync_session`).
    __redmap_events__ = "session"

    def __init__(
        self,
        bind: AsyncEngine | None = None,
        *,
        autoflush: bool = True,
        expire_on_commit: bool = False,
        allow_cross_slot: bool = False,
    ):
        self.bind: AsyncEngine = bind if bind is not None else default_async_engine()
        self.sync_session = Session(
            None,
            autoflush=autoflush,
            expire_on_commit=expire_on_commit,
            allow_cross_slot=allow_cross_slot,
        )
        self.sync_session._async_engine = self.bind
        self.sync_session._event_owners = (self,)

    async def __aenter__(self: AS) -> AS:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncSession of {self.sync_session!r}>"

    # -- options, read through to the wrapped session ---------------------------------

    @property
    def autoflush(self) -> bool:
        return self.sync_session.autoflush

    @autoflush.setter
    def autoflush(self, value: bool) -> None:
        self.sync_session.autoflush = value

    @property
    def expire_on_commit(self) -> bool:
        return self.sync_session.expire_on_commit

    @expire_on_commit.setter
    def expire_on_commit(self, value: bool) -> None:
        self.sync_session.expire_on_commit = value

    @property
    @contextlib.contextmanager
    def no_autoflush(self) -> Iterator[AsyncSession]:
        """`with session.no_autoflush:` reads inside do not flush first."""
        with self.sync_session.no_autoflush:
            yield self

    # -- membership (no I/O) ------------------------------------------------------------

    def add(self, obj: object) -> None:
        """Put a new or detached object in the session; it is written at the next flush."""
        self.sync_session.add(obj)

    def add_all(self, objs: Iterable[object]) -> None:
        self.sync_session.add_all(objs)

    async def delete(self, obj: object) -> None:
        """Mark a persistent object for deletion at the next flush (awaitable, as in
        SQLAlchemy: relationship cascades may need to load related objects, which the
        flush does)."""
        self.sync_session.delete(obj)

    def expunge(self, obj: object) -> None:
        self.sync_session.expunge(obj)

    def expunge_all(self) -> None:
        self.sync_session.expunge_all()

    def expire(self, obj: object, attribute_names: Sequence[str] | None = None) -> None:
        """Forget loaded values; in an AsyncSession they must be loaded again with
        `await refresh(obj)` before they are read."""
        self.sync_session.expire(obj, attribute_names)

    def expire_all(self) -> None:
        self.sync_session.expire_all()

    def is_modified(self, obj: object) -> bool:
        return self.sync_session.is_modified(obj)

    @property
    def new(self) -> IdentitySet:
        return self.sync_session.new

    @property
    def dirty(self) -> IdentitySet:
        return self.sync_session.dirty

    @property
    def deleted(self) -> IdentitySet:
        return self.sync_session.deleted

    def __contains__(self, obj: object) -> bool:
        return obj in self.sync_session

    def __iter__(self) -> Iterator[Any]:
        return iter(self.sync_session)

    # -- I/O ------------------------------------------------------------------------------

    async def get(
        self,
        model: type[M],
        pk: Any,
        *,
        options: Sequence[Load] = (),
        include_deleted: bool = False,
    ) -> M | None:
        """The object with this primary key, or None (round trips as `Session.get`);
        `options=[selectinload(Model.rel)]` loads relationships an AsyncSession could
        not load on access; `include_deleted` reads a soft-deleted one."""
        return await self.bind.run(
            self.sync_session._get_steps(model, pk, options, include_deleted)
        )

    async def restore(self, model: type[M], pk: Any) -> M:
        """Bring back a soft-deleted object and its cascade, atomically (as
        `Session.restore`)."""
        return await self.bind.run(self.sync_session._restore_steps(model, pk))

    async def get_one(self, model: type[M], pk: Any, *, options: Sequence[Load] = ()) -> M:
        """The object with this primary key; `NoResultFound` when there is none."""
        return await self.bind.run(self.sync_session._get_one_steps(model, pk, options))

    async def get_many(self, model: type[M], pks: Iterable[Any]) -> list[M | None]:
        """The objects for `pks`, in order, None where absent; 1 round trip at most."""
        return await self.bind.run(self.sync_session._get_many_steps(model, pks))

    async def scalars(self, stmt: Select[M]) -> ScalarResult[M]:
        """Run a `select()` and return its objects."""
        return await self.bind.run(self.sync_session._scalars_steps(stmt))

    async def count(self, stmt: Select[Any]) -> int:
        """How many objects `stmt` matches (limit/offset applied); 1 round trip."""
        return await self.bind.run(self.sync_session._count_steps(stmt))

    async def replace_all(self, model: type[M], objects: Iterable[M]) -> None:
        """Make `objects` the whole stored set of `model` at the next flush (as
        `Session.replace_all`: the stored set is read now, replaced atomically then)."""
        await self.bind.run(self.sync_session._replace_all_steps(model, objects))

    async def execute(self, stmt: Update[Any] | Delete[Any]) -> Result:
        """Run an `update()` or `delete()` statement in one atomic flush (as
        `Session.execute`); `Result.rowcount` is the number of objects matched."""
        return await self.bind.run(self.sync_session._execute_steps(stmt))

    async def refresh(self, obj: object, attribute_names: Sequence[str] | None = None) -> None:
        """Reload `obj`'s fields now; relationships named in `attribute_names` are loaded
        (the way to reach a lazy="select" relationship from asyncio code)."""
        await self.bind.run(self.sync_session._refresh_steps(obj, attribute_names))

    async def merge(self, obj: M) -> M:
        """Copy `obj`'s state onto the session's object with the same primary key."""
        return await self.bind.run(self.sync_session._merge_steps(obj))

    async def flush(self) -> None:
        """Write every pending change in one WATCH/MULTI/EXEC transaction.

        Cancelled after the EXEC may have been sent, the flush is settled like a lost
        reply before `CancelledError` goes on: applied once or not at all, and the
        session says which (objects persistent, still pending, or in doubt).
        """
        await self.bind.run(self.sync_session._flush_steps())

    async def commit(self) -> None:
        """Flush; then, only with expire_on_commit=True, expire every object (the
        before_commit and after_commit events around it, as `Session.commit`)."""
        await self.bind.run(self.sync_session._commit_steps())

    async def rollback(self) -> None:
        """Discard pending changes: new objects are expunged, the others expired (reload
        them with `await refresh(obj)`)."""
        self.sync_session.rollback()

    async def close(self) -> None:
        """Release every object; loaded attributes stay readable."""
        self.sync_session.close()

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:
        """Commit at the end of the block, or roll back if it raises."""
        try:
            yield self
        except BaseException:
            await self.rollback()
            raise
        await self.commit()


class async_sessionmaker(Generic[AS]):  # noqa: N801 - SQLAlchemy's name
    """A factory of `AsyncSession`s with preset options.

    >>> Factory = async_sessionmaker(engine)
    >>> async with Factory.begin() as s:
    ...     s.add(obj)
    """

    # Session events registered here apply to the sessions it makes.
    __redmap_events__ = "session"

    @overload
    def __init__(
        self: async_sessionmaker[AsyncSession],
        bind: AsyncEngine | None = None,
        *,
        autoflush: bool = True,
        expire_on_commit: bool = False,
        allow_cross_slot: bool = False,
    ) -> None: ...
    @overload
    def __init__(
        self,
        bind: AsyncEngine | None = None,
        *,
        class_: type[AS],
        autoflush: bool = True,
        expire_on_commit: bool = False,
        allow_cross_slot: bool = False,
    ) -> None: ...
    def __init__(
        self,
        bind: AsyncEngine | None = None,
        *,
        class_: type[AS] = AsyncSession,  # type: ignore[assignment]
        autoflush: bool = True,
        expire_on_commit: bool = False,
        allow_cross_slot: bool = False,
    ) -> None:
        self.bind = bind
        self.class_ = class_
        self.kw: dict[str, Any] = {
            "autoflush": autoflush,
            "expire_on_commit": expire_on_commit,
            "allow_cross_slot": allow_cross_slot,
        }

    def __call__(self, **overrides: Any) -> AS:
        kw = {**self.kw, **overrides}
        bind = kw.pop("bind", self.bind)
        session = self.class_(bind, **kw)
        session.sync_session._event_owners += (self,)
        return session

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AS]:
        """A new session committed at the end of the block, rolled back on error, then
        closed."""
        async with self() as session, session.begin():
            yield session


async def run_in_transaction(
    fn: Callable[[AsyncSession], Awaitable[R]],
    session_factory: Callable[[], AsyncSession] = AsyncSession,
    retries: int = RETRIES,
) -> R:
    """`await fn(session)` and commit; on StaleDataError retry with a fresh session.

    The policy of `redmap.run_in_transaction` (up to `retries` retries, default 50,
    full-jitter waits of at most 50 ms each, `await`ed): autoflush is off while `fn`
    runs, so every change goes into the one commit at the end; any error other than
    StaleDataError propagates at once (a PartialCommitError is never retried).
    """
    attempt = 0
    while True:
        async with session_factory() as session:
            try:
                with session.no_autoflush:
                    result = await fn(session)
                await session.commit()
                return result
            except StaleDataError:
                await session.rollback()
                if attempt >= retries:
                    raise
        attempt += 1
        await asyncio.sleep(backoff(attempt))
