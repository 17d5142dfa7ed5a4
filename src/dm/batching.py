"""``dm.batched``: walk a query in keyset-paginated batches inside a revision's hook.

The query is re-issued per batch with ``key > last_key`` (ascending on ``key``), so memory
stays constant whatever the table size and rows changed by earlier batches are not
revisited.

In a revision with ``transactional = False`` each batch's writes are committed together
with a checkpoint (the loop, the last key, the rows done) in the attempt's tracker row.
When the attempt fails or is interrupted, the next run of the same revision and direction
starts after that checkpoint, so every row is processed exactly once. A hook may run
several ``batched`` loops one after the other; the checkpoint records which one was
running, and the loops an earlier attempt finished are skipped.

In a transactional revision ``batched`` only pages: the whole revision is one transaction
and there is no checkpoint. The runner sets the run context ``batched`` reads; used outside
a dm run, ``batched`` raises :class:`BatchingError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import decimal
import logging
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

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from .progress import Progress

log = logging.getLogger("dm.batched")

SaveCheckpoint = Callable[[AsyncSession, dict[str, Any]], Awaitable[None]]


class BatchingError(RuntimeError):
    """``batched`` was used wrongly: outside a dm run, or with an unusable key or option."""


@dataclass
class RunContext:
    """What ``batched`` needs to know about the hook being run.

    ``resume`` is the checkpoint an earlier failed attempt left (non-transactional
    revisions only); ``save_checkpoint`` writes a checkpoint in the session's transaction.
    ``loops`` counts the ``batched`` loops the hook has started.
    """

    revision: str
    direction: str
    transactional: bool
    resume: Mapping[str, Any] | None = None
    save_checkpoint: SaveCheckpoint | None = None
    loops: int = 0
    autocommit: Callable[[], AbstractAsyncContextManager[None]] | None = None
    """The runner's autocommit block (``dm.autocommit``), leaving and resuming its transaction."""


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
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
    committed: Callable[[RunContext, Mapping[str, Any], int], None] | None = None


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
def run_context(context: RunContext) -> Iterator[None]:
    """Make ``context`` the current run for ``batched`` while the hook runs."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def current_run() -> RunContext | None:
    """Return the run context of the hook being run, or None outside a dm run."""
    return _current.get()


class Batch(list[Any]):
    """The rows of one batch, with the inclusive key bounds of the page and its row count.

    With ``batched(..., rows=False)`` the list is empty: only ``first_key``, ``last_key``
    and ``row_count`` are fetched.
    """

    def __init__(
        self, rows: list[Any], first_key: Any, last_key: Any, row_count: int | None = None
    ) -> None:
        super().__init__(rows)
        self.first_key = first_key
        self.last_key = last_key
        self.row_count = len(rows) if row_count is None else row_count


async def batched(
    session: AsyncSession,
    query: sa.Select[Any],
    *,
    key: sa.ColumnElement[Any] | Sequence[sa.ColumnElement[Any]],
    size: int = 1000,
    throttle: float = 0.0,
    count: bool = False,
    rows: bool = True,
) -> AsyncIterator[Batch]:
    """Yield the rows of ``query`` in batches of at most ``size``, ordered by ``key``.

    ``key`` must be one of the query's selected columns, unique and never null; the query
    is re-issued per batch as ``query WHERE key > <last key> ORDER BY key LIMIT size``
    (any ORDER BY of its own is replaced). Bound each batch's write by
    ``key BETWEEN batch.first_key AND batch.last_key``: on PostgreSQL a range is about 2.7
    times faster than ``key IN (<ids>)``. A composite key is a tuple of columns, unique
    together (e.g. ``(t.c.tenant_id, t.c.id)``); its bounds are tuples, compared as row
    values: ``sa.tuple_(*key).between(batch.first_key, batch.last_key)``.

    :param throttle: seconds to sleep after each batch, so live traffic keeps its share.
    :param count: run one ``COUNT(*)`` of the query first, for a total and an ETA.
    :param rows: False fetches only each page's first key, last key and row count (one
        row per batch instead of ``size``): the batch is an empty list with ``first_key``,
        ``last_key`` and ``row_count``. Faster when the write needs only the key range;
        single-column keys only.
    """
    context = _current.get()
    if context is None:
        raise BatchingError("dm.batched() can only be used inside a revision run by dm")
    revision = context.revision
    probe = _probes[-1] if _probes else None
    if probe is not None and probe.size is not None:
        size = probe.size
    if size < 1:
        raise BatchingError(f"revision {revision}: batched() size must be at least 1")
    if throttle < 0:
        raise BatchingError(f"revision {revision}: batched() throttle must not be negative")
    keyset = _Keyset.of(query, key, revision)
    if not rows and keyset.composite:
        raise BatchingError(f"revision {revision}: batched(rows=False) needs a single-column key")
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
    unordered = query.order_by(None)

    def after(last: Any) -> sa.Select[Any]:
        return unordered if last is None else unordered.where(keyset.after(last))

    fetch = _fetch_rows if rows else _fetch_bounds
    total = None
    if count:  # the rows still to do, plus those an earlier attempt did
        total = done + await _count(session, after(last))
    progress = Progress(label, total, done=done)
    completed = False
    try:
        while True:
            page = after(last).order_by(*keyset.columns).limit(size)
            batch = await fetch(session, page, keyset)
            finished = batch.row_count < size
            if batch.row_count:
                if keyset.has_null(batch.first_key) or keyset.has_null(batch.last_key):
                    raise BatchingError(f"revision {revision}: the key column must not be null")
                stored_key = keyset.encode(batch.last_key, revision) if save else None
                yield batch
                last, done = batch.last_key, done + batch.row_count
                progress.advance(batch.row_count)
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
                await save(session, checkpoint)
                await session.commit()
                if probe is not None and probe.committed is not None:
                    probe.committed(context, checkpoint, batch.row_count)
            if finished:
                break
            if throttle:
                await asyncio.sleep(throttle)
        completed = True
        progress.finish()
    finally:
        if not completed:
            progress.close()


@dataclass(frozen=True)
class _Start:
    """Where one loop starts: skipped, after a key, or from the beginning."""

    skip: bool = False
    last: Any = None
    done: int = 0

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
            return cls(last=last, done=int(checkpoint["rows_done"]))
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
        if not self.composite:
            condition: sa.ColumnElement[bool] = self.columns[0] > last
            return condition
        # Bound with each column's own type, not one guessed from the Python value: on
        # PostgreSQL each parameter of a row value is cast to the type it is bound with.
        values = [
            sa.bindparam(None, v, type_=c.type) for c, v in zip(self.columns, last, strict=True)
        ]
        return sa.tuple_(*self.columns) > sa.tuple_(*values)

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


async def _fetch_rows(session: AsyncSession, page: sa.Select[Any], keyset: _Keyset) -> Batch:
    found = list((await session.execute(page)).all())
    if not found:
        return Batch([], None, None)
    return Batch(found, keyset.value(found[0]), keyset.value(found[-1]))


async def _fetch_bounds(session: AsyncSession, page: sa.Select[Any], keyset: _Keyset) -> Batch:
    """Fetch the page's first key, last key and row count: one row instead of the page."""
    position = keyset.positions[0]
    keys = page.with_only_columns(page.selected_columns[position], maintain_column_froms=True)
    inner = keys.subquery()
    key = next(iter(inner.c))
    bounds = sa.select(sa.func.min(key), sa.func.max(key), sa.func.count())
    first, last, found = (await session.execute(bounds)).one()
    return Batch([], first, last, int(found))


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
