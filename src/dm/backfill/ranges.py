"""Key ranges of a parallel ``dm.batched`` loop, kept in the tracker's ``<table>_ranges``.

A loop run with ``workers=N`` (PostgreSQL) splits its key space into contiguous ranges
``(lower, upper]``, one row each, under a token naming the loop. Every worker (a task of
the run, or a ``dm work`` process) claims a range with ``FOR UPDATE SKIP LOCKED`` and a
lease, pages through it, and commits each batch together with the range's checkpoint (its
last key and row count). That checkpoint update is the range's fence: it matches only
while the worker still owns the range and the range's bounds are those it paged with
(``version``); otherwise the batch rolls back. A worker that died loses its lease when it
expires; the range is then claimed again from its checkpoint. When no range is left to
claim, a worker splits the largest remaining one at the middle of what is left
(``steal``), so the last minutes are not one worker alone. The rows a range has left are
estimated from its worker's progress; when that finds none worth splitting (a range whose
rows sit behind a gap in its keys looks almost empty), the loop counts them, up to a bound.

Ranges need a key that can be split by value: one column of integers, numerics, dates,
timestamps or UUIDs.
"""

from __future__ import annotations

import decimal
import uuid
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace
from datetime import date
from datetime import datetime
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import AsyncSession

from dm.backfill.keys import decode_key
from dm.backfill.keys import encode_key

RANGES_PER_WORKER = 4
"""Ranges planned per worker: a worker that finishes one claims the next before any split."""
SPLIT_BATCHES = 4
"""A range is split only with at least this many batches left (see ``RangeStore.steal``)."""
SPLIT_LOCK = "dm.ranges.split"
"""Names the advisory lock that lets one worker of a loop split a range at a time."""

RowCount = Callable[[Any, Any, int], Awaitable[int]]
"""Count the loop's rows whose key is in ``(lower, upper]`` (None: unbounded on that side),
stopping at ``limit``: ``count(lower, upper, limit)``, at most ``limit``. The loop gives it
(``RangeStore.steal``): the ranges know the keys, not the loop's query."""


