"""Workers of a batched loop run in key ranges: the run's own, and ``dm work`` processes.

A loop with ``workers=N`` (``dm.backfill.batching``, ``dm.backfill.ranges``) is worked by
the run's hook and N - 1 tasks of the run, each running the revision's hook again on a
connection of its own (:class:`Crew`). Other processes join with ``dm work REV``
(:func:`join`): they run the hook the same way and claim ranges beside the run's workers.

Every commit of a worker passes a fence. The run's workers commit only while the run
holds the migration lock (the run's fence, as on the run's own connection) and only while
they own the range they work (its lease); a ``dm work`` process, which holds no lock, only
while it owns its range. A worker that lost its range (its lease expired and another took
the range over) therefore commits nothing more: its batch rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession

from dm.backfill.batching import WorkerDone
from dm.backfill.batching import run_context
from dm.backfill.errors import LoopStop
from dm.backfill.progress import Progress
from dm.backfill.ranges import Joinable
from dm.backfill.ranges import Outcome
from dm.backfill.ranges import RangeStore
from dm.backfill.ranges import give_up
from dm.backfill.ranges import joinable
from dm.core.errors import DmError
from dm.core.errors import FenceLost
from dm.core.errors import RevisionFailed
from dm.core.errors import UsageError
from dm.core.errors import describe_error
from dm.core.graph import Hook
from dm.core.planning import Step
from dm.engine.cancellation import finish_despite_cancel
from dm.engine.fence import CommitFence
from dm.engine.hooks import call_hook
from dm.engine.recording import Request
from dm.engine.stops import StopAtBoundary
from dm.engine.stops import StopPolicy
from dm.engine.tracker import Status
from dm.engine.tracker import Tracker

log = logging.getLogger("dm.workers")

ADOPT_SECONDS = 10.0
"""How long a ``dm work`` process waits, once its attempt is recorded failed, for a new
run to resume it (a run restarted after its predecessor was killed) before it stops."""
SHUTDOWN_SECONDS = 10.0
"""How long the run's workers may take to reach their batch boundary once the hook failed."""

Connect = Callable[[], Awaitable[AsyncConnection]]
"""Open a connection set up as the run's working connection is (session settings)."""

_STOPPING_STATUSES = {
    Status.PAUSED.value: Status.PAUSED,
    Status.CANCELLED.value: Status.CANCELLED,
    Status.STOPPED.value: Status.STOPPED,
    Status.ABANDONED.value: Status.ABANDONED,
}
"""Statuses of an attempt that end the ``dm work`` processes working its loop."""


FIRST_POLL_SECONDS = 0.1
"""A ``dm work`` process started with the run (a Job beside the pre-deploy Job) looks for
the loop this soon again, then less and less often (up to its ``poll``)."""


def polls(most: float) -> Iterator[float]:
    """Pauses between looks for something to start: 0.1 s, doubling up to ``most``."""
    pause = min(FIRST_POLL_SECONDS, most)
    while True:
        yield pause
        pause = min(pause * 2, most)


