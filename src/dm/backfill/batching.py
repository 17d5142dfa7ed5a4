"""``dm.batched``: walk a query in keyset-paginated batches inside a revision's hook.

The query is re-issued per batch with ``key > last_key`` (ascending on ``key``), so memory
stays constant whatever the table size and rows changed by earlier batches are not
revisited. By default a batch is a key range, ``(lower, upper]``: only the page's last key
comes back, and the caller bounds its write by ``batch.where()``; ``rows=True`` fetches the
rows too.

Between batches the loop may sleep (``throttle``), wait while a ``pause_when`` predicate
gives a reason (``dm.backfill.backoff`` has ready-made ones), and resize the next page so that a
batch takes about ``target_seconds``.

In a revision with ``transactional = False`` each batch's writes are committed together
with a checkpoint (the loop, the last key, the rows done) in the attempt's tracker row.
When the attempt fails or is interrupted, the next run of the same revision and direction
starts after that checkpoint, so every row is processed exactly once. A hook may run
several ``batched`` loops one after the other; the checkpoint records which one was
running, and the loops an earlier attempt finished are skipped.

In a transactional revision ``batched`` only pages: the whole revision is one transaction
and there is no checkpoint. The runner sets the unit of work ``batched`` reads; used outside
a dm run, ``batched`` raises :class:`BatchingError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import operators

from dm.backfill.errors import BatchingError as BatchingError
from dm.backfill.errors import LoopStop
from dm.backfill.keys import decode_key
from dm.backfill.keys import encode_key
from dm.backfill.progress import Progress
from dm.backfill.progress import clock
from dm.backfill.ranges import RANGES_PER_WORKER
from dm.backfill.ranges import Outcome
from dm.backfill.ranges import Range
from dm.backfill.ranges import RangeStore
from dm.backfill.ranges import split_points
from dm.backfill.ranges import splittable
from dm.backfill.ranges import with_progress

log = logging.getLogger("dm.batched")


class RunUnit(Protocol):
    """What ``batched`` and the autocommit blocks need of the attempt running the hook: the
    runner's unit of work (``dm.engine.unit.UnitOfWork``)."""

    revision: str
    direction: str
    transactional: bool
    resume: Mapping[str, Any] | None
    """The checkpoint an earlier attempt left (``transactional = False`` revisions only)."""
    loops: int
    """How many ``batched`` loops the hook has started."""

    async def save_checkpoint(self, session: AsyncSession, checkpoint: Mapping[str, Any]) -> Any:
        """Write ``checkpoint`` in the batch's transaction; return what ``after_checkpoint``
        takes (the request another shell left on the attempt)."""

    async def after_checkpoint(self, request: Any) -> None:
        """Called once a batch (not the last) and its checkpoint committed: the runner's
        stop check (time up, ``dm pause``, ``dm cancel``), which raises to stop."""

    def autocommit(self) -> AbstractAsyncContextManager[None]:
        """Return a block that leaves the revision's transaction and resumes it after."""

    @property
    def attempt_id(self) -> int | None:
        """The attempt's row in the tracker (None for a worker of another process)."""

    @property
    def parallel(self) -> Parallel | None:
        """What a loop with ``workers`` needs (PostgreSQL, ``transactional = False``), or
        None where loops run as one worker."""


class Parallel(Protocol):
    """What a unit of work offers a loop run with ``workers=N``: the ranges, and the run's
    own workers (``dm.engine.workers``)."""

    role: str
    """``run`` (the attempt's own hook: it plans the ranges and finishes the loop) or
    ``worker`` (a task of the run, or a ``dm work`` process, running the hook again)."""
    joins: tuple[str, int] | None
    """A worker's loop: its token and number (earlier loops are skipped)."""
    progress: Progress | None
    """The progress the run's own workers share (set by the run's loop)."""
    number: int
    """The worker's number in its process (0: the run's own hook, or a ``dm work``)."""
    stays: bool
    """Whether the worker stays, once no range is left to claim, until every range is
    finished (taking over any whose worker died): the run, and ``dm work`` processes."""

    def store(self, lease_seconds: float) -> RangeStore:
        """Return the statements on the ranges, for this worker."""

    def fenced(self) -> None:
        """Note that a fenced statement (a range's checkpoint, claim or split) matched."""

    async def start_workers(self, count: int, token: str, loop: int) -> None:
        """Start ``count`` workers of the run, each running the hook on a connection of its
        own and joining the loop ``token`` (``run`` only)."""

    async def join_workers(self) -> None:
        """Wait for the run's workers to end; raise what stopped or failed one."""

    async def stop_workers(self) -> None:
        """Cancel the run's workers (the loop ends early) and wait for them."""

    async def after_range_checkpoint(self, outcome: Outcome) -> bool:
        """After a batch of a range committed, or between two looks of a worker with no
        range to work: raise ``StopAtBoundary`` to stop there (a request on the attempt, the
        run's time, another worker that stopped). Return whether the worker still owns its
        range (False: taken over while it waited)."""

    async def stopping(self, session: AsyncSession, stop: LoopStop) -> None:
        """The run's loop stops at ``stop``: tell the other processes' workers, which see
        the attempt at their next checkpoint (``run`` only; commits)."""

    def if_unfinished(self, settle: Callable[[], Awaitable[None]] | None) -> None:
        """Await ``settle`` when the run's hook ends with this loop neither finished nor
        stopped (a failure, a signal), before the hook's session closes: an exception in
        the loop's body leaves the loop's generator to be closed later, by another task
        (``run`` only; None: nothing to settle)."""


class WorkerDone(BaseException):
    """Ends a worker's run of the hook once its loop has no range left (``role=worker``).

    A ``BaseException``: revision code catching ``Exception`` cannot turn it into a return
    and run the code after the loop, which is the run's alone.
    """


