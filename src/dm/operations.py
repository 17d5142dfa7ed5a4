"""Operator commands on one revision at a time, and read-only inspection.

``run`` and ``rollback`` act on a single revision (the old framework's ``run`` and
``rollback``), ``resolve`` records a manual fix of a failed revision, ``verify`` re-runs
``verify()`` hooks read-only, and ``info`` describes the configuration. Like
``dm.command``, nothing here prints: each function returns a result object, and the CLI and
the programmatic API call the same functions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from typing import TYPE_CHECKING
from typing import Any

import sqlalchemy as sa

from . import planning
from .errors import DmError
from .errors import UnknownTarget
from .errors import UsageError
from .errors import describe_error
from .graph import Graph
from .graph import Revision
from .graph import display_path
from .planning import Step
from .recording import Request
from .redaction import stored
from .runtime import Database
from .runtime import RunResult
from .runtime import execute_plan
from .runtime import load_graph
from .runtime import open_database
from .runtime import tracker_for
from .schema import AppSchema
from .tracker import Attempt
from .tracker import Status
from .tracker import utcnow

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from .settings import Settings
    from .tracker import Tracker

log = logging.getLogger("dm.operations")

RESOLVABLE = (Status.SUCCESS, Status.ROLLED_BACK)


# -- results ----------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class VerifyOutcome:
    """One revision's ``verify()`` result: ``passed``, ``failed`` or ``no verify()``."""

    revision: str
    description: str
    result: str
    error: str | None = None

    @property
    def failed(self) -> bool:
        """Return whether the hook raised or returned anything but True."""
        return self.result == "failed"


