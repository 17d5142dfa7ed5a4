"""Let ``alembic -n <section> upgrade|downgrade|current`` run through dm.

``env.py`` calls :func:`run`. The plan comes from whatever Alembic command was invoked; it
is executed by dm's runner under dm's lock and recorded in dm's tracker, exactly as the
``dm`` command would. Alembic's ``stamp`` and offline ``--sql`` mode are refused: revision
hooks are Python coroutines, and ``dm stamp`` records stamps properly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from typing import Any

from alembic.runtime.migration import RevisionStep
from alembic.util import CommandError

from . import _alembic_compat as compat
from . import planning
from .errors import DmError
from .graph import Graph
from .planning import Step
from .settings import Settings
from .signals import run_until_signal

if TYPE_CHECKING:
    from alembic.runtime.environment import EnvironmentContext

log = logging.getLogger("dm.alembic_env")


def run(context: EnvironmentContext) -> None:
    """Execute the invoked Alembic command's plan with dm's runner."""
    from . import log as dm_log

    if context.is_offline_mode():
        raise CommandError(
            "dm revisions are Python coroutines; offline --sql mode is not supported"
        )
    config = context.config
    dm_log.configure()
    try:
        settings = Settings.load(
            config_file=config.config_file_name, ini_section=config.config_ini_section
        )
        run_until_signal(_run(context, settings))
    except DmError as exc:
        raise CommandError(str(exc)) from exc


async def _run(context: EnvironmentContext, settings: Settings) -> None:
    from . import runtime

    graph = Graph.from_config(settings.alembic_config())
    async with runtime.open_database(settings) as db:
        steps = await _plan(context, graph, db, await db.read_latest())
        if not steps:
            return
        async with db.locked() as (recorder, _interrupted):
            steps = await _plan(context, graph, db, recorder.latest)
            await runtime.run_steps(db.runner(recorder), steps)


async def _plan(context: EnvironmentContext, graph: Graph, db: Any, latest: Any) -> list[Step]:
    """Ask the invoked Alembic command for its steps, given the tracker's heads; the
    environment guard decides each as in ``dm upgrade``."""
    environment = db.settings.environment
    heads = graph.applied_heads(planning.applied_revisions(latest))
    conn = await db.conn()

    def plan(sync_conn: Any) -> list[Any]:
        context.configure(connection=sync_conn)
        migration_context = context.get_context()
        migration_context.get_current_heads = lambda: heads  # type: ignore[method-assign]
        return list(compat.migrations_fn(migration_context)(heads, migration_context))

    try:
        async with conn.begin():
            alembic_steps = await conn.run_sync(plan)
    except AttributeError:
        # Alembic binds each step's hook while planning, so a revision without
        # downgrade() fails there; dm's own plan of the same target names it.
        target = context.get_revision_argument()
        try:
            planning.plan_downgrade(graph, str(target or "base"), latest, environment)
        except DmError as exc:
            raise CommandError(str(exc)) from None
        raise
    steps = []
    for step in alembic_steps:
        if not isinstance(step, RevisionStep):
            raise CommandError("use 'dm stamp' to stamp revisions in dm's tracker")
        steps.append(Step(graph.revision(step.revision.revision), step.is_upgrade))
    return planning.with_decisions(steps, environment, latest)
