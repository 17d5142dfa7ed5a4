"""Verbs that read: current, status, check, history, heads, branches, show, log, verify, info."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from typing import TYPE_CHECKING
from typing import Any

import sqlalchemy as sa
from alembic.script.revision import RevisionError
from alembic.util import CommandError

from dm.config.redaction import stored
from dm.core import planning
from dm.core.errors import DmError
from dm.core.errors import UnknownTarget
from dm.core.errors import UsageError
from dm.core.errors import describe_error
from dm.core.graph import Graph
from dm.core.graph import Revision
from dm.core.graph import checksum
from dm.core.graph import display_path
from dm.core.state import UNFINISHED
from dm.core.state import Attempt
from dm.core.state import State
from dm.engine.app_schema import AppSchema
from dm.engine.execution import Database
from dm.engine.execution import load_graph
from dm.engine.execution import open_database
from dm.engine.execution import shown_state
from dm.engine.execution import tracker_for
from dm.verbs.common import one_revision
from dm.verbs.common import plain_id

if TYPE_CHECKING:
    from alembic.script import Script
    from sqlalchemy.ext.asyncio import AsyncConnection

    from dm.config.settings import Settings
    from dm.engine.tracker import Tracker

log = logging.getLogger("dm.verbs.inspect")


@dataclass(frozen=True)
class RevisionInfo:
    """A revision file as the graph sees it."""

    revision: str
    down_revisions: list[str]
    description: str
    branch_labels: list[str]
    depends_on: list[str]
    path: str
    is_head: bool
    is_branch_point: bool
    is_merge_point: bool
    reversible: bool
    doc: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    """The module-level attributes dm reads from the file (``transactional``...)."""

    @classmethod
    def of(cls, rev: Revision) -> RevisionInfo:
        """Describe ``rev``."""
        script = rev.script
        return cls(
            revision=script.revision,
            down_revisions=list(_as_list(script.down_revision)),
            description=rev.description,
            branch_labels=sorted(script.branch_labels),
            depends_on=list(_as_list(script.dependencies)),
            path=display_path(script.path),
            is_head=script.is_head,
            is_branch_point=script.is_branch_point,
            is_merge_point=script.is_merge_point,
            reversible=rev.reversible,
            doc=rev.doc,
            attributes={
                "transactional": rev.transactional,
                "environments": list(rev.environments) if rev.environments is not None else None,
                "timeout": rev.timeout,
                "max_runtime": rev.max_runtime,
                "blocks_deploy": rev.blocks_deploy,
                "requires_schema": list(rev.requires_schema),
                "requires_complete": list(rev.requires_complete),
                "idempotent": rev.idempotent,
            },
        )


@dataclass(frozen=True)
class CurrentResult:
    """The applied heads, as derived from the tracker."""

    heads: list[str]
    graph_heads: list[str]
    skipped: list[str] = field(default_factory=list)
    """Those of ``heads`` the environment guard skipped (they never ran here)."""


@dataclass(frozen=True)
class RevisionStatus:
    """One revision's latest attempt (``status`` is None when it never ran)."""

    revision: str
    description: str
    status: str | None = None
    """The latest attempt's status (None when it never ran)."""
    state: str = State.NOT_RUN.value
    """What is in effect (``dm.core.state``); a ``running`` attempt shows ``died`` when its run
    died, ``pausing`` or ``cancelling`` when ``dm pause`` or ``dm cancel`` asked it to stop."""
    direction: str | None = None
    applied: bool = False
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None
    run_by: str | None = None
    pod_name: str | None = None
    error: str | None = None
    reason: str | None = None
    is_head: bool = False
    missing_file: bool = False
    modified: bool = False
    """The file changed since the attempt that applied it (checksums differ)."""
    checkpoint: dict[str, Any] | None = None
    """Where a non-transactional revision's batches stand (running, failed, stopped,
    paused or cancelled attempt)."""
    request: str | None = None
    """``pause``, ``cancel`` or ``abandon``: what ``dm pause``/``dm cancel`` asked of the
    latest attempt; with ``request_by`` (who) and ``request_reason`` (why)."""
    request_by: str | None = None
    request_reason: str | None = None
    blocks_deploy: bool = True
    """False: ``dm check`` passes while the revision is unfinished (``blocks_deploy = False``)."""


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` found: everything must be empty for the check to pass."""

    pending: list[str]
    failed: list[str]
    """Revisions in state ``failed`` or ``partial``: the next run retries or resumes them."""
    running: list[str]
    missing: list[str]
    modified: list[str] = field(default_factory=list)
    allow_modified: bool = False
    died: list[str] = field(default_factory=list)
    """Revisions whose attempt is pending while no run holds the lock: the run died, and
    the next run marks the attempt interrupted and retries it."""
    needs_schema: list[str] = field(default_factory=list)
    """One line per pending revision that an upgrade would refuse: it requires application
    schema revisions the database lacks (``requires_schema``)."""
    incomplete: list[str] = field(default_factory=list)
    """Batched revisions stopped at a batch boundary: ``incomplete`` (time up), ``paused``
    or ``cancelled``; a later run takes them up again."""
    deferred: list[str] = field(default_factory=list)
    """Unfinished revisions (not run, running, died, incomplete, paused, cancelled) that do
    not fail the check because they say ``blocks_deploy = False``."""
    abandoned: list[str] = field(default_factory=list)
    """Passed, but never applied: settled by ``dm cancel --skip`` (not run again)."""
    skipped: list[str] = field(default_factory=list)
    """Passed, but never applied here: the environment guard skipped them."""

    @property
    def ok(self) -> bool:
        """Return whether nothing is pending, failed, running, died, incomplete, missing or
        (unless allowed) modified since it was applied."""
        modified = self.modified and not self.allow_modified
        unsettled = self.pending or self.failed or self.running or self.died or self.incomplete
        return not (unsettled or self.missing or modified)


async def current(settings: Settings) -> CurrentResult:
    """Show the applied heads, as recorded in the tracker."""
    graph = load_graph(settings, cached=True)
    async with open_database(settings) as db:
        latest = await db.read_latest()
    heads = graph.applied_heads(planning.applied_revisions(latest))
    skipped = [rev for rev in heads if latest[rev].is_skipped]
    return CurrentResult(list(heads), list(graph.heads), skipped)


async def status(settings: Settings) -> list[RevisionStatus]:
    """Show every revision with its state and latest attempt, oldest revision first."""
    graph = load_graph(settings, cached=True)
    async with open_database(settings) as db:
        latest = await db.read_latest()
        died = await db.died(latest)
    heads = set(graph.heads)
    rows = [
        _revision_status(
            s.revision,
            graph.revision(s.revision).description,
            latest.get(s.revision),
            died,
            is_head=s.revision in heads,
            modified=_is_modified(s, latest.get(s.revision)),
            blocks_deploy=graph.revision(s.revision).blocks_deploy,
        )
        for s in graph.walk()
    ]
    for revision, attempt in latest.items():
        if not graph.known(revision):
            rows.append(
                _revision_status(
                    revision, attempt.description or "", attempt, died, missing_file=True
                )
            )
    return rows


def _is_modified(script: Script, attempt: Attempt | None) -> bool:
    """Return whether ``script``'s file changed since the attempt that applied it."""
    if attempt is None or attempt.state is not State.APPLIED:
        return False
    applied_from = attempt.in_effect_checksum
    return applied_from is not None and applied_from != checksum(script)


def _revision_status(
    revision: str,
    description: str,
    attempt: Attempt | None,
    died: Collection[str],
    *,
    is_head: bool = False,
    modified: bool = False,
    missing_file: bool = False,
    blocks_deploy: bool = True,
) -> RevisionStatus:
    if attempt is None:
        return RevisionStatus(
            revision,
            description,
            is_head=is_head,
            missing_file=missing_file,
            blocks_deploy=blocks_deploy,
        )
    return RevisionStatus(
        revision=revision,
        description=description,
        status=attempt.status.value,
        state=shown_state(attempt, revision in died),
        direction=attempt.direction,
        applied=attempt.is_applied,
        attempts=attempt.attempts,
        started_at=attempt.started_at,
        finished_at=attempt.finished_at,
        duration_ms=attempt.duration_ms,
        run_by=attempt.run_by,
        pod_name=attempt.pod_name,
        error=attempt.error_message,
        reason=attempt.reason,
        is_head=is_head,
        missing_file=missing_file,
        modified=modified,
        checkpoint=attempt.checkpoint,
        request=attempt.request,
        request_by=attempt.request_by,
        request_reason=attempt.request_reason,
        blocks_deploy=blocks_deploy,
    )


async def check(settings: Settings, *, allow_modified: bool = False) -> CheckResult:
    """Check that every revision is applied and none failed or is running.

    :param allow_modified: do not fail on revision files changed since they were applied.
    """
    graph = load_graph(settings, cached=True)
    schema = AppSchema.for_graph(settings, graph)
    async with open_database(settings) as db:
        return await _check(settings, graph, db, allow_modified, schema)


async def _check(
    settings: Settings,
    graph: Graph,
    db: Database,
    allow_modified: bool,
    schema: AppSchema | None = None,
) -> CheckResult:
    latest = await db.read_latest()
    died = await db.died(latest)

    def having(*states: State) -> list[str]:
        return sorted(r for r, a in latest.items() if a.state in states and r not in died)

    def blocking(revisions: Collection[str]) -> list[str]:
        return [r for r in revisions if not _deferrable(graph, r)]

    running = having(State.RUNNING)
    failed = having(State.FAILED, State.PARTIAL)
    incomplete = having(*UNFINISHED)
    missing = sorted(r for r, a in latest.items() if a.is_applied and not graph.known(r))
    modified = sorted(
        r for r, a in latest.items() if graph.known(r) and _is_modified(graph.script(r), a)
    )
    skip = set(running) | set(failed) | set(died) | set(incomplete)
    steps = planning.plan_upgrade(graph, "heads", latest, settings.environment)
    pending = [s.revision for s in steps if s.revision not in skip]
    needs_schema = []
    if schema is not None and planning.needs_schema(steps):
        needs_schema = planning.schema_blocked(steps, await db.read_schema(schema))
    unfinished = [*pending, *running, *sorted(died), *incomplete]
    deferred = sorted(r for r in unfinished if _deferrable(graph, r))
    return CheckResult(
        *(blocking(pending), failed, blocking(running), missing, modified, allow_modified),
        died=blocking(sorted(died)),
        needs_schema=needs_schema,
        incomplete=blocking(incomplete),
        deferred=deferred,
        abandoned=having(State.ABANDONED),
        skipped=having(State.SKIPPED),
    )


def _deferrable(graph: Graph, revision: str) -> bool:
    """Return whether ``revision`` says the application may start before it is done."""
    return graph.known(revision) and not graph.revision(revision).blocks_deploy


async def check_wait(
    settings: Settings,
    *,
    timeout: float = 300.0,
    interval: float = 5.0,
    allow_modified: bool = False,
) -> CheckResult:
    """Poll ``check`` until it passes or ``timeout`` seconds have passed; return the last result.

    Each poll reads the tracker once, without the lock, and logs one line naming what it
    still waits for. A transient database failure during a poll (the database restarting,
    unreachable for a moment) is logged and counts as "not yet".

    :raises TransientFailure: no poll reached the database before the timeout.
    :raises UsageError: bad configuration or revision files, a refused login, a missing
        database (a person must fix these: waiting does not help).
    """
    import asyncio
    import time

    from dm.core.errors import DatabaseUnreachable
    from dm.core.errors import TransientFailure
    from dm.core.transient import is_transient

    graph = load_graph(settings, cached=True)
    schema = AppSchema.for_graph(settings, graph)
    # The polls retry on their own schedule: no start-up retry inside a poll.
    settings = settings.model_copy(update={"connect_retry_seconds": 0.0})
    deadline = time.monotonic() + timeout
    result: CheckResult | None = None
    polls = 0
    while True:
        polls += 1
        remaining = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, interval)):
                async with open_database(settings) as db:
                    result = await _check(settings, graph, db, allow_modified, schema)
            unreachable = None
        except TransientFailure as exc:
            unreachable = str(exc)
        except TimeoutError:
            unreachable = "the database did not answer in time"
        except Exception as exc:
            if not is_transient(exc):
                raise
            unreachable = f"transient database failure: {' '.join(str(exc).split())}"
        if result is not None and unreachable is None and result.ok:
            log.info("check passed after %d poll(s)", polls)
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if result is None:
                raise DatabaseUnreachable(
                    f"{unreachable} (gave up waiting after {timeout:g}s, {polls} poll(s))"
                )
            log.warning(
                "gave up waiting after %gs (%d poll(s)): %s", timeout, polls, _waiting_for(result)
            )
            return result
        if unreachable is not None:
            log.warning("poll %d: %s; next poll in %gs", polls, unreachable, interval)
        elif result is not None:
            log.info(
                "poll %d: waiting for %s; next poll in %gs (%.0fs left)",
                polls,
                _waiting_for(result),
                interval,
                remaining,
            )
        await asyncio.sleep(min(interval, remaining))


def _waiting_for(result: CheckResult) -> str:
    """Summarise in one line what keeps ``result`` from passing."""
    parts = [
        f"{label} {', '.join(revisions)}"
        for label, revisions in (
            ("pending", result.pending),
            ("needing schema", [line.split()[1] for line in result.needs_schema]),
            ("running", result.running),
            ("died", result.died),
            ("incomplete", result.incomplete),
            ("failed", result.failed),
            ("missing", result.missing),
            ("modified", [] if result.allow_modified else result.modified),
        )
        if revisions
    ]
    return "; ".join(parts) or "nothing"


def heads(settings: Settings) -> list[RevisionInfo]:
    """Show the head revisions of the graph."""
    graph = load_graph(settings, cached=True)
    return [RevisionInfo.of(graph.revision(rev)) for rev in graph.heads]


def branches(settings: Settings) -> list[RevisionInfo]:
    """Show the revisions where the graph branches."""
    graph = load_graph(settings, cached=True)
    return [RevisionInfo.of(graph.revision(s.revision)) for s in graph.walk() if s.is_branch_point]


def history(settings: Settings, rev_range: str | None = None) -> list[RevisionInfo]:
    """Show revisions newest first, optionally limited to ``start:end``."""
    graph = load_graph(settings, cached=True)
    base, head = "base", "heads"
    if rev_range:
        if ":" not in rev_range:
            raise UsageError(f"history range {rev_range!r} must look like START:END")
        start, end = rev_range.split(":", 1)
        base, head = start or "base", end or "heads"
    try:
        scripts = list(graph.script_dir.walk_revisions(base=base, head=head))
    except (CommandError, RevisionError) as exc:
        raise UnknownTarget(f"history range {rev_range!r}: {' '.join(str(exc).split())}") from None
    return [RevisionInfo.of(graph.revision(s.revision)) for s in scripts]


def show(settings: Settings, revision: str) -> list[RevisionInfo]:
    """Show the revision(s) a target names."""
    graph = load_graph(settings, cached=True)
    found = graph.resolve(revision)
    if not found:
        raise UnknownTarget(f"no revision matches {revision!r}")
    return [RevisionInfo.of(graph.revision(s.revision)) for s in found]


def _as_list(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


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


def _is_applied(latest: Mapping[str, Attempt], revision: str) -> bool:
    attempt = latest.get(revision)
    return attempt is not None and attempt.is_applied


async def attempts(settings: Settings, revision: str) -> list[AttemptRecord]:
    """Return every attempt of ``revision``, oldest first, with errors and tracebacks.

    :param revision: anything that names one revision file, or the exact id of a revision
        whose file is gone but which has rows in the tracker.
    :raises UnknownTarget: nothing is known of ``revision``.
    """
    from dm.engine.tracker import as_utc

    graph = load_graph(settings)
    # A revision whose file is gone is named by its full id, which wins over a partial id
    # of a file (a tracker row of "ab" over the file "abc123").
    gone = plain_id(revision) and not graph.known(revision)
    async with open_database(settings) as db:
        rows = await _history(db, revision) if gone else []
        if not rows:
            try:
                rev = one_revision(graph, revision).id
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

    from dm.engine.unit import check_verify

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


async def info(settings: Settings) -> InfoResult:
    """Describe the environment, database (password hidden), project, tracker and lock."""
    from dm.engine.tracker import Tracker

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

    from dm.core.version import __version__

    found = {"dm": __version__, "python": platform.python_version()}
    for name in ("alembic", "sqlalchemy", "asyncpg", "psycopg", "aiosqlite"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


async def lock_state(settings: Settings, tracker: Tracker) -> tuple[str, str | None]:
    """Return whether the migration lock is held now (``free``/``held``) and by whom."""
    from dm.engine.lock import current_holder

    holder = await current_holder(settings.lock_url(), tracker)
    return ("free", None) if holder is None else ("held", holder)