class Lease:
    """The fence of one worker's connection: the range it holds, once it holds one."""

    def __init__(self, fence: CommitFence | None, tracker: Tracker, owner: str) -> None:
        self.fence = fence
        self.tracker = tracker
        self.owner = owner
        self.current: tuple[str, int] | None = None
        """The range this worker holds (token, number), if any."""

    def holding(self, token: str | None, number: int | None) -> None:
        """Every commit from now on needs this worker to own range ``number`` of ``token``."""
        self.current = None if token is None or number is None else (token, number)
        if self.fence is None:
            return
        if token is None or number is None:
            self.fence.require(None)
            return
        r = self.tracker.ranges
        self.fence.require(
            sa.select(r.c.number).where(
                r.c.token == token, r.c.number == number, r.c.owner == self.owner
            )
        )

    def held(self) -> None:
        """A fenced statement matched in the current transaction: its commit is safe."""
        if self.fence is not None:
            self.fence.hold()

    async def release(self, conn: AsyncConnection) -> None:
        """Give up the ranges this worker holds (it ends: a failure, a signal): its batch
        in flight rolls back, its last checkpoints stay, and another worker may claim them
        at once instead of after the lease. On a connection of its own when the worker's
        is unusable (a statement cut short); a dead database leaves the lease to expire.
        A cancellation meanwhile (the run stops its workers) waits for it to end."""
        await finish_despite_cancel(self._give_up(conn))

    async def _give_up(self, conn: AsyncConnection) -> None:
        self.holding(None, None)
        # Every range of its own: one claimed as it was cancelled too.
        statement = give_up(self.tracker.ranges, self.owner)
        try:
            if conn.in_transaction():
                await conn.rollback()
            await conn.execute(statement)
            await conn.commit()
            return
        except Exception as exc:  # try a fresh connection below, once this one is gone
            log.debug("%s: giving its ranges up on its own connection failed: %s", self.owner, exc)
            with contextlib.suppress(Exception):  # its session may hold the range's row lock
                await conn.invalidate()
        try:
            async with conn.engine.connect() as fresh:
                await fresh.execute(statement)
                await fresh.commit()
        except Exception as exc:  # the lease expires instead
            log.debug("%s: could not give its ranges up: %s", self.owner, exc)


class _Parallel:
    """What one worker's ``batched`` loop sees (``dm.backfill.batching.Parallel``)."""

    role = "worker"
    stays = True
    number = 0

    def __init__(
        self,
        tracker: Tracker,
        owner: str,
        lease: Lease,
        *,
        run_id: str | None,
        joins: tuple[str, int] | None,
        progress: Progress | None = None,
    ) -> None:
        self.tracker = tracker
        self.owner = owner
        self.lease = lease
        self.run_id = run_id
        self.joins = joins
        self.progress = progress
        self._store: RangeStore | None = None
        self._unfinished: Callable[[], Awaitable[None]] | None = None

    def store(self, lease_seconds: float) -> RangeStore:
        fence = None if self.run_id is None else self.tracker.fence_held(self.run_id)
        self._store = RangeStore(
            self.tracker.ranges,
            self.tracker.table,
            owner=self.owner,
            lease_seconds=lease_seconds,
            fence=fence,
            holding=self.lease.holding,
        )
        return self._store

    def fenced(self) -> None:
        self.lease.held()

    async def start_workers(self, count: int, token: str, loop: int) -> None:
        raise AssertionError("only the run starts workers")  # pragma: no cover

    async def join_workers(self) -> None:
        return None

    async def stop_workers(self) -> None:
        return None

    async def after_range_checkpoint(self, outcome: Outcome) -> bool:
        raise NotImplementedError

    async def stopping(self, session: AsyncSession, stop: LoopStop) -> None:
        return None

    def if_unfinished(self, settle: Callable[[], Awaitable[None]] | None) -> None:
        self._unfinished = settle


