"""Verbs that run revisions: upgrade, downgrade, stamp, run, rollback, resume."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dm.core import planning
from dm.core.errors import UsageError
from dm.core.planning import Step
from dm.core.state import Attempt
from dm.core.state import State
from dm.engine.app_schema import AppSchema
from dm.engine.execution import RunResult
from dm.engine.execution import execute_plan
from dm.engine.execution import load_graph
from dm.engine.execution import open_database
from dm.engine.execution import planned
from dm.engine.execution import recorded_status
from dm.verbs.common import one_revision

if TYPE_CHECKING:
    from dm.config.settings import Settings
    from dm.engine.workers import WorkResult

log = logging.getLogger("dm.verbs.run")

WORK_POLL_SECONDS = 1.0
"""How often, at most, ``dm work --wait`` looks again for the loop to join (sooner at first:
``dm.engine.workers.polls``)."""


async def upgrade(settings: Settings, target: str = "heads", *, dry_run: bool = False) -> RunResult:
    """Upgrade to a later revision (default: every head).

    :param target: ``heads``, ``head``, a revision, ``branch@head``, ``+N``...
    :param dry_run: only return the plan.
    """
    graph = load_graph(settings, cached=True)  # imported before anything runs
    schema = AppSchema.for_graph(settings, graph)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_upgrade(graph, target, latest, settings.environment)

    return await execute_plan(settings, target, plan, dry_run=dry_run, schema=schema, graph=graph)


async def downgrade(settings: Settings, target: str, *, dry_run: bool = False) -> RunResult:
    """Revert to an earlier revision, running ``downgrade()`` hooks newest first.

    :param target: a revision, ``base``, ``-N``, ``branch@-N``...
    :param dry_run: only return the plan.
    """
    graph = load_graph(settings)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_downgrade(graph, target, latest, settings.environment)

    return await execute_plan(settings, target, plan, dry_run=dry_run)


async def stamp(
    settings: Settings,
    target: str,
    *,
    dry_run: bool = False,
    ignore_environment: bool = False,
) -> RunResult:
    """Record revisions as applied (or not) up to ``target`` without running them.

    Moving up records ``success`` rows, or ``skipped`` for a revision the environment
    guard excludes (as an upgrade here would); moving down records ``rolled_back`` rows
    and refuses an applied revision the guard excludes. Each row carries the reason
    ``stamped`` (with the guard's verdict, if any); the result's plan says per revision what
    is recorded and why.

    :param dry_run: only return the plan; nothing is written.
    :param ignore_environment: record every revision applied (or not) whatever its
        ``environments``; the override is recorded in each such row's reason.
    """
    from dm.engine.attempts import StepResult

    graph = load_graph(settings)
    environment = settings.environment

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_stamp(
            graph, target, latest, environment, ignore_environment=ignore_environment
        )

    async with open_database(settings) as probe:  # refuse a bad target before creating anything
        steps = plan(await probe.read_latest())
    if dry_run:
        return RunResult(target, planned(steps), dry_run=True)
    async with open_database(settings) as db, db.locked() as (recorder, interrupted):
        steps = plan(recorder.latest)
        results = []
        async with recorder.conn.begin():  # all or nothing
            for step in steps:
                status = recorded_status(step)
                await recorder.record_step(step, status)
                log.info(
                    "stamp %s: recorded %s (%s)", step.revision, status.value, step.decision.reason
                )
                results.append(
                    StepResult(step.revision, step.direction, status, 0, step.description)
                )
        return RunResult(target, planned(steps), results, interrupted)


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
    rev = one_revision(graph, revision)
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
    rev = one_revision(graph, revision)

    def plan(latest: Mapping[str, Attempt]) -> list[Step]:
        return planning.plan_rollback(graph, rev, latest, settings.environment)

    return await execute_plan(settings, rev.id, plan, dry_run=dry_run)


async def resume(settings: Settings, revision: str, *, dry_run: bool = False) -> RunResult:
    """Resume a batched revision that stopped part-way (``paused``, ``incomplete`` or
    ``partial``) from its checkpoint, in the direction it was going; nothing else runs.

    :raises UsageError: it has nothing to resume, or (upgrade) an ancestor is not applied.
    """

    graph = load_graph(settings)
    rev = one_revision(graph, revision)

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


async def work(settings: Settings, revision: str, *, wait: float = 0.0) -> WorkResult:
    """Join the running parallel loop of ``revision`` (``batched(..., workers=N)``) as one
    more worker: claim its key ranges and work them with the revision's own hook until
    none is left. Holds no migration lock; every commit needs the range it is for.

    :param wait: seconds to wait for the loop to start (the run may not have reached it).
    :raises UsageError: the database is SQLite (its loops run as one worker).
    """
    from dm.config.engines import is_sqlite
    from dm.engine.attempts import prepare_connection
    from dm.engine.tracker import RANGES_LAYOUT
    from dm.engine.workers import WorkResult
    from dm.engine.workers import join
    from dm.engine.workers import polls

    if is_sqlite(settings.url()):
        raise UsageError(
            "dm work needs PostgreSQL: on SQLite, which has one writer, a batched loop runs "
            "as one worker"
        )
    graph = load_graph(settings)
    rev = one_revision(graph, revision)

    def step_of(direction: str) -> Step:
        if direction == "downgrade" and rev.downgrade is None:  # pragma: no cover - the run's
            raise UsageError(f"revision {rev.id} has no downgrade()")
        return Step(rev, direction == "upgrade")

    deadline = time.monotonic() + wait
    pauses = polls(WORK_POLL_SECONDS)
    async with open_database(settings) as db:
        conn = await db.conn()
        while True:  # the tracker may not exist yet, or be older than parallel loops
            layout = await db.tracker.layout(conn)
            await conn.rollback()
            if layout is not None and layout >= RANGES_LAYOUT:
                break
            if time.monotonic() >= deadline:
                return WorkResult(rev.id, joined=False)
            await asyncio.sleep(next(pauses))
        await prepare_connection(
            conn,
            lock_timeout=settings.pg_lock_timeout,
            idle_in_transaction_timeout=settings.idle_in_transaction_timeout,
        )
        left = max(deadline - time.monotonic(), 0.0)
        return await join(db.tracker, conn, step_of, rev.id, wait=left, poll=WORK_POLL_SECONDS)