def ranges_table(metadata: sa.MetaData, tracker: str) -> sa.Table:
    """Return the ranges table of the tracker named ``tracker`` (in ``metadata``)."""
    return sa.Table(
        f"{tracker}_ranges",
        metadata,
        sa.Column("token", sa.String(36), primary_key=True),
        sa.Column("number", sa.Integer(), primary_key=True),
        sa.Column("revision", sa.String(64), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("loop", sa.Integer(), nullable=False),
        sa.Column("attempt_id", sa.BigInteger(), nullable=False),
        sa.Column("lower_key", sa.JSON()),
        sa.Column("upper_key", sa.JSON()),
        sa.Column("low_key", sa.JSON()),
        sa.Column("high_key", sa.JSON()),
        sa.Column("last_key", sa.JSON()),
        sa.Column("rows_done", sa.BigInteger(), nullable=False, default=0),
        sa.Column("finished", sa.Boolean(), nullable=False, default=False),
        sa.Column("version", sa.Integer(), nullable=False, default=0),
        sa.Column("owner", sa.String(96)),
        sa.Column("lease_until", sa.DateTime(timezone=True)),
        sa.Index(f"ix_{tracker}_ranges_revision", "revision"),
    )


def splittable(value: Any) -> bool:
    """Return whether a key value can be split by value (see the module docstring)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | decimal.Decimal | datetime | date | uuid.UUID)


def _number(value: Any) -> float:
    """Return ``value`` on a line, for comparing the sizes of ranges."""
    if isinstance(value, uuid.UUID):
        return float(value.int)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return float(value.toordinal())
    return float(value)


def between(low: Any, high: Any, fraction: float) -> Any:
    """Return the key ``fraction`` of the way from ``low`` to ``high`` (same type)."""
    if isinstance(low, uuid.UUID):
        return uuid.UUID(int=low.int + int((high.int - low.int) * fraction))
    if isinstance(low, datetime):
        return low + (high - low) * fraction
    if isinstance(low, date):
        return low + timedelta(days=int((high - low).days * fraction))
    if isinstance(low, decimal.Decimal):
        return low + (high - low) * decimal.Decimal(str(fraction))
    return low + int((high - low) * fraction)


def split_points(low: Any, high: Any, parts: int) -> list[Any]:
    """Return up to ``parts - 1`` increasing keys strictly between ``low`` and ``high``."""
    points: list[Any] = []
    for index in range(1, parts):
        point = between(low, high, index / parts)
        if low < point < high and (not points or point > points[-1]):
            points.append(point)
    return points


@dataclass(frozen=True)
class Range:
    """One claimed range: keys in ``(lower, upper]`` (None: unbounded), done up to ``last``."""

    token: str
    number: int
    lower: Any
    upper: Any
    last: Any
    rows_done: int
    version: int

    @property
    def start(self) -> Any:
        """The key the next page starts after (None: from the first key)."""
        return self.lower if self.last is None else self.last


@dataclass(frozen=True)
class _Span:
    """Where a range stands on the key line, for choosing one to split."""

    range: Range
    begin: Any
    end: Any
    start: Any

    @classmethod
    def of(cls, held: Range, low: Any, high: Any) -> _Span:
        begin = held.lower if held.lower is not None else _decoded(low)
        end = held.upper if held.upper is not None else _decoded(high)
        return cls(held, begin, end, begin if held.last is None else held.last)

    @property
    def passed(self) -> float:
        """How far along the key line its worker has got (0 when not begun)."""
        if self.begin is None or self.start is None or not self.begin < self.start:
            return 0.0
        return _number(self.start) - _number(self.begin)

    @property
    def keys_left(self) -> float:
        """How much of the key line is left to its worker (0 when none)."""
        if None in (self.start, self.end) or not self.start < self.end:
            return 0.0
        return _number(self.end) - _number(self.start)

    @property
    def middle(self) -> Any:
        """The key halfway through what is left, if there is one strictly inside."""
        if None in (self.start, self.end) or not self.start < self.end:
            return None
        middle = between(self.start, self.end, 0.5)
        return middle if self.start < middle < self.end else None

    def rows_left(self, loop_density: float | None) -> float | None:
        """Estimate the rows left, from its own rows per key or else the loop's."""
        if None in (self.start, self.end) or not self.start < self.end:
            return None
        passed = self.passed
        density = self.range.rows_done / passed if self.range.rows_done and passed else None
        density = density if density is not None else loop_density
        if density is None:
            return None
        return density * (_number(self.end) - _number(self.start))


def _decoded(stored: Any) -> Any:
    return None if stored is None else decode_key(stored)


@dataclass(frozen=True)
class Outcome:
    """What a range's checkpoint update found: whether it matched, the range's bounds now,
    and the request or status of the attempt (``dm pause``, ``dm cancel``, a stopped run)."""

    matched: bool
    upper: Any = None
    version: int = 0
    status: str | None = None
    request: tuple[str, str | None, str | None] | None = None


class RangeStore:
    """The statements on the ranges of one loop (token), for one worker (``owner``)."""

    def __init__(
        self,
        ranges: sa.Table,
        attempts: sa.Table,
        *,
        owner: str,
        lease_seconds: float,
        fence: sa.ColumnElement[bool] | None = None,
        holding: Callable[[str | None, int | None], None] | None = None,
    ) -> None:
        """:param attempts: the tracker's attempt table (for the attempt's status/request).
        :param fence: a condition every checkpoint update carries besides the lease (the
            run's fence, for the run's own workers).
        :param holding: told of the range this worker holds from now on (token and
            number; None, None: none), so that every commit of its connection needs it."""
        self.ranges = ranges
        self.attempts = attempts
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self.lease: sa.ColumnElement[Any] = sa.literal_column(
            f"interval '{float(lease_seconds)} seconds'"
        )
        self.fence = fence
        self._holding = holding
        self._checkpoints: dict[bool, sa.Update] = {}
        self._short: dict[tuple[str, int], tuple[int, Any]] = {}
        """The ranges a count found too short to split (token and number), at the version
        and last key it counted from: not counted again until their checkpoint moves."""

    def hold(self, held: Range | None) -> None:
        """Note which range this worker holds now (None: none)."""
        if self._holding is not None:
            self._holding(*((None, None) if held is None else (held.token, held.number)))

    def _lease_until(self) -> sa.ColumnElement[Any]:
        return sa.func.clock_timestamp() + self.lease

    # -- planning -------------------------------------------------------------------

    async def plan(
        self,
        session: AsyncSession,
        *,
        token: str,
        revision: str,
        direction: str,
        loop: int,
        attempt_id: int,
        points: list[Any],
        low: Any,
        high: Any,
        first_lower: Any = None,
        rows_before: int = 0,
    ) -> int:
        """Write the ranges cut at ``points`` (none: one range), the first starting after
        ``first_lower`` (a loop an earlier attempt ran as one worker, with ``rows_before``
        rows done); drop this revision's older ranges (a loop that starts over). Return how
        many ranges there are. ``low`` and ``high``, the loop's smallest and largest key
        when it was planned, size the open ends of the first and last range."""
        r = self.ranges
        await session.execute(r.delete().where(r.c.revision == revision))
        bounds = [first_lower, *points, None]
        rows = [
            {
                "token": token,
                "number": number,
                "revision": revision,
                "direction": direction,
                "loop": loop,
                "attempt_id": attempt_id,
                "lower_key": None if lower is None else encode_key(lower, revision),
                "upper_key": None if upper is None else encode_key(upper, revision),
                "low_key": None if low is None else encode_key(low, revision),
                "high_key": None if high is None else encode_key(high, revision),
                "last_key": None,
                "rows_done": rows_before if number == 0 else 0,
                "finished": False,
                "version": 0,
            }
            for number, (lower, upper) in enumerate(zip(bounds, bounds[1:], strict=False))
        ]
        await session.execute(r.insert(), rows)
        return len(rows)

    async def adopt(self, session: AsyncSession, token: str, attempt_id: int) -> int:
        """Make ``attempt_id`` (a resumed attempt) the owner of the loop's ranges; release
        the leases of the runs that held the migration lock before (they can commit no
        more). Return how many ranges are left to do."""
        r = self.ranges
        ours = r.c.token == token
        await session.execute(
            r.update()
            .where(ours, r.c.owner.like("run:%"))
            .values(owner=None, lease_until=None, attempt_id=attempt_id)
        )
        await session.execute(r.update().where(ours).values(attempt_id=attempt_id))
        return await self.unfinished(session, token)

    async def attempt_state(self, session: AsyncSession, token: str) -> Outcome:
        """Return the status and request of the attempt the loop's ranges belong to, as a
        checkpoint would (a worker with no range to work looks between two waits)."""
        r, a = self.ranges, self.attempts
        of_loop = sa.select(r.c.attempt_id).where(r.c.token == token).limit(1).scalar_subquery()
        row = (
            await session.execute(
                sa.select(a.c.status, a.c.request, a.c.request_by, a.c.request_reason).where(
                    a.c.id == of_loop
                )
            )
        ).first()
        if row is None:
            return Outcome(True)
        status, request, by, reason = row
        return Outcome(True, None, 0, status, None if request is None else (request, by, reason))

    async def unfinished(self, session: AsyncSession, token: str) -> int:
        """Return how many of the loop's ranges are not finished."""
        r = self.ranges
        query = sa.select(sa.func.count()).where(r.c.token == token, sa.not_(r.c.finished))
        return int((await session.execute(query)).scalar_one())

    async def held(self, session: AsyncSession, token: str) -> int:
        """Return how many unfinished ranges a live worker holds (lease not expired)."""
        r = self.ranges
        query = sa.select(sa.func.count()).where(
            r.c.token == token,
            sa.not_(r.c.finished),
            r.c.owner.is_not(None),
            r.c.lease_until > sa.func.clock_timestamp(),
        )
        return int((await session.execute(query)).scalar_one())

    async def rows_done(self, session: AsyncSession, token: str) -> int:
        """Return the rows the loop's ranges committed, all workers together."""
        r = self.ranges
        query = sa.select(sa.func.coalesce(sa.func.sum(r.c.rows_done), 0))
        return int((await session.execute(query.where(r.c.token == token))).scalar_one())

    async def drop(self, session: AsyncSession, token: str) -> None:
        """Delete the loop's ranges (it finished; its checkpoint says so)."""
        await session.execute(self.ranges.delete().where(self.ranges.c.token == token))

    # -- claiming -------------------------------------------------------------------

    async def claim(self, session: AsyncSession, token: str) -> Range | None:
        """Claim a range nobody holds (never claimed, or its lease expired); commits."""
        r = self.ranges
        free = (
            sa.select(r.c.number)
            .where(
                r.c.token == token,
                sa.not_(r.c.finished),
                sa.or_(r.c.owner.is_(None), r.c.lease_until < sa.func.clock_timestamp()),
            )
            .order_by(r.c.number)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        claimed = await session.execute(
            r.update()
            .where(r.c.token == token, r.c.number == free)
            .values(owner=self.owner, lease_until=self._lease_until())
            .returning(*self._range_columns())
        )
        row = claimed.first()
        await session.commit()
        held = None if row is None else _range(row)
        self.hold(held)
        return held

    async def steal(
        self,
        session: AsyncSession,
        token: str,
        batch_rows: int,
        count: RowCount | None = None,
    ) -> Range | None:
        """Split the range another worker holds with the most rows left at the middle of
        what it has left; claim the upper half. Commits; None when nothing is worth it.

        The rows left are estimated from the rows the range's worker has done over the keys
        it has passed (from those of the whole loop for a range not begun); the open ends
        of the first and last range run to the loop's smallest and largest key when it was
        planned. Only a range with at least ``SPLIT_BATCHES`` batches of ``batch_rows`` left
        is split, so the cut falls well past the batch its worker is working on.

        When the estimate finds none, ``count`` (the loop's) counts the rows the ranges
        really have left, up to ``SPLIT_BATCHES`` batches each, the widest key span first,
        and the first range that has them all is split: one whose rows sit behind a gap in
        its keys has done few rows over many keys and looks almost empty. A range counted
        short is not counted again until its checkpoint moves (a worker waiting for the
        others' last ranges looks every ``JOIN_POLL_SECONDS``).
        """
        r = self.ranges
        # One split at a time per loop (the new range's number is the next free one); the
        # two-key form keeps clear of the single-key advisory lock of dm's migration lock.
        await session.execute(
            sa.select(
                sa.func.pg_advisory_xact_lock(sa.func.hashtext(SPLIT_LOCK), sa.func.hashtext(token))
            )
        )
        rows = (
            await session.execute(
                sa.select(*self._range_columns(), r.c.low_key, r.c.high_key)
                .where(r.c.token == token, sa.not_(r.c.finished))
                .with_for_update(skip_locked=True)
            )
        ).all()
        spans = [_Span.of(_range(row[:7]), row[7], row[8]) for row in rows]
        begun = [span for span in spans if span.range.rows_done > 0 and span.passed > 0]
        passed = sum(span.passed for span in begun)
        done = sum(span.range.rows_done for span in begun)
        loop_density = done / passed if passed > 0 else None
        best: tuple[float, _Span] | None = None
        for span in spans:
            left = span.rows_left(loop_density)
            if left is None or left < SPLIT_BATCHES * batch_rows or span.middle is None:
                continue
            if best is None or left > best[0]:
                best = (left, span)
        chosen = best[1] if best is not None else None
        if chosen is None and count is not None:
            chosen = await self._counted(token, spans, batch_rows, count)
        if chosen is None:
            await session.commit()
            return None
        victim = chosen.range
        middle = chosen.middle
        revision = await self._revision(session, token)
        cut = encode_key(middle, revision)
        await session.execute(
            r.update()
            .where(r.c.token == token, r.c.number == victim.number)
            .values(upper_key=cut, version=r.c.version + 1)
        )
        last = sa.select(sa.func.max(r.c.number)).where(r.c.token == token)
        number = int((await session.execute(last)).scalar_one()) + 1
        template = sa.select(
            r.c.revision, r.c.direction, r.c.loop, r.c.attempt_id, r.c.low_key, r.c.high_key
        ).where(r.c.token == token, r.c.number == victim.number)
        copied = (await session.execute(template)).one()
        await session.execute(
            r.insert().values(
                token=token,
                number=number,
                revision=copied.revision,
                direction=copied.direction,
                loop=copied.loop,
                attempt_id=copied.attempt_id,
                lower_key=cut,
                upper_key=None if victim.upper is None else encode_key(victim.upper, revision),
                low_key=copied.low_key,
                high_key=copied.high_key,
                last_key=None,
                rows_done=0,
                finished=False,
                version=0,
                owner=self.owner,
                lease_until=self._lease_until(),
            )
        )
        await session.commit()
        stolen = Range(token, number, middle, victim.upper, None, 0, 0)
        self.hold(stolen)
        return stolen

    async def _counted(
        self, token: str, spans: list[_Span], batch_rows: int, count: RowCount
    ) -> _Span | None:
        """Return the first range, widest key span left first, that ``count`` finds with
        at least ``SPLIT_BATCHES`` batches left; remember those it finds short."""
        wanted = SPLIT_BATCHES * batch_rows
        widest = sorted(
            (span for span in spans if span.middle is not None),
            key=lambda span: span.keys_left,
            reverse=True,
        )
        for span in widest:
            held = span.range
            at = (held.version, held.last)
            if self._short.get((token, held.number)) == at:
                continue
            if await count(held.start, held.upper, wanted) >= wanted:
                self._short.pop((token, held.number), None)
                return span
            self._short[(token, held.number)] = at
        return None

    async def _revision(self, session: AsyncSession, token: str) -> str:
        r = self.ranges
        query = sa.select(r.c.revision).where(r.c.token == token).limit(1)
        return str((await session.execute(query)).scalar_one())

    # -- checkpoints -----------------------------------------------------------------

    async def checkpoint(
        self, session: AsyncSession, held: Range, last: Any, rows_done: int, finished: bool
    ) -> Outcome:
        """Write the range's checkpoint in the batch's transaction (not committed): it
        matches only while this worker owns the range at the bounds it paged with."""
        result = await session.execute(
            self._checkpoint_statement(finished),
            {
                "dm_token": held.token,
                "dm_number": held.number,
                "dm_version": held.version,
                "dm_last_key": None if last is None else encode_key(last, "checkpoint"),
                "dm_rows_done": rows_done,
            },
        )
        row = result.first()
        if row is None:
            return Outcome(False)
        upper, version, status, request, by, reason = row
        return Outcome(
            True,
            None if upper is None else decode_key(upper),
            int(version),
            status,
            None if request is None else (request, by, reason),
        )

    def _checkpoint_statement(self, finished: bool) -> sa.Update:
        """The checkpoint update, built once per worker with bound parameters (it runs
        with every batch): the range's new checkpoint and lease where this worker owns it
        at its version, returning its bounds and the attempt's status and request."""
        built = self._checkpoints.get(finished)
        if built is not None:
            return built
        r, a = self.ranges, self.attempts
        conditions = [
            r.c.token == sa.bindparam("dm_token"),
            r.c.number == sa.bindparam("dm_number"),
            r.c.owner == self.owner,
            r.c.version == sa.bindparam("dm_version"),
        ]
        if self.fence is not None:
            conditions.append(self.fence)
        of_attempt = a.c.id == r.c.attempt_id
        built = self._checkpoints[finished] = (
            r.update()
            .where(*conditions)
            .values(
                last_key=sa.bindparam("dm_last_key", type_=r.c.last_key.type),
                rows_done=sa.bindparam("dm_rows_done"),
                finished=finished,
                owner=None if finished else self.owner,
                lease_until=None if finished else self._lease_until(),
            )
            .returning(
                r.c.upper_key,
                r.c.version,
                sa.select(a.c.status).where(of_attempt).scalar_subquery(),
                sa.select(a.c.request).where(of_attempt).scalar_subquery(),
                sa.select(a.c.request_by).where(of_attempt).scalar_subquery(),
                sa.select(a.c.request_reason).where(of_attempt).scalar_subquery(),
            )
        )
        return built

    async def renew(
        self, executor: AsyncSession | AsyncConnection, token: str, number: int
    ) -> bool:
        """Renew this worker's lease on range ``number`` (it waits between two batches);
        return whether it still owns the range (False: taken over, or finished)."""
        r = self.ranges
        result = await executor.execute(
            r.update()
            .where(r.c.token == token, r.c.number == number, r.c.owner == self.owner)
            .values(lease_until=self._lease_until())
            .returning(r.c.number)
        )
        return result.first() is not None

    async def release(self, session: AsyncSession) -> None:
        """Give up the ranges this worker holds (it stops; its last checkpoint committed):
        another worker may claim them at once. Commits."""
        await session.execute(give_up(self.ranges, self.owner))
        await session.commit()

    async def reread(self, session: AsyncSession, held: Range) -> Range | None:
        """Return the range as it is now if this worker still owns it, else None."""
        r = self.ranges
        row = (
            await session.execute(
                sa.select(*self._range_columns()).where(
                    r.c.token == held.token, r.c.number == held.number, r.c.owner == self.owner
                )
            )
        ).first()
        return None if row is None else _range(row)

    def _range_columns(self) -> tuple[sa.ColumnElement[Any], ...]:
        r = self.ranges
        return (
            r.c.token,
            r.c.number,
            r.c.lower_key,
            r.c.upper_key,
            r.c.last_key,
            r.c.rows_done,
            r.c.version,
        )


def give_up(ranges: sa.Table, owner: str) -> sa.Update:
    """Return the statement that frees every unfinished range ``owner`` holds (its last
    checkpoints stay): another worker may claim them at once."""
    return (
        ranges.update()
        .where(ranges.c.owner == owner, sa.not_(ranges.c.finished))
        .values(owner=None, lease_until=None)
    )


def _range(row: Any) -> Range:
    token, number, lower, upper, last, rows_done, version = row
    return Range(
        token,
        int(number),
        None if lower is None else decode_key(lower),
        None if upper is None else decode_key(upper),
        None if last is None else decode_key(last),
        int(rows_done),
        int(version),
    )


@dataclass(frozen=True)
class Joinable:
    """A parallel loop a ``dm work`` process can join: its token, where it runs, and the
    status and request (``dm pause``, ``dm cancel``) of the attempt it works for."""

    token: str
    revision: str
    direction: str
    loop: int
    status: str | None
    request: tuple[str, str | None, str | None] | None


async def joinable(
    session: AsyncSession | AsyncConnection, ranges: sa.Table, attempts: sa.Table, revision: str
) -> Joinable | None:
    """Return the loop of ``revision`` with ranges left to do, if any."""
    r, a = ranges, attempts
    row = (
        await session.execute(
            sa.select(
                r.c.token,
                r.c.revision,
                r.c.direction,
                r.c.loop,
                a.c.status,
                a.c.request,
                a.c.request_by,
                a.c.request_reason,
            )
            .join_from(r, a, a.c.id == r.c.attempt_id, isouter=True)
            .where(r.c.revision == revision, sa.not_(r.c.finished))
            .limit(1)
        )
    ).first()
    await session.commit()
    if row is None:
        return None
    token, revision, direction, loop, status, request, by, reason = row
    asked = None if request is None else (request, by, reason)
    return Joinable(token, revision, direction, loop, status, asked)


def with_progress(outcome: Outcome, held: Range, last: Any, rows_done: int) -> Range:
    """Return ``held`` after a matched checkpoint: its new bounds, last key and rows."""
    return replace(
        held, upper=outcome.upper, version=outcome.version, last=last, rows_done=rows_done
    )
