"""Let Alembic's commands (``alembic -n <section> upgrade``, ``alembic.command.upgrade(cfg, ...)``,
pytest-alembic) run through dm.

``env.py`` calls :func:`run`. Alembic's contract holds:

- **The caller's database.** A connection or engine in ``config.attributes["connection"]``
  is where dm runs (``dm.alembic.caller_connection``: inside the caller's transaction when
  one is open);
  otherwise the URL comes from the caller's ``Config`` object (a ``sqlalchemy.url`` set on it
  in code wins over ``DM_DATABASE_URL``/``DATABASE_URL``), then dm's usual settings. One
  info line names the database (password hidden) and where it came from.
- **Any event loop.** Called inside ``AsyncConnection.run_sync`` (Alembic's asyncio
  recipe), dm runs on the caller's loop; called from a thread whose loop is running, on a
  worker thread with its own loop; otherwise in a new loop, with dm's signal handling.
- **dm's plan.** ``upgrade`` and ``downgrade`` are planned by ``dm.core.planning`` exactly as
  ``dm upgrade``/``dm downgrade`` plan them (skipped revisions now allowed run, an undo of a
  skipped revision is recorded); other commands (``current``) get the tracker's heads.
  Alembic's ``stamp`` and offline ``--sql`` mode are refused: revision hooks are Python
  coroutines, and ``dm stamp`` records stamps properly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any

from alembic.runtime.migration import MigrationContext
from alembic.runtime.migration import RevisionStep
from alembic.util import CommandError

from dm.config.settings import Settings
from dm.core import alembic_compat as compat
from dm.core import planning
from dm.core.environments import check_declared
from dm.core.errors import DmError
from dm.core.graph import Graph
from dm.core.planning import Step
from dm.engine.signals import run_until_signal

if TYPE_CHECKING:
    from alembic.runtime.environment import EnvironmentContext

    from dm.core.state import Attempt
    from dm.engine.execution import Database

log = logging.getLogger("dm.alembic_env")


def run(context: EnvironmentContext) -> None:
    """Execute the invoked Alembic command with dm's planner and runner."""
    from dm.alembic import caller_connection
    from dm.config import log as dm_log
    from dm.config.redaction import scrub

    if context.is_offline_mode():
        raise CommandError(
            "dm revisions are Python coroutines; offline --sql mode is not supported"
        )
    config = context.config
    dm_log.configure()  # redacted: settings register their secrets when they load
    given = config.attributes.get("connection")
    if given is not None and not caller_connection.is_shareable(given):
        raise CommandError(
            f"{caller_connection.SOURCE} holds a {type(given).__name__}; dm runs on a SQLAlchemy "
            "Connection, Engine, AsyncConnection or AsyncEngine"
        )
    try:
        settings = Settings.from_alembic_config(config)
        graph = Graph.from_config(config)
        check_declared(graph.revisions, settings.declared_environments)

        def work(own_loop: bool) -> Coroutine[Any, Any, None]:
            return _run(context, graph, _opener(settings, given, own_loop))

        _drive(
            work,
            callers_loop_only=given is not None and caller_connection.needs_callers_loop(given),
            this_thread_only=given is not None and caller_connection.is_thread_bound(given),
        )
    except DmError as exc:
        raise CommandError(scrub(str(exc))) from exc