class Crew(_Parallel):
    """The run's side of a parallel loop: the run's hook and the tasks it starts."""

    role = "run"

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        lease: Lease,
        *,
        step: Step,
        stops: StopPolicy,
        connect: Connect,
        ask_stop: Callable[[AsyncSession, str], Awaitable[None]],
    ) -> None:
        """:param ask_stop: leave a ``stop`` request, with a reason, on the run's attempt
        (in the session's transaction, fenced)."""
        super().__init__(tracker, f"run:{run_id}:0", lease, run_id=run_id, joins=None)
        self._run_id = run_id
        self.step = step
        self.stops = stops
        self.connect = connect
        self._ask_stop = ask_stop
        self.stop: StopAtBoundary | None = None
        """The first stop a worker met: the others stop at their next boundary."""
        self.failure: BaseException | None = None
        """What ended a worker task in failure: the run's loop raises it, the others end."""
        self.ending = False
        """The run's hook ended: the workers end at their next batch boundary."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start_workers(self, count: int, token: str, loop: int) -> None:
        for number in range(1, count + 1):
            task = asyncio.create_task(self._work(number, token, loop))
            self._tasks.append(task)

    async def join_workers(self) -> None:
        if not self._tasks:
            return
        tasks, self._tasks = self._tasks, []
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except BaseException:
            await _cancel(tasks)
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self.failure is not None:
            raise self.failure
        if self.stop is not None:
            raise self.stop

    async def stop_workers(self) -> None:
        tasks, self._tasks = self._tasks, []
        await _cancel(tasks)

    async def shutdown(self) -> None:
        """End the run's workers and the lease on the run's connection (the hook ended).

        When the run is being cancelled (a signal, its time limit) the workers are
        cancelled with it; otherwise (the hook failed) each ends at its next batch
        boundary, and one still in its batch after ``SHUTDOWN_SECONDS`` is cancelled. A
        loop left unfinished then gives the run's ranges up and records the rows done.
        """
        tasks, self._tasks = self._tasks, []
        current = asyncio.current_task()
        if tasks and current is not None and current.cancelling():
            await _cancel(tasks)
        elif tasks:
            self.ending = True
            _, pending = await asyncio.wait(tasks, timeout=SHUTDOWN_SECONDS)
            await _cancel(list(pending))
        self.lease.holding(None, None)
        settle, self._unfinished = self._unfinished, None
        if settle is not None:  # the loop ended in a failure or on a signal
            await settle()

    async def stopping(self, session: AsyncSession, stop: LoopStop) -> None:
        """At the run's own stop (its time box) leave a ``stop`` request on the attempt, so
        that the ``dm work`` processes stop after their batch too (a request of ``dm
        pause`` or ``dm cancel`` they read already); the run's tasks stop at ``self.stop``."""
        if isinstance(stop, StopAtBoundary) and stop.status is Status.STOPPED:
            await self._ask_stop(session, stop.reason)
            await session.commit()

    async def after_range_checkpoint(self, outcome: Outcome, *, member: bool = False) -> bool:
        if member and self.ending:
            raise WorkerDone
        if self.failure is not None:
            if member:
                raise WorkerDone
            failure, self.failure = self.failure, None
            raise failure
        if self.stop is not None:
            raise self.stop
        request = None if outcome.request is None else Request(*outcome.request)
        try:
            await self.stops.after_checkpoint(self.step, request)
        except StopAtBoundary as stop:
            self.stop = stop
            raise
        return True

    async def _work(self, number: int, token: str, loop: int) -> None:
        """One worker of the run: the hook again, on a connection of its own."""
        owner = f"run:{self._run_id}:{number}"
        conn = await self.connect()
        try:
            assert conn.sync_connection is not None
            fence = CommitFence(conn.sync_connection, self.tracker, self._run_id)
            lease = Lease(fence, self.tracker, owner)
            member = _Member(self, number, owner, lease, joins=(token, loop))
            with fence.installed():
                await _run_hook(conn, self.step, member)
        except StopAtBoundary:
            pass  # self.stop: the run's loop raises it once its workers ended
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
        finally:
            await _close(conn)


class _Member(_Parallel):
    """A worker task of the run: it stops when the run's loop does, and ends once no range
    is left to claim (the run's own loop waits for the rest)."""

    stays = False

    def __init__(
        self, crew: Crew, number: int, owner: str, lease: Lease, *, joins: tuple[str, int]
    ) -> None:
        super().__init__(
            crew.tracker,
            owner,
            lease,
            run_id=crew.run_id,
            joins=joins,
            progress=crew.progress,
        )
        self.crew = crew
        self.number = number

    async def after_range_checkpoint(self, outcome: Outcome) -> bool:
        return await self.crew.after_range_checkpoint(outcome, member=True)


