"""dm's built-in tests of a project's data migrations, collected by ``pytest --dm``.

Each test is a plain function taking the plugin's fixtures (``dm.testing.plugin``), so a
project may also import one into its own test module. Each runs on fresh databases, walks
the revisions with dm's own commands (lock and tracker included), and fails the way dm
reports a failure: the revision, the step, the database, what went wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import NoReturn

import pytest

from dm.core.errors import DmError
from dm.core.errors import IrreversiblePlan
from dm.core.errors import RevisionFailed
from dm.core.errors import one_line
from dm.testing import BatchLog
from dm.testing import Databases
from dm.testing import DmRunner
from dm.testing import ProjectConfig
from dm.testing import describe
from dm.testing import differences
from dm.testing import import_offline_in_subprocess
from dm.testing import with_ini

if TYPE_CHECKING:
    from dm.backfill.batching import Probe
    from dm.core.graph import Graph
    from dm.testing import DmTestConfig
    from dm.testing import Seed

BUILTINS = (
    "test_single_head",
    "test_revisions_import_offline",
    "test_upgrade_from_base",
    "test_up_down_up",
    "test_idempotent_revisions",
    "test_batched_revisions_resume",
    "test_environment_guards",
)


def test_single_head(dm_runner: DmRunner) -> None:
    """The revision graph has one head.

    Two revisions written off the same parent in two branches of the code make two heads:
    ``dm upgrade head`` then refuses to run, and the order of the two revisions is left to
    chance. Merge them (``dm merge heads``) so that the order is decided and reviewed.
    """
    graph = dm_runner.graph()
    if len(graph.heads) > 1:
        heads = ", ".join(
            f"{head} ({graph.revision(head).description or 'no description'})"
            for head in graph.heads
        )
        _fail(
            f"the revision graph has {len(graph.heads)} heads: {heads}\n"
            "  merge them with 'dm merge heads' so that their order is decided"
        )


def test_revisions_import_offline(dm_config: ProjectConfig, dm_database_url: str) -> None:
    """Every revision file imports without touching a database or the network.

    dm imports every revision file each time it loads the graph: for ``dm status``, for
    ``dm check`` in a readiness probe, in every pod. A file that connects at import slows
    or breaks all of them, and connects to whatever database its environment names. The
    files are imported in a fresh interpreter with connections refused (sockets, DNS,
    SQLite files), while ``DATABASE_URL`` names the test's database.
    """
    found = import_offline_in_subprocess(dm_config, dm_database_url)
    if found:
        _fail("a revision file touched the database or network at import:\n" + "\n".join(found))


def test_upgrade_from_base(
    dm_runner: DmRunner, dm_test_config: DmTestConfig, pytestconfig: pytest.Config
) -> None:
    """Every revision upgrades from an empty database, one at a time, and its verify() passes.

    This is what a new environment (a developer's machine, a fresh staging database) runs.
    Each revision runs alone, after the seeds given for it, so a failure names the first
    revision that breaks.
    """
    dm_test_config = with_ini(dm_test_config, pytestconfig)
    graph = dm_runner.graph()
    _upgrade_each(dm_runner, graph, dm_test_config, step="upgrade from base")
    for row in dm_runner.status_sync():
        if row.state not in ("applied", "skipped"):
            _fail(
                describe(
                    graph.revision(row.revision) if graph.known(row.revision) else None,
                    "upgrade from base",
                    dm_runner.redacted_url,
                    f"its state is {row.state} after 'dm upgrade heads'",
                )
            )


def test_up_down_up(
    dm_runner: DmRunner, dm_test_config: DmTestConfig, pytestconfig: pytest.Config
) -> None:
    """Each reversible revision goes down and up again: downgrade() undoes what upgrade()
    did well enough for upgrade() and verify() to pass once more.

    A downgrade is what an operator reaches for during an incident; it must work then,
    not be tried for the first time. The walk goes down one revision at a time, newest
    first, to ``minimum_downgrade_revision`` (or the first revision named in
    ``skip_revisions``), then up again. A revision without downgrade() ends the walk: the
    revisions below it are reported as not tested (a skip), unless it is the floor.
    """
    dm_test_config = with_ini(dm_test_config, pytestconfig)
    graph = dm_runner.graph()
    url = dm_runner.redacted_url
    _upgrade_each(dm_runner, graph, dm_test_config, step="upgrade (round trip: up)")
    floor = dm_test_config.minimum_downgrade_revision
    stays = set() if floor is None else set(_path_to(graph, floor))
    skip = _resolve_all(graph, dm_test_config.skip_revisions)
    order = [script.revision for script in reversed(graph.walk()) if script.revision not in stays]
    went_down: list[str] = []
    ended: str | None = None
    failure = None
    for rev in order:
        if rev in skip:
            break
        try:
            dm_runner.rollback_sync(rev)
        except IrreversiblePlan:
            ended = rev
            break
        except RevisionFailed as exc:
            failure = describe(graph.revision(rev), "downgrade (round trip: down)", url, _why(exc))
            break
        except DmError as exc:
            failure = describe(graph.revision(rev), "dm rollback (round trip)", url, one_line(exc))
            break
        went_down.append(rev)
    if failure is not None:
        _fail(failure)
    for rev in reversed(went_down):
        _upgrade(dm_runner, graph, rev, "upgrade again after its downgrade (round trip: up)")
    if ended is not None:
        below = order[order.index(ended) + 1 :]
        if below:
            pytest.skip(
                f"round trip ended at {ended} ({graph.revision(ended).description}): it has "
                "no downgrade(); "
                f"not round-tripped: {', '.join(below)} (make {ended} the floor with "
                f"dm_minimum_downgrade_revision = {ended} to keep the rest of the walk)"
            )


def test_idempotent_revisions(
    dm_config: ProjectConfig,
    dm_databases: Databases,
    dm_test_config: DmTestConfig,
    pytestconfig: pytest.Config,
) -> None:
    """A revision marked ``idempotent = True`` leaves the same data when it runs twice.

    An operator re-runs such a revision by hand (``dm run REV --force``) when data drifted,
    trusting the mark; a second run that duplicates or overwrites rows breaks that trust.
    Each marked revision is upgraded on a fresh database, then run again: every table
    (the tracker's excepted) must hold the same rows.
    """
    dm_test_config = with_ini(dm_test_config, pytestconfig)
    graph = DmRunner(dm_config, dm_databases.create()).graph()
    skip = _resolve_all(graph, dm_test_config.skip_revisions)
    marked = [rev for rev in graph.revisions if rev.idempotent and rev.id not in skip]
    if not marked:
        pytest.skip("no revision is marked idempotent = True")
    failures = []
    for rev in marked:
        runner = DmRunner(dm_config, dm_databases.create())
        _upgrade_each(runner, graph, dm_test_config, until=rev.id, step="upgrade")
        before = runner.snapshot_sync()
        try:
            runner.run_sync(rev.id, force=True)
        except RevisionFailed as exc:
            failures.append(
                describe(rev, "run again (idempotent = True)", runner.redacted_url, _why(exc))
            )
            continue
        changed = differences(before, runner.snapshot_sync())
        if changed:
            failures.append(
                describe(
                    rev,
                    "run again (idempotent = True)",
                    runner.redacted_url,
                    "the second run changed the data:\n" + "\n".join(changed),
                )
            )
    if failures:
        _fail("\n\n".join(failures))


def test_batched_revisions_resume(
    dm_config: ProjectConfig,
    dm_databases: Databases,
    dm_test_config: DmTestConfig,
    pytestconfig: pytest.Config,
) -> None:
    """A ``transactional = False`` revision interrupted after its first batch resumes and
    ends as if it had never been interrupted.

    Such a revision exists to survive a killed pod: the next run must resume after the
    last committed batch, neither redoing committed batches (duplicated or doubled data)
    nor skipping rows. The test interrupts the upgrade right after its first committed
    batch (with ``batch_size`` rows per batch, default 1, so a few seeded rows make several
    batches), runs it again, and checks that verify() passes, that the loops processed each
    row once across both attempts (as many as one uninterrupted run does) and that every
    table holds what an uninterrupted run leaves.
    """
    dm_test_config = with_ini(dm_test_config, pytestconfig)
    graph = DmRunner(dm_config, dm_databases.create()).graph()
    skip = _resolve_all(graph, dm_test_config.skip_revisions)
    batched = [rev for rev in graph.revisions if not rev.transactional and rev.id not in skip]
    if not batched:
        pytest.skip("no revision is transactional = False")
    size = dm_test_config.batch_size
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    report = None if reporter is None else (lambda line: reporter.write_line(f"\ndm: {line}"))
    failures: list[str] = []
    notes: list[str] = []
    for rev in batched:
        step = "upgrade interrupted after its first batch, then resumed"
        reference = DmRunner(dm_config, dm_databases.create())
        _upgrade_before(reference, graph, dm_test_config, rev.id)
        whole = BatchLog(rev.id, report=report)
        _upgrade(reference, graph, rev.id, "upgrade (uninterrupted)", whole.probe(size))
        if whole.batches == 0:
            if _state(reference, rev.id) == "skipped":
                notes.append(f"{rev.id}: skipped by its environment guard here")
                continue
            failures.append(
                describe(
                    rev,
                    step,
                    reference.redacted_url,
                    "its upgrade committed no dm.batched checkpoint, so a run interrupted "
                    "part-way starts over; loop with dm.batched (or list the revision in "
                    "dm_skip_revisions)",
                )
            )
            continue
        if not sum(whole.rows.values()):
            notes.append(f"{rev.id}: its loops found no rows (seed some before it)")
            continue
        expected = reference.snapshot_sync()
        runner = DmRunner(dm_config, dm_databases.create())
        url = runner.redacted_url
        _upgrade_before(runner, graph, dm_test_config, rev.id)
        first = BatchLog(rev.id, interrupt=True, report=report)
        try:
            runner.upgrade_sync(rev.id, probe=first.probe(size))
        except RevisionFailed as exc:
            if not first.interrupted:
                failures.append(describe(rev, "upgrade (before the interruption)", url, _why(exc)))
                continue
        if not first.interrupted:
            failures.append(describe(rev, step, url, "no batch was committed: not interrupted"))
            continue
        resumed = BatchLog(rev.id, report=report)
        try:
            runner.upgrade_sync(rev.id, probe=resumed.probe(size))
        except RevisionFailed as exc:
            failures.append(describe(rev, step, url, f"the resumed run failed: {_why(exc)}"))
            continue
        problems = _recount(whole, first, resumed)
        changed = differences(expected, runner.snapshot_sync())
        if changed:
            problems.append("the data differs from an uninterrupted run's:")
            problems.extend(f"  {line}" for line in changed)
        if problems:
            problems.append(_attempts(runner, rev.id))
            failures.append(describe(rev, step, url, "\n".join(problems)))
    if failures:
        _fail("\n\n".join(failures))
    if notes and len(notes) == len(batched):
        pytest.skip("; ".join(notes))


def test_environment_guards(
    dm_config: ProjectConfig,
    dm_databases: Databases,
    dm_test_config: DmTestConfig,
    pytestconfig: pytest.Config,
) -> None:
    """In every environment the project names, the dry-run plan runs exactly the revisions
    whose ``environments`` allow it, and a real upgrade of that plan passes.

    A guard is the only thing between ``delete test users`` and production. Upgrading in
    the default environment alone would never run the guarded revisions at all: each
    environment named by a revision (plus dm's default and ``dm_environments``) gets a
    fresh database, a dry run whose plan is checked against the guards, then the upgrade.
    """
    from dm.core.environments import allows

    dm_test_config = with_ini(dm_test_config, pytestconfig)
    graph = DmRunner(dm_config, dm_databases.create()).graph()
    guarded = [rev for rev in graph.revisions if rev.environments]
    if not guarded and not dm_test_config.environments:
        pytest.skip("no revision declares environments")
    default = DmRunner(dm_config, dm_databases.create()).settings().environment
    names = {default, *dm_test_config.environments}
    names.update(name for rev in guarded for name in rev.environments or ())
    failures = []
    for environment in sorted(names):
        runner = DmRunner(dm_config, dm_databases.create(), environment=environment)
        plan = runner.upgrade_sync("heads", dry_run=True).planned
        print(  # shown with -s or -rP: the plan per environment
            f"dm: environment {environment!r}: "
            + ", ".join(f"{step.revision} {step.action}" for step in plan)
        )
        for step in plan:
            rev = graph.revision(step.revision)
            allowed = rev.environments is None or allows(rev.environments, environment)
            if step.action != ("run" if allowed else "skip"):
                failures.append(
                    describe(
                        rev,
                        f"dry-run plan in environment {environment!r}",
                        runner.redacted_url,
                        f"planned to {step.action}, but its environments are {rev.environments!r}",
                    )
                )
        _upgrade_each(runner, graph, dm_test_config, step=f"upgrade in environment {environment!r}")
    if failures:
        _fail("\n\n".join(failures))


# -- helpers ---------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    pytest.fail(message, pytrace=False)


def _why(exc: RevisionFailed) -> str:
    return str(exc).split(" failed: ", 1)[-1]


def _seeds(graph: Graph, config: DmTestConfig) -> Mapping[str, Seed]:
    seeds = {}
    for name, seed in config.seeds.items():
        found = graph.resolve(name)
        if len(found) != 1:
            _fail(f"dm_test_config seeds: {name!r} does not name one revision")
        seeds[found[0].revision] = seed
    return seeds


def _resolve_all(graph: Graph, names: tuple[str, ...]) -> set[str]:
    resolved = set()
    for name in names:
        found = graph.resolve(name)
        if len(found) != 1:
            _fail(f"dm_skip_revisions: {name!r} does not name one revision")
        resolved.add(found[0].revision)
    return resolved


def _path_to(graph: Graph, target: str) -> list[str]:
    """Return ``target`` and its ancestors, oldest first."""
    try:
        return [rev.id for rev in graph.upgrade_path(target, ())]
    except DmError as exc:
        message = f"dm_minimum_downgrade_revision: {one_line(exc)}"
    _fail(message)


def _upgrade_each(
    runner: DmRunner,
    graph: Graph,
    config: DmTestConfig,
    *,
    step: str,
    until: str | None = None,
    before: bool = False,
) -> None:
    """Upgrade one revision at a time, parents first, seeding right before seeded ones.

    :param until: only this revision and its ancestors.
    :param before: stop right before ``until`` runs, its own seed applied.
    """
    seeds = _seeds(graph, config)
    order = [s.revision for s in graph.walk()] if until is None else _path_to(graph, until)
    for rev in order:
        if rev in seeds:
            _seed(runner, graph, rev, seeds[rev])
        if before and rev == until:
            return
        _upgrade(runner, graph, rev, step)


def _upgrade_before(runner: DmRunner, graph: Graph, config: DmTestConfig, rev: str) -> None:
    """Upgrade to the parents of ``rev`` (seeded as usual), then apply ``rev``'s own seed."""
    _upgrade_each(runner, graph, config, step="upgrade", until=rev, before=True)


def _seed(runner: DmRunner, graph: Graph, rev: str, seed: Seed) -> None:
    try:
        runner.seed_sync(seed, before=rev)
        return
    except RevisionFailed as exc:
        message = describe(graph.revision(exc.revision), "upgrade", runner.redacted_url, _why(exc))
    except Exception as exc:
        message = describe(
            graph.revision(rev),
            "seed (dm_test_config)",
            runner.redacted_url,
            f"{type(exc).__name__}: {one_line(exc)}",
        )
    _fail(message)  # outside the except block: no chained exceptions in the report


def _upgrade(
    runner: DmRunner, graph: Graph, target: str, step: str, probe: Probe | None = None
) -> None:
    try:
        runner.upgrade_sync(target, probe=probe)
        return
    except RevisionFailed as exc:
        rev = graph.revision(exc.revision) if graph.known(exc.revision) else None
        message = describe(rev, step, runner.redacted_url, _why(exc))
    except DmError as exc:
        message = describe(graph.revision(target), step, runner.redacted_url, one_line(exc))
    _fail(message)  # outside the except block: no chained exceptions in the report


def _state(runner: DmRunner, rev: str) -> str | None:
    return next((row.state for row in runner.status_sync() if row.revision == rev), None)


def _recount(whole: BatchLog, first: BatchLog, resumed: BatchLog) -> list[str]:
    """Compare, loop by loop, the rows both attempts processed with one whole run's."""
    problems = []
    for loop in sorted(set(whole.rows) | set(first.rows) | set(resumed.rows)):
        done = first.rows[loop] + resumed.rows[loop]
        if done == whole.rows[loop]:
            continue
        what = "committed batches were redone" if done > whole.rows[loop] else "rows were skipped"
        problems.append(
            f"loop {loop + 1}: {first.rows[loop]} row(s) committed before the interruption + "
            f"{resumed.rows[loop]} after resuming = {done}, but an uninterrupted run "
            f"processes {whole.rows[loop]}: {what}"
        )
    return problems


def _attempts(runner: DmRunner, rev: str) -> str:
    """Return the revision's attempts as the tracker records them, on one line each."""
    lines = ["tracker:"]
    for attempt in runner.attempts_sync(rev):
        checkpoint = attempt.checkpoint or {}
        rows = checkpoint.get("rows_done")
        done = f", checkpoint rows_done={rows}" if rows is not None else ""
        error = f": {attempt.error_message}" if attempt.error_message else ""
        lines.append(f"  attempt {attempt.attempt} {attempt.status}{done}{error}")
    return "\n".join(lines)
