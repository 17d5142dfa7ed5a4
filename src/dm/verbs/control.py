"""Verbs that act on a run from another shell: pause, cancel, resolve."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from typing import Any

import sqlalchemy as sa

from dm.core.errors import UnknownTarget
from dm.core.errors import UsageError
from dm.core.errors import describe_error
from dm.core.graph import Revision
from dm.core.planning import Step
from dm.engine.execution import Database
from dm.engine.execution import load_graph
from dm.engine.execution import open_database
from dm.engine.recording import Request
from dm.engine.tracker import Status
from dm.engine.tracker import utcnow
from dm.verbs.common import one_revision
from dm.verbs.common import plain_id

if TYPE_CHECKING:
    from dm.config.settings import Settings

log = logging.getLogger("dm.verbs.control")


RESOLVABLE = (Status.SUCCESS, Status.ROLLED_BACK)


@dataclass(frozen=True)
class ResolveResult:
    """The row ``resolve`` recorded."""

    revision: str
    status: str
    direction: str
    previous_status: str
    reason: str
    run_by: str
    resolved_at: datetime


async def resolve(
    settings: Settings, revision: str, *, as_status: str, reason: str
) -> ResolveResult:
    """Record that an operator fixed a failed revision by hand.

    ``success`` means its upgrade is now in effect; ``rolled_back`` means it is not. The
    row records who, when and the reason; no hook runs. A revision whose file was deleted
    can be settled whatever its latest attempt (name its full id): ``rolled_back`` clears
    it from ``dm check``.

    :raises UsageError: the revision's latest attempt did not fail (and its file exists),
        the status is not ``success`` or ``rolled_back``, or the reason is empty.
    """
    try:
        status = Status(as_status)
    except ValueError:
        status = Status.PENDING
    if status not in RESOLVABLE:
        raise UsageError(f"--as must be success or rolled_back, not {as_status!r}")
    if not reason.strip():
        raise UsageError("resolve needs a --reason saying what was fixed by hand")
    graph = load_graph(settings)
    try:
        rev: Revision | None = one_revision(graph, revision)
    except UnknownTarget:
        rev = None
        async with open_database(settings) as probe:  # a tracker row whose file is gone?
            gone = [r for r in await probe.read_latest() if not graph.known(r)]
        # Its full id, or a prefix of exactly one such revision (as for a file's partial id).
        matches = [revision] if revision in gone else [r for r in gone if r.startswith(revision)]
        if len(matches) != 1 or not plain_id(revision):
            raise
        revision = matches[0]
    rev_id = rev.id if rev is not None else revision
    direction = "upgrade" if status is Status.SUCCESS else "downgrade"
    text = f"resolved by hand: {reason.strip()}"
    async with open_database(settings) as db, db.locked() as (recorder, _interrupted):
        attempt = recorder.latest.get(rev_id)
        if attempt is None or (rev is not None and attempt.status is not Status.FAILED):
            state = "never run" if attempt is None else attempt.status.value
            raise UsageError(
                f"cannot resolve {rev_id}: its latest attempt is {state}, not failed; only a "
                "failed revision (or one whose file was deleted) can be resolved"
            )
        async with recorder.conn.begin():
            if rev is not None:
                step = Step(rev, status is Status.SUCCESS)
                await recorder.record_step(step, status, reason=text)
            else:
                await recorder.record(
                    rev_id,
                    description=attempt.description or "",
                    direction=direction,
                    status=status,
                    checksum=None,
                    reason=f"{text} (file missing)",
                )
        run_by = recorder.run.run_by
        log.info("%s: resolved as %s by %s", rev_id, status.value, run_by)
        return ResolveResult(
            rev_id, status.value, direction, attempt.status.value, text, run_by, utcnow()
        )


SQLITE_REQUEST_SECONDS = 60.0
"""How long ``dm pause``/``dm cancel`` try for SQLite's write lock between two batches."""

_REQUESTS = {"pause": "pause", "cancel": "cancel", "cancel --skip": "abandon"}

_SETTLED_BY = {"cancel": Status.CANCELLED, "abandon": Status.ABANDONED}


@dataclass(frozen=True)
class ControlResult:
    """What ``pause`` or ``cancel`` did to one revision.

    ``outcome`` is ``requested`` (left on the running attempt: the run stops at its next
    batch boundary), ``recorded`` (a stopped revision settled with a new row), ``unchanged``
    (it already was so), ``honoured`` (with ``stuck_after``: the run stopped as asked) or
    ``settled`` (with ``stuck_after``: the run did not answer, and its attempt was ended
    without it; the run is fenced out but may still hold the migration lock).
    """

    revision: str
    action: str
    outcome: str
    state: str
    by: str
    reason: str | None