class _Joiner(_Parallel):
    """A ``dm work`` process: it stops when the attempt it works for is stopped, or failed
    and not taken over by a new run within ``ADOPT_SECONDS``. (A run that was killed leaves
    its attempt pending: its workers go on, and the next run finishes the loop.)"""

    conn: AsyncConnection
    revision: str

    async def after_range_checkpoint(self, outcome: Outcome) -> bool:
        stop = _stopped_by(outcome.status, outcome.request)
        if stop is not None:
            raise stop
        if outcome.status != Status.FAILED.value:
            return True
        adopted, holds = await self._taken_over()
        if not adopted:
            raise StopAtBoundary(
                Status.STOPPED,
                "its attempt failed (the next dm upgrade or dm resume goes on with its ranges)",
            )
        return holds

    async def _taken_over(self) -> tuple[bool, bool]:
        """Wait up to ``ADOPT_SECONDS`` for a new run to resume the failed attempt (its
        ranges then belong to a pending attempt), renewing the lease on the range this
        worker holds; return whether a run did, and whether the worker still owns its range
        (a lease shorter than the wait may expire and the range be taken over)."""
        assert self.joins is not None and self._store is not None
        store = self._store
        deadline = time.monotonic() + ADOPT_SECONDS
        pause = min(1.0, store.lease_seconds / 4)
        holds = True
        while True:
            if holds and self.lease.current is not None:
                holds = await store.renew(self.conn, *self.lease.current)
                if not holds:  # nothing of its own to commit: the look below is a read
                    await self.conn.rollback()
                    self.lease.holding(None, None)
            loop = await joinable(self.conn, self.tracker.ranges, self.tracker.table, self.revision)
            if loop is None and await _settled(self.conn, self.tracker, self.revision):
                return True, holds  # a new run resumed the loop and finished it meanwhile
            # No range left but not settled yet: the new run is recording its success.
            if loop is not None and loop.token != self.joins[0]:
                return False, holds
            if loop is not None and loop.status == Status.PENDING.value:
                return True, holds
            if time.monotonic() >= deadline:
                return False, holds
            await asyncio.sleep(pause)


@dataclass
class WorkerUnit:
    """What ``batched`` sees of a worker's run of the hook (``dm.backfill.batching.RunUnit``)."""

    revision: str
    direction: str
    parallel: _Parallel
    attempt_id: int | None = None
    transactional: bool = False
    resume: Mapping[str, Any] | None = None
    loops: int = 0

    async def save_checkpoint(self, session: AsyncSession, checkpoint: Mapping[str, Any]) -> Any:
        raise UsageError(
            f"revision {self.revision}: a worker can only join a loop run with workers"
        )

    async def after_checkpoint(self, request: Any) -> None:
        return None

    def autocommit(self) -> AbstractAsyncContextManager[None]:
        raise UsageError(
            f"revision {self.revision}: an autocommit block cannot run in a worker of a "
            "parallel loop (each worker runs the code before the loop again): move it into "
            "a revision of its own before this one, or after the loop"
        )


async def _run_hook(conn: AsyncConnection, step: Step, parallel: _Parallel) -> None:
    """Run ``step``'s hook as a worker until its loop has no range left."""
    hook: Hook | None = step.rev.upgrade if step.is_upgrade else step.rev.downgrade
    assert hook is not None
    unit = WorkerUnit(step.revision, step.direction, parallel)
    session = AsyncSession(bind=conn, expire_on_commit=False)
    try:
        with run_context(unit):
            await call_hook(hook, session)
    except WorkerDone:
        pass
    finally:
        try:
            await session.close()
        finally:
            await parallel.lease.release(conn)
        if conn.in_transaction():
            await conn.rollback()


async def _close(conn: AsyncConnection) -> None:
    """Close a worker's connection, to the end even if the worker is cancelled meanwhile
    (a close cut short leaves the driver's connection half closed, and an error logged)."""
    closing = asyncio.ensure_future(conn.close())
    try:
        await asyncio.wait({closing})  # not cancelled with the caller: it goes on
    finally:
        if not closing.done():
            await asyncio.wait({closing})
        if not closing.cancelled():
            closing.exception()  # retrieved: the connection is gone either way


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled():
                task.exception()  # retrieved: what the loop raises is reported instead


# -- dm work -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkResult:
    """What a ``dm work`` process did."""

    revision: str
    joined: bool
    """Whether it found the loop running and worked its ranges."""
    direction: str | None = None
    stopped: str | None = None
    """Why it stopped before the loop's ranges were done (a request, a stopped attempt)."""


