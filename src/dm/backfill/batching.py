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
import decimal
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
from datetime import date
from datetime import datetime
from typing import Any
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from dm.backfill.progress import Progress
from dm.backfill.progress import clock

log = logging.getLogger("dm.batched")


class BatchingError(RuntimeError):
    """``batched`` was used wrongly: outside a dm run, or with an unusable key or option."""


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
    loop = context.loops
    context.loops += 1
    save = None if context.transactional else context.save_checkpoint
    label = f"{context.direction} {revision}" + (f" (loop {loop + 1})" if loop else "")

    start = _Start.from_checkpoint(context.resume, loop, keyset, revision)
    if start.skip:
        log.info("%s: finished by an earlier attempt; skipped", label)
        return
    if start.done:
        log.info("%s: resuming after key %r, %d rows already done", label, start.last, start.done)
    last, done = start.last, start.done
    sizer.resume_at(start.size)
    unordered = query.order_by(None)

    def after(last: Any) -> sa.Select[Any]:
        return unordered if last is None else unordered.where(keyset.after(last))

    fetch = _fetch_rows if rows else _fetch_bounds
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
            page = after(last).order_by(*keyset.columns).limit(limit)
            batch = await fetch(session, page, keyset, last, limit)
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

    async def wait(self, session: AsyncSession) -> None:
        """Return once the predicate gives no reason to wait (at once if it gives none)."""
        reason = await self.reason(session)
        if reason is None:
            return
        started = last_line = time.monotonic()
        log.info("%s: waiting: %s", self.label, reason, extra={"waiting": reason})
        while reason is not None:
            await asyncio.sleep(self.poll)
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
        columns = tuple(key) if isinstance(key, tuple | list) else (key,)
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
    values = [sa.bindparam(None, v, type_=c.type) for c, v in zip(columns, value, strict=True)]
    return compare(sa.tuple_(*columns), sa.tuple_(*values))


_OPERATORS: dict[str, Callable[[Any, Any], sa.ColumnElement[bool]]] = {
    ">": lambda left, right: left > right,
    "<=": lambda left, right: left <= right,
}


async def _fetch_rows(
    session: AsyncSession, page: sa.Select[Any], keyset: _Keyset, lower: Any, limit: int
) -> Batch:
    found = list((await session.execute(page)).all())
    upper = keyset.value(found[-1]) if found else None
    return Batch(keyset, lower, upper, len(found), found, limit)


async def _fetch_bounds(
    session: AsyncSession, page: sa.Select[Any], keyset: _Keyset, lower: Any, limit: int
) -> Batch:
    """Fetch a page's last key only: its ``limit``-th key (``OFFSET limit - 1``), one row.

    No aggregate, so any ordered key type works (PostgreSQL has no ``max(uuid)``), and the
    row count of a full page is ``limit``. Only a loop's last page, shorter, comes back
    whole (its keys), to be counted.
    """
    keys = page.with_only_columns(
        *(page.selected_columns[p] for p in keyset.positions), maintain_column_froms=True
    )
    row = (await session.execute(keys.offset(limit - 1).limit(1))).first()
    if row is not None:
        return Batch(keyset, lower, _key_of(row), limit, None, limit)
    found = (await session.execute(keys)).all()
    upper = _key_of(found[-1]) if found else None
    return Batch(keyset, lower, upper, len(found), None, limit)


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


# -- keys in checkpoints ---------------------------------------------------------------
# Integers and strings are stored as they are; other key types as {"<type>": "<text>"}.

_TAGGED: dict[str, Callable[[str], Any]] = {
    "uuid": uuid.UUID,
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "decimal": decimal.Decimal,
}


def encode_key(value: Any, revision: str) -> Any:
    """Return ``value`` as it is stored in a checkpoint (JSON).

    :raises BatchingError: the key's type cannot be stored.
    """
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | str):
        return value
    elif isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    elif isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    elif isinstance(value, date):
        return {"date": value.isoformat()}
    elif isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    raise BatchingError(
        f"revision {revision}: a key of type {type(value).__name__} cannot be stored in a "
        "checkpoint; use an integer, string, UUID, date, datetime or numeric key"
    )


def decode_key(stored: Any) -> Any:
    """Return the key value ``encode_key`` stored as ``stored``."""
    if isinstance(stored, dict):
        ((tag, text),) = stored.items()
        return _TAGGED[tag](text)
    if isinstance(stored, int | str) and not isinstance(stored, bool):
        return stored
    raise ValueError(f"not a stored key: {stored!r}")
