"""What every command that touches the database shares: settings to graph, tracker, engine,
lock and run info, and the one path that executes a plan.

``dm.verbs`` (the commands), ``dm.alembic.env`` (Alembic's command API)
and the programmatic API use these public names; nothing here prints or exits.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from dm.core import planning
from dm.core.environments import Action
from dm.core.graph import Graph
from dm.core.planning import Step
from dm.core.state import Attempt
from dm.core.state import State
from dm.engine.tracker import RunInfo
from dm.engine.tracker import Status
from dm.engine.tracker import Tracker

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncEngine

    from dm.config.settings import Settings
    from dm.core.planning import SchemaState
    from dm.engine.app_schema import AppSchema
    from dm.engine.attempts import Runner
    from dm.engine.attempts import StepResult
    from dm.engine.recording import Recorder

log = logging.getLogger("dm.runtime")

INTERRUPTED = "interrupted: the run that made this attempt stopped before finishing it"
DIED = "died"
"""The state shown for a ``running`` attempt whose run died (no run holds the lock)."""
REQUESTED_STATES = {"pause": "pausing", "cancel": "cancelling", "abandon": "cancelling"}
"""The states shown for a ``running`` attempt that ``dm pause`` or ``dm cancel`` asked to
stop (it does so at its next batch boundary)."""


def shown_state(attempt: Attempt, died: bool) -> str:
    """Return the state ``dm status`` shows for a revision's latest attempt."""
    if died:
        return DIED
    if attempt.state is State.RUNNING and attempt.request in REQUESTED_STATES:
        return REQUESTED_STATES[attempt.request]
    return attempt.state.value


@dataclass(frozen=True)
class PlannedStep:
    """A step of a plan, as shown before it runs."""

    revision: str
    direction: str
    description: str
    reversible: bool
    action: str = "run"
    """``run``; ``skip`` (the environment guard); ``record`` (undo of a skipped upgrade)."""
    reason: str | None = None
    """Why: the environment guard's verdict on a guarded revision, or why a step is only
    recorded (None for an unguarded revision that runs)."""
    records: str | None = None
    """The status a step that does not run is recorded with (``success``, ``rolled_back``,
    ``skipped``); None for a step that runs."""


@dataclass(frozen=True)
class RunResult:
    """The outcome of ``upgrade``, ``downgrade`` or ``stamp``."""

    target: str
    planned: list[PlannedStep]
    steps: list[StepResult] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def nothing_to_do(self) -> bool:
        """Return whether the plan was empty."""
        return not self.planned


def load_graph(settings: Settings, *, cached: bool = False) -> Graph:
    """Load and validate the project's revision graph (and the environment names its
    revisions use, against ``dm.core.environments`` when it is set).

    :param cached: read it from ``dm.core.graph_cache`` when that matches the files (for a
        command that runs no hook, or calls ``Graph.ensure_imported`` before it does).
    """
    from dm.core.environments import check_declared

    config = settings.alembic_config()
    graph = Graph.from_config(config, cached=cached)
    check_declared(graph.revisions, settings.declared_environments)
    if (config.get_main_option("prepend_sys_path") or "").strip() in (".", "./"):
        log.warning(
            "%s: prepend_sys_path = . imports modules from the working directory, whatever "
            "it is; set prepend_sys_path = %%(here)s (the project's directory)",
            settings.config_file,
        )
    return graph


def tracker_for(settings: Settings, backend: str | None = None) -> Tracker:
    """Return the tracker tables the settings name (no schema on SQLite).

    :param backend: the database's backend name (``sqlite``, ``postgresql``); by default
        that of the settings' URL.
    """
    if backend is None:
        backend = settings.url().get_backend_name()
    schema = None if backend == "sqlite" else settings.tracker_schema
    return Tracker(settings.tracker_table, schema)


def run_info(settings: Settings) -> RunInfo:
    """Return who and where this invocation runs."""
    from dm.core.version import __version__

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = str(os.getuid())
    return RunInfo(
        run_id=str(uuid.uuid4()),
        run_by=f"{user}@{socket.gethostname()}"[:255],  # the column's width
        pod_name=settings.pod_name,
        dm_version=__version__,
        environment=settings.environment,
        environment_source=settings.environment_source,
    )


