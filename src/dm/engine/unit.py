"""The unit of work of one try of an attempt: the hook's session and transactions.

The runner (``dm.engine.attempts``) records an attempt ``pending``, then hands the revision's work
to a :class:`UnitOfWork` on the run's connection. The unit runs the hook and ``verify()``
within the revision's time limit; in a transactional revision it first begins the
revision's transaction (its ``SET LOCAL`` limits and a mark checked after the hooks),
and the runner commits that transaction together with the final status. The unit is also
what ``dm.batched``, ``dm.autocommit`` and Alembic's ``autocommit_block()`` see of the run
(``dm.backfill.batching.current_run``): it writes each checkpoint in its batch's transaction, asks
the stop policy after each, and leaves and resumes the revision's transaction around an
autocommit block.

Every commit on the connection, whoever asks for it, passes the run's fence
(``dm.engine.fence``): this module only decides when dm itself commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession

from dm.backfill.batching import run_context
from dm.core.errors import UsageError
from dm.core.errors import describe_error
from dm.core.graph import Hook
from dm.core.graph import Revision
from dm.core.planning import Step
from dm.engine.hooks import call_hook
from dm.engine.recording import IN_REVISION
from dm.engine.recording import Recorder
from dm.engine.recording import Request
from dm.engine.stops import StopAtBoundary
from dm.engine.stops import StopPolicy
from dm.engine.workers import Connect
from dm.engine.workers import Crew
from dm.engine.workers import Lease

log = logging.getLogger("dm.runner")

# Marks set at the start of a transactional revision and checked after its hooks: they
# exist only as long as dm's transaction does (see TransactionEnded). On PostgreSQL a
# transaction-local setting, which (unlike a query or a savepoint) still lets the revision
# begin with SET TRANSACTION ISOLATION LEVEL; on SQLite a savepoint.
_PG_MARK = (IN_REVISION, "on")
_PG_MARKED = sa.text(f"SELECT current_setting('{IN_REVISION}', true)")
_SQLITE_MARK = "SAVEPOINT dm_revision"
_SQLITE_RELEASE = sa.text("RELEASE SAVEPOINT dm_revision")

# After a cancellation, how often and how long to interrupt SQLite's running statement
# before the hook's task is cancelled outright.
_INTERRUPT_ATTEMPTS = 5
_INTERRUPT_PAUSE = 0.05


class VerifyFailed(Exception):
    """``verify()`` did not return True."""


class TransactionEnded(Exception):
    """A transactional revision's code rolled back dm's transaction itself."""


class HookExited(Exception):
    """Revision code raised ``SystemExit``, ``KeyboardInterrupt`` or ``CancelledError``.

    Such an exception is a failure of the revision, not a request to stop dm: exit codes
    other than 0, 1 and 2 come only from dm's own lock and signal handling.
    """


class RevisionTimedOut(Exception):
    """The revision ran longer than its time limit."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"timed out after {limit:g}s")
        self.limit = limit