@dataclass(frozen=True)
class VerifyResult:
    """Every checked revision's outcome; ``ok`` when none failed."""

    outcomes: list[VerifyOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return whether no ``verify()`` failed."""
        return not any(outcome.failed for outcome in self.outcomes)


@dataclass(frozen=True)
class InfoResult:
    """What dm would run against, and with what."""

    environment: str
    database_url: str
    config_file: str
    ini_section: str
    script_location: str
    tracker_table: str
    lock: str
    """``free``, ``held`` or ``unknown`` (the database could not be asked)."""
    lock_holder: str | None
    versions: dict[str, str]
    environment_source: str = "the default"
    """Where ``environment`` came from (``DM_ENVIRONMENT``, ``.env``, the ini...)."""


@dataclass(frozen=True)
class AttemptRecord:
    """One attempt of a revision as the tracker holds it, error and traceback included."""

    id: int
    revision: str
    attempt: int
    direction: str
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    reason: str | None
    error_message: str | None
    error_traceback: str | None
    run_id: str
    run_by: str | None
    pod_name: str | None
    environment: str | None
    dm_version: str | None
    checksum: str | None
    checkpoint: dict[str, object] | None
    environment_source: str | None = None
    """Where ``environment`` came from (NULL in rows written before tracker layout 4)."""
    db_user: str | None = None
    """The database's ``session_user`` of the connection that wrote the row (PostgreSQL)."""


# -- one revision at a time ----------------------------------------------------------------------


async def run(
    settings: Settings,
    revision: str,
    *,
    force: bool = False,
    reason: str | None = None,
    dry_run: bool = False,
    ignore_environment: bool = False,
) -> RunResult:
    """Run one revision's upgrade (and verify) when its ancestors are applied.

    :param force: run it again, as a new attempt, even though it already succeeded; the
        attempt's reason is ``forced`` (``forced: <reason>`` when a reason is given).
    :param dry_run: only return the plan.
    :param ignore_environment: run it although its ``environments`` exclude this one; the
        attempt's reason records the override.
    :raises UsageError: an ancestor is not applied (each is named), a reason was given
        without ``force``, or a forced run of an applied revision the environment guard
        excludes (without ``ignore_environment``).
    """

    if reason is not None and not force:
        raise UsageError("--reason goes with --force")
    forced_reason = f"forced: {reason.strip()}" if reason and reason.strip() else "forced"
    graph = load_graph(settings)
    rev = _one(graph, revision)
    why = forced_reason if force else None

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_run(
            graph, rev, latest, settings.environment, why, ignore_environment=ignore_environment
        )

    schema = AppSchema.for_graph(settings, graph)
    return await execute_plan(settings, rev.id, plan, dry_run=dry_run, schema=schema)


async def rollback(settings: Settings, revision: str, *, dry_run: bool = False) -> RunResult:
    """Run one revision's downgrade when no applied revision depends on it.

    :param dry_run: only return the plan.
    :raises UsageError: applied revisions depend on it (each is named).
    :raises IrreversiblePlan: the revision has no ``downgrade()``.
    """

    graph = load_graph(settings)
    rev = _one(graph, revision)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_rollback(graph, rev, latest, settings.environment)

    return await execute_plan(settings, rev.id, plan, dry_run=dry_run)


def _one(graph: Graph, revision: str) -> Revision:
    found = graph.resolve(revision)
    if not found:
        raise UnknownTarget(f"no revision matches {revision!r}")
    if len(found) > 1:
        names = ", ".join(s.revision for s in found)
        raise UnknownTarget(f"{revision!r} names several revisions ({names}); name one")
    return graph.revision(found[0].revision)


def _is_applied(latest: Mapping[str, Attempt], revision: str) -> bool:
    attempt = latest.get(revision)
    return attempt is not None and attempt.is_applied


# -- manual resolution --------------------------------------------------------------------------


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
        rev: Revision | None = _one(graph, revision)
    except UnknownTarget:
        rev = None
        async with open_database(settings) as probe:  # a tracker row whose file is gone?
            gone = [r for r in await probe.read_latest() if not graph.known(r)]
        # Its full id, or a prefix of exactly one such revision (as for a file's partial id).
        matches = [revision] if revision in gone else [r for r in gone if r.startswith(revision)]
        if len(matches) != 1 or not _plain_id(revision):
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


# -- pause, resume, cancel -----------------------------------------------------------------------

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
    from .runtime import run_info
    from .state import State

    graph = load_graph(settings)
    rev = _one(graph, revision)
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
    from .runtime import REQUESTED_STATES
    from .runtime import run_info

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
    the run's "writer waiting" file (``dm.lock``), which makes the run hold off its next
    batch until the write is done, and retries every millisecond meanwhile (up to
    ``SQLITE_REQUEST_SECONDS``).
    """
    from sqlalchemy.exc import OperationalError

    from .files import create_private
    from .lock import writer_waiting_path

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
    from .state import State

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


async def resume(settings: Settings, revision: str, *, dry_run: bool = False) -> RunResult:
    """Resume a batched revision that stopped part-way (``paused``, ``incomplete`` or
    ``partial``) from its checkpoint, in the direction it was going; nothing else runs.

    :raises UsageError: it has nothing to resume, or (upgrade) an ancestor is not applied.
    """
    from .state import State

    graph = load_graph(settings)
    rev = _one(graph, revision)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        attempt = latest.get(rev.id)
        state = attempt.state if attempt is not None else State.NOT_RUN
        if attempt is None or state not in (State.PAUSED, State.INCOMPLETE, State.PARTIAL):
            hint = {
                State.ABANDONED: f"; to run it again from its first row: dm run {rev.id}",
                State.CANCELLED: f"; the next dm upgrade (or dm run {rev.id}) starts it over",
            }.get(state, "")
            raise UsageError(
                f"cannot resume {rev.id}: it is {state.value}; dm resume goes on with a "
                f"batched revision that stopped part-way (paused, incomplete, partial){hint}"
            )
        if attempt.direction == "upgrade":
            return planning.plan_run(graph, rev, latest, settings.environment, None)
        return planning.with_decisions([Step(rev, False)], settings.environment, latest)

    return await execute_plan(settings, rev.id, plan, dry_run=dry_run)


# -- attempts -----------------------------------------------------------------------------------


async def attempts(settings: Settings, revision: str) -> list[AttemptRecord]:
    """Return every attempt of ``revision``, oldest first, with errors and tracebacks.

    :param revision: anything that names one revision file, or the exact id of a revision
        whose file is gone but which has rows in the tracker.
    :raises UnknownTarget: nothing is known of ``revision``.
    """
    from .tracker import as_utc

    graph = load_graph(settings)
    # A revision whose file is gone is named by its full id, which wins over a partial id
    # of a file (a tracker row of "ab" over the file "abc123").
    gone = _plain_id(revision) and not graph.known(revision)
    async with open_database(settings) as db:
        rows = await _history(db, revision) if gone else []
        if not rows:
            try:
                rev = _one(graph, revision).id
            except UnknownTarget as exc:
                if gone:
                    raise UnknownTarget(f"{exc}, and the tracker has no rows of it") from None
                raise
            rows = await _history(db, rev)
    return [
        AttemptRecord(
            id=row.id,
            revision=row.revision,
            attempt=row.attempt,
            direction=row.direction,
            status=row.status,
            started_at=as_utc(row.started_at),
            finished_at=as_utc(row.finished_at),
            duration_ms=row.duration_ms,
            reason=row.reason,
            error_message=stored(row.error_message),
            error_traceback=stored(row.error_traceback),
            run_id=row.run_id,
            run_by=row.run_by,
            pod_name=row.pod_name,
            environment=row.environment,
            dm_version=row.dm_version,
            checksum=row.checksum,
            checkpoint=row.checkpoint,
            environment_source=row.environment_source,
            db_user=row.db_user,
        )
        for row in rows
    ]


async def _history(db: Database, revision: str) -> list[sa.Row[Any]]:
    """Return the tracker rows of ``revision``, oldest first (none without a tracker)."""
    if db._file_missing():
        return []
    conn = await db.conn()
    async with conn.begin():
        layout = await db.tracker.layout(conn)
        return [] if layout is None else await db.tracker.history(conn, revision, layout)


def _plain_id(revision: str) -> bool:
    """Return whether ``revision`` looks like a revision id rather than a symbolic target."""
    return bool(revision) and all(c.isalnum() or c in "_-" for c in revision)


# -- verify -------------------------------------------------------------------------------------


async def verify(settings: Settings, revisions: Sequence[str] = ()) -> VerifyResult:
    """Re-run the ``verify()`` hooks of applied revisions, read-only.

    Each hook runs in its own transaction, which is rolled back (and is ``READ ONLY`` on
    PostgreSQL). Useful after a restore.

    :param revisions: the revisions to check (default: every applied revision).
    :raises UsageError: a named revision is not applied.
    """
    graph = load_graph(settings)
    async with open_database(settings) as db:
        latest = await db.read_latest()
        if revisions:
            scripts = [script for rev in revisions for script in graph.resolve(rev)]
            if not scripts:
                raise UnknownTarget(f"no revision matches {' '.join(revisions)!r}")
            not_applied = [s.revision for s in scripts if not _is_applied(latest, s.revision)]
            if not_applied:
                raise UsageError(f"not applied, nothing to verify: {', '.join(not_applied)}")
        else:
            scripts = [s for s in graph.walk() if _is_applied(latest, s.revision)]
        outcomes = []
        for script in scripts:
            rev = graph.revision(script.revision)
            outcome = await _verify_one(await db.conn(), rev, settings.timeout)
            # The CLI prints each outcome; at INFO the terminal would show it twice.
            log.debug("verify %s: %s", script.revision, outcome.result)
            outcomes.append(outcome)
        return VerifyResult(outcomes)


async def _verify_one(conn: AsyncConnection, rev: Revision, timeout: float | None) -> VerifyOutcome:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .unit import check_verify

    if rev.verify is None:
        return VerifyOutcome(rev.id, rev.description, "no verify()")
    limit = rev.timeout or timeout
    transaction = await conn.begin()
    try:
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SET TRANSACTION READ ONLY"))
        session = AsyncSession(bind=conn)
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                failure = await check_verify(rev, session)
        finally:
            await session.close()
    except TimeoutError as exc:
        if limit is not None and deadline.expired():
            failure = f"verify() timed out after {limit:g}s"
        else:  # verify() itself raised it (e.g. a client call of its own timed out)
            failure = f"verify() raised {describe_error(exc)}"
    except Exception as exc:  # a database error (a hook's own error is check_verify's)
        failure = f"verify() raised {describe_error(exc)}"
    finally:
        await transaction.rollback()
    if failure is not None:
        return VerifyOutcome(rev.id, rev.description, "failed", failure)
    return VerifyOutcome(rev.id, rev.description, "passed")


# -- info ---------------------------------------------------------------------------------------


async def info(settings: Settings) -> InfoResult:
    """Describe the environment, database (password hidden), project, tracker and lock."""
    from .tracker import Tracker

    config = settings.alembic_config()
    holder: str | None
    try:
        url = settings.redacted_url()
        tracker = tracker_for(settings)
    except DmError as exc:  # shown, not raised: info is where one looks at a bad setting
        configured = settings.database_url is not None
        url = f"(invalid: {exc})" if configured else str(exc)
        tracker = Tracker(settings.tracker_table, settings.tracker_schema)
        why = "the database URL is invalid" if configured else "no database configured"
        lock, holder = "unknown", why
    else:
        try:
            lock, holder = await lock_state(settings, tracker)
        except DmError as exc:
            lock, holder = "unknown", str(exc)
    location = config.get_main_option("script_location") or ""
    return InfoResult(
        environment=settings.environment,
        database_url=url,
        config_file=display_path(settings.config_file),
        ini_section=settings.ini_section,
        script_location=display_path(location) if location else "",
        tracker_table=tracker.qualified_name,
        lock=lock,
        lock_holder=holder,
        versions=versions(),
        environment_source=settings.environment_source,
    )


def versions() -> dict[str, str]:
    """Return the versions of dm, Python, Alembic, SQLAlchemy and the database drivers."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    from . import __version__

    found = {"dm": __version__, "python": platform.python_version()}
    for name in ("alembic", "sqlalchemy", "asyncpg", "psycopg", "aiosqlite"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


async def lock_state(settings: Settings, tracker: Tracker) -> tuple[str, str | None]:
    """Return whether the migration lock is held now (``free``/``held``) and by whom."""
    from .lock import current_holder

    holder = await current_holder(settings.lock_url(), tracker)
    return ("free", None) if holder is None else ("held", holder)


__all__ = [
    "AttemptRecord",
    "ControlResult",
    "InfoResult",
    "ResolveResult",
    "VerifyOutcome",
    "VerifyResult",
    "attempts",
    "cancel",
    "info",
    "lock_state",
    "pause",
    "resolve",
    "resume",
    "rollback",
    "run",
    "verify",
    "versions",
]