_current: contextvars.ContextVar[RunUnit | None] = contextvars.ContextVar(
    "dm_run_context", default=None
)


@dataclass(frozen=True)
class Probe:
    """Instrumentation of ``batched`` loops, for tests (dm's pytest plugin).

    ``size`` replaces every loop's batch size; ``committed(context, checkpoint, rows)`` is
    called right after each batch and its checkpoint commit (``transactional = False``
    only), with the batch's row count; what it raises ends the hook as a failure would.
    """

    size: int | None = None
    committed: Callable[[RunUnit, Mapping[str, Any], int], None] | None = None


_probes: list[Probe] = []
"""The probes in effect, innermost last. A plain list, not a context variable: a test sets
it around a whole dm command, whose connections may switch contexts (greenlets)."""


@contextlib.contextmanager
def probing(probe: Probe) -> Iterator[None]:
    """Apply ``probe`` to the ``batched`` loops run inside the block (tests only)."""
    _probes.append(probe)
    try:
        yield
    finally:
        _probes.remove(probe)


@contextlib.contextmanager
def run_context(context: RunUnit) -> Iterator[None]:
    """Make ``context`` the current run for ``batched`` while the hook runs."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def current_run() -> RunUnit | None:
    """Return the unit of work of the hook being run, or None outside a dm run."""
    return _current.get()


class Batch:
    """One batch: the key range ``(lower, upper]`` of a page, its row count and, with
    ``rows=True``, its rows.

    ``lower`` is the key the batch starts after (None for a loop's first batch) and
    ``upper`` the page's last key: the page's rows are exactly the query's rows with
    ``lower < key <= upper``. ``where()`` is that condition, the bound for the batch's write.
    """

    __slots__ = ("_keyset", "_rows", "lower", "row_count", "size", "upper")

    def __init__(
        self,
        keyset: _Keyset,
        lower: Any,
        upper: Any,
        row_count: int,
        rows: list[Any] | None = None,
        size: int = 0,
    ) -> None:
        self._keyset = keyset
        self._rows = rows
        self.lower = lower
        self.upper = upper
        self.row_count = row_count
        self.size = size
        """The page size asked for (``row_count`` is smaller only for a loop's last page)."""

    def where(self, *columns: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """Return ``lower < key <= upper``: bound the batch's write by it.

        ``columns`` default to the loop's key; pass other columns (the key of the table
        written to, e.g. through a join or an alias) in the key's order.
        """
        return self._keyset.within(self.lower, self.upper, columns or None)

    @property
    def rows(self) -> list[Any]:
        """The page's rows, fetched with ``batched(..., rows=True)`` only."""
        if self._rows is None:
            raise BatchingError(
                "this batch has no rows: batched() fetches only the key range by default; "
                "pass rows=True to get the rows"
            )
        return self._rows

    @property
    def first_key(self) -> Any:
        """The key of the page's first row (``rows=True`` only; the bound is ``lower``)."""
        if self._rows is None:
            raise BatchingError(
                "batch.first_key needs batched(..., rows=True); bound the batch's write by "
                "batch.where() (key > batch.lower AND key <= batch.upper) instead"
            )
        return self._keyset.value(self._rows[0])

    @property
    def last_key(self) -> Any:
        """The key of the page's last row: ``upper``."""
        return self.upper

    def __len__(self) -> int:
        return self.row_count

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]

    def __repr__(self) -> str:
        return f"<Batch ({self.lower!r}, {self.upper!r}], {self.row_count} rows>"


PausePredicate = Callable[[AsyncSession], Awaitable[str | bool | None]]
"""``pause_when``: an async function of the session returning why to wait, or None/False."""

_SMOOTHING = 0.5
"""Weight of the newest batch in the smoothed time per row (``target_seconds``)."""
_DEADBAND = 0.1
"""A computed size within this fraction of the current one leaves it unchanged."""
_MAX_STEP = 2.0
"""The size changes by at most this factor from one batch to the next."""
DEFAULT_LEASE_SECONDS = 150.0
"""How long a worker holds a range of a parallel loop between two commits: above dm's
default ``idle_in_transaction_session_timeout`` (60 s) plus a long batch, so that a frozen
worker's session, and the row locks of its batch, are gone before its range is taken over."""
STOP_WAIT_SECONDS = 10.0
"""How long a stopped run waits for the other processes' workers to reach their boundary."""
REPORT_SECONDS = 2.0
"""How often the run writes the rows of all workers of a parallel loop in its attempt."""
FAILED_SETTLE_SECONDS = 5.0
"""How long the run, failing, tries to give its ranges up and write the rows done."""
JOIN_POLL_SECONDS = 0.2
"""How often the run looks again while other processes' workers finish their ranges."""
WAIT_LOG_INTERVAL = 60.0
"""Seconds between two "still waiting" lines while ``pause_when`` holds a loop."""


async def batched(
    session: AsyncSession,
    query: sa.Select[Any],
    *,
    key: sa.ColumnElement[Any] | Sequence[sa.ColumnElement[Any]],
    size: int = 1000,
    rows: bool = False,
    throttle: float = 0.0,
    count: bool = False,
    target_seconds: float | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    pause_when: PausePredicate | None = None,
    pause_poll: float = 5.0,
    workers: int = 1,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> AsyncIterator[Batch]:
    """Walk ``query`` in batches of at most ``size`` rows, ordered by ``key``.

    ``key`` must be one of the query's selected columns, unique and never null (or a
    tuple of columns, unique together, compared as a row value). Each page is the query
    re-issued as ``query WHERE key > <last key> ORDER BY key LIMIT size`` (its own ORDER
    BY is replaced); by default only the page's last key and row count come back (one
    row), and the batch is the key range ``(batch.lower, batch.upper]``. Bound the
    batch's write by ``batch.where()`` and repeat the query's condition.

    :param rows: True fetches the page's rows too: ``for row in batch``, ``batch.rows``.
    :param throttle: seconds to sleep after each batch, so live traffic keeps its share.
    :param count: run one ``COUNT(*)`` of the query first, for a total and an ETA.
    :param target_seconds: adapt the batch size so that each batch (its page query, the
        work done with it and its commit) takes about this long, starting at ``size``,
        between ``min_size`` (default ``size // 10``) and ``max_size`` (default ``size * 10``).
    :param pause_when: an async predicate ``f(session)`` checked between batches: while it
        returns a reason (a string, or True), the loop waits, checking again every
        ``pause_poll`` seconds. ``dm.backfill.backoff`` has ready-made ones.
    :param workers: on PostgreSQL, in a ``transactional = False`` revision, split the key
        space into ranges worked by ``workers`` workers at once, each on a connection of
        its own; ``dm work`` processes may join (``dm.backfill.ranges``). Each worker runs
        the hook again, so code before the loop runs in every worker and code after it in
        the run alone. Needs one key column of integers, numerics, dates, timestamps or
        UUIDs. Elsewhere the loop runs as one worker.
    :param lease_seconds: how long a worker holds a range without committing a batch
        before another may take it over from its checkpoint (longer than a batch takes).
    """
    context = _current.get()
    if context is None:
        raise BatchingError("dm.batched() can only be used inside a revision run by dm")
    revision = context.revision
    probe = _probes[-1] if _probes else None
    if probe is not None and probe.size is not None:  # a fixed size; no tuning
        size, target_seconds, min_size, max_size = probe.size, None, None, None
    sizer = _Sizer.of(size, target_seconds, min_size, max_size, revision)
    if throttle < 0:
        raise BatchingError(f"revision {revision}: batched() throttle must not be negative")
    if pause_poll <= 0:
        raise BatchingError(f"revision {revision}: batched() pause_poll must be positive")
    keyset = _Keyset.of(query, key, revision)
    # Private, but the only way to see them: a query's own LIMIT was ignored and its own
    # OFFSET skipped rows of every page.
    if any(c is not None for c in (query._limit_clause, query._offset_clause, query._fetch_clause)):
        raise BatchingError(
            f"revision {revision}: batched() pages the query itself (LIMIT and OFFSET by "
            "batch): remove the query's own LIMIT, OFFSET or FETCH, or select what it "
            "chose with a condition (e.g. key <= a bound)"
        )
    if workers < 1:
        raise BatchingError(f"revision {revision}: batched() workers must be at least 1")
    if not lease_seconds > 0:
        raise BatchingError(f"revision {revision}: batched() lease_seconds must be positive")
    loop = context.loops
    context.loops += 1
    parallel = context.parallel
    if parallel is not None and parallel.joins is not None:  # a worker joining a loop
        _, joined = parallel.joins
        if loop < joined:
            return  # finished by the run before the worker joined
        if loop > joined or (workers < 2 and not _ranged_resume(context.resume, loop)):
            raise WorkerDone
    elif workers > 1 and parallel is None:
        log.info(
            "%s %s: batched(workers=%d) runs as one worker here (%s)",
            context.direction,
            revision,
            workers,
            "a transactional revision" if context.transactional else "SQLite has one writer",
        )
    save = None if context.transactional else context.save_checkpoint
    label = f"{context.direction} {revision}" + (f" (loop {loop + 1})" if loop else "")

    start = _Start.from_checkpoint(context.resume, loop, keyset, revision)
    if start.skip:
        log.info("%s: finished by an earlier attempt; skipped", label)
        return
    if parallel is not None and (
        workers > 1 or parallel.joins is not None or _ranged_resume(context.resume, loop)
    ):
        ranged = _RangedLoop(
            session,
            context,
            parallel,
            keyset,
            query.order_by(None),
            loop=loop,
            label=label,
            workers=workers,
            lease_seconds=lease_seconds,
            pages=_Pages(query, keyset, rows=rows, revision=revision),
            sizer=sizer,
            throttle=throttle,
            # A waiting worker renews its lease at each look: look often enough to keep it.
            waiter=None
            if pause_when is None
            else _Waiter(pause_when, min(pause_poll, lease_seconds / 4), label, False),
            count=count,
            probe=probe,
        )
        async for batch in ranged.run(start):
            yield batch
        if parallel.role == "worker":
            raise WorkerDone
        return
    if start.done:
        log.info("%s: resuming after key %r, %d rows already done", label, start.last, start.done)
    last, done = start.last, start.done
    sizer.resume_at(start.size)
    unordered = query.order_by(None)

    def after(last: Any) -> sa.Select[Any]:
        return unordered if last is None else unordered.where(keyset.after(last))

    pages = _Pages(query, keyset, rows=rows, revision=revision)
    await _refuse_null_keys(session, unordered, keyset, revision)
    total = None
    if count:  # the rows still to do, plus those an earlier attempt did
        total = done + await _count(session, after(last))
    progress = Progress(label, total, done=done, batch_size=sizer.size)
    waiter = None if pause_when is None else _Waiter(pause_when, pause_poll, label, save is None)
    completed = False
    try:
        while True:
            limit = sizer.size
            started = time.monotonic()
            batch = await pages.fetch(session, last, None, limit)
            finished = batch.row_count < limit
            if batch.row_count:
                if keyset.has_null(batch.upper):
                    raise BatchingError(f"revision {revision}: the key column must not be null")
                stored_key = keyset.encode(batch.upper, revision) if save else None
                yield batch
                last, done = batch.upper, done + batch.row_count
            else:
                stored_key = keyset.encode(last, revision) if save and last is not None else None
            if save is not None:
                checkpoint = {
                    "loop": loop,
                    "last_key": stored_key,
                    "rows_done": done,
                    "rows_total": total,
                    "finished": finished,
                }
                if sizer.target is not None:  # a resumed loop goes on at the size reached
                    checkpoint["batch_size"] = limit
                request = await save(session, checkpoint)
                await session.commit()
                if probe is not None and probe.committed is not None:
                    probe.committed(context, checkpoint, batch.row_count)
                if not finished:
                    await context.after_checkpoint(request)  # may stop the loop here
            sizer.observe(batch.row_count, time.monotonic() - started)
            progress.advance(batch.row_count, batch_size=sizer.size)
            if finished:
                break
            if throttle:
                await asyncio.sleep(throttle)
            if waiter is not None:
                await waiter.wait(session)
        completed = True
        progress.finish()
    finally:
        if not completed:
            progress.close()


def _ranged_resume(checkpoint: Mapping[str, Any] | None, loop: int) -> bool:
    """Return whether ``checkpoint`` is of loop ``loop`` run in ranges, not finished."""
    return bool(
        checkpoint
        and checkpoint.get("ranges")
        and checkpoint.get("loop") == loop
        and not checkpoint.get("finished")
    )


class _RangedLoop:
    """One worker's share of a loop run in key ranges (``workers=N``, PostgreSQL).

    The run's own hook plans the ranges (or adopts those of the attempt it resumes),
    starts the run's other workers, works ranges like them and, once none is left to
    claim, waits for every range to finish (taking over any whose lease expired) before it
    records the loop finished. A worker works ranges until none is left, then ends.
    """

    def __init__(
        self,
        session: AsyncSession,
        context: RunUnit,
        parallel: Parallel,
        keyset: _Keyset,
        query: sa.Select[Any],
        *,
        loop: int,
        label: str,
        workers: int,
        lease_seconds: float,
        pages: _Pages,
        sizer: _Sizer,
        throttle: float,
        waiter: _Waiter | None,
        count: bool,
        probe: Probe | None,
    ) -> None:
        self.session = session
        self.context = context
        self.parallel = parallel
        self.keyset = keyset
        self.query = query
        self.loop = loop
        self.label = label
        self.workers = workers
        self.store = parallel.store(lease_seconds)
        self.pages = pages
        self.sizer = sizer
        self.throttle = throttle
        self.waiter = waiter
        self.count = count
        self.probe = probe
        self.revision = context.revision
        self._running: dict[str, Any] = {}
        """The attempt's checkpoint while the loop runs (the run only)."""
        self._reported = time.monotonic()
        self._waited: float | None = None

    async def run(self, start: _Start) -> AsyncIterator[Batch]:
        """Yield this worker's batches; for the run, until the whole loop is done."""
        if self.keyset.composite:
            raise BatchingError(
                f"revision {self.revision}: batched(workers=...) needs a key of one column"
            )
        run = self.parallel.role == "run"
        if run:  # once, before planning: the workers join a loop already checked
            await _refuse_null_keys(self.session, self.query, self.keyset, self.revision)
            token, total = await self._begin(start)
        else:
            assert self.parallel.joins is not None
            token, total = self.parallel.joins[0], None
        progress = None if run else self.parallel.progress
        own_progress = progress is None
        if progress is None and run:  # shared with the run's workers
            done = await self.store.rows_done(self.session, token)
            await self.session.commit()
            progress = Progress(self.label, total, done=done, batch_size=self.sizer.size)
            self.parallel.progress = progress
        elif progress is None:  # a dm work process: its own rows
            progress = Progress(self.label, None, batch_size=self.sizer.size)
        completed = stopped = False
        if run:  # the hook may end without closing this generator: dm settles it then

            async def settle() -> None:
                await self._failed(token)

            self.parallel.if_unfinished(settle)
        try:
            if run and self.workers > 1:
                await self.parallel.start_workers(self.workers - 1, token, self.loop)
            while True:
                held = await self._next_range(token)
                if held is None:
                    if not self.parallel.stays:
                        break
                    left = await self._left(token)
                    if left == 0:
                        break
                    self._waiting(left)
                    await self._report(token)
                    # A stop (a request, the run's time box) reaches a waiting worker too.
                    state = await self.store.attempt_state(self.session, token)
                    await self.session.commit()
                    await self.parallel.after_range_checkpoint(state)
                    await asyncio.sleep(JOIN_POLL_SECONDS)
                    continue
                self._waited = None
                try:
                    async for batch in self._work(held, progress):
                        yield batch
                except LoopStop:  # its last checkpoint committed: free it for the next run
                    self.store.hold(None)
                    await self.store.release(self.session)
                    raise
                finally:
                    self.store.hold(None)
            if run:
                await self._finish(token, total)
            completed = True
            if own_progress:
                progress.finish()
        except LoopStop as stop:
            stopped = True
            if run:  # the other workers stop at their next boundary, ranges given up
                await self.parallel.stopping(self.session, stop)
                with contextlib.suppress(LoopStop):
                    await self.parallel.join_workers()
                await self._others_stopped(token)
                await self._report(token, force=True)  # dm status shows where it stopped
            raise
        finally:
            if run and not completed:
                await self.parallel.stop_workers()
            if run and (completed or stopped):
                self.parallel.if_unfinished(None)
            if own_progress and not completed:
                progress.close()

    async def _begin(self, start: _Start) -> tuple[str, int | None]:
        """Plan the loop's ranges, or adopt those of the attempt resumed; commits."""
        resume = self.context.resume
        session = self.session
        if _ranged_resume(resume, self.loop):
            assert resume is not None
            token = str(resume["ranges"])
            total = resume.get("rows_total")
            self._running = dict(resume)
            left = await self.store.adopt(session, token, self._attempt_id())
            await session.commit()
            log.info("%s: resuming its ranges, %d not finished", self.label, left)
            return token, None if total is None else int(total)
        low, high = await _key_bounds(session, self._after(start.last), self.keyset)
        for value in (low, high):
            if value is not None and not splittable(value):
                raise BatchingError(
                    f"revision {self.revision}: batched(workers=...) needs a key of integers, "
                    f"numerics, dates, timestamps or UUIDs to split into ranges, not "
                    f"{type(value).__name__}"
                )
        total = None
        if self.count:
            total = start.done + await _count(session, self._after(start.last))
        points = [] if low is None else split_points(low, high, self.workers * RANGES_PER_WORKER)
        token = str(uuid.uuid4())
        ranges = await self.store.plan(
            session,
            token=token,
            revision=self.revision,
            direction=self.context.direction,
            loop=self.loop,
            attempt_id=self._attempt_id(),
            points=points,
            low=low,
            high=high,
            first_lower=start.last,
            rows_before=start.done,
        )
        self._running = {
            "loop": self.loop,
            "ranges": token,
            "workers": self.workers,
            "last_key": None,
            "rows_done": start.done,
            "rows_total": total,
            "finished": False,
        }
        await self.context.save_checkpoint(session, self._running)
        await session.commit()
        log.info("%s: %d key ranges for %d workers", self.label, ranges, self.workers)
        return token, total

    def _attempt_id(self) -> int:
        attempt_id = self.context.attempt_id
        assert attempt_id is not None  # the run's own hook
        return attempt_id

    def _after(self, last: Any) -> sa.Select[Any]:
        return self.query if last is None else self.query.where(self.keyset.after(last))

    async def _next_range(self, token: str) -> Range | None:
        """Claim a free range, else split the largest one another worker holds."""
        held = await self.store.claim(self.session, token)
        if held is None:
            held = await self.store.steal(self.session, token, self.sizer.size, self._count)
        return held

    async def _count(self, lower: Any, upper: Any, limit: int) -> int:
        """Return how many rows of the loop's query have a key in ``(lower, upper]`` (None:
        unbounded), counting at most ``limit``: the pages' own query over the key's order,
        cut at ``limit`` rows, not a count of the whole range."""
        (column,) = self.keyset.columns
        page = self._after(lower)
        if upper is not None:
            page = page.where(self.keyset.within(None, upper, None))
        keys = page.with_only_columns(
            page.selected_columns[self.keyset.positions[0]], maintain_column_froms=True
        )
        cut = keys.order_by(column).limit(limit).subquery()
        counted = sa.select(sa.func.count()).select_from(cut)
        return int((await self.session.execute(counted)).scalar_one())

    async def _report(self, token: str, *, force: bool = False) -> None:
        """Every ``REPORT_SECONDS`` (the run only): write the rows all workers have done in
        the attempt's checkpoint, for ``dm status`` and ``dm cancel --stuck-after``."""
        now = time.monotonic()
        if self.parallel.role != "run" or (now - self._reported < REPORT_SECONDS and not force):
            return
        self._reported = now
        rows = await self.store.rows_done(self.session, token)
        await self.context.save_checkpoint(self.session, {**self._running, "rows_done": rows})
        await self.session.commit()

    async def _left(self, token: str) -> int:
        """Return how many ranges are not finished (other workers hold them), once the
        run's own workers ended."""
        await self.parallel.join_workers()
        left = await self.store.unfinished(self.session, token)
        await self.session.commit()
        return left

    async def _failed(self, token: str) -> None:
        """The run's loop ended in a failure or on a signal: give this worker's ranges up
        (the next run, or a ``dm work`` process, may take them at once) and write the rows of
        all workers in the attempt, for ``dm status``. Best effort, bounded: the failure is
        what the caller records and tells, whatever happens here."""

        async def settle() -> None:
            await self.session.rollback()
            self.store.hold(None)
            await self.store.release(self.session)
            await self._report(token, force=True)

        try:
            await asyncio.wait_for(settle(), FAILED_SETTLE_SECONDS)
        except Exception as exc:  # noqa: BLE001 - the loop's own failure is what counts
            log.debug("%s: could not settle the loop's ranges: %s", self.label, exc)

    async def _others_stopped(self, token: str) -> None:
        """At a stop: wait, up to ``STOP_WAIT_SECONDS``, for the ``dm work`` processes to
        finish their batch and give their range up, so the stop records their rows too."""
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while time.monotonic() < deadline:
            held = await self.store.held(self.session, token)
            await self.session.commit()
            if held == 0:
                return
            await asyncio.sleep(0.1)

    def _waiting(self, left: int) -> None:
        """Say, at once and then every ``WAIT_LOG_INTERVAL``, what this worker waits for."""
        now = time.monotonic()
        if self._waited is not None and now - self._waited < WAIT_LOG_INTERVAL:
            return
        self._waited = now
        log.info(
            "%s: no range left to claim; waiting for %d range(s) other workers hold (one "
            "whose worker died is taken over when its lease expires)",
            self.label,
            left,
        )

    async def _finish(self, token: str, total: int | None) -> None:
        """Record the loop finished (with the rows of all workers) and drop its ranges."""
        done = await self.store.rows_done(self.session, token)
        await self.store.drop(self.session, token)
        await self.context.save_checkpoint(
            self.session,
            {
                "loop": self.loop,
                "last_key": None,
                "rows_done": done,
                "rows_total": total,
                "finished": True,
            },
        )
        await self.session.commit()

    async def _work(self, held: Range, progress: Progress) -> AsyncIterator[Batch]:
        """Page through one range, committing each batch with the range's checkpoint."""
        session = self.session
        while True:
            limit = self.sizer.size
            started = time.monotonic()
            batch = await self.pages.fetch(session, held.start, held.upper, limit)
            finished = batch.row_count < limit
            last, done = held.last, held.rows_done
            if batch.row_count:
                yield batch
                last, done = batch.upper, done + batch.row_count
            outcome = await self.store.checkpoint(session, held, last, done, finished)
            if not outcome.matched:
                await session.rollback()
                self.store.hold(None)  # the look below commits nothing of the range's
                again = await self.store.reread(session, held)
                await session.commit()
                self.store.hold(again)
                if again is None:
                    log.warning(
                        "%s: range %d was taken over (this worker's lease expired); its "
                        "last batch was rolled back",
                        self.label,
                        held.number,
                    )
                    return
                held = again  # split by another worker: the batch is redone within it
                continue
            self.parallel.fenced()
            await session.commit()
            if self.probe is not None and self.probe.committed is not None:
                checkpoint = {"loop": self.loop, "range": held.number, "rows_done": done}
                self.probe.committed(self.context, checkpoint, batch.row_count)
            held = with_progress(outcome, held, last, done)
            await self._report(held.token)
            self.sizer.observe(batch.row_count, time.monotonic() - started)
            progress.advance(
                batch.row_count, batch_size=self.sizer.size, worker=self.parallel.number
            )
            if finished:  # nobody owns the range now: no lease to keep, no commit to fence
                self.store.hold(None)
            if not await self.parallel.after_range_checkpoint(outcome) and not finished:
                _taken_over_while_waiting(self.label, held)
                return
            if finished:
                return
            if self.throttle:
                await asyncio.sleep(self.throttle)
            if self.waiter is not None:

                async def keep(held: Range = held) -> bool:
                    return await self.store.renew(session, held.token, held.number)

                if not await self.waiter.wait(session, keep=keep):
                    _taken_over_while_waiting(self.label, held)
                    return


def _taken_over_while_waiting(label: str, held: Range) -> None:
    log.warning(
        "%s: range %d was taken over while this worker waited (its lease expired); its "
        "batches so far are committed",
        label,
        held.number,
    )


async def _key_bounds(
    session: AsyncSession, query: sa.Select[Any], keyset: _Keyset
) -> tuple[Any, Any]:
    """Return the smallest and largest key of ``query`` (None, None when it has no row):
    two index look-ups, not a scan."""
    (column,) = keyset.columns
    keys = query.with_only_columns(
        query.selected_columns[keyset.positions[0]], maintain_column_froms=True
    )
    low = (await session.execute(keys.order_by(column.asc()).limit(1))).scalar()
    high = (await session.execute(keys.order_by(column.desc()).limit(1))).scalar()
    await session.commit()
    return low, high


@dataclass
class _Sizer:
    """The size of the next page: fixed, or adapted toward ``target`` seconds per batch."""

    size: int
    target: float | None = None
    floor: int = 1
    ceiling: int = 1
    per_row: float | None = None

    @classmethod
    def of(
        cls,
        size: int,
        target: float | None,
        floor: int | None,
        ceiling: int | None,
        revision: str,
    ) -> _Sizer:
        if size < 1:
            raise BatchingError(f"revision {revision}: batched() size must be at least 1")
        if target is None:
            if floor is not None or ceiling is not None:
                raise BatchingError(
                    f"revision {revision}: batched() min_size and max_size need target_seconds"
                )
            return cls(size)
        if not target > 0:
            raise BatchingError(f"revision {revision}: batched() target_seconds must be positive")
        low = max(size // 10, 1) if floor is None else floor
        high = size * 10 if ceiling is None else ceiling
        if not 1 <= low <= size <= high:
            raise BatchingError(
                f"revision {revision}: batched() needs 1 <= min_size <= size <= max_size "
                f"(got {low}, {size}, {high})"
            )
        return cls(size, float(target), low, high)

    def resume_at(self, size: int | None) -> None:
        """Go on at the ``size`` an earlier attempt reached (within the floor and ceiling)."""
        if self.target is not None and size is not None:
            self.size = min(max(size, self.floor), self.ceiling)

    def observe(self, rows: int, seconds: float) -> None:
        """Account for a batch of ``rows`` rows that took ``seconds``; set the next size."""
        if self.target is None or rows <= 0:
            return
        latest = max(seconds, 1e-6) / rows
        if self.per_row is None:
            self.per_row = latest
        else:
            self.per_row = _SMOOTHING * latest + (1 - _SMOOTHING) * self.per_row
        ideal = self.target / self.per_row
        if abs(ideal - self.size) <= _DEADBAND * self.size:
            return
        stepped = min(max(ideal, self.size / _MAX_STEP), self.size * _MAX_STEP)
        self.size = int(min(max(stepped, self.floor), self.ceiling))


class _Waiter:
    """Hold a loop between batches while its ``pause_when`` predicate gives a reason."""

    def __init__(
        self, predicate: PausePredicate, poll: float, label: str, transactional: bool
    ) -> None:
        self.predicate = predicate
        self.poll = poll
        self.label = label
        self.transactional = transactional
        self.name = getattr(predicate, "__name__", "pause_when")

    async def reason(self, session: AsyncSession) -> str | None:
        """Ask the predicate; outside a revision's transaction, end the one it opened."""
        answer = await self.predicate(session)
        if not self.transactional and session.in_transaction():
            await session.commit()  # no transaction stays open while the loop waits
        if not answer:  # None, False or ""
            return None
        return answer if isinstance(answer, str) else f"{self.name} returned {answer!r}"

    async def wait(
        self, session: AsyncSession, *, keep: Callable[[], Awaitable[bool]] | None = None
    ) -> bool:
        """Return once the predicate gives no reason to wait (at once if it gives none).

        :param keep: a worker of a parallel loop: renew its lease on its range before each
            look (in the look's transaction); False when it lost the range meanwhile, and
            then the wait ends at once, returning False.
        """
        reason = await self.reason(session)
        if reason is None:
            return True
        started = last_line = time.monotonic()
        log.info("%s: waiting: %s", self.label, reason, extra={"waiting": reason})
        while reason is not None:
            await asyncio.sleep(self.poll)
            if keep is not None and not await keep():
                await session.rollback()
                return False
            reason = await self.reason(session)
            now = time.monotonic()
            if reason is not None and now - last_line >= WAIT_LOG_INTERVAL:
                last_line = now
                log.info(
                    "%s: still waiting after %s: %s",
                    self.label,
                    clock(now - started),
                    reason,
                    extra={"waiting": reason},
                )
        log.info("%s: resuming after waiting %s", self.label, clock(time.monotonic() - started))
        return True


@dataclass(frozen=True)
class _Start:
    """Where one loop starts: skipped, after a key, or from the beginning."""

    skip: bool = False
    last: Any = None
    done: int = 0
    size: int | None = None
    """The size a self-tuning loop had reached (``target_seconds``), to go on from."""

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Mapping[str, Any] | None, loop: int, keyset: _Keyset, revision: str
    ) -> _Start:
        if not checkpoint:
            return cls()
        try:
            at_loop = int(checkpoint["loop"])
            if loop < at_loop or (loop == at_loop and checkpoint.get("finished")):
                return cls(skip=True)
            if loop > at_loop or checkpoint.get("last_key") is None:
                return cls()
            last = keyset.decode(checkpoint["last_key"])
            size = checkpoint.get("batch_size")
            return cls(
                last=last,
                done=int(checkpoint["rows_done"]),
                size=None if size is None else int(size),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BatchingError(
                f"revision {revision}: the checkpoint of the earlier attempt is unreadable "
                f"({checkpoint!r})"
            ) from exc


@dataclass(frozen=True)
class _Keyset:
    """The key of one loop: one column, or several compared as a row value."""

    columns: tuple[sa.ColumnElement[Any], ...]
    positions: tuple[int, ...]

    @classmethod
    def of(
        cls,
        query: sa.Select[Any],
        key: sa.ColumnElement[Any] | Sequence[sa.ColumnElement[Any]],
        revision: str,
    ) -> _Keyset:
        keys = tuple(key) if isinstance(key, tuple | list) else (key,)
        # An ORM attribute (Item.id) stands for its column.
        columns = tuple(
            k.__clause_element__() if hasattr(k, "__clause_element__") else k for k in keys
        )
        if not columns:
            raise BatchingError(f"revision {revision}: batched() needs a key column")
        return cls(columns, tuple(_key_position(query, column, revision) for column in columns))

    @property
    def composite(self) -> bool:
        return len(self.columns) > 1

    def after(self, last: Any) -> sa.ColumnElement[bool]:
        """Return the condition ``key > last``."""
        return _compare(self.columns, ">", last)

    def within(
        self, lower: Any, upper: Any, columns: Sequence[sa.ColumnElement[Any]] | None
    ) -> sa.ColumnElement[bool]:
        """Return ``lower < key <= upper`` on ``columns`` (default: the key's own)."""
        columns = tuple(columns) if columns else self.columns
        if len(columns) != len(self.columns):
            raise BatchingError(
                f"batch.where() needs {len(self.columns)} column(s), the key's, got {len(columns)}"
            )
        below = _compare(columns, "<=", upper)
        return below if lower is None else sa.and_(_compare(columns, ">", lower), below)

    def value(self, row: Any) -> Any:
        """Return the key of ``row``: a value, or a tuple for a composite key."""
        if not self.composite:
            return row[self.positions[0]]
        return tuple(row[position] for position in self.positions)

    def has_null(self, value: Any) -> bool:
        return any(v is None for v in value) if self.composite else value is None

    def encode(self, value: Any, revision: str) -> Any:
        if not self.composite:
            return encode_key(value, revision)
        return [encode_key(v, revision) for v in value]

    def decode(self, stored: Any) -> Any:
        if not self.composite:
            return decode_key(stored)
        if not isinstance(stored, list) or len(stored) != len(self.columns):
            raise ValueError(f"not a key of {len(self.columns)} columns: {stored!r}")
        return tuple(decode_key(v) for v in stored)


def _compare(
    columns: Sequence[sa.ColumnElement[Any]], operator: str, value: Any
) -> sa.ColumnElement[bool]:
    """Return ``columns <operator> value``: a column, or a row value for a composite key."""
    compare = _OPERATORS[operator]
    if len(columns) == 1:
        return compare(columns[0], value)
    # Bound with each column's own type, not one guessed from the Python value: on
    # PostgreSQL each parameter of a row value is cast to the type it is bound with.
    values = [
        v if isinstance(v, sa.BindParameter) else sa.bindparam(None, v, type_=c.type)
        for c, v in zip(columns, value, strict=True)
    ]
    return compare(sa.tuple_(*columns), sa.tuple_(*values))


_OPERATORS: dict[str, Callable[[Any, Any], sa.ColumnElement[bool]]] = {
    ">": lambda left, right: left > right,
    "<=": lambda left, right: left <= right,
}


class _Pages:
    """The page queries of one loop, built once with bound parameters (the key bounds, the
    size): building and caching a statement for each batch cost more CPU than running it.

    A page is the loop's rows with ``lower < key <= upper`` (None: unbounded), in key
    order, ``limit`` at most. By default only its last key comes back (its ``limit``-th
    row, ``OFFSET limit - 1``: one row); a last page, shorter, comes back whole (its keys)
    to be counted. No aggregate, so any ordered key type works (PostgreSQL has no
    ``max(uuid)``). With ``rows``, the page's rows come back.

    A bound is bound with the type ``key > value`` would give it (``batch.where()`` does
    so): the key column's, or the value's where the two differ (a ``datetime`` for a column
    declared ``Date``); a statement is built for each kind of value, in practice one.
    """

    def __init__(
        self, query: sa.Select[Any], keyset: _Keyset, *, rows: bool, revision: str
    ) -> None:
        self.query = query.order_by(None)
        self.keyset = keyset
        self.rows = rows
        self.revision = revision
        self._built: dict[tuple[type | None, type | None], tuple[sa.Select[Any], ...]] = {}

    async def fetch(self, session: AsyncSession, lower: Any, upper: Any, limit: int) -> Batch:
        """Return the page after ``lower`` (up to ``upper``) of at most ``limit`` rows."""
        page, last_row = self._statements(lower, upper)
        params = {"dm_page_limit": limit, **self._bound("lower", lower)}
        params.update(self._bound("upper", upper))
        keyset = self.keyset
        if self.rows:
            found = list((await session.execute(page, params)).all())
            last = keyset.value(found[-1]) if found else None
            batch = Batch(keyset, lower, last, len(found), found, limit)
        else:
            params["dm_page_offset"] = limit - 1
            row = (await session.execute(last_row, params)).first()
            if row is not None:
                batch = Batch(keyset, lower, _key_of(row), limit, None, limit)
            else:
                keys = (await session.execute(page, params)).all()
                last = _key_of(keys[-1]) if keys else None
                batch = Batch(keyset, lower, last, len(keys), None, limit)
        if batch.row_count and lower is not None and batch.upper == lower:
            raise BatchingError(
                f"revision {self.revision}: the page after key {lower!r} ended at that same "
                "key, so the loop would not advance; is the key column declared with the "
                "database column's type?"
            )
        return batch

    def _statements(self, lower: Any, upper: Any) -> tuple[sa.Select[Any], ...]:
        """The page query (rows, or keys only) and its last row's, for these bounds."""
        kinds = (None if lower is None else type(lower), None if upper is None else type(upper))
        built = self._built.get(kinds)
        if built is None:
            columns = self.keyset.columns
            page = self.query
            if lower is not None:
                page = page.where(_compare(columns, ">", self._parameters("lower", ">", lower)))
            if upper is not None:
                page = page.where(_compare(columns, "<=", self._parameters("upper", "<=", upper)))
            page = page.order_by(*columns)
            if not self.rows:
                keys = (page.selected_columns[p] for p in self.keyset.positions)
                page = page.with_only_columns(*keys, maintain_column_froms=True)
            last_row = page.offset(sa.bindparam("dm_page_offset")).limit(1)
            built = self._built[kinds] = (page.limit(sa.bindparam("dm_page_limit")), last_row)
        return built

    def _parameters(self, bound: str, operator: str, value: Any) -> Any:
        """The bound parameters of a key bound: one per key column, typed as the loop's
        comparison would type ``value`` (a row value: each column's own type)."""
        columns = self.keyset.columns
        if not self.keyset.composite:
            (column,) = columns
            compared = column.type.coerce_compared_value(_SQL_OPERATORS[operator], value)
            return sa.bindparam(f"dm_page_{bound}_0", type_=compared)
        return tuple(
            sa.bindparam(f"dm_page_{bound}_{n}", type_=column.type)
            for n, column in enumerate(columns)
        )

    def _bound(self, bound: str, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        values = value if self.keyset.composite else (value,)
        return {f"dm_page_{bound}_{n}": v for n, v in enumerate(values)}


_SQL_OPERATORS = {">": operators.gt, "<=": operators.le}


def _key_of(row: Any) -> Any:
    """Return the key a row of key columns holds: a value, or a tuple for several."""
    return row[0] if len(row) == 1 else tuple(row)


async def _refuse_null_keys(
    session: AsyncSession, query: sa.Select[Any], keyset: _Keyset, revision: str
) -> None:
    """Raise when a row of ``query`` has a NULL key, before the loop's first batch.

    A NULL key sorts first on SQLite and last on PostgreSQL, and ``key > last`` never
    selects it: checked per page, the row would be skipped silently unless it happened to
    end a page. One indexed ``IS NULL`` probe finds it wherever it is.
    """
    selected = tuple(query.subquery().c)
    keys = [selected[position] for position in keyset.positions]
    probe = sa.select(sa.literal(1)).where(sa.or_(*(key.is_(None) for key in keys))).limit(1)
    if (await session.execute(probe)).first() is not None:
        names = ", ".join(str(column) for column in keyset.columns)
        raise BatchingError(
            f"revision {revision}: the batched() key ({names}) is NULL in some rows of the "
            "query; use a key that is never null, or exclude those rows from the query"
        )


async def _count(session: AsyncSession, query: sa.Select[Any]) -> int:
    counted = sa.select(sa.func.count()).select_from(query.subquery())
    return int((await session.execute(counted)).scalar_one())


def _key_position(query: sa.Select[Any], key: sa.ColumnElement[Any], revision: str) -> int:
    for index, column in enumerate(query.selected_columns):
        if column is key or column.compare(key):
            return index
    raise BatchingError(f"revision {revision}: the key column must be selected by the query")
