"""``dm pause``, ``cancel``, ``resolve``."""

from __future__ import annotations

import click

from dm.cli.app import Invocation
from dm.cli.app import emit_json
from dm.cli.app import json_option
from dm.cli.app import main
from dm.cli.app import pass_invocation
from dm.cli.app import run_coroutine
from dm.cli.app import write_line
from dm.cli.render import render_control


@main.command()
@click.argument("rev")
@click.option("--reason", help="Why it is paused (recorded, shown by dm status).")
@json_option
@pass_invocation
def pause(invocation: Invocation, rev: str, reason: str | None, as_json: bool) -> None:
    """Stop a running batched revision at its next batch boundary, checkpoint kept.

    Works from any host (it writes a request to the tracker; no lock). The run exits 5 and
    records the attempt paused; dm resume REV or the next dm upgrade resumes it.
    """
    from dm import verbs

    result = run_coroutine(verbs.pause(invocation.settings(), rev, reason=reason))
    render_control(result, as_json)


@main.command()
@click.argument("rev")
@click.option("--reason", help="Why it is cancelled (recorded, shown by dm status).")
@click.option(
    "--skip", is_flag=True, help="Do not run it again: plans pass it (default: start over)."
)
@click.option("--lock-timeout", type=click.FloatRange(min=0), help="Seconds to wait for the lock.")
@click.option(
    "--stuck-after",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="For a running one: wait this long for its run to stop; if it commits no batch "
    "meanwhile, end its attempt without it (its run is fenced out).",
)
@json_option
@pass_invocation
def cancel(
    invocation: Invocation,
    rev: str,
    reason: str | None,
    skip: bool,
    lock_timeout: float | None,
    stuck_after: float | None,
    as_json: bool,
) -> None:
    """Stop a batched revision and settle it: the next run starts it over (or, --skip,
    does not run it again). Committed batches stay.

    A running one stops at its next batch boundary (a request, no lock); one that stopped
    earlier (incomplete, paused, partial) is settled at once under the lock. With
    --stuck-after, a run that is alive but no longer answering is settled without it.
    """
    from dm import verbs

    settings = invocation.settings(lock_timeout=lock_timeout)
    result = run_coroutine(
        verbs.cancel(settings, rev, reason=reason, skip=skip, stuck_after=stuck_after)
    )
    render_control(result, as_json)


@main.command()
@click.argument("rev")
@click.option(
    "--as",
    "as_status",
    type=click.Choice(["success", "rolled_back"]),
    required=True,
    help="success: its upgrade is now in effect; rolled_back: it is not.",
)
@click.option("--reason", required=True, help="What was fixed by hand (recorded).")
@click.option("--lock-timeout", type=click.FloatRange(min=0), help="Seconds to wait for the lock.")
@json_option
@pass_invocation
def resolve(
    invocation: Invocation,
    rev: str,
    as_status: str,
    reason: str,
    lock_timeout: float | None,
    as_json: bool,
) -> None:
    """Record that a failed revision was fixed by hand (no hook runs)."""
    from dm import verbs

    settings = invocation.settings(lock_timeout=lock_timeout)
    result = run_coroutine(verbs.resolve(settings, rev, as_status=as_status, reason=reason))
    if as_json:
        emit_json(result)
    else:
        write_line(
            f"{result.revision}: recorded {result.status} (was {result.previous_status}) "
            f"by {result.run_by}; {result.reason}"
        )


@main.command()
@click.argument("rev")
@click.option("--reason", required=True, help="Why the edit is safe to accept (recorded).")
@click.option("--lock-timeout", type=click.FloatRange(min=0), help="Seconds to wait for the lock.")
@json_option
@pass_invocation
def repair(
    invocation: Invocation, rev: str, reason: str, lock_timeout: float | None, as_json: bool
) -> None:
    """Accept an edit of applied revision REV's file: record its new checksum, run nothing."""
    from dm.verbs.repair import repair as accept_edit

    settings = invocation.settings(lock_timeout=lock_timeout)
    result = run_coroutine(accept_edit(settings, rev, reason=reason))
    if as_json:
        emit_json(result)
    else:
        write_line(
            f"{result.revision}: edit accepted (checksum {result.old_checksum[:12]} -> "
            f"{result.new_checksum[:12]}) by {result.run_by}; nothing was run"
        )