class UnitOfWork:
    """One try of one attempt of ``step`` on the recorder's connection."""

    def __init__(
        self,
        recorder: Recorder,
        step: Step,
        attempt_id: int,
        stops: StopPolicy,
        *,
        resume: Mapping[str, Any] | None = None,
        limit: float | None = None,
        remaining: float | None = None,
        lock_timeout: float | None = None,
        joined: bool = False,
        pooled: bool = False,
        isolation_level: str | None = None,
        connect: Connect | None = None,
    ) -> None:
        """:param limit: the revision's time limit, in seconds; ``remaining``: what it
            leaves for this try.
        :param lock_timeout: this try's ``lock_timeout`` when it differs from the
            connection's (a retry after a lock wait timed out).
        :param joined: the connection is inside the caller's transaction: nothing commits
            (dm's transactions are savepoints), and an autocommit block is refused.
        :param pooled: the connection may go through a transaction pooler: an autocommit
            block is refused (its statements run outside a transaction).
        :param isolation_level: the connection's own, restored after an autocommit block.
        """
        self.revision = step.revision
        self.direction = step.direction
        self.transactional = step.transactional
        self.resume = resume
        """The checkpoint this attempt resumes from (``transactional = False`` only)."""
        self.loops = 0
        """How many ``batched`` loops the hook has started."""
        self.partly_committed = False
        """An autocommit block, or revision code, committed part of the work: the try
        cannot be retried, and the revision was not atomic."""
        self.stop: StopAtBoundary | None = None
        """The stop raised after a checkpoint, kept in case revision code swallowed it."""
        self.step = step
        self.recorder = recorder
        self.conn: AsyncConnection = recorder.conn
        self.attempt_id = attempt_id
        self._stops = stops
        self._limit = limit
        self._budget = limit if remaining is None else max(remaining, 0.001)
        self._lock_timeout = lock_timeout
        self._joined = joined
        self._pooled = pooled
        self._isolation_level = isolation_level
        self._postgres = self.conn.dialect.name == "postgresql"
        self._session: AsyncSession | None = None
        self._connect = connect
        self._crew: Crew | None = None
        self.mark_unchecked = False
        """PostgreSQL: the revision's mark is still to be checked; the final status's
        update requires it (``IN_REVISION``), and :meth:`check_transaction_intact` tells
        why when that update matches nothing."""

    # -- what dm.batched and the autocommit blocks call (dm.backfill.batching.RunUnit) -------------

    async def save_checkpoint(
        self, session: AsyncSession, checkpoint: Mapping[str, Any]
    ) -> Request | None:
        """Write ``checkpoint`` in the batch's transaction (fenced); return the request
        another shell left on the attempt, if any."""
        return await self.recorder.save_checkpoint(self.attempt_id, session, checkpoint)

    async def after_checkpoint(self, request: object) -> None:
        """After a batch committed: raise :class:`~dm.engine.stops.StopAtBoundary` to stop there."""
        try:
            await self._stops.after_checkpoint(self.step, request)
        except StopAtBoundary as stop:
            self.stop = stop
            raise

    @property
    def parallel(self) -> Crew | None:
        """The run's side of loops run with ``workers`` (``dm.engine.workers``): on
        PostgreSQL, in a ``transactional = False`` revision run by dm itself."""
        if self._crew is None:
            if not self._postgres or self.transactional or self._joined or self._connect is None:
                return None
            run_id = self.recorder.run.run_id
            tracker = self.recorder.tracker
            owner = f"run:{run_id}:0"
            self._crew = Crew(
                tracker,
                run_id,
                Lease(self.recorder.fence, tracker, owner),
                step=self.step,
                stops=self._stops,
                connect=self._connect,
                ask_stop=self._ask_stop,
            )
        return self._crew

    async def _ask_stop(self, session: AsyncSession, reason: str) -> None:
        await self.recorder.ask_stop(self.attempt_id, session, reason)

    def autocommit(self) -> AbstractAsyncContextManager[None]:
        """Return the autocommit block of the running hook (``dm.autocommit``)."""
        assert self._session is not None, "an autocommit block runs only inside the hook"
        return self._autocommit_block(self._session)

    # -- the work --------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the step's hooks and ``verify()`` within the time limit.

        A transactional step's transaction is begun by the caller and left open for it to
        commit with the final status; a ``transactional = False`` step's work is committed.
        """
        interrupt = None if self._postgres else await self._sqlite_interrupt()
        raw_commits = self._raw_commits()
        if self.transactional:
            await self._set_up_transaction()
        # Inside the caller's transaction dm's transactions are savepoints: the session
        # joins them rather than opening savepoints of its own (rolled back on close).
        session = AsyncSession(
            bind=self.conn,
            expire_on_commit=False,
            join_transaction_mode="rollback_only" if self._joined else "conditional_savepoint",
        )
        self._session = session
        deadline = asyncio.timeout(self._budget)
        try:
            with run_context(self):
                async with deadline:
                    if interrupt is None:
                        await self._hooks(session)
                    else:
                        await _interruptible(self._hooks(session), interrupt)
            await self._settle(session)
            if self.transactional:
                await self._check_transaction_intact(raw_commits)
        except TimeoutError as exc:
            if self._limit is not None and deadline.expired():
                raise RevisionTimedOut(self._limit) from exc
            raise
        except DBAPIError as exc:
            if self._limit is not None and _is_statement_timeout(exc):
                raise RevisionTimedOut(self._limit) from exc
            raise
        finally:
            if self._crew is not None:
                await self._crew.shutdown()
            self._session = None
            await session.close()
            if self.recorder.fence is not None:
                self.recorder.fence.transaction_setup = ()
            if self._raw_commits() > raw_commits:
                self.partly_committed = True
                log.warning(
                    "%s %s: the revision's code committed (a COMMIT statement or "
                    "connection.commit()): its work before that was committed, the rest ran "
                    "in a new transaction, so the revision was not atomic",
                    self.direction,
                    self.revision,
                )

    async def _hooks(self, session: AsyncSession) -> None:
        step = self.step
        hook = step.rev.upgrade if step.is_upgrade else step.rev.downgrade
        assert hook is not None  # planning refuses to run a missing downgrade()
        await _call_hook(step.direction, hook, session)
        if step.is_upgrade and step.rev.verify is not None:
            await self._settle(session)
            failure = await check_verify(step.rev, session)
            if failure is not None:
                raise VerifyFailed(failure)

    async def _settle(self, session: AsyncSession) -> None:
        """Send the hook's work to the database: flushed into the revision's transaction,
        or committed when the revision commits its own work (``transactional = False``).

        The connection's transaction is committed, not the session's: revision code may
        have committed the connection itself (``op.get_bind().commit()``) and begun
        another, which the session does not know (closing the session sends nothing).
        """
        await session.flush()
        if not self.transactional and self.conn.in_transaction():
            await self.conn.commit()  # passes the fence

    # -- the revision's transaction ----------------------------------------------------------

    async def _set_up_transaction(self) -> None:
        """Begin a transactional revision's transaction: its time and lock limits (``SET
        LOCAL``, PostgreSQL) and the mark checked after its hooks; the fence applies them
        again after a commit of the revision's code."""
        statements = []
        if self._postgres:
            if not self._joined:  # inside the caller's transaction it would outlive the revision
                statements += [
                    f"SET LOCAL {name} = {value}" for name, value in self._local_timeouts()
                ]
            # SET LOCAL, not set_config(): a SET is no query, so the revision's code may still
            # begin with SET TRANSACTION ISOLATION LEVEL.
            statements.append(f"SET LOCAL {_PG_MARK[0]} = '{_PG_MARK[1]}'")
        else:
            statements.append(_SQLITE_MARK)
        for statement in statements:
            await self.conn.exec_driver_sql(statement)
        if self.recorder.fence is not None:
            self.recorder.fence.transaction_setup = tuple(statements)

    def _local_timeouts(self) -> list[tuple[str, str]]:
        """Return the transaction-local time limits of this try: they end with its
        transaction."""
        settings = []
        if self._budget is not None:
            ms = max(int(self._budget * 1000), 1)
            settings.append(("statement_timeout", str(ms)))
        if self._lock_timeout is not None:  # a retry after a lock wait timed out
            ms = max(int(self._lock_timeout * 1000), 1)
            settings.append(("lock_timeout", str(ms)))
        return settings

    async def _check_transaction_intact(self, raw_commits: int) -> None:
        """Raise if the revision's code ended dm's transaction behind the fence's back.

        On PostgreSQL, unless revision code committed (the next statement applies the mark
        again), the check is left to the update of the final status, which requires the
        mark (``mark_unchecked``): one round trip less per revision.
        """
        if self._postgres and self._raw_commits() == raw_commits:
            self.mark_unchecked = True
            return
        await self.check_transaction_intact()

    async def check_transaction_intact(self) -> None:
        """Raise :class:`TransactionEnded` if the revision's mark is gone."""
        if self._postgres:
            intact = (await self.conn.execute(_PG_MARKED)).scalar() == "on"
        else:
            try:
                await self.conn.execute(_SQLITE_RELEASE)
                intact = True
            except DBAPIError as exc:  # any other failure is reported as it is
                if "no such savepoint" not in str(exc.orig):
                    raise
                intact = False
        if not intact:
            raise TransactionEnded(
                "the revision's code ended dm's transaction itself (a ROLLBACK statement, or "
                "a COMMIT sent past SQLAlchemy on the driver's own connection); raise an "
                "exception to undo a revision's work, or make it transactional = False "
                "(and use dm.batched) to commit as it goes"
            )

    @contextlib.asynccontextmanager
    async def _autocommit_block(self, session: AsyncSession) -> AsyncIterator[None]:
        """Commit the revision's transaction so far, run the block in autocommit mode, then
        begin the revision's next transaction (marked and limited as the first was)."""
        if self._joined:
            raise UsageError(
                "an autocommit block cannot run inside the caller's transaction: it would "
                "commit the caller's work; run this revision with dm upgrade, or give "
                "Alembic a connection with no transaction begun"
            )
        if self._pooled:
            raise UsageError(
                "an autocommit block cannot run through a transaction pooler (the database "
                "URL has statement_cache_size=0): its statements run outside a transaction, "
                "which the pooler may split across server connections; run this revision "
                "with DM_DATABASE_URL pointing at PostgreSQL directly"
            )
        fence = self.recorder.fence
        if fence is not None:
            fence.transaction_setup = ()  # the commit below is dm's own
        await self._end_transaction(session)  # passes the fence
        self.partly_committed = True
        await self.conn.execution_options(isolation_level="AUTOCOMMIT")
        fenced = fence.autocommit_block() if fence is not None else contextlib.nullcontext()
        succeeded = False
        try:
            with fenced:
                yield
            succeeded = True
        finally:
            with contextlib.suppress(Exception):  # SQLAlchemy's autobegun, no-op transaction
                await self._end_transaction(session)
            with contextlib.suppress(Exception):
                await self.conn.execution_options(isolation_level=self._isolation_level)
        if not succeeded:
            return
        if self.transactional:
            await self.conn.begin()
            await self._set_up_transaction()
        else:  # the session's transaction again, committed as the hook's work is
            await session.connection()

    async def _end_transaction(self, session: AsyncSession) -> None:
        """Commit the hook's session (joined to dm's transaction, or its own) and the
        connection's transaction, so the session begins afresh on its next use."""
        if session.in_transaction():
            await session.commit()
        if self.conn.in_transaction():
            await self.conn.commit()

    def _raw_commits(self) -> int:
        fence = self.recorder.fence
        return 0 if fence is None else fence.raw_commits

    async def _sqlite_interrupt(self) -> Callable[[], Awaitable[None]] | None:
        """Return aiosqlite's ``interrupt()`` of the working connection, if it has one."""
        raw = await self.conn.get_raw_connection()
        interrupt = getattr(raw.driver_connection, "interrupt", None)
        # aiosqlite's is a coroutine; the sqlite3 driver's (a caller's connection) is not.
        return interrupt if inspect.iscoroutinefunction(interrupt) else None


