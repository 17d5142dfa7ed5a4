"""``dm current``, ``status``, ``check``, ``history``, ``heads``, ``branches``, ``show``,
``log``, ``verify``, ``info``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from dm.cli.app import Invocation
from dm.cli.app import current_invocation
from dm.cli.app import emit_json
from dm.cli.app import json_option
from dm.cli.app import main
from dm.cli.app import pass_invocation
from dm.cli.app import run_coroutine
from dm.cli.app import write_line
from dm.cli.render import REQUESTED_NOTES
from dm.cli.render import STOPPED_NOTES
from dm.cli.render import describe_checkpoint
from dm.cli.render import print_table
from dm.cli.render import render_attempt
from dm.cli.render import render_revisions

if TYPE_CHECKING:
    from dm.config.settings import Settings


EXIT_CHECK_FAILED = 4


def _note(message: str) -> None:
    """Tell the user something on stderr: a plain line, or a JSON log line."""
    invocation = current_invocation()
    if invocation is not None and invocation.log_format == "json":
        import logging

        logging.getLogger("dm").info(message)
    else:
        write_line(message, err=True)


@main.command()
@json_option
@pass_invocation
def current(invocation: Invocation, as_json: bool) -> None:
    """Show the applied head revisions recorded in the tracker."""
    from dm import verbs

    result = run_coroutine(verbs.current(invocation.settings()))
    if as_json:
        emit_json({"heads": result.heads})
        return
    if not result.heads:
        _note("(nothing applied)")
    for rev in result.heads:
        line = f"{rev} (head)" if rev in result.graph_heads else rev
        write_line(f"{line} (skipped)" if rev in result.skipped else line)


@main.command()
@click.argument("rev", required=False)
@json_option
@pass_invocation
def status(invocation: Invocation, rev: str | None, as_json: bool) -> None:
    """Show every revision: status, last run, duration, by whom, attempts, error; with REV,
    that revision and each of its attempts."""
    from dm import verbs

    settings = invocation.settings()
    rows = run_coroutine(verbs.status(settings))
    records = None
    if rev is not None:
        records = run_coroutine(verbs.attempts(settings, rev))  # a partial id, a gone file's id
        chosen = records[0].revision if records else verbs.show(settings, rev)[0].revision
        rows = [row for row in rows if row.revision == chosen]
    if as_json:
        emit_json(rows if records is None else {"status": rows[0], "attempts": records})
        return
    table = [
        ("REVISION", "STATE", "LAST ATTEMPT", "ATTEMPTS", "LAST RUN (UTC)", "DURATION", "BY")
        + ("DESCRIPTION",)
    ]
    for row in rows:
        last = row.status or "-"
        if row.direction == "downgrade" and row.status == "failed":
            last = "failed (downgrade)"
        state = row.state
        if row.missing_file:
            state += " (file missing)"
        if row.modified:
            state += " (modified)"
        note = row.reason if row.status == "skipped" else None
        if row.missing_file and row.state != "rolled_back":  # not settled yet
            note = (
                f"its file is gone; to settle it: dm resolve {row.revision} --as rolled_back "
                '--reason "file removed"'
            )
        elif row.state == "died":
            note = "its run died; the next run marks it interrupted and retries it"
            if row.checkpoint:  # batches it committed: the retry resumes after them
                note += "; checkpoint: " + describe_checkpoint(row.checkpoint)
                note += f"; the next {row.direction} resumes there"
        elif row.status in STOPPED_NOTES:
            note = (row.reason or row.status) + STOPPED_NOTES[row.status].format(
                direction=row.direction, revision=row.revision
            )
            if row.checkpoint:
                note += "; checkpoint: " + describe_checkpoint(row.checkpoint)
        elif row.status in ("pending", "failed") and (row.checkpoint or row.request):
            notes = []
            if row.checkpoint:
                notes.append("checkpoint: " + describe_checkpoint(row.checkpoint))
            if row.status == "failed" and row.checkpoint:
                notes.append(f"the next {row.direction} resumes there")
            elif row.status == "pending" and row.request:
                by = f" by {row.request_by}" if row.request_by else ""
                notes.append(f"{REQUESTED_NOTES[row.request]}{by}, at its next batch boundary")
            note = "; ".join(notes) or None
        table.append(
            (
                row.revision,
                state,
                last,
                str(row.attempts),
                row.started_at.strftime("%Y-%m-%d %H:%M:%S") if row.started_at else "-",
                f"{row.duration_ms} ms" if row.duration_ms is not None else "-",
                row.pod_name or row.run_by or "-",
                row.description
                + (f"  [error: {row.error}]" if row.error and row.status == "failed" else "")
                + (f"  [{note}]" if note else ""),
            )
        )
    print_table(table)
    if records is not None:
        write_line("")
        for record in records:
            render_attempt(record, traceback=False)
        if records and records[-1].error_traceback:
            write_line(f"(dm log {rows[0].revision} shows the tracebacks)")


@main.command()
@click.option(
    "--allow-modified", is_flag=True, help="Pass although applied revision files changed."
)
@click.option(
    "--wait", is_flag=True, help="Poll until the check passes (exit 0) or --timeout (exit 4)."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="With --wait: seconds to wait in all.  [default: 300]",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    help="With --wait: seconds between polls.  [default: 5]",
)
@click.option(
    "--offline",
    is_flag=True,
    help="Check the revision files and the graph only, without a database (exit 4: several heads).",
)
@click.option(
    "--allow-multiple-heads", is_flag=True, help="With --offline: pass with several heads."
)
@json_option
@pass_invocation
def check(
    invocation: Invocation,
    allow_modified: bool,
    wait: bool,
    timeout: float | None,
    interval: float | None,
    offline: bool,
    allow_multiple_heads: bool,
    as_json: bool,
) -> None:
    """Exit 0 when every revision is applied; exit 4 when any is pending, failed, running or
    stopped part-way (except revisions with blocks_deploy = False)."""
    from dm import verbs

    if not wait and (timeout is not None or interval is not None):
        raise click.UsageError("--timeout and --interval go with --wait")
    if offline and (wait or allow_modified):
        raise click.UsageError("--offline reads no database: not with --wait or --allow-modified")
    if allow_multiple_heads and not offline:
        raise click.UsageError("--allow-multiple-heads goes with --offline")
    settings = invocation.settings()
    if offline:
        _check_offline(settings, allow_multiple_heads, as_json)
        return
    if wait:
        result = run_coroutine(
            verbs.check_wait(
                settings,
                timeout=300.0 if timeout is None else timeout,
                interval=5.0 if interval is None else interval,
                allow_modified=allow_modified,
            )
        )
    else:
        result = run_coroutine(verbs.check(settings, allow_modified=allow_modified))
    if as_json:
        emit_json(
            {
                "ok": result.ok,
                "pending": result.pending,
                "failed": result.failed,
                "running": result.running,
                "died": result.died,
                "incomplete": result.incomplete,
                "missing": result.missing,
                "modified": result.modified,
                "needs_schema": result.needs_schema,
                "deferred": result.deferred,
                "abandoned": result.abandoned,
                "skipped": result.skipped,
            }
        )
    else:
        if result.ok:
            passed = [
                f"{len(revisions)} {label} ({', '.join(revisions)})"
                for label, revisions in (
                    ("skipped by the environment guard", result.skipped),
                    ("abandoned by dm cancel --skip, not run again", result.abandoned),
                )
                if revisions
            ]
            if passed:
                write_line(f"ok: every revision is applied or passed: {'; '.join(passed)}")
            else:
                write_line("ok: every revision is applied")
        for label, revisions in (
            ("pending", result.pending),
            ("failed", result.failed),
            ("running", result.running),
            ("run died (the next run retries)", result.died),
            ("incomplete, paused or cancelled (a later run takes it up)", result.incomplete),
            ("applied but file missing", result.missing),
            ("modified since applied", result.modified),
        ):
            if revisions:
                write_line(f"{label}: {', '.join(revisions)}")
        for revision in result.missing:
            write_line(
                f"  {revision}: its file is gone; if that is on purpose: dm resolve {revision} "
                '--as rolled_back --reason "file removed"'
            )
        for revision in [] if result.allow_modified else result.modified:
            write_line(
                f"  {revision}: a cosmetic edit (comments, formatting): dm repair {revision} "
                f'--reason "..."; a change to run: dm run {revision} --force --reason "..."'
            )
        for line in result.needs_schema:
            write_line(f"needs schema: {line}; run the application's `alembic upgrade` first")
        if result.deferred:
            deferred = ", ".join(result.deferred)
            write_line(f"unfinished, not blocking (blocks_deploy = False): {deferred}")
    if not result.ok:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)


def _check_offline(settings: Settings, allow_multiple_heads: bool, as_json: bool) -> None:
    from dm.verbs.validate import check_offline

    found = check_offline(settings, allow_multiple_heads=allow_multiple_heads)
    if as_json:
        emit_json({"ok": found.ok, "revisions": found.revisions, "heads": list(found.heads)})
    elif len(found.heads) > 1:
        verdict = "ok (allowed)" if found.ok else "error"
        write_line(
            f"{verdict}: {len(found.heads)} heads ({', '.join(found.heads)}) in "
            f"{found.revisions} revisions; join them with 'dm merge heads', or pass "
            "--allow-multiple-heads for independent branches"
        )
    else:
        what = (
            f"{found.revisions} revisions load, one head {found.heads[0]}"
            if found.heads
            else "no revisions"
        )
        write_line(f"ok: {what} (no database used)")
    if not found.ok:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)


@main.command()
@click.option("-r", "--rev-range", metavar="START:END", help="Limit to a range, e.g. base:ab12.")
@click.option("--verbose", "detailed", is_flag=True, help="Show paths, parents and docstrings.")
@json_option
@pass_invocation
def history(invocation: Invocation, rev_range: str | None, detailed: bool, as_json: bool) -> None:
    """List revisions, newest first, with their descriptions."""
    from dm import verbs

    render_revisions(verbs.history(invocation.settings(), rev_range), detailed, as_json)


@main.command()
@click.option("--verbose", "detailed", is_flag=True, help="Show paths, parents and docstrings.")
@json_option
@pass_invocation
def heads(invocation: Invocation, detailed: bool, as_json: bool) -> None:
    """Show the head revisions of the revision graph."""
    from dm import verbs

    render_revisions(verbs.heads(invocation.settings()), detailed, as_json)


@main.command()
@click.option("--verbose", "detailed", is_flag=True, help="Show paths, parents and docstrings.")
@json_option
@pass_invocation
def branches(invocation: Invocation, detailed: bool, as_json: bool) -> None:
    """Show the revisions where the graph branches."""
    from dm import verbs

    render_revisions(verbs.branches(invocation.settings()), detailed, as_json)


@main.command()
@click.argument("rev")
@json_option
@pass_invocation
def show(invocation: Invocation, rev: str, as_json: bool) -> None:
    """Show the revision REV (an id, partial id, label, head...)."""
    from dm import verbs

    infos = verbs.show(invocation.settings(), rev)
    if as_json:
        emit_json(infos[0] if len(infos) == 1 else infos)
    else:
        render_revisions(infos, True, False)


main.add_command(history, name="list")  # the old framework's name for it


@main.command("log")
@click.argument("rev")
@json_option
@pass_invocation
def log_command(invocation: Invocation, rev: str, as_json: bool) -> None:
    """Show every attempt of revision REV, oldest first, with its error and traceback."""
    from dm import verbs

    records = run_coroutine(verbs.attempts(invocation.settings(), rev))
    if as_json:
        emit_json(records)
        return
    if not records:
        _note(f"{rev}: no attempt recorded")
    for record in records:
        render_attempt(record, traceback=True)


@main.command()
@click.argument("revisions", nargs=-1)
@json_option
@pass_invocation
def verify(invocation: Invocation, revisions: tuple[str, ...], as_json: bool) -> None:
    """Re-run verify() of applied revisions (default: all) read-only; exit 1 if any fails."""
    from dm import verbs

    result = run_coroutine(verbs.verify(invocation.settings(), revisions))
    if as_json:
        emit_json({"ok": result.ok, "outcomes": result.outcomes})
    else:
        if not result.outcomes:
            write_line("nothing applied to verify")
        for outcome in result.outcomes:
            error = f": {outcome.error}" if outcome.error else ""
            write_line(f"{outcome.result:<12} {outcome.revision}  {outcome.description}{error}")
    if not result.ok:
        raise click.exceptions.Exit(1)


@main.command()
@json_option
@pass_invocation
def info(invocation: Invocation, as_json: bool) -> None:
    """Show the environment, database (password hidden), project, tracker, lock and versions."""
    from dm import verbs

    result = run_coroutine(verbs.info(invocation.settings()))
    if as_json:
        emit_json(result)
        return
    lock = result.lock + (f" ({result.lock_holder})" if result.lock_holder else "")
    for label, value in (
        ("environment", f"{result.environment} (from {result.environment_source})"),
        ("database", result.database_url),
        ("config", f"{result.config_file} [{result.ini_section}]"),
        ("scripts", result.script_location),
        ("tracker", result.tracker_table),
        ("lock", lock),
        ("versions", ", ".join(f"{k} {v}" for k, v in result.versions.items())),
    ):
        write_line(f"{label + ':':<13}{value}")
