"""Execute a plan: one transaction per revision, every attempt recorded in the tracker.

For each step the runner commits a ``pending`` row first (so an operator sees what is
running), then runs the hook, ``verify()`` and the final status in one transaction. A
failure rolls that transaction back and records ``failed`` in a transaction of its own.
A revision with ``transactional = False`` is the exception: ``dm.batched`` commits each of
its batches with a checkpoint in the pending row, the final status follows the work, and
the next attempt resumes from the checkpoint of a failed one.

Cancellation (a signal, or the revision's time limit) interrupts whatever the hook awaits,
including a running PostgreSQL statement: asyncpg sends a cancel request, the transaction
is rolled back and the failure is recorded before the cancellation goes on. If the process
dies instead, the row stays ``pending`` and the next run marks it failed (interrupted);
``client_connection_check_interval`` makes PostgreSQL abort a statement whose client died
within about a second, so the orphaned transaction cannot hold row locks for long.

A batched revision can also stop early on purpose, at a batch boundary (its batch and
checkpoint committed): when the run's ``--max-runtime`` or the revision's ``max_runtime`` is
up, or when ``dm pause``/``dm cancel`` left a request on the attempt (the checkpoint update
returns it). The attempt is recorded ``stopped``, ``paused``, ``cancelled`` or
``abandoned`` and :class:`~dm.errors.Incomplete` (exit 5) ends the run. A transactional
revision cannot stop midway: the run's time limit is checked before each revision starts.

A failure caused by a transient database error (``dm.transient``: a lost connection, a
deadlock, a serialization failure, a lock wait timing out) is recorded ``failed`` with an
error starting "transient" and raised as ``TransientRevisionFailure`` (exit 75). If the work
connection itself died, SQLAlchemy opens a fresh one to record the failure.

Lock waits are retried like GitLab's ``with_lock_retries``: on PostgreSQL, a transactional
revision whose statement waited longer than ``lock_timeout`` (SQLSTATE 55P03) is rolled back
and run again in the same attempt, up to ``DM_LOCK_RETRIES`` more times, each try with twice
the previous ``lock_timeout`` and after a pause doubling from ``DM_LOCK_RETRY_WAIT``. The
revision's time limit covers all its tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from . import watchdog
from .batching import RunContext
from .batching import run_context
from .db import transaction_settings
from .errors import FenceLost
from .errors import Incomplete
from .errors import RevisionFailed
from .errors import TransientRevisionFailure
from .errors import UsageError
from .errors import describe_error
from .graph import Hook
from .graph import Revision
from .graph import checksum
from .hooks import call_hook
from .planning import Step
from .pooler import pooler_problem
from .recording import Recorder
from .recording import Request
from .tracker import Status
from .transient import is_lock_timeout
from .transient import is_transient
from .urls import through_pooler

log = logging.getLogger("dm.runner")

TRANSIENT_PREFIX = "transient (a retry may succeed): "
"""Starts the recorded error of an attempt that failed on a transient database error."""

# Marks set at the start of a transactional revision and checked after its hooks: they
# exist only as long as dm's transaction does (see TransactionEnded). On PostgreSQL a
# transaction-local setting, which (unlike a query or a savepoint) still lets the revision
# begin with SET TRANSACTION ISOLATION LEVEL; on SQLite a savepoint.
_PG_MARK = sa.text("SET LOCAL dm.in_revision = 'on'")
_PG_MARKED = sa.text("SELECT current_setting('dm.in_revision', true)")
_SQLITE_MARK = sa.text("SAVEPOINT dm_revision")
_SQLITE_RELEASE = sa.text("RELEASE SAVEPOINT dm_revision")

MAX_LOCK_TIMEOUT = 2_147_483.0
"""PostgreSQL's ``lock_timeout`` takes at most 2147483647 ms."""

# After a cancellation, how often and how long to interrupt SQLite's running statement
# before the hook's task is cancelled outright.
_WRITER_GRACE = 1.0
"""How long a SQLite run waits between two batches for a writer that asked to get in."""

_INTERRUPT_ATTEMPTS = 5
_INTERRUPT_PAUSE = 0.05


