"""Execute a plan: each step one attempt, recorded in the tracker; the attempt lifecycle.

For each step the runner records a ``pending`` attempt (committed first, so an operator
sees what is running), hands the work to a :class:`~dm.engine.unit.UnitOfWork`, then records how
it ended::

    pending ──> unit of work ──> success / rolled_back   (with the work, in one transaction)
                     │      └──> stopped / paused / cancelled / abandoned   (at a batch
                     │           boundary: dm.engine.stops; the batches committed stay; exit 5)
                     └─────────> failed   (its transaction rolled back; the failure
                                 recorded in a transaction of its own)

A transactional revision runs its hook, ``verify()`` and its final status in one
transaction; a lock wait that timed out rolls the try back and runs it again
(``dm.engine.lock_retries``). A revision with ``transactional = False`` lets ``dm.batched`` commit
per batch with a checkpoint in the pending row; its final status follows the work, and the
next attempt resumes from the checkpoint of a failed one. Every commit passes the run's
fence (``dm.engine.fence``): a run that lost its lock commits nothing more and exits 3.

Cancellation (a signal, or the revision's time limit) interrupts whatever the hook awaits,
including a running PostgreSQL statement: asyncpg sends a cancel request, the transaction
is rolled back and the failure is recorded before the cancellation goes on. If the process
dies instead, the row stays ``pending`` and the next run marks it failed (interrupted);
``client_connection_check_interval`` makes PostgreSQL abort a statement whose client died
within about a second, so the orphaned transaction cannot hold row locks for long.

A failure caused by a transient database error (``dm.core.transient``: a lost connection, a
deadlock, a serialization failure, a lock wait timing out) is recorded ``failed`` with an
error starting "transient" and raised as ``TransientRevisionFailure`` (exit 75). If the work
connection itself died, SQLAlchemy opens a fresh one to record the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from dm.config.engines import configured_url
from dm.config.engines import transaction_settings
from dm.config.liveness import session_guards
from dm.config.pooler import pooler_problem
from dm.config.urls import through_pooler
from dm.core.errors import FenceLost
from dm.core.errors import Incomplete
from dm.core.errors import RevisionFailed
from dm.core.errors import TransientRevisionFailure
from dm.core.errors import UsageError
from dm.core.errors import describe_error
from dm.core.graph import checksum
from dm.core.planning import DEFERRED
from dm.core.planning import Step
from dm.core.transient import is_lock_timeout
from dm.core.transient import is_transient
from dm.engine import loop_watchdog
from dm.engine.cancellation import finish_despite_cancel
from dm.engine.lock_retries import LockRetries
from dm.engine.lock_retries import LockWaitTimedOut
from dm.engine.recording import Recorder
from dm.engine.stops import StopAtBoundary
from dm.engine.stops import StopPolicy
from dm.engine.stops import next_step_after
from dm.engine.tracker import Status
from dm.engine.unit import HookExited
from dm.engine.unit import RevisionTimedOut
from dm.engine.unit import TransactionEnded
from dm.engine.unit import UnitOfWork

log = logging.getLogger("dm.runner")

RECORD_AFTER_LOSS_SECONDS = 5.0
"""How long recording a failure may take after a transient failure (a lost connection):
past it the attempt stays pending and the next run marks it interrupted."""

TRANSIENT_PREFIX = "transient (a retry may succeed): "
"""Starts the recorded error of an attempt that failed on a transient database error."""


@dataclass(frozen=True)
class StepResult:
    """What happened to one step of a plan."""

    revision: str
    direction: str
    status: Status
    duration_ms: int
    description: str


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
        idle_in_transaction_timeout: float | None = None,
    ) -> None:
        """:param shared: the connection is the caller's (``dm.alembic.caller_connection``):
            its session settings are left alone (no ``lock_timeout`` or other ``SET``).
        :param joined: the connection is inside the caller's transaction: nothing may
            commit, so every revision runs as a transactional one (in a savepoint) and an
            autocommit block is refused.
        :param max_runtime: seconds the run may work, counted from ``started`` (a
            ``time.monotonic()`` value; default: now).
        :param writer_waiting: (SQLite) a file another process creates while it waits for
            the database's write lock: between two batches the run then lets it in.
        :param idle_in_transaction_timeout: PostgreSQL ``idle_in_transaction_session_timeout``
            of the session, in seconds (hooks included; None or 0: the server's).
        """
        self.recorder = recorder
        self.conn = recorder.conn
        self.timeout = timeout
        self.pg_lock_timeout = pg_lock_timeout
        self.idle_in_transaction_timeout = idle_in_transaction_timeout
        self.shared = shared or joined
        self.joined = joined
        self._postgres = self.conn.dialect.name == "postgresql"
        self.retries = LockRetries(
            pg_lock_timeout, lock_retries, lock_retry_wait, ours=self._postgres and not self.shared
        )
        self.stops = StopPolicy(
            max_runtime=max_runtime, started=started, writer_waiting=writer_waiting
        )
        # The URL as configured: psycopg's engine URL no longer holds the pooler marker.
        self._pooled = self._postgres and through_pooler(configured_url(self.conn.engine))
        """The connection may be pooled: nothing may outlive a transaction, nothing autocommits."""
        self._session_ready = False
        sync = self.conn.sync_connection
        self._isolation_level = sync.default_isolation_level if sync else None
        self._rescue: loop_watchdog.Rescue | None = None

    async def run(self, steps: Sequence[Step]) -> list[StepResult]:
        """Run ``steps`` in order; stop at the first failure.

        :raises RevisionFailed: a hook raised or ``verify()`` failed; earlier steps stay.
        """
        return [await self.run_step(step) for step in steps]

    async def run_step(self, step: Step) -> StepResult:
        """Run one step as one attempt and record how it ended (see the module docstring).

        :raises RevisionFailed: the attempt failed and is recorded ``failed``.
        :raises TransientRevisionFailure: the same, on a transient database error.
        :raises Incomplete: the attempt stopped at a batch boundary, or the run's time was
            up before it started.
        :raises FenceLost: another run took the lock over; nothing more was committed.
        """
        if self.joined and not step.transactional:
            log.info(
                "%s %s: transactional = False, but inside the caller's transaction nothing "
                "can commit: it runs as one transaction, its batches keep no checkpoint",
                step.direction,
                step.revision,
            )
            step = replace(step, rev=replace(step.rev, transactional=True))
        self.stops.before_step(step)
        resume = self._resume_point(step)
        if self._postgres and not self._session_ready and not self.shared:
            await self._prepare_session()
        async with self._pending_row_transaction():
            attempt_id = await self.recorder.record_step(step, Status.PENDING, checkpoint=resume)
        label = _label(step)
        self._log_start(step, label, resume)
        started = time.perf_counter()
        self.stops.step_starts()
        final = Status.SUCCESS if step.is_upgrade else Status.ROLLED_BACK
        dog = loop_watchdog.active()
        if dog is not None:
            if self._rescue is None:
                self._rescue = await loop_watchdog.rescue_for(
                    self.conn, self.recorder.tracker, self.recorder.run
                )
            dog.arm(step.revision, attempt_id, _timeout_of(step, self.timeout), self._rescue)
        try:
            if step.transactional:
                await self._run_transactional(step, attempt_id, final, started, label)
            else:
                await self._run_batched(step, attempt_id, resume, final, started)
        except StopAtBoundary as stop:
            await self._record_stop(step, label, attempt_id, stop, started)
        except FenceLost:
            await self._rollback()
            raise _taken_over(step, label) from None
        except BaseException as exc:
            await self._fail(step, label, attempt_id, exc, started)
            raise
        finally:
            if dog is not None:
                dog.disarm()
        duration = _elapsed_ms(started)
        log.info("%s: %s in %d ms", label, final.value, duration)
        return StepResult(step.revision, step.direction, final, duration, step.description)

    def _resume_point(self, step: Step) -> Mapping[str, Any] | None:
        """Return the checkpoint a ``transactional = False`` step resumes from, if any."""
        prior = self.recorder.latest.get(step.revision)
        if step.transactional or prior is None or prior.direction != step.direction:
            return None
        return prior.checkpoint if prior.can_resume else None

    def _log_start(self, step: Step, label: str, resume: Mapping[str, Any] | None) -> None:
        prior = self.recorder.latest.get(step.revision)
        if not (resume and prior):
            log.info("%s: running", label)
            return
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

    def _unit(
        self,
        step: Step,
        attempt_id: int,
        *,
        resume: Mapping[str, Any] | None = None,
        remaining: float | None = None,
        lock_timeout: float | None = None,
    ) -> UnitOfWork:
        return UnitOfWork(
            self.recorder,
            step,
            attempt_id,
            self.stops,
            resume=resume,
            limit=_timeout_of(step, self.timeout),
            remaining=remaining,
            lock_timeout=lock_timeout,
            joined=self.joined,
            pooled=self._pooled,
            isolation_level=self._isolation_level,
            connect=None if self.shared else self._worker_connection,
        )

    async def _run_batched(
        self,
        step: Step,
        attempt_id: int,
        resume: Mapping[str, Any] | None,
        final: Status,
        started: float,
    ) -> None:
        """Run a ``transactional = False`` step: its work commits as it goes (per batch,
        with its checkpoint), then its final status in a transaction of its own."""
        unit = self._unit(step, attempt_id, resume=resume)
        try:
            await unit.run()
        except Exception as exc:
            if self.retries.active and is_lock_timeout(exc):
                raise LockWaitTimedOut(self.retries.advice(step, 1)) from exc
            raise
        if unit.stop is not None:  # the revision's code swallowed the stop: its loop did not finish
            raise unit.stop
        async with self.conn.begin():
            await self._finish(attempt_id, final, started)

    async def _run_transactional(
        self, step: Step, attempt_id: int, final: Status, started: float, label: str
    ) -> None:
        """Run a transactional step, retrying it after a lock wait timed out (PostgreSQL).

        Every try runs in a transaction of its own, in the same attempt; the attempt is
        finished by the try that succeeds, or recorded failed by the caller.
        """
        limit = _timeout_of(step, self.timeout)
        tries = self.retries.tries()
        for number in range(1, tries + 1):
            remaining = None if limit is None else limit - (time.perf_counter() - started)
            lock_timeout = self.retries.timeout_of(number) if number > 1 else None
            unit = self._unit(step, attempt_id, remaining=remaining, lock_timeout=lock_timeout)
            try:
                # Not ``async with begin()``: an autocommit block commits this transaction
                # and begins the next; the failure path rolls back whichever is open.
                await self.conn.begin()
                await unit.run()
                check = unit.check_transaction_intact if unit.mark_unchecked else None
                await self._finish(attempt_id, final, started, in_revision=check)
                await self.conn.commit()
                if number > 1:
                    log.info("%s: got its locks on try %d/%d", label, number, tries)
                return
            except Exception as exc:
                if not (self.retries.active and is_lock_timeout(exc)):
                    raise
                wait = self.retries.pause_after(number)
                left = None if limit is None else limit - (time.perf_counter() - started)
                last = number == tries or unit.partly_committed
                if last or (left is not None and left <= wait):
                    advice = self.retries.advice(
                        step, number, partly_committed=unit.partly_committed
                    )
                    raise LockWaitTimedOut(advice) from exc
                await self._rollback()
                log.warning(
                    "%s: lock wait timed out (lock_timeout %gs), try %d/%d; retrying in %gs "
                    "with lock_timeout %gs",
                    label,
                    self.retries.timeout_of(number),
                    number,
                    tries,
                    wait,
                    self.retries.timeout_of(number + 1),
                )
            await asyncio.sleep(wait)

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
        deferred = step.is_upgrade and not step.rev.blocks_deploy
        after = DEFERRED if deferred else "the revisions after it did not run"
        message = (
            f"{label}: {stop.reason}, at a batch boundary after {duration} ms; its committed "
            f"batches stay, {next_step_after(stop, step)}; {after}"
        )
        if deferred:  # the run goes on: this line is all that tells the stop
            log.warning("%s", message)
        raise Incomplete(step.revision, message, stop.status.value)  # told once, by dm's CLI

    async def _fail(
        self, step: Step, label: str, attempt_id: int, exc: BaseException, started: float
    ) -> None:
        """Record the attempt failed and raise what the caller sees of it; a
        ``BaseException`` (a cancellation) goes on as it is once recorded."""
        duration = _elapsed_ms(started)
        message = _describe(exc)
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

    async def _finish(
        self,
        attempt_id: int,
        status: Status,
        started: float,
        *,
        in_revision: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        duration = _elapsed_ms(started)
        await self.recorder.finish(
            attempt_id, status, duration_ms=duration, in_revision=in_revision
        )

    async def _rollback(self) -> None:
        """Roll back whatever this run's connection still has open (nothing is recorded),
        a transaction whose commit the fence refused included."""
        with contextlib.suppress(Exception):
            await finish_despite_cancel(self.conn.rollback())

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
        await self._apply_settings(self.conn)
        self._session_ready = True

    async def _worker_connection(self) -> AsyncConnection:
        """Open a connection for a worker of a parallel loop, set up as the run's is."""
        conn = await self.conn.engine.connect()
        try:
            await self._apply_settings(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _apply_settings(self, conn: AsyncConnection) -> None:
        await prepare_connection(
            conn,
            lock_timeout=self.pg_lock_timeout,
            idle_in_transaction_timeout=self.idle_in_transaction_timeout,
        )

    async def _record_failure(
        self, attempt_id: int, exc: BaseException, message: str, duration: int
    ) -> None:
        """Record the attempt failed; a failure to record is logged (the next run marks the
        attempt interrupted), except :class:`FenceLost`: the attempt is another run's now."""
        reason = "interrupted" if not isinstance(exc, Exception) else None
        # A stop dm caused (a signal) has no traceback worth reading: it is dm's own frames.
        trace = None if reason else "".join(traceback.format_exception(exc))
        try:
            # A further cancellation must not stop the failure from being recorded, nor
            # let the caller close the connection while the record is being written.
            write = self._write_failure(attempt_id, message, trace, duration, reason)
            if isinstance(exc, Exception) and is_transient(exc):
                # The connection died: a fresh one may hang on the same network (bounded).
                write = asyncio.wait_for(write, RECORD_AFTER_LOSS_SECONDS)
            await finish_despite_cancel(write)
        except FenceLost:
            raise
        except Exception as record_error:  # the next run marks the attempt interrupted
            log.warning(
                "could not record the failure: %s; the attempt stays pending and the next "
                "run marks it failed (interrupted)",
                describe_error(record_error),
            )

    async def _write_failure(
        self, attempt_id: int, message: str, trace: str | None, duration: int, reason: str | None
    ) -> None:
        # A connection that died was invalidated by SQLAlchemy: after the rollback, begin()
        # opens a fresh one, so the failure is recorded even when the work connection died.
        await self.conn.rollback()  # no-op when nothing is open
        async with self.conn.begin():
            await self.recorder.finish(
                attempt_id,
                Status.FAILED,
                duration_ms=duration,
                error_message=message,
                error_traceback=trace,
                reason=reason,
            )


def _describe(exc: BaseException) -> str:
    """Return what the tracker records of a failure (no statement, no parameters)."""
    if isinstance(exc, RevisionTimedOut | TransactionEnded | HookExited):
        return str(exc)
    if isinstance(exc, LockWaitTimedOut) and exc.__cause__ is not None:
        return f"{describe_error(exc.__cause__)}; {exc}"
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return "interrupted"
    return describe_error(exc)  # a driver error without its statement and parameters


def _label(step: Step) -> str:
    label = f"{step.direction} {step.revision}"
    return f"{label} ({step.description})" if step.description else label


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


def _timeout_of(step: Step, default: float | None) -> float | None:
    return step.timeout if step.timeout is not None else default


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


async def prepare_connection(
    conn: AsyncConnection,
    *,
    lock_timeout: float | None,
    idle_in_transaction_timeout: float | None,
) -> None:
    """Apply the settings every revision runs with to ``conn`` (PostgreSQL): to the
    session, or to each transaction on a connection that may be pooled."""
    version = conn.dialect.server_version_info or (0,)
    settings: dict[str, str] = {}
    if version >= (14,):
        # A statement whose client died (SIGKILL) is aborted within about a second,
        # instead of running on and holding its locks against the next run.
        settings["client_connection_check_interval"] = "1000"
    if lock_timeout:
        # A data migration never queues behind live traffic's locks for long.
        settings["lock_timeout"] = str(max(int(lock_timeout * 1000), 1))
    settings.update(session_guards(version, idle_in_transaction_timeout))
    if through_pooler(configured_url(conn.engine)):
        if conn.in_transaction():
            await conn.commit()
        transaction_settings(conn, settings)
        return
    for name, value in settings.items():
        await conn.execute(sa.text(f"SET {name} = {value}"))
    await conn.commit()