async def pause(settings: Settings, revision: str, *, reason: str | None = None) -> ControlResult:
    """Ask the run working on ``revision`` (any host: the request is a tracker write) to
    stop its batched loop at the next batch boundary; the checkpoint is kept and the
    attempt is recorded ``paused``. Needs no lock.

    :raises UsageError: the revision is transactional, or not running (paused already is
        no error), or its run died.
    """
    return await _control(settings, revision, "pause", reason)


async def cancel(
    settings: Settings,
    revision: str,
    *,
    reason: str | None = None,
    skip: bool = False,
    stuck_after: float | None = None,
) -> ControlResult:
    """Stop a batched revision and settle its attempt: ``cancelled`` (the next run starts
    it over) or, with ``skip``, ``abandoned`` (plans pass it; it does not run again).

    A running one is asked to stop at its next batch boundary (no lock needed); one that
    stopped earlier (``incomplete``, ``paused``, ``partial``; ``cancelled`` with ``skip``)
    is settled at once with a new row, under the migration lock.

    :param stuck_after: for a running one, wait up to this many seconds for its run to
        stop; if it commits no batch meanwhile (alive, but no longer answering), end its
        attempt without it: this command takes the fence, so that run can commit nothing
        more, and records the attempt as asked.
    :raises UsageError: the revision is transactional, or has nothing to cancel.
    """
    verb = "cancel --skip" if skip else "cancel"
    return await _control(settings, revision, verb, reason, stuck_after=stuck_after)


async def _control(
    settings: Settings,
    revision: str,
    verb: str,
    reason: str | None,
    *,
    stuck_after: float | None = None,
) -> ControlResult:
    from dm.core.state import State
    from dm.engine.execution import run_info

    graph = load_graph(settings)
    rev = one_revision(graph, revision)
    if rev.transactional:
        raise UsageError(
            f"cannot {verb} {rev.id}: it is transactional, so it cannot stop midway (only a "
            "transactional = False revision stopping between batches can); SIGTERM to its "
            "run rolls it back"
        )
    request = _REQUESTS[verb]
    why = reason.strip() if reason and reason.strip() else None
    run_by = run_info(settings).run_by
    by = f"{run_by} ({settings.pod_name})" if settings.pod_name else run_by
    async with open_database(settings) as db:
        latest = await db.read_latest()
        attempt = latest.get(rev.id)
        state = attempt.state if attempt is not None else State.NOT_RUN
        if attempt is not None and state is State.RUNNING:
            if rev.id in await db.died(latest):
                raise UsageError(
                    f"cannot {verb} {rev.id}: its run died (state died); the next run marks "
                    "the attempt interrupted and resumes it"
                )
            conn = await db.conn()
            async with conn.begin():
                layout = await db.tracker.layout(conn)
            if layout is not None and layout < 3:
                raise UsageError(
                    f"cannot {verb} {rev.id}: the tracker has layout {layout}, written by "
                    "an older dm that does not read requests"
                )
            left = await _leave_request(db, attempt.id, request, by, why)
            if not left:
                raise UsageError(f"cannot {verb} {rev.id}: its attempt ended meanwhile")
            log.info(
                "%s: %s requested by %s; it stops at its next batch boundary", rev.id, verb, by
            )
            if stuck_after is not None:
                return await _settle_if_stuck(db, rev, attempt.id, request, by, why, stuck_after)
            return ControlResult(rev.id, request, "requested", state.value, by, why)
    if request == "pause":
        if state is State.PAUSED:
            return ControlResult(rev.id, request, "unchanged", state.value, by, why)
        raise UsageError(
            f"cannot pause {rev.id}: it is not running (state {state.value}); dm pause stops "
            "a running batched revision at its next batch boundary"
        )
    return await _settle_stopped(settings, rev, request, by, why)


STUCK_POLL_SECONDS = 0.25
"""How often ``dm cancel --stuck-after`` looks at the running attempt."""