class Database:
    """One working connection, opened on first use, plus the lock around writes."""

    def __init__(self, settings: Settings, tracker: Tracker) -> None:
        from dm.config.engines import create_engine

        self.settings = settings
        self.tracker = tracker
        self.url = settings.url()
        self.application_name = f"dm:{settings.pod_name or socket.gethostname()}"
        self.engine: AsyncEngine = create_engine(self.url, application_name=self.application_name)
        self.run = run_info(settings)
        """Who runs, stamped on every attempt; its run id is the fence while locked."""
        self._conn: AsyncConnection | None = None
        self._conn_exit = contextlib.AsyncExitStack()
        self._exit = contextlib.AsyncExitStack()
        self.started = time.monotonic()
        """When the command began: a run's ``max_runtime`` counts from here."""
        self._announced = False

    def announce(self) -> None:
        """Log, once, the database (password hidden) and environment a run works on, and
        where each came from."""
        from dm.config.urls import redact

        if self._announced:
            return
        self._announced = True
        url_source = self.settings.url_source
        log.info(
            "database %s (%s); environment %r (from %s)",
            redact(self.url),
            url_source if url_source.startswith("the ") else f"from {url_source}",
            self.settings.environment,
            self.settings.environment_source,
        )

    async def close(self) -> None:
        await self._conn_exit.aclose()
        await self._exit.aclose()
        await self.engine.dispose()

    def runner(self, recorder: Recorder) -> Runner:
        """Return a runner recording through ``recorder`` (from :meth:`locked`)."""
        from dm.engine.attempts import Runner
        from dm.engine.lock import writer_waiting_path

        return Runner(
            recorder,
            timeout=self.settings.timeout,
            pg_lock_timeout=self.settings.pg_lock_timeout,
            lock_retries=self.settings.lock_retries,
            lock_retry_wait=self.settings.lock_retry_wait,
            max_runtime=self.settings.max_runtime,
            started=self.started,
            writer_waiting=writer_waiting_path(self.settings.lock_url(), self.tracker),
            idle_in_transaction_timeout=self.settings.idle_in_transaction_timeout,
        )

    async def conn(self) -> AsyncConnection:
        if self._conn is None:
            from dm.config.engines import connect

            retry = self.settings.connect_retry_seconds
            self._conn = await self._conn_exit.enter_async_context(
                connect(self.engine, retry_seconds=retry)
            )
        return self._conn

    async def _close_conn(self) -> None:
        """Close the working connection (the next :meth:`conn` opens a new one)."""
        self._conn = None
        await self._conn_exit.aclose()

    def _file_missing(self) -> bool:
        from dm.config.engines import is_sqlite

        return is_sqlite(self.url) and not Path(self.url.database or "").exists()

    async def read_latest(self) -> dict[str, Attempt]:
        """Return the tracker's latest attempts without writing anything."""
        if self._file_missing():
            return {}
        conn = await self.conn()
        async with conn.begin():
            return await self.tracker.read_latest(conn)

    async def read_schema(self, schema: AppSchema) -> SchemaState:
        """Return the application's schema revisions in the database (``dm.engine.app_schema``)."""
        if self._file_missing():
            from dm.core.planning import SchemaState

            return SchemaState((), frozenset())
        conn = await self.conn()
        async with conn.begin():
            return await schema.read(conn)

    async def require_schema(self, schema: AppSchema | None, steps: Sequence[Step]) -> None:
        """Refuse ``steps`` while one needs application schema revisions the database
        lacks (``requires_schema``); read nothing when no step declares any.

        :raises SchemaNotReady: naming each such revision; nothing was written.
        """
        if schema is not None and planning.needs_schema(steps):
            planning.require_schema(steps, await self.read_schema(schema))

    async def died(self, latest: Mapping[str, Attempt]) -> set[str]:
        """Return the revisions whose attempt is pending while no run holds the lock."""
        running = {rev for rev, attempt in latest.items() if attempt.state is State.RUNNING}
        if not running:
            return set()
        from dm.engine.lock import current_holder

        await self._resolve_tracker()
        holder = await current_holder(self.settings.lock_url(), self.tracker)
        return running if holder is None else set()

    async def _resolve_tracker(self) -> None:
        """Resolve the tracker's relation on the working connection (PostgreSQL): the
        migration lock's key is the table the work writes to, whatever the lock URL's
        ``search_path``."""
        from dm.config.engines import is_sqlite
        from dm.engine.lock import resolve_relation

        if self.tracker.relation is not None or is_sqlite(self.url):
            return
        conn = await self.conn()
        if conn.in_transaction():  # the caller's transaction (caller_connection): read inside it
            await resolve_relation(conn, self.tracker)
            return
        async with conn.begin():
            await resolve_relation(conn, self.tracker)

    def claim_timeout(self) -> float | None:
        """Return how long claiming the fence may wait for the previous holder's write."""
        return self.settings.lock_timeout

    def migration_lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Return the migration lock of this database (held while the context runs)."""
        from dm.engine.lock import migration_lock

        return migration_lock(
            self.settings.lock_url(),
            self.tracker,
            self.settings.lock_timeout,
            self.application_name,
            connect_retry=self.settings.connect_retry_seconds,
        )

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[tuple[Recorder, list[str]]]:
        """Hold the migration lock and claim the fence; yield the recorder of this run (with
        the fresh latest attempts) and the revisions whose runs were found interrupted.

        While the block runs, every commit of the working connection passes the fence
        (``dm.engine.fence``), whoever asks for it.
        """
        from dm.config.engines import is_sqlite
        from dm.engine.fence import CommitFence
        from dm.engine.recording import Recorder

        if not is_sqlite(self.url):
            await self._resolve_tracker()
            # A waiting run holds no server connection it does not need: in a small
            # session pool, the run holding the lock must be able to open this one.
            await self._close_conn()
        async with self.migration_lock():
            conn = await self.conn()
            if conn.dialect.name == "sqlite":
                from dm.config.engines import SQLITE_IMMEDIATE

                await conn.execution_options(**{SQLITE_IMMEDIATE: True})
            await self.tracker.ensure(conn)
            async with conn.begin():
                await self.tracker.claim(conn, self.run.run_id, self.claim_timeout())
                interrupted = await self.tracker.fail_pending(conn, self.run, INTERRUPTED)
            for revision in interrupted:
                log.warning(
                    "revision %s: an earlier run died while running it; marked failed", revision
                )
            self.announce()  # the database and environment of this write run, at INFO
            async with conn.begin():
                latest = await self.tracker.latest(conn)
            assert conn.sync_connection is not None
            fence = CommitFence(
                conn.sync_connection,
                self.tracker,
                self.run.run_id,
                joined=getattr(self, "joined", False),
            )
            with fence.installed():
                async with self._freeze_watch(conn):
                    yield Recorder(conn, self.tracker, self.run, latest, fence=fence), interrupted

    def _freeze_watch(self, conn: AsyncConnection) -> contextlib.AbstractAsyncContextManager[Any]:
        """Watch the working connection for a frozen network (``dm.config.liveness``): PostgreSQL
        on a connection of dm's own, not through a pooler (its backend is not dm's)."""
        from dm.config.engines import create_engine
        from dm.config.liveness import PROBE_SECONDS
        from dm.config.liveness import watching
        from dm.config.urls import through_pooler

        if conn.dialect.name != "postgresql" or through_pooler(self.url):
            return contextlib.nullcontext()
        probe = functools.partial(
            create_engine,
            self.settings.lock_url(),
            application_name="dm:probe",
            autocommit=True,
            timeout=PROBE_SECONDS,
        )
        return watching(conn, probe)


@contextlib.asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    """Yield a :class:`Database` for the settings; close it afterwards."""
    from dm.engine.alembic_context import environment

    db = Database(settings, tracker_for(settings))
    try:
        with environment(settings, db.tracker):
            yield db
    finally:
        await db.close()


def planned(steps: Sequence[Step]) -> list[PlannedStep]:
    """Return ``steps`` as shown before (or after) they run."""
    return [
        PlannedStep(
            step.revision,
            step.direction,
            step.description,
            step.reversible,
            step.decision.action.value,
            step.decision.reason,
            None if step.runs else recorded_status(step).value,
        )
        for step in steps
    ]


async def run_steps(runner: Runner, steps: Sequence[Step]) -> list[StepResult]:
    """Run ``steps`` in order, recording instead of running what the plan decided.

    A backfill that says ``blocks_deploy = False`` and stops at a batch boundary (its time
    box, ``dm pause``, ``dm cancel``) is deferred: the run goes on with the steps after it.
    A step that declares ``requires_complete`` on a revision not complete, and every step
    after it in the graph, is held back; when any is, the run ends with
    :class:`~dm.core.errors.Incomplete` (exit 5) naming them, after the other steps ran.
    """
    from dm.core.errors import Incomplete
    from dm.engine.attempts import StepResult

    results: list[StepResult] = []
    complete = {rev for rev, attempt in runner.recorder.latest.items() if attempt.counts_as_applied}
    held: dict[str, str] = {}  # revision -> why it waits
    for step in steps:
        waits = planning.waits(step, complete, held)
        if waits is not None:
            held[step.revision] = waits
            log.warning("upgrade %s: not run: %s", step.revision, waits)
            continue
        if not step.runs:
            results.append(await record_unrun(runner.recorder, step))
            continue
        try:
            result = await runner.run_step(step)
        except Incomplete as stop:
            if stop.stopped is None or not step.is_upgrade or step.rev.blocks_deploy:
                raise
            status = Status(stop.stopped)
            results.append(StepResult(step.revision, step.direction, status, 0, step.description))
            continue
        results.append(result)
        if step.is_upgrade and result.status is Status.SUCCESS:
            complete.add(step.revision)
    if held:
        first = next(iter(held))
        lines = "; ".join(f"upgrade {rev} {why}" for rev, why in held.items())
        raise Incomplete(first, f"{lines}; the next run goes on from there")
    return results


async def record_unrun(recorder: Recorder, step: Step) -> StepResult:
    """Record a step that does not run: ``skipped``, or the undo of a skipped upgrade."""
    from dm.engine.attempts import StepResult

    status = recorded_status(step)
    async with recorder.conn.begin():
        await recorder.record_step(step, status, reason=step.decision.reason)
    log.info("%s %s: %s (%s)", step.direction, step.revision, status.value, step.decision.reason)
    return StepResult(step.revision, step.direction, status, 0, step.description)


def recorded_status(step: Step) -> Status:
    """Return the status a step that does not run is recorded with."""
    if step.decision.action is Action.SKIP:
        return Status.SKIPPED
    return Status.SUCCESS if step.is_upgrade else Status.ROLLED_BACK


async def execute_plan(
    settings: Settings,
    label: str,
    plan: Callable[[Mapping[str, Attempt]], list[Step]],
    *,
    dry_run: bool = False,
    schema: AppSchema | None = None,
    graph: Graph | None = None,
) -> RunResult:
    """Plan from the tracker, then take the lock, re-plan and run: the one path that writes.

    The first plan, outside the lock, answers dry runs and "nothing to do" without
    blocking; the plan that runs is made again under the lock, from a fresh read.

    :param label: the target as the user gave it, for the result.
    :param plan: the steps to run, given each revision's latest attempt (a ``dm.core.planning``
        planner: it refuses what may not run).
    :param schema: the application's schema migrations, when revisions declare
        ``requires_schema``: a plan (a dry run too) with a step whose schema revisions the
        database lacks is refused whole, before anything is written.
    :param graph: the graph ``plan`` reads, when it may come from the graph cache: it is
        loaded by import before anything runs.
    """
    async with open_database(settings) as db:
        steps = plan(await db.read_latest())
        await db.require_schema(schema, steps)
        if dry_run or not steps:
            if dry_run:
                db.announce()  # say which database and environment the plan is for
            return RunResult(label, planned(steps), dry_run=dry_run)
        if graph is not None and graph.from_cache:
            graph.ensure_imported()  # the plan made again below runs the imported hooks
        async with db.locked() as (recorder, interrupted):
            db.announce()  # the run starts: say which database and environment it works on
            steps = plan(recorder.latest)
            await db.require_schema(schema, steps)
            if not steps:
                log.info("another run finished this work while dm waited for the lock")
                return RunResult(label, [], interrupted=interrupted)
            results = await run_steps(db.runner(recorder), steps)
            return RunResult(label, planned(steps), results, interrupted)