@dataclass(frozen=True)
class StepResult:
    """What happened to one step of a plan."""

    revision: str
    direction: str
    status: Status
    duration_ms: int
    description: str


class VerifyFailed(Exception):
    """``verify()`` did not return True."""


class TransactionEnded(Exception):
    """A transactional revision's code committed or rolled back dm's transaction itself."""


class HookExited(Exception):
    """Revision code raised ``SystemExit``, ``KeyboardInterrupt`` or ``CancelledError``.

    Such an exception is a failure of the revision, not a request to stop dm: exit codes
    other than 0, 1 and 2 come only from dm's own lock and signal handling.
    """


class LockWaitTimedOut(Exception):
    """A revision's lock waits timed out on every try; the driver's error is its cause."""


class StopAtBoundary(BaseException):
    """Raised by the stop check after a batch committed: the attempt ends ``status``.

    A ``BaseException``, so revision code catching ``Exception`` around its loop cannot
    swallow it and go on as if the loop had finished.
    """

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_STATUS_OF_REQUEST = {
    "pause": Status.PAUSED,
    "cancel": Status.CANCELLED,
    "abandon": Status.ABANDONED,
}


class RevisionTimedOut(Exception):
    """The revision ran longer than its time limit."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"timed out after {limit:g}s")
        self.limit = limit


class Runner:
    """Runs steps on the recorder's connection and records each attempt through it."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        timeout: float | None = None,
        pg_lock_timeout: float | None = None,
        shared: bool = False,
        joined: bool = False,
        lock_retries: int = 0,
        lock_retry_wait: float = 1.0,
        max_runtime: float | None = None,
        started: float | None = None,
        writer_waiting: Path | None = None,
    ) -> None:
        """:param shared: the connection is the caller's (``dm.shared``): its session
            settings are left alone (no ``lock_timeout`` or other ``SET``).
        :param joined: the connection is inside the caller's transaction: nothing may
            commit, so every revision runs as a transactional one (in a savepoint) and an
            autocommit block is refused.
        :param max_runtime: seconds the run may work, counted from ``started`` (a
            ``time.monotonic()`` value; default: now).
        :param writer_waiting: (SQLite) a file another process creates while it waits for
            the database's write lock: between two batches the run then lets it in.
        """
        self.recorder = recorder
        self.conn = recorder.conn
        self.timeout = timeout
        self.pg_lock_timeout = pg_lock_timeout
        self.shared = shared or joined
        self.joined = joined
        self.lock_retries = lock_retries
        self.lock_retry_wait = lock_retry_wait
        self._try_lock_timeout: float | None = None
        """The ``lock_timeout`` of the current try when it differs from the session's."""
        self._partly_committed = False
        """An autocommit block of the current try committed work: it is not retried."""
        self.max_runtime = max_runtime
        self._run_started = time.monotonic() if started is None else started
        self._writer_waiting = writer_waiting
        self._postgres = self.conn.dialect.name == "postgresql"
        self._pooled = self._postgres and through_pooler(self.conn.engine.url)
        """The connection may be pooled: nothing may outlive a transaction, nothing autocommits."""
        self._session_ready = False
        sync = self.conn.sync_connection
        self._isolation_level = sync.default_isolation_level if sync else None
        self._rescue: watchdog.Rescue | None = None
        self._step_started: float | None = None

    async def run(self, steps: Sequence[Step]) -> list[StepResult]:
        """Run ``steps`` in order; stop at the first failure.

        :raises RevisionFailed: a hook raised or ``verify()`` failed; earlier steps stay.
        """
        return [await self.run_step(step) for step in steps]

    async def run_step(self, step: Step) -> StepResult:
        """Run one step and record the outcome.

        A transactional step runs in one transaction with its final status. A step with
        ``transactional = False`` lets ``dm.batched`` commit per batch (with a checkpoint
        in this attempt's row) and resumes from the checkpoint of a failed attempt in the
        same direction; its final status is committed after its work.
        """
        if self.joined and not step.transactional:
            log.info(
                "%s %s: transactional = False, but inside the caller's transaction nothing "
                "can commit: it runs as one transaction, its batches keep no checkpoint",
                step.direction,
                step.revision,
            )
            step = replace(step, rev=replace(step.rev, transactional=True))
        self._check_run_time(step)
        prior = self.recorder.latest.get(step.revision)
        resume = None
        if not step.transactional and prior and prior.direction == step.direction:
            resume = prior.checkpoint if prior.can_resume else None
        if self._postgres and not self._session_ready and not self.shared:
            await self._prepare_session()
        async with self._pending_row_transaction():
            attempt_id = await self.recorder.record_step(step, Status.PENDING, checkpoint=resume)
        label = f"{step.direction} {step.revision}"
        if step.description:
            label += f" ({step.description})"
        if resume and prior:
            how = f" ({prior.reason})" if prior.status is not Status.FAILED and prior.reason else ""
            log.log(
                logging.WARNING if prior.status is Status.PAUSED else logging.INFO,
                "%s: running, resuming from the checkpoint of attempt %d%s",
                label,
                prior.attempt,
                how,
            )
            if prior.checksum and prior.checksum != checksum(step.script):
                log.warning(
                    "%s: the file changed since attempt %d; resuming from its checkpoint "
                    "anyway (dm resolve settles the failed attempt to start over)",
                    label,
                    prior.attempt,
                )
        else:
            log.info("%s: running", label)
        started = time.perf_counter()
        self._step_started = time.monotonic()
        final = Status.SUCCESS if step.is_upgrade else Status.ROLLED_BACK
        context = functools.partial(
            RunContext,
            step.revision,
            step.direction,
            step.transactional,
            resume=resume,
            save_checkpoint=functools.partial(self.recorder.save_checkpoint, attempt_id),
        )
        stops: list[StopAtBoundary] = []
        context = functools.partial(
            context, after_checkpoint=functools.partial(self._stop_check, step, stops)
        )
        dog = watchdog.active()
        if dog is not None:
            if self._rescue is None:
                self._rescue = await watchdog.rescue_for(
                    self.conn, self.recorder.tracker, self.recorder.run
                )
            limit = _timeout_of(step, self.timeout)
            dog.arm(step.revision, attempt_id, limit, self._rescue)
        try:
            if step.transactional:
                await self._run_transactional(step, context, attempt_id, final, started, label)
            else:
                try:
                    await self._execute(step, context())  # commits its own work
                except Exception as exc:
                    if self._lock_timeout_is_dms and is_lock_timeout(exc):
                        raise LockWaitTimedOut(self._lock_advice(step, 1)) from exc
                    raise
                if stops:  # the revision's code swallowed the stop: its loop did not finish
                    raise stops[0]
                async with self.conn.begin():
                    await self._finish(attempt_id, final, started)
        except StopAtBoundary as stop:
            await self._record_stop(step, label, attempt_id, stop, started)
        except FenceLost:
            await self._rollback()
            raise _taken_over(step, label) from None
        except BaseException as exc:
            duration = _elapsed_ms(started)
            message = self._describe(step, exc)
            transient = isinstance(exc, Exception) and is_transient(exc)
            if transient:
                message = f"{TRANSIENT_PREFIX}{message}"
            try:
                await self._record_failure(attempt_id, exc, message, duration)
            except FenceLost:
                raise _taken_over(step, label) from exc
            log.error("%s: FAILED after %d ms: %s", label, duration, message)
            problem = pooler_problem(exc) if isinstance(exc, Exception) else None
            if isinstance(problem, UsageError):  # a configuration problem, not the revision's
                raise problem from exc
            if transient:
                raise TransientRevisionFailure(step.revision, message) from exc
            if isinstance(exc, Exception):
                raise RevisionFailed(step.revision, message) from exc
            raise
        finally:
            if dog is not None:
                dog.disarm()
        duration = _elapsed_ms(started)
        log.info("%s: %s in %d ms", label, final.value, duration)
        return StepResult(step.revision, step.direction, final, duration, step.description)

    async def _run_transactional(
        self,
        step: Step,
        context: Callable[[], RunContext],
        attempt_id: int,
        final: Status,
        started: float,
        label: str,
    ) -> None:
        """Run a transactional step, retrying it after a lock wait timed out (PostgreSQL).

        Every try runs in a transaction of its own, in the same attempt; the attempt is
        finished by the try that succeeds, or recorded failed by the caller.
        """
        retries = self.lock_retries if self._lock_timeout_is_dms else 0
        limit = _timeout_of(step, self.timeout)
        tries = retries + 1
        for number in range(1, tries + 1):
            remaining = None if limit is None else limit - (time.perf_counter() - started)
            self._try_lock_timeout = self._lock_timeout_of(number) if number > 1 else None
            self._partly_committed = False
            try:
                # Not ``async with begin()``: an autocommit block commits this transaction
                # and begins the next; the failure path rolls back whichever is open.
                await self.conn.begin()
                await self._execute(step, context(), remaining=remaining)
                await self._finish(attempt_id, final, started)
                await self.conn.commit()
                if number > 1:
                    log.info("%s: got its locks on try %d/%d", label, number, tries)
                return
            except Exception as exc:
                if not (self._lock_timeout_is_dms and is_lock_timeout(exc)):
                    raise
                wait = self.lock_retry_wait * (1 << (number - 1))
                left = None if limit is None else limit - (time.perf_counter() - started)
                if number == tries or self._partly_committed or (left is not None and left <= wait):
                    raise LockWaitTimedOut(self._lock_advice(step, number)) from exc
                await self._rollback()
                log.warning(
                    "%s: lock wait timed out (lock_timeout %gs), try %d/%d; retrying in %gs "
                    "with lock_timeout %gs",
                    label,
                    self._lock_timeout_of(number),
                    number,
                    tries,
                    wait,
                    self._lock_timeout_of(number + 1),
                )
            finally:
                self._try_lock_timeout = None
            await asyncio.sleep(wait)

    @property
    def _lock_timeout_is_dms(self) -> bool:
        """Return whether dm set this connection's ``lock_timeout`` (DM_PG_LOCK_TIMEOUT): on
        PostgreSQL, on a connection of its own (a caller's keeps its settings and its
        transaction, so a lock wait there is neither retried nor blamed on dm's settings)."""
        return self._postgres and not self.shared and bool(self.pg_lock_timeout)

    def _lock_timeout_of(self, number: int) -> float:
        """Return the ``lock_timeout`` of try ``number``: doubled on each retry."""
        return min((self.pg_lock_timeout or 0.0) * (1 << (number - 1)), MAX_LOCK_TIMEOUT)

    def _lock_advice(self, step: Step, tries: int) -> str:
        """Say which settings bounded the lock waits of ``tries`` tries, and what to change."""
        timeouts = ", ".join(f"{self._lock_timeout_of(n):g}s" for n in range(1, tries + 1))
        settings = (
            f"DM_PG_LOCK_TIMEOUT={self.pg_lock_timeout:g}s, DM_LOCK_RETRIES={self.lock_retries}, "
            f"DM_LOCK_RETRY_WAIT={self.lock_retry_wait:g}s"
        )
        if not step.transactional:
            return (
                f"a lock wait timed out (lock_timeout {timeouts}; {settings}); a "
                "transactional = False revision is not retried in place: the next run resumes "
                "it from its checkpoint"
            )
        why = "" if not self._partly_committed else " (not retried: an autocommit block committed)"
        return (
            f"lock wait timed out on each of {tries} tries (lock_timeout {timeouts}){why}; "
            f"{settings}: raise DM_PG_LOCK_TIMEOUT or DM_LOCK_RETRIES, or find the session "
            "holding the lock (pg_locks)"
        )

    def _check_run_time(self, step: Step) -> None:
        """Refuse to start ``step`` once the run's ``max_runtime`` is up (the run's first
        step always starts, so every run makes progress)."""
        if self.max_runtime is None or self._step_started is None:
            return
        if time.monotonic() - self._run_started >= self.max_runtime:
            message = (
                f"max runtime of {self.max_runtime:g}s reached before {step.direction} "
                f"{step.revision} started: it and the revisions after it did not run; the "
                "next run goes on from there"
            )
            log.warning("%s", message)
            raise Incomplete(step.revision, message)

    async def _stop_check(self, step: Step, stops: list[StopAtBoundary], request: object) -> None:
        """After a batch committed: stop there if another shell asked (``request``) or the
        run's or the revision's time is up; on SQLite first let a waiting writer in."""
        if self._writer_waiting is not None and self._writer_waiting.exists():
            await _let_writer_in(self._writer_waiting)
        stop = None
        if isinstance(request, Request) and request.action in _STATUS_OF_REQUEST:
            stop = StopAtBoundary(_STATUS_OF_REQUEST[request.action], request.describe())
        else:
            now = time.monotonic()
            limits = []
            if self.max_runtime is not None:
                limits.append((self._run_started + self.max_runtime, self.max_runtime, "run's"))
            if step.rev.max_runtime is not None and self._step_started is not None:
                own = step.rev.max_runtime
                limits.append((self._step_started + own, own, "revision's"))
            for deadline, seconds, whose in limits:
                if now >= deadline:
                    reason = f"stopped: the {whose} max runtime of {seconds:g}s was reached"
                    stop = StopAtBoundary(Status.STOPPED, reason)
                    break
        if stop is not None:
            stops.append(stop)
            raise stop

    async def _record_stop(
        self, step: Step, label: str, attempt_id: int, stop: StopAtBoundary, started: float
    ) -> None:
        """Record the attempt stopped at a batch boundary, then raise ``Incomplete``."""
        await self._rollback()  # nothing is open after a batch's commit; be sure
        duration = _elapsed_ms(started)
        try:
            async with self.conn.begin():
                await self.recorder.finish(
                    attempt_id, stop.status, duration_ms=duration, reason=stop.reason
                )
        except FenceLost:
            raise _taken_over(step, label) from None
        next_step = {
            Status.STOPPED: f"the next dm {step.direction} resumes it",
            Status.PAUSED: f"dm resume {step.revision} (or the next dm {step.direction}) "
            "resumes it",
            Status.CANCELLED: f"the next dm {step.direction} starts it over",
            Status.ABANDONED: "plans pass it: it does not run again",
        }[stop.status]
        message = (
            f"{label}: {stop.reason}, at a batch boundary after {duration} ms; its committed "
            f"batches stay, {next_step}; the revisions after it did not run"
        )
        log.warning("%s", message)
        raise Incomplete(step.revision, message)

    async def _finish(self, attempt_id: int, status: Status, started: float) -> None:
        await self.recorder.finish(attempt_id, status, duration_ms=_elapsed_ms(started))

    async def _rollback(self) -> None:
        """Roll back whatever this run's connection still has open (nothing is recorded)."""
        if self.conn.in_transaction():
            with contextlib.suppress(Exception):
                await _finish_despite_cancel(self.conn.rollback())

    async def _execute(
        self, step: Step, context: RunContext, *, remaining: float | None = None
    ) -> None:
        """Run the step's hooks (``remaining``: what its time limit leaves for this try)."""
        limit = _timeout_of(step, self.timeout)
        budget = limit if remaining is None else max(remaining, 0.001)
        if self._postgres and step.transactional and not self.joined:
            # Inside the caller's transaction a SET LOCAL would outlive the revision.
            await self._set_local_timeouts(budget)
        interrupt = None if self._postgres else await self._sqlite_interrupt()
        if step.transactional:
            await self.conn.execute(_PG_MARK if self._postgres else _SQLITE_MARK)
        # Inside the caller's transaction dm's transactions are savepoints: the session
        # joins them rather than opening savepoints of its own (rolled back on close).
        session = AsyncSession(
            bind=self.conn,
            expire_on_commit=False,
            join_transaction_mode="rollback_only" if self.joined else "conditional_savepoint",
        )
        context.autocommit = functools.partial(self._autocommit_block, step, budget, session)
        deadline = asyncio.timeout(budget)
        try:
            with run_context(context):
                async with deadline:
                    if interrupt is None:
                        await self._hooks(step, session)
                    else:
                        await _interruptible(self._hooks(step, session), interrupt)
            await _settle(step, session)
            if step.transactional:
                await self._check_transaction_intact()
        except TimeoutError as exc:
            if limit is not None and deadline.expired():
                raise RevisionTimedOut(limit) from exc
            raise
        except DBAPIError as exc:
            if limit is not None and _is_statement_timeout(exc):
                raise RevisionTimedOut(limit) from exc
            raise
        finally:
            await session.close()

    @contextlib.asynccontextmanager
    async def _autocommit_block(
        self, step: Step, limit: float | None, session: AsyncSession
    ) -> AsyncIterator[None]:
        """Commit the revision's transaction so far, run the block in autocommit mode, then
        begin the revision's next transaction (marked and limited as the first was)."""
        if self.joined:
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
        await self._end_transaction(session)
        self._partly_committed = True
        await self.conn.execution_options(isolation_level="AUTOCOMMIT")
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            with contextlib.suppress(Exception):  # SQLAlchemy's autobegun, no-op transaction
                await self._end_transaction(session)
            with contextlib.suppress(Exception):
                await self.conn.execution_options(isolation_level=self._isolation_level)
        if not succeeded:
            return
        if step.transactional:
            await self.conn.begin()
            if self._postgres:
                await self._set_local_timeouts(limit)
            await self.conn.execute(_PG_MARK if self._postgres else _SQLITE_MARK)
        else:  # the session's transaction again, committed as the hook's work is
            await session.connection()

    async def _end_transaction(self, session: AsyncSession) -> None:
        """Commit the hook's session (joined to dm's transaction, or its own) and the
        connection's transaction, so the session begins afresh on its next use."""
        if session.in_transaction():
            await session.commit()
        if self.conn.in_transaction():
            await self.conn.commit()

    async def _check_transaction_intact(self) -> None:
        """Raise if the revision's code ended dm's transaction (a raw COMMIT or ROLLBACK)."""
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
                "the revision's code ended dm's transaction itself (a COMMIT or ROLLBACK "
                "statement): what it did before a COMMIT is committed, so the revision was "
                "not atomic; make it transactional = False (and use dm.batched) to commit "
                "as it goes"
            )

    async def _hooks(self, step: Step, session: AsyncSession) -> None:
        hook = step.rev.upgrade if step.is_upgrade else step.rev.downgrade
        assert hook is not None  # planning refuses to run a missing downgrade()
        await _call_hook(step.direction, hook, session)
        if step.is_upgrade and step.rev.verify is not None:
            await _settle(step, session)
            failure = await check_verify(step.rev, session)
            if failure is not None:
                raise VerifyFailed(failure)

    async def _sqlite_interrupt(self) -> Callable[[], Awaitable[None]] | None:
        """Return aiosqlite's ``interrupt()`` of the working connection, if it has one."""
        raw = await self.conn.get_raw_connection()
        interrupt = getattr(raw.driver_connection, "interrupt", None)
        # aiosqlite's is a coroutine; the sqlite3 driver's (a caller's connection) is not.
        return interrupt if inspect.iscoroutinefunction(interrupt) else None

    @contextlib.asynccontextmanager
    async def _pending_row_transaction(self) -> AsyncIterator[None]:
        """Commit the pending row on its own; on PostgreSQL in one round trip.

        In autocommit mode the INSERT is its own transaction, so no BEGIN and COMMIT
        round trips are paid for it on every revision.
        """
        if not self._postgres or self.shared or self._pooled:
            async with self.conn.begin():
                yield
            return
        await self.conn.execution_options(isolation_level="AUTOCOMMIT")
        try:
            async with self.conn.begin():  # sends nothing in autocommit mode
                yield
        finally:
            await self.conn.execution_options(isolation_level=self._isolation_level)

    async def _prepare_session(self) -> None:
        """Apply the settings every revision on this connection runs with, once: to the
        session, or to each transaction on a connection that may be pooled."""
        version = self.conn.dialect.server_version_info or (0,)
        settings: dict[str, str] = {}
        if version >= (14,):
            # A statement whose client died (SIGKILL) is aborted within about a second,
            # instead of running on and holding its locks against the next run.
            settings["client_connection_check_interval"] = "1000"
        if self.pg_lock_timeout:
            # A data migration never queues behind live traffic's locks for long.
            settings["lock_timeout"] = str(max(int(self.pg_lock_timeout * 1000), 1))
        if self._pooled:
            if self.conn.in_transaction():
                await self.conn.commit()
            transaction_settings(self.conn, settings)
            self._session_ready = True
            return
        for name, value in settings.items():
            await self.conn.execute(sa.text(f"SET {name} = {value}"))
        await self.conn.commit()
        self._session_ready = True

    async def _set_local_timeouts(self, limit: float | None) -> None:
        # SET LOCAL: the value ends with the revision's transaction.
        if limit is not None:
            ms = max(int(limit * 1000), 1)
            await self.conn.execute(sa.text(f"SET LOCAL statement_timeout = {ms}"))
        if self._try_lock_timeout is not None:  # a retry after a lock wait timed out
            ms = max(int(self._try_lock_timeout * 1000), 1)
            await self.conn.execute(sa.text(f"SET LOCAL lock_timeout = {ms}"))

    def _describe(self, step: Step, exc: BaseException) -> str:
        if isinstance(exc, RevisionTimedOut | TransactionEnded | HookExited):
            return str(exc)
        if isinstance(exc, LockWaitTimedOut) and exc.__cause__ is not None:
            return f"{describe_error(exc.__cause__)}; {exc}"
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            return "interrupted"
        return describe_error(exc)  # a driver error without its statement and parameters

    async def _record_failure(
        self, attempt_id: int, exc: BaseException, message: str, duration: int
    ) -> None:
        """Record the attempt failed; a failure to record is logged (the next run marks the
        attempt interrupted), except :class:`FenceLost`: the attempt is another run's now."""
        trace = "".join(traceback.format_exception(exc))
        reason = "interrupted" if not isinstance(exc, Exception) else None
        try:
            # A further cancellation must not stop the failure from being recorded, nor
            # let the caller close the connection while the record is being written.
            await _finish_despite_cancel(
                self._write_failure(attempt_id, message, trace, duration, reason)
            )
        except FenceLost:
            raise
        except Exception as record_error:  # the next run marks the attempt interrupted
            log.warning(
                "could not record the failure: %s; the attempt stays pending and the next "
                "run marks it failed (interrupted)",
                describe_error(record_error),
            )

    async def _write_failure(
        self, attempt_id: int, message: str, trace: str, duration: int, reason: str | None
    ) -> None:
        # A connection that died was invalidated by SQLAlchemy: after the rollback, begin()
        # opens a fresh one, so the failure is recorded even when the work connection died.
        if self.conn.in_transaction():
            await self.conn.rollback()
        async with self.conn.begin():
            await self.recorder.finish(
                attempt_id,
                Status.FAILED,
                duration_ms=duration,
                error_message=message,
                error_traceback=trace,
                reason=reason,
            )


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