async def _settle_if_stuck(
    db: Database,
    rev: Revision,
    attempt_id: int,
    request: str,
    by: str,
    why: str | None,
    stuck_after: float,
) -> ControlResult:
    """Wait up to ``stuck_after`` seconds for the run to stop at a batch boundary; if it
    commits no batch meanwhile, end its attempt without it (see :func:`cancel`)."""
    from dm.engine.execution import REQUESTED_STATES
    from dm.engine.execution import run_info

    loop = asyncio.get_running_loop()
    conn = await db.conn()
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(STUCK_POLL_SECONDS * 1000)}")
        await conn.commit()

    async def progress() -> tuple[str, Any] | None:
        async with conn.begin():
            return await db.tracker.attempt_progress(conn, attempt_id)

    first = await progress()
    deadline = loop.time() + stuck_after
    answered = False
    while first is not None and first[0] == Status.PENDING.value and loop.time() < deadline:
        await asyncio.sleep(STUCK_POLL_SECONDS)
        now = await progress()
        if now is None or now[0] != Status.PENDING.value:
            final = now[0] if now is not None else "gone"
            log.info("%s: its run stopped as asked (%s)", rev.id, final)
            return ControlResult(rev.id, request, "honoured", final, by, why)
        answered = answered or now[1] != first[1]
    if first is None or first[0] != Status.PENDING.value:
        final = first[0] if first is not None else "gone"
        return ControlResult(rev.id, request, "honoured", final, by, why)
    if answered:  # it commits batches: it stops at the next boundary, as asked
        return ControlResult(rev.id, request, "requested", REQUESTED_STATES[request], by, why)
    status = _SETTLED_BY[request]
    text = (
        f"{Request(request, by, why).describe()}; its run did not answer for "
        f"{stuck_after:g}s (no batch committed), so the attempt was ended without it"
    )
    try:
        async with conn.begin():
            if conn.dialect.name == "postgresql":  # the attempt row too
                ms = max(int(db.settings.lock_timeout * 1000), 1)
                await conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
            run_id = run_info(db.settings).run_id
            ended = await db.tracker.settle_stuck(
                conn, attempt_id, run_id, status, text, timeout=db.settings.lock_timeout
            )
    except sa.exc.DBAPIError as exc:
        raise UsageError(
            f"cannot settle {rev.id}: its run holds a lock this needs ({describe_error(exc)}); "
            "stop its process (the next run marks the attempt interrupted), or retry with a "
            "longer --lock-timeout"
        ) from None
    if not ended:
        return ControlResult(rev.id, request, "honoured", "ended", by, why)
    log.warning(
        "%s: %s; that run can commit nothing more (it exits 3 if it wakes up), but it holds "
        "the migration lock until its process ends: stop it so that the next run can start",
        rev.id,
        text,
    )
    return ControlResult(rev.id, request, "settled", status.value, by, why)


async def _leave_request(
    db: Database, attempt_id: int, request: str, by: str, why: str | None
) -> bool:
    """Write the request on the running attempt; return False if it is no longer pending.

    On SQLite the running batch holds the database's write lock until it commits, and the
    gap before the next batch is too short for SQLite's busy handler: the request creates
    the run's "writer waiting" file (``dm.engine.lock``), which makes the run hold off its next
    batch until the write is done, and retries every millisecond meanwhile (up to
    ``SQLITE_REQUEST_SECONDS``).
    """
    from sqlalchemy.exc import OperationalError

    from dm.config.files import create_private
    from dm.engine.lock import writer_waiting_path

    conn = await db.conn()
    if conn.dialect.name != "sqlite":
        async with conn.begin():
            return await db.tracker.request(conn, attempt_id, request, by, why)
    await conn.exec_driver_sql("PRAGMA busy_timeout = 1")
    await conn.commit()
    waiting = writer_waiting_path(db.settings.lock_url(), db.tracker)
    assert waiting is not None
    create_private(waiting, "SQLite writer-waiting file")  # let in after the next batch
    try:
        deadline = asyncio.get_running_loop().time() + SQLITE_REQUEST_SECONDS
        while True:
            try:
                async with conn.begin():
                    return await db.tracker.request(conn, attempt_id, request, by, why)
            except OperationalError as exc:
                if "locked" not in str(exc) or asyncio.get_running_loop().time() > deadline:
                    raise
    finally:
        waiting.unlink(missing_ok=True)


async def _settle_stopped(
    settings: Settings, rev: Revision, request: str, by: str, why: str | None
) -> ControlResult:
    """Record a stopped revision ``cancelled`` or ``abandoned``, under the lock."""
    from dm.core.state import State

    status = _SETTLED_BY[request]
    settleable = {State.INCOMPLETE, State.PAUSED, State.PARTIAL}
    if status is Status.ABANDONED:
        settleable.add(State.CANCELLED)
    async with open_database(settings) as db, db.locked() as (recorder, _interrupted):
        attempt = recorder.latest.get(rev.id)
        state = attempt.state if attempt is not None else State.NOT_RUN
        if state is State.ABANDONED or (state is State.CANCELLED and status is Status.CANCELLED):
            return ControlResult(rev.id, request, "unchanged", state.value, by, why)
        if attempt is None or state not in settleable:
            raise UsageError(
                f"cannot cancel {rev.id}: it is {state.value}; dm cancel stops a running "
                "batched revision, or settles one that stopped part-way (incomplete, paused, "
                "partial)"
            )
        text = Request(request, by, why).describe()
        step = Step(rev, attempt.direction == "upgrade")
        async with recorder.conn.begin():
            await recorder.record_step(step, status, reason=text, checkpoint=attempt.checkpoint)
        log.info("%s: %s", rev.id, text)
        return ControlResult(rev.id, request, "recorded", status.value, by, why)
