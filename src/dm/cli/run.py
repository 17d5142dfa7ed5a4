"""``dm upgrade``, ``downgrade``, ``stamp``, ``run``, ``rollback``, ``resume``, ``work``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import click

from dm.cli.app import Invocation
from dm.cli.app import emit_json
from dm.cli.app import json_option
from dm.cli.app import main
from dm.cli.app import pass_invocation
from dm.cli.app import run_coroutine
from dm.cli.app import write_line
from dm.cli.render import render_run


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--lock-timeout",
        type=click.FloatRange(min=0),
        help="Seconds to wait for another dm run.  [default: 600; env DM_LOCK_TIMEOUT]",
    )(fn)
    fn = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        help="Per-revision time limit in seconds (a revision's own `timeout` wins).",
    )(fn)
    fn = click.option(
        "--max-runtime",
        type=click.FloatRange(min=0, min_open=True),
        help="Seconds the run may work: a batched revision then stops at a batch boundary "
        "(exit 5; the next run resumes it), and no further revision starts.  "
        "[env DM_MAX_RUNTIME]",
    )(fn)
    fn = click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")(fn)
    return json_option(fn)


# Relative targets such as -1 look like options; let them through as arguments.
_TARGET_COMMAND = {"context_settings": {"ignore_unknown_options": True}}


def _check_target(target: str) -> None:
    """Refuse an option that was let through as the target (``--sql``, a typo...)."""
    from dm.core.errors import UsageError

    if target == "--sql":
        raise UsageError(
            "offline SQL (--sql) is not supported: revisions are Python code run against "
            "the database; --dry-run shows the plan"
        )
    if target.startswith("--"):
        raise UsageError(f"no such option: {target}")


@main.command(**_TARGET_COMMAND)
@click.argument("target", default="heads")
@_run_options
@pass_invocation
def upgrade(
    invocation: Invocation,
    target: str,
    lock_timeout: float | None,
    timeout: float | None,
    max_runtime: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run upgrade() (and verify()) of every revision up to TARGET  [default: heads]."""
    _check_target(target)
    from dm import verbs

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = run_coroutine(verbs.upgrade(settings, target, dry_run=dry_run))
    render_run(result, "upgrade", as_json)


@main.command(**_TARGET_COMMAND)
@click.argument("target")
@_run_options
@pass_invocation
def downgrade(
    invocation: Invocation,
    target: str,
    lock_timeout: float | None,
    timeout: float | None,
    max_runtime: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run downgrade() of every applied revision above TARGET, newest first."""
    _check_target(target)
    from dm import verbs

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = run_coroutine(verbs.downgrade(settings, target, dry_run=dry_run))
    render_run(result, "downgrade", as_json)


@main.command(**_TARGET_COMMAND)
@click.argument("target")
@click.option("--lock-timeout", type=click.FloatRange(min=0), help="Seconds to wait for the lock.")
@click.option(
    "--ignore-environment",
    is_flag=True,
    help="Record revisions whose `environments` exclude this one as applied too (recorded).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be recorded and write nothing.")
@json_option
@pass_invocation
def stamp(
    invocation: Invocation,
    target: str,
    lock_timeout: float | None,
    ignore_environment: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Record revisions up to TARGET as applied (or down to it as not applied) without
    running them; says per revision what it records and why."""
    _check_target(target)
    from dm import verbs

    result = run_coroutine(
        verbs.stamp(
            invocation.settings(lock_timeout=lock_timeout),
            target,
            dry_run=dry_run,
            ignore_environment=ignore_environment,
        )
    )
    if as_json:
        render_run(result, "stamp", as_json)
        return
    if not result.planned:
        write_line(f"nothing to stamp: already at {result.target}")
        return
    verb = "would record" if result.dry_run else "recorded"
    for step in result.planned:
        write_line(f"stamp {step.revision}: {verb} {step.records} ({step.reason})")
    counts = Counter(step.records for step in result.planned)
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    done = "nothing written (dry run)" if result.dry_run else "done"
    write_line(f"stamp: {summary}; {done}, target {result.target}")


@main.command("run", **_TARGET_COMMAND)
@click.argument("rev")
@click.option("--force", is_flag=True, help="Run it again although it succeeded (a new attempt).")
@click.option("--reason", help="Why it is forced (recorded with the attempt).")
@click.option(
    "--ignore-environment",
    is_flag=True,
    help="Run it although its `environments` exclude this one (recorded with the attempt).",
)
@_run_options
@pass_invocation
def run_revision(
    invocation: Invocation,
    rev: str,
    force: bool,
    reason: str | None,
    ignore_environment: bool,
    lock_timeout: float | None,
    timeout: float | None,
    max_runtime: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run one revision's upgrade() and verify(); its ancestors must be applied."""
    _check_target(rev)
    from dm import verbs

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = run_coroutine(
        verbs.run(
            settings,
            rev,
            force=force,
            reason=reason,
            dry_run=dry_run,
            ignore_environment=ignore_environment,
        )
    )
    if result.nothing_to_do and not as_json:
        write_line(f"nothing to run: {result.target} already succeeded (--force runs it again)")
        return
    render_run(result, "run", as_json)


@main.command("rollback", **_TARGET_COMMAND)
@click.argument("rev")
@_run_options
@pass_invocation
def rollback_revision(
    invocation: Invocation,
    rev: str,
    lock_timeout: float | None,
    timeout: float | None,
    max_runtime: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run one revision's downgrade(); no applied revision may depend on it."""
    _check_target(rev)
    from dm import verbs

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = run_coroutine(verbs.rollback(settings, rev, dry_run=dry_run))
    if result.nothing_to_do and not as_json:
        write_line(f"nothing to roll back: {result.target} is not applied")
        return
    render_run(result, "rollback", as_json)


@main.command("resume", **_TARGET_COMMAND)
@click.argument("rev")
@_run_options
@pass_invocation
def resume_revision(
    invocation: Invocation,
    rev: str,
    lock_timeout: float | None,
    timeout: float | None,
    max_runtime: float | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Resume a batched revision stopped part-way (paused, incomplete, partial) from its
    checkpoint; nothing else runs."""
    _check_target(rev)
    from dm import verbs

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = run_coroutine(verbs.resume(settings, rev, dry_run=dry_run))
    render_run(result, "resume", as_json)


@main.command("work")
@click.argument("rev")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds to wait for the run to start the loop before concluding none is running.",
)
@json_option
@pass_invocation
def work(invocation: Invocation, rev: str, wait: float, as_json: bool) -> None:
    """Join the running parallel loop of REV (dm.batched(..., workers=N)) as one more
    worker, on PostgreSQL.

    It works key ranges until every range of the loop is finished (taking over those of
    workers that died), then exits 0; it exits 0 too when no such loop is running. A
    pause, cancel or time box of the run ends it after its batch (exit 5).

    Takes no migration lock: start several, in other pods too. A worker that is killed
    loses its range when its lease expires; its committed batches stay.
    """
    from dm import verbs
    from dm.core.errors import Incomplete

    result = run_coroutine(verbs.work(invocation.settings(), rev, wait=wait))
    if result.stopped is not None:
        raise Incomplete(result.revision, f"{result.direction} {result.revision}: {result.stopped}")
    if as_json:
        emit_json(
            {
                "revision": result.revision,
                "joined": result.joined,
                "direction": result.direction,
            }
        )
    elif result.joined:
        write_line(f"{result.direction} {result.revision}: no key range left for this worker")
    else:
        write_line(f"{result.revision}: no parallel loop running; nothing to join")