def _drive(
    work: Callable[[bool], Coroutine[Any, Any, None]],
    *,
    callers_loop_only: bool,
    this_thread_only: bool,
) -> None:
    """Run ``work`` where it can run: on the caller's loop from inside its greenlet
    (``run_sync``), else on a worker thread when this thread's loop is running, else in a
    new loop with dm's signal handling.

    :param callers_loop_only: the caller's connection belongs to the caller's loop.
    :param this_thread_only: the caller's database exists only in this thread.
    """
    from sqlalchemy.util import await_only
    from sqlalchemy.util.concurrency import in_greenlet

    if in_greenlet():
        await_only(work(False))
        return
    if callers_loop_only:
        from dm.alembic import caller_connection

        raise CommandError(
            f"the async connection in {caller_connection.SOURCE} can be used only on its own event "
            "loop: call Alembic's command inside it, e.g. "
            "await conn.run_sync(lambda sync_conn: ...) with "
            "cfg.attributes['connection'] = sync_conn"
        )
    if not _loop_running():
        run_until_signal(work(True))
        return
    if this_thread_only:
        from dm.alembic import caller_connection

        raise CommandError(
            f"the in-memory SQLite database in {caller_connection.SOURCE} exists only in the "
            "thread that opened it, whose event loop is running: call Alembic's command outside "
            "the running loop, or use a SQLite file"
        )
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dm") as pool:
        pool.submit(asyncio.run, work(True)).result()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _opener(
    settings: Settings, given: object, own_loop: bool
) -> Callable[[], contextlib.AbstractAsyncContextManager[Database]]:
    """Return how to open the database: the caller's connection, else dm's own."""

    @contextlib.asynccontextmanager
    async def open_database() -> AsyncIterator[Database]:
        from dm.alembic import caller_connection
        from dm.config.urls import redact
        from dm.engine import execution

        if given is None:
            async with execution.open_database(settings) as db:
                log.info("database %s (from %s)", redact(db.url), settings.url_source)
                yield db
            return
        async with caller_connection.open_shared(settings, given, own_loop=own_loop) as shared_db:
            inside = ", inside its transaction" if shared_db.joined else ""
            log.info(
                "database %s (the connection in %s%s)",
                redact(shared_db.url),
                caller_connection.SOURCE,
                inside,
            )
            yield shared_db

    return open_database


async def _run(
    context: EnvironmentContext,
    graph: Graph,
    open_database: Callable[[], contextlib.AbstractAsyncContextManager[Database]],
) -> None:
    from dm.engine import execution
    from dm.engine.app_schema import AppSchema

    async with open_database() as db:
        schema = AppSchema.for_graph(db.settings, graph)
        steps = await _plan(context, graph, db, await db.read_latest())
        await db.require_schema(schema, steps)
        if not steps:
            return
        async with db.locked() as (recorder, _interrupted):
            steps = await _plan(context, graph, db, recorder.latest)
            await db.require_schema(schema, steps)
            if not steps:
                log.info("another run finished this work while dm waited for the lock")
                return
            await execution.run_steps(db.runner(recorder), steps)


async def _plan(
    context: EnvironmentContext, graph: Graph, db: Database, latest: Mapping[str, Attempt]
) -> list[Step]:
    """Plan the invoked command: ``upgrade``/``downgrade`` with dm's planner; any other
    command (``current``) runs Alembic's own function on the tracker's heads."""
    environment = db.settings.environment
    conn = await db.conn()

    def configure(sync_conn: Any) -> MigrationContext:
        context.configure(connection=sync_conn)
        return context.get_context()

    migration_context = await conn.run_sync(configure)
    verb, target = compat.invoked_plan(migration_context)
    try:
        if verb == "upgrade":
            return planning.plan_upgrade(graph, target or "heads", latest, environment)
        if verb == "downgrade":
            return planning.plan_downgrade(graph, target or "base", latest, environment)
    except DmError as exc:
        from dm.config.redaction import scrub

        raise CommandError(scrub(str(exc))) from None
    heads = graph.applied_heads(planning.applied_revisions(latest))

    def plan(sync_conn: Any) -> list[Any]:
        migration_context = configure(sync_conn)
        migration_context.get_current_heads = lambda: heads  # type: ignore[method-assign]
        return list(compat.migrations_fn(migration_context)(heads, migration_context))

    async with conn.begin():
        alembic_steps = await conn.run_sync(plan)
    steps = []
    for step in alembic_steps:
        if not isinstance(step, RevisionStep):
            raise CommandError("use 'dm stamp' to stamp revisions in dm's tracker")
        steps.append(Step(graph.revision(step.revision.revision), step.is_upgrade))
    return planning.with_decisions(steps, environment, latest)