async def _settle(step: Step, session: AsyncSession) -> None:
    """Send the hook's work to the database: flushed into the revision's transaction, or
    committed when the revision commits its own work (``transactional = False``)."""
    if step.transactional:
        await session.flush()
    else:
        await session.commit()


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


async def _finish_despite_cancel(work: Awaitable[None]) -> None:
    """Await ``work`` to its end even if this task is cancelled meanwhile, then re-cancel."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            cancelled = True
            if task.done():
                break
    if cancelled:
        raise asyncio.CancelledError
    task.result()


async def _let_writer_in(path: Path) -> None:
    """Hold off the next batch (SQLite) while another process waits for the write lock:
    until it removes ``path``, for at most ``_WRITER_GRACE`` seconds. Its request, if any,
    comes back with the next checkpoint."""
    deadline = time.monotonic() + _WRITER_GRACE
    while path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


def _taken_over(step: Step, label: str) -> FenceLost:
    """Return the error of a run whose step's attempt another run took over."""
    kept = (
        ""
        if step.transactional
        else "; the batches it committed before stay, and the run that took over resumes after them"
    )
    message = (
        f"lost the migration lock: another run took it over while {label} ran; this run's "
        f"work in progress was rolled back{kept}"
    )
    log.error("%s: stopped: %s", label, message)
    return FenceLost(message)


def _is_statement_timeout(exc: DBAPIError) -> bool:
    """Return whether PostgreSQL cancelled a statement because of ``statement_timeout``."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code == "57014" and "statement timeout" in str(orig)


def _timeout_of(step: Step, default: float | None) -> float | None:
    return step.timeout if step.timeout is not None else default


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