async def join(
    tracker: Tracker,
    conn: AsyncConnection,
    step_of: Callable[[str], Step],
    revision: str,
    *,
    wait: float,
    poll: float = 1.0,
) -> WorkResult:
    """Join the running loop of ``revision`` on ``conn``: claim and work its ranges with
    the revision's own hook until none is left.

    :param step_of: the step of the revision in a direction (``upgrade``/``downgrade``).
    :param wait: seconds to wait for the loop to start (the run may not have reached it).
    """
    deadline = time.monotonic() + wait
    pauses = polls(poll)
    session = AsyncSession(bind=conn, expire_on_commit=False)
    try:
        while True:  # a loop that is running: not paused, stopped or failed (not yet resumed)
            loop = await joinable(session, tracker.ranges, tracker.table, revision)
            held_up = None if loop is None else _held_up(loop)
            if (loop is not None and held_up is None) or time.monotonic() >= deadline:
                break
            if loop is None and await _settled(session, tracker, revision):
                break  # its latest attempt ended: no loop of it is coming
            await asyncio.sleep(next(pauses))
    finally:
        await session.close()
    if loop is None:
        return WorkResult(revision, joined=False)
    if held_up is not None:
        return WorkResult(revision, False, loop.direction, stopped=f"{held_up}; nothing done")
    step = step_of(loop.direction)
    owner = f"work:{uuid.uuid4()}"
    assert conn.sync_connection is not None
    fence = CommitFence(conn.sync_connection, tracker, None)
    lease = Lease(fence, tracker, owner)
    joiner = _Joiner(tracker, owner, lease, run_id=None, joins=(loop.token, loop.loop))
    joiner.conn, joiner.revision = conn, revision
    which = f" (loop {loop.loop + 1})" if loop.loop else ""
    log.info("%s %s: joining its parallel loop%s as %s", loop.direction, revision, which, owner)
    try:
        with fence.installed():
            await _run_hook(conn, step, joiner)
    except StopAtBoundary as stop:
        return WorkResult(revision, True, loop.direction, stopped=stop.reason)
    except FenceLost:
        raise FenceLost(
            f"{loop.direction} {revision}: this worker's range was taken over (its lease "
            "expired) before the revision's code committed; that commit was refused and "
            "rolled back"
        ) from None
    except (DmError, DBAPIError):
        raise  # dm's own, and database failures (transient or not), told as such
    except Exception as exc:  # the revision's code failed in this worker
        raise RevisionFailed(revision, describe_error(exc)) from exc
    return WorkResult(revision, True, loop.direction)


async def _settled(
    session: AsyncSession | AsyncConnection, tracker: Tracker, revision: str
) -> bool:
    """Return whether the latest attempt of ``revision`` ended in success (a worker started
    after the loop finished has nothing to wait for)."""
    t = tracker.table
    status = (
        await session.execute(
            sa.select(t.c.status).where(t.c.revision == revision).order_by(t.c.id.desc()).limit(1)
        )
    ).scalar()
    await session.commit()
    return status in (Status.SUCCESS.value, Status.ROLLED_BACK.value)


def _stopped_by(
    status: str | None, request: tuple[str, str | None, str | None] | None
) -> StopAtBoundary | None:
    """Return the stop of a ``dm work`` process whose attempt has ``status`` and
    ``request`` (``dm pause``, ``dm cancel``), or None while it may work on."""
    if request is not None and request[0] == "stop":  # the run's own stop, e.g. its time box
        return StopAtBoundary(Status.STOPPED, f"its run {request[2] or 'stopped'}")
    if request is not None and request[0] in {"pause", "cancel", "abandon"}:
        return StopAtBoundary(Status.STOPPED, f"its attempt was {Request(*request).describe()}")
    stopping = _STOPPING_STATUSES.get(status or "")
    if stopping is not None:
        return StopAtBoundary(stopping, f"its attempt was {stopping.value}")
    return None


def _held_up(loop: Joinable) -> str | None:
    """Why a worker must not join ``loop`` now (None: it may), while it waits."""
    stop = _stopped_by(loop.status, loop.request)
    if stop is None and loop.status != Status.FAILED.value:
        return None
    why = stop.reason if stop is not None else "its attempt failed"
    return f"{why} (the next dm {loop.direction} or dm resume goes on with its ranges)"