async def check_verify(rev: Revision, session: AsyncSession) -> str | None:
    """Run ``rev``'s ``verify()``: return why it failed, or None when it returned True.

    The one executor of ``verify()``: after a revision's hook, and for ``dm verify``. A
    database error or a timeout propagates (it is reported as such).
    """
    assert rev.verify is not None
    try:
        outcome = await _call_hook("verify", rev.verify, session)
    except (DBAPIError, TimeoutError, HookExited):
        raise
    except Exception as exc:
        return f"verify() raised {describe_error(exc)}"
    return None if outcome is True else f"verify() returned {outcome!r}"


async def _call_hook(name: str, hook: Hook, session: AsyncSession) -> Any:
    """Await ``hook(session)``, turning an exit or cancellation it raises into ``HookExited``.

    A cancellation dm asked for (a signal, the time limit, the lost lock) cancels this task,
    so ``cancelling()`` is non-zero and it passes through; a ``CancelledError`` with no
    pending cancellation, ``SystemExit`` and ``KeyboardInterrupt`` come from revision code
    (dm turns SIGINT into a cancellation, never into ``KeyboardInterrupt``, while it runs).
    """
    try:
        return await call_hook(hook, session)
    except (SystemExit, KeyboardInterrupt, asyncio.CancelledError) as exc:
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise
        raise HookExited(f"{name}() raised {exc!r}") from exc


async def _interruptible(work: Awaitable[None], interrupt: Callable[[], Awaitable[None]]) -> None:
    """Await ``work``; if cancelled, interrupt SQLite's running statement before unwinding.

    aiosqlite runs each statement in a thread that a cancellation does not stop, so the
    rollback would queue behind a long statement. Worse, a cancellation that reaches
    SQLAlchemy mid-statement invalidates the connection, and SQLite keeps the closed
    connection's write lock until the interrupted statement is garbage-collected, so the
    failure could not be recorded. ``interrupt()`` acts at once: the statement fails with
    "interrupted", the hook unwinds normally, and only a hook still running after that
    (awaiting something else) is cancelled. The hook runs in a task of its own (on SQLite
    only), so a cancellation of the caller does not reach it before ``interrupt()``.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        for _ in range(_INTERRUPT_ATTEMPTS):
            with contextlib.suppress(Exception):
                await interrupt()
            await asyncio.wait({task}, timeout=_INTERRUPT_PAUSE)
            if task.done():
                break
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what gets reported
        raise
    task.result()


def _is_statement_timeout(exc: DBAPIError) -> bool:
    """Return whether PostgreSQL cancelled a statement because of ``statement_timeout``."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == "57014" and "statement timeout" in str(orig)
