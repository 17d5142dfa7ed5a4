"""The ``dm`` command line: a thin click layer over ``dm.command``.

The only module that prints, reads options or picks exit codes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import json
import os
import re
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import TextIO
from typing import TypeVar

import click

from . import __version__
from .errors import DmError
from .errors import Incomplete
from .errors import RevisionFailed
from .errors import TransientFailure
from .errors import describe_error
from .pooler import pooler_problem
from .printable import printable
from .privileges import privilege_problem
from .transient import is_transient

if TYPE_CHECKING:
    from .command import RevisionInfo
    from .command import RunResult
    from .operations import AttemptRecord
    from .operations import ControlResult
    from .settings import Settings

T = TypeVar("T")

EXIT_CHECK_FAILED = 4


def _note_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    invocation = ctx.find_object(Invocation)
    if invocation is not None and value:
        invocation.as_json = True  # errors, too, are then printed as JSON on stdout
    return value


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_note_json,
    help="Print the result (or the error) as JSON on stdout.",
)


@dataclasses.dataclass
class Invocation:
    """Options given to the ``dm`` group, shared with every subcommand."""

    config_file: Path | None
    section: str | None
    database_url: str | None
    verbose: bool
    log_format: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    secrets: list[str] = dataclasses.field(default_factory=list)
    """Secret parts of the configured URLs: masked in every line dm writes."""
    as_json: bool = False
    stdout: TextIO = dataclasses.field(default_factory=lambda: sys.stdout)
    """dm's own output; revision code's ``sys.stdout`` goes to the log instead."""
    stderr: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)

    def settings(self, **overrides: Any) -> Settings:
        """Resolve settings from options, environment, ini file and defaults."""
        from . import log
        from .settings import Settings

        settings = Settings.load(
            config_file=self.config_file,
            ini_section=self.section,
            database_url=self.database_url,
            **overrides,
        )
        self.secrets = sorted({*self.secrets, *settings.secrets()}, key=len, reverse=True)
        log.add_secrets(self.secrets)
        return settings

    def scrub(self, text: str) -> str:
        """Return ``text`` with every URL masked and every known secret removed."""
        from .redaction import scrub

        return scrub(text, self.secrets)


pass_invocation = click.make_pass_decorator(Invocation)


class DmCommand(click.Command):
    """Run a subcommand with ``sys.stdout`` (and, with JSON logs, ``sys.stderr``) sent to
    the log.

    Revision code runs inside dm (its module body when the graph loads, its hooks while
    they run): what it prints becomes log lines, so dm's own output (``--json``) stays
    clean and with JSON logs every stderr line stays one JSON object. dm prints through
    the streams saved in ``Invocation``. Python-level only: a C extension writing to file
    descriptor 1 itself is not redirected.
    """

    def invoke(self, ctx: click.Context) -> Any:
        from . import log

        invocation = ctx.find_object(Invocation)
        with contextlib.ExitStack() as stack:
            if invocation is not None:
                out = log.OutputWriter("dm.output")
                stack.callback(out.flush)  # a last line without a newline
                stack.enter_context(contextlib.redirect_stdout(out))
                if invocation.log_format == "json":
                    err = log.OutputWriter("dm.output", "warning")
                    stack.callback(err.flush)
                    stack.enter_context(contextlib.redirect_stderr(err))
            return super().invoke(ctx)


class DmGroup(click.Group):
    """Turn ``DmError`` and usage errors into one ``dm: error: ...`` line and its exit code;
    accept global options after the command too (``cli_args``)."""

    command_class = DmCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from .cli_args import hoist_global_options

        return super().parse_args(ctx, hoist_global_options(self, args))

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        from .cli_args import one_line

        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as exc:  # a global option refused, before the group ran
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `dm`: click prints the help
                raise
            _report(None, one_line(exc), exc.exit_code, "usage_error")
            raise click.exceptions.Exit(exc.exit_code) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DmError as exc:
            _fail(ctx, str(exc), exc.exit_code, exc)
        except KeyboardInterrupt as exc:  # outside the event loop (e.g. while importing)
            _fail(ctx, "interrupted", 130, exc)
        except click.ClickException as exc:
            invocation = ctx.find_object(Invocation)
            if invocation is None:  # the command name was refused before the group ran
                log_format = ctx.params.get("log_format") or "text"
                invocation = Invocation(None, None, None, False, log_format)
            from .cli_args import one_line

            _report(invocation, one_line(exc), exc.exit_code, "usage_error")
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # stdout closed early, e.g. `dm history | head`
            invocation = ctx.find_object(Invocation)
            stdout = invocation.stdout if invocation is not None else sys.stdout
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout.fileno())
            ctx.exit(1)
        except Exception as exc:
            problem = pooler_problem(exc)  # e.g. a prepared statement met through PgBouncer
            if problem is not None:
                _fail(ctx, str(problem), problem.exit_code, exc)
            denied = privilege_problem(exc)  # the role lacks a grant: a configuration problem
            if denied is not None:
                _fail(ctx, str(denied), denied.exit_code, exc)
            if is_transient(exc):  # e.g. the connection died between two revisions
                failure = TransientFailure(f"transient database failure: {describe_error(exc)}")
                _fail(ctx, f"{failure} (a retry may succeed)", failure.exit_code, exc)
            message = (
                f"internal error: {describe_error(exc)}; this is a bug in dm, please report it "
                "with the output of --verbose"
            )
            _fail(ctx, message, 1, exc)
        except BaseException as exc:  # SystemExit or CancelledError from code dm ran
            _fail(ctx, f"unexpected {exc!r}", 1, exc)


def _fail(ctx: click.Context, message: str, code: int, exc: BaseException) -> None:
    from .redaction import scrub as scrub_text

    invocation = ctx.find_object(Invocation)
    scrub = invocation.scrub if invocation is not None else scrub_text
    trace = None
    if invocation is not None and invocation.verbose:
        trace = scrub("".join(traceback.format_exception(exc)).rstrip())
    elif code == 1 and not isinstance(exc, DmError):
        message += " (run with --verbose for the traceback)"
    extra = {"revision": exc.revision} if isinstance(exc, RevisionFailed | Incomplete) else {}
    _report(invocation, scrub(message), code, _kind(exc), trace, **extra)
    ctx.exit(code)


def _kind(exc: BaseException) -> str:
    """Name the kind of an error for JSON output: ``revision_failed``, ``config_error``..."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if not isinstance(exc, DmError):
        return "internal_error"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def _report(
    invocation: Invocation | None,
    message: str,
    code: int,
    kind: str,
    trace: str | None = None,
    **extra: str,
) -> None:
    """Print the final error: ``dm: error: ...`` (or a JSON log line) on stderr, and with
    ``--json`` also ``{"error": {...}}`` on stdout."""
    error: dict[str, Any] = {"message": message, "exit_code": code, "kind": kind, **extra}
    if invocation is not None and invocation.as_json:
        click.echo(json.dumps({"error": error}, indent=2), file=invocation.stdout)
    stderr = invocation.stderr if invocation is not None else sys.stderr
    if invocation is not None and invocation.log_format == "json":
        from .log import json_line

        fields = {key: value for key, value in error.items() if key != "message"}
        level = "warning" if kind == "incomplete" else "error"  # a stop asked for, exit 5
        click.echo(json_line(level, "dm", message, traceback=trace, **fields), file=stderr)
        return
    if trace:
        click.echo(trace, file=stderr)
    # A stop that was asked for (time box, dm pause, dm cancel: exit 5) is no error.
    label = "stopped" if kind == "incomplete" else "error"
    click.echo(f"dm: {label}: {printable(message)}", file=stderr)


def _current() -> Invocation | None:
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(Invocation) if ctx is not None else None


def _echo(message: str = "", *, err: bool = False) -> None:
    """Print on dm's own stdout (or stderr), which revision code cannot write to."""
    invocation = _current()
    message = printable(message)  # stored reasons, pod names, run_by: no terminal escapes
    if invocation is None:
        click.echo(message, err=err)
    else:
        click.echo(message, file=invocation.stderr if err else invocation.stdout)


def _note(message: str) -> None:
    """Tell the user something on stderr: a plain line, or a JSON log line."""
    invocation = _current()
    if invocation is not None and invocation.log_format == "json":
        import logging

        logging.getLogger("dm").info(message)
    else:
        _echo(message, err=True)


@click.group(cls=DmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="DM_CONFIG",
    help="Config file holding dm's section.  [default: ./alembic.ini; env DM_CONFIG]",
)
@click.option(
    "-n",
    "--name",
    "section",
    envvar="DM_INI_SECTION",
    help="Section of the config file.  [default: data_migrations; env DM_INI_SECTION]",
)
@click.option(
    "--database-url",
    metavar="URL",
    help="Database URL; prefer DM_DATABASE_URL, which keeps the password out of `ps`.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logs and tracebacks on errors.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="DM_LOG_FORMAT",
    show_default=True,
    help="Log lines on stderr as text or JSON.",
)
@click.option(
    "-x",
    "x_arguments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Argument for revision code, read with context.get_x_argument() (as alembic -x).",
)
@click.version_option(__version__, prog_name="dm")
@click.pass_context
def main(
    ctx: click.Context,
    config_file: Path | None,
    section: str | None,
    database_url: str | None,
    verbose: bool,
    log_format: str,
    x_arguments: tuple[str, ...],
) -> None:
    """Run data migrations and maintenance scripts the way Alembic runs schema revisions."""
    from . import log
    from . import progress
    from .redaction import register
    from .redaction import scrub
    from .urls import secrets_of

    secrets = [database_url, *secrets_of(database_url)] if database_url else []
    register(secrets)
    invocation = Invocation(
        config_file, section, database_url, verbose, log_format, secrets=secrets
    )
    ctx.obj = invocation
    log.configure(
        verbose=verbose, json_lines=log_format == "json", secrets=secrets, scrub=scrub
    )
    progress.use_bar(log_format == "text" and sys.stderr.isatty())
    if x_arguments or "dm.alembic_context" in sys.modules:  # Alembic loads only when needed
        from .alembic_context import set_x_arguments

        set_x_arguments(x_arguments)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    from . import watchdog
    from .signals import run_until_signal

    invocation = _current()

    def report(message: str, code: int, kind: str) -> None:
        _report(invocation, message, code, kind)

    # What is loaded by now (click, SQLAlchemy, dm...) lives to the end of the command:
    # frozen, it is left out of the collector's full passes, which a batched run over
    # millions of rows triggers again and again (about half the client CPU of a 1M-row
    # dm.batched backfill, bench/batched.py). Unfrozen afterwards for an embedding process.
    gc.freeze()
    try:
        with watchdog.installed(report):
            return run_until_signal(coro)
    finally:
        gc.unfreeze()


def _emit_json(value: Any) -> None:
    _echo(json.dumps(_jsonable(value), indent=2, sort_keys=False))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


# -- project files ----------------------------------------------------------------------------


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=".")
@pass_invocation
def init(invocation: Invocation, directory: Path) -> None:
    """Create a dm project: alembic.ini (or dm's section in it) and data_migrations/."""
    import shlex

    from . import command

    result = command.init(directory, section=invocation.section or "data_migrations")
    verb = "added a section to" if result.appended_section else "wrote"
    _echo(f"{verb} {result.config_file}; created {result.script_location}/")
    if result.gitignore:
        _echo(f"ignored the embedded database dm.sqlite3 in {result.gitignore}")
    if result.schema_section:
        _echo(
            f"wired the application's Alembic schema migrations ([{result.schema_section}]): "
            "a revision may declare requires_schema = ('<schema revision id>',)"
        )
    enter = "" if directory.resolve() == Path.cwd() else f"cd {shlex.quote(str(directory))}, "
    _echo(f"next: {enter}dm revision -m 'describe the change', then dm upgrade heads")


@main.command()
@click.option("-m", "--message", required=True, help="What the revision does (its description).")
@click.option("--head", default="head", show_default=True, help="Parent revision (or branch@head).")
@click.option("--splice", is_flag=True, help="Allow a parent that is not a head.")
@click.option("--branch-label", help="Label the new revision's branch.")
@click.option("--depends-on", multiple=True, help="Revision or label this one depends on.")
@click.option("--rev-id", help="Use this revision id instead of a generated one.")
@click.option("--allow-duplicate-slug", is_flag=True, help="Accept a message another revision has.")
@click.option(
    "--sync", is_flag=True, help="Write an Alembic-style revision: plain def upgrade() using op."
)
@json_option
@pass_invocation
def revision(
    invocation: Invocation,
    message: str,
    head: str,
    splice: bool,
    branch_label: str | None,
    depends_on: tuple[str, ...],
    rev_id: str | None,
    allow_duplicate_slug: bool,
    sync: bool,
    as_json: bool,
) -> None:
    """Create a revision file with async upgrade/downgrade/verify stubs (--sync: Alembic-style)."""
    from . import command

    info = command.revision(
        invocation.settings(),
        message,
        head=head,
        splice=splice,
        branch_label=branch_label,
        depends_on=depends_on,
        rev_id=rev_id,
        allow_duplicate_slug=allow_duplicate_slug,
        sync=sync,
    )
    if as_json:
        _emit_json(info)
    else:
        _echo(f"created {info.revision}: {info.path}")


@main.command()
@click.argument("revisions", nargs=-1)
@click.option("-m", "--message", help="Description of the merge revision.")
@click.option("--branch-label", help="Label the merge revision's branch.")
@click.option("--rev-id", help="Use this revision id instead of a generated one.")
@json_option
@pass_invocation
def merge(
    invocation: Invocation,
    revisions: tuple[str, ...],
    message: str | None,
    branch_label: str | None,
    rev_id: str | None,
    as_json: bool,
) -> None:
    """Create a revision merging REVISIONS (default: all heads)."""
    from . import command

    info = command.merge(
        invocation.settings(), revisions, message, branch_label=branch_label, rev_id=rev_id
    )
    if as_json:
        _emit_json(info)
    else:
        _echo(f"created merge {info.revision}: {info.path}")


# -- running -----------------------------------------------------------------------------------


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
    from .errors import UsageError

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
    from . import command

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = _run(command.upgrade(settings, target, dry_run=dry_run))
    _render_run(result, "upgrade", as_json)


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
    from . import command

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = _run(command.downgrade(settings, target, dry_run=dry_run))
    _render_run(result, "downgrade", as_json)


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
    from . import command

    result = _run(
        command.stamp(
            invocation.settings(lock_timeout=lock_timeout),
            target,
            dry_run=dry_run,
            ignore_environment=ignore_environment,
        )
    )
    if as_json:
        _render_run(result, "stamp", as_json)
        return
    if not result.planned:
        _echo(f"nothing to stamp: already at {result.target}")
        return
    verb = "would record" if result.dry_run else "recorded"
    for step in result.planned:
        _echo(f"stamp {step.revision}: {verb} {step.records} ({step.reason})")
    counts = Counter(step.records for step in result.planned)
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    done = "nothing written (dry run)" if result.dry_run else "done"
    _echo(f"stamp: {summary}; {done}, target {result.target}")


_STOPPED = ("stopped", "paused", "cancelled", "abandoned")


def _render_run(result: RunResult, verb: str, as_json: bool) -> None:
    if as_json:
        _emit_json(
            {
                "target": result.target,
                "dry_run": result.dry_run,
                "planned": result.planned,
                "steps": result.steps,
                "interrupted": result.interrupted,
            }
        )
        return
    if result.dry_run:
        if not result.planned:
            _echo(f"nothing to {verb}: already at {result.target}")
        for step in result.planned:
            reversible = "" if step.reversible else "  (irreversible)"
            action = "" if step.reason is None else f"  [{step.action}: {step.reason}]"
            _echo(f"{step.direction} {step.revision}  {step.description}{reversible}{action}")
        return
    if result.nothing_to_do:
        _echo(f"nothing to {verb}: already at {result.target}")
    else:
        skipped = [s.revision for s in result.steps if s.status.value == "skipped"]
        # Undoing a skipped upgrade runs nothing: it is recorded, not done (stamp records all).
        recorded = [p for p in result.planned if p.action == "record" and verb != "stamp"]
        # A blocks_deploy = False backfill that stopped part-way: the run went on without it.
        deferred = [s for s in result.steps if s.status.value in _STOPPED]
        ran = len(result.steps) - len(skipped) - len(recorded) - len(deferred)
        also = f", {len(skipped)} skipped" if skipped else ""
        if recorded:
            also += f", {len(recorded)} recorded only (skipped here: nothing to undo)"
        if deferred:
            also += f", {len(deferred)} deferred"
        _echo(f"{verb}: {ran} revision(s) done{also}, target {result.target}")
        reasons = {p.revision: p.reason for p in result.planned}
        for revision in skipped:
            _echo(f"skipped {revision}: {reasons.get(revision)}")
        for stopped in deferred:
            _echo(
                f"deferred {stopped.revision}: {stopped.status.value} part-way "
                "(blocks_deploy = False); the run went on without it"
            )


# -- reading -----------------------------------------------------------------------------------


@main.command()
@json_option
@pass_invocation
def current(invocation: Invocation, as_json: bool) -> None:
    """Show the applied head revisions recorded in the tracker."""
    from . import command

    result = _run(command.current(invocation.settings()))
    if as_json:
        _emit_json({"heads": result.heads})
        return
    if not result.heads:
        _note("(nothing applied)")
    for rev in result.heads:
        line = f"{rev} (head)" if rev in result.graph_heads else rev
        _echo(f"{line} (skipped)" if rev in result.skipped else line)


@main.command()
@click.argument("rev", required=False)
@json_option
@pass_invocation
def status(invocation: Invocation, rev: str | None, as_json: bool) -> None:
    """Show every revision: status, last run, duration, by whom, attempts, error; with REV,
    that revision and each of its attempts."""
    from . import command
    from . import operations

    settings = invocation.settings()
    rows = _run(command.status(settings))
    records = None
    if rev is not None:
        records = _run(operations.attempts(settings, rev))  # a partial id, a gone file's id
        chosen = records[0].revision if records else command.show(settings, rev)[0].revision
        rows = [row for row in rows if row.revision == chosen]
    if as_json:
        _emit_json(rows if records is None else {"status": rows[0], "attempts": records})
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
                f'its file is gone; to settle it: dm resolve {row.revision} --as rolled_back '
                '--reason "file removed"'
            )
        elif row.state == "died":
            note = "its run died; the next run marks it interrupted and retries it"
        elif row.status in _STOPPED_NOTES:
            note = (row.reason or row.status) + _STOPPED_NOTES[row.status].format(
                direction=row.direction, revision=row.revision
            )
            if row.checkpoint:
                note += "; checkpoint: " + _describe_checkpoint(row.checkpoint)
        elif row.status in ("pending", "failed") and (row.checkpoint or row.request):
            notes = []
            if row.checkpoint:
                notes.append("checkpoint: " + _describe_checkpoint(row.checkpoint))
            if row.status == "failed" and row.checkpoint:
                notes.append(f"the next {row.direction} resumes there")
            elif row.status == "pending" and row.request:
                by = f" by {row.request_by}" if row.request_by else ""
                notes.append(f"{_REQUESTED[row.request]}{by}, at its next batch boundary")
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
    _print_table(table)
    if records is not None:
        _echo("")
        for record in records:
            _render_attempt(record, traceback=False)
        if records and records[-1].error_traceback:
            _echo(f"(dm log {rows[0].revision} shows the tracebacks)")


# What happens next to a revision whose latest attempt stopped at a batch boundary.
_STOPPED_NOTES = {
    "stopped": "; the next {direction} resumes it",
    "paused": "; dm resume {revision} or the next {direction} resumes it",
    "cancelled": "; the next {direction} starts it over",
    "abandoned": "; not run again",
}
_REQUESTED = {
    "pause": "pause requested",
    "cancel": "cancel requested",
    "abandon": "cancel --skip requested",
}


def _describe_checkpoint(checkpoint: Mapping[str, Any]) -> str:
    rows = f"{checkpoint.get('rows_done', 0):,}"
    total = checkpoint.get("rows_total")
    if total:
        rows += f"/{total:,}"
    loop = checkpoint.get("loop", 0)
    where = f"loop {loop + 1}, " if loop else ""
    return f"{where}{rows} rows done, last key {checkpoint.get('last_key')!r}"


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        _echo("  ".join([*cells, row[-1]]).rstrip())


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
    from . import command

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
        result = _run(
            command.check_wait(
                settings,
                timeout=300.0 if timeout is None else timeout,
                interval=5.0 if interval is None else interval,
                allow_modified=allow_modified,
            )
        )
    else:
        result = _run(command.check(settings, allow_modified=allow_modified))
    if as_json:
        _emit_json(
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
                _echo(f"ok: every revision is applied or passed: {'; '.join(passed)}")
            else:
                _echo("ok: every revision is applied")
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
                _echo(f"{label}: {', '.join(revisions)}")
        for revision in result.missing:
            _echo(
                f"  {revision}: its file is gone; if that is on purpose: dm resolve {revision} "
                '--as rolled_back --reason "file removed"'
            )
        for revision in [] if result.allow_modified else result.modified:
            _echo(
                f"  {revision}: a cosmetic edit (comments, formatting): dm repair {revision} "
                f'--reason "..."; a change to run: dm run {revision} --force --reason "..."'
            )
        for line in result.needs_schema:
            _echo(f"needs schema: {line}; run the application's `alembic upgrade` first")
        if result.deferred:
            _echo(f"unfinished, not blocking (blocks_deploy = False): {', '.join(result.deferred)}")
    if not result.ok:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)


def _check_offline(settings: Settings, allow_multiple_heads: bool, as_json: bool) -> None:
    from .validate import check_offline

    found = check_offline(settings, allow_multiple_heads=allow_multiple_heads)
    if as_json:
        _emit_json({"ok": found.ok, "revisions": found.revisions, "heads": list(found.heads)})
    elif len(found.heads) > 1:
        verdict = "ok (allowed)" if found.ok else "error"
        _echo(
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
        _echo(f"ok: {what} (no database used)")
    if not found.ok:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)


@main.command()
@click.option("-r", "--rev-range", metavar="START:END", help="Limit to a range, e.g. base:ab12.")
@click.option("--verbose", "detailed", is_flag=True, help="Show paths, parents and docstrings.")
@json_option
@pass_invocation
def history(invocation: Invocation, rev_range: str | None, detailed: bool, as_json: bool) -> None:
    """List revisions, newest first, with their descriptions."""
    from . import command

    _render_revisions(command.history(invocation.settings(), rev_range), detailed, as_json)


@main.command()
@click.option("--verbose", "detailed", is_flag=True, help="Show paths, parents and docstrings.")
@json_option
@pass_invocation
def heads(invocation: Invocation, detailed: bool, as_json: bool) -> None:
    """Show the head revisions of the revision graph."""
    from . import command

    _render_revisions(command.heads(invocation.settings()), detailed, as_json)


@main.command()
@click.option("--verbose", "detailed", is_flag=True, help="Show paths, parents and docstrings.")
@json_option
@pass_invocation
def branches(invocation: Invocation, detailed: bool, as_json: bool) -> None:
    """Show the revisions where the graph branches."""
    from . import command

    _render_revisions(command.branches(invocation.settings()), detailed, as_json)


@main.command()
@click.argument("rev")
@json_option
@pass_invocation
def show(invocation: Invocation, rev: str, as_json: bool) -> None:
    """Show the revision REV (an id, partial id, label, head...)."""
    from . import command

    infos = command.show(invocation.settings(), rev)
    if as_json:
        _emit_json(infos[0] if len(infos) == 1 else infos)
    else:
        _render_revisions(infos, True, False)


def _render_revisions(infos: list[RevisionInfo], detailed: bool, as_json: bool) -> None:
    if as_json:
        _emit_json(infos)
        return
    for info in infos:
        parents = ", ".join(info.down_revisions) or "<base>"
        marks = "".join(
            f" ({mark})"
            for mark, on in (
                ("head", info.is_head),
                ("branchpoint", info.is_branch_point),
                ("mergepoint", info.is_merge_point),
            )
            if on
        )
        labels = f" ({', '.join(info.branch_labels)})" if info.branch_labels else ""
        if not detailed:
            _echo(f"{parents} -> {info.revision}{labels}{marks}, {info.description}")
            continue
        _echo(f"Rev: {info.revision}{labels}{marks}")
        _echo(f"Parent: {parents}")
        if info.depends_on:
            _echo(f"Also depends on: {', '.join(info.depends_on)}")
        _echo(f"Reversible: {'yes' if info.reversible else 'no'}")
        _echo(f"Path: {info.path}")
        for name, value in info.attributes.items():
            _echo(f"{name}: {_attribute(name, value)}")
        _echo("")
        for line in (info.doc or info.description).splitlines():
            _echo(f"    {line}".rstrip())
        _echo("")


def _attribute(name: str, value: Any) -> str:
    """Show a revision attribute as the file would set it, with what its default means."""
    if value is None:
        return {"environments": "None (every environment)", "timeout": "None (DM_TIMEOUT)"}.get(
            name, "None"
        )
    if isinstance(value, list) and not value:
        return "None"
    if isinstance(value, list):
        return f"({', '.join(repr(v) for v in value)}{',' if len(value) == 1 else ''})"
    return repr(value)


main.add_command(history, name="list")  # the old framework's name for it


# -- one revision at a time ---------------------------------------------------------------------


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
    from . import operations

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = _run(
        operations.run(
            settings,
            rev,
            force=force,
            reason=reason,
            dry_run=dry_run,
            ignore_environment=ignore_environment,
        )
    )
    if result.nothing_to_do and not as_json:
        _echo(f"nothing to run: {result.target} already succeeded (--force runs it again)")
        return
    _render_run(result, "run", as_json)


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
    from . import operations

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = _run(operations.rollback(settings, rev, dry_run=dry_run))
    if result.nothing_to_do and not as_json:
        _echo(f"nothing to roll back: {result.target} is not applied")
        return
    _render_run(result, "rollback", as_json)


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
    from . import operations

    result = _run(operations.pause(invocation.settings(), rev, reason=reason))
    _render_control(result, as_json)


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
    from . import operations

    settings = invocation.settings(lock_timeout=lock_timeout)
    result = _run(
        operations.cancel(settings, rev, reason=reason, skip=skip, stuck_after=stuck_after)
    )
    _render_control(result, as_json)


def _render_control(result: ControlResult, as_json: bool) -> None:
    if as_json:
        _emit_json(result)
        return
    why = f" ({result.reason})" if result.reason else ""
    verb = {"pause": "pause", "cancel": "cancel", "abandon": "cancel --skip"}[result.action]
    if result.outcome == "requested":
        _echo(
            f"{result.revision}: {verb} requested by {result.by}{why}; its run stops at the "
            "next batch boundary (dm status shows it)"
        )
    elif result.outcome == "recorded":
        _echo(f"{result.revision}: recorded {result.state} by {result.by}{why}")
    elif result.outcome == "honoured":
        _echo(f"{result.revision}: its run stopped as asked ({result.state})")
    elif result.outcome == "settled":
        _echo(
            f"{result.revision}: its run did not answer: recorded {result.state} by "
            f"{result.by}{why}; that run can commit nothing more, but it holds the migration "
            "lock until its process ends: stop it so that the next run can start"
        )
    else:
        _echo(f"{result.revision}: already {result.state}; nothing changed")


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
    from . import operations

    settings = invocation.settings(
        lock_timeout=lock_timeout, timeout=timeout, max_runtime=max_runtime
    )
    result = _run(operations.resume(settings, rev, dry_run=dry_run))
    _render_run(result, "resume", as_json)


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
    from . import operations

    settings = invocation.settings(lock_timeout=lock_timeout)
    result = _run(operations.resolve(settings, rev, as_status=as_status, reason=reason))
    if as_json:
        _emit_json(result)
    else:
        _echo(
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
    from .repair import repair as accept_edit

    settings = invocation.settings(lock_timeout=lock_timeout)
    result = _run(accept_edit(settings, rev, reason=reason))
    if as_json:
        _emit_json(result)
    else:
        _echo(
            f"{result.revision}: edit accepted (checksum {result.old_checksum[:12]} -> "
            f"{result.new_checksum[:12]}) by {result.run_by}; nothing was run"
        )


@main.command("log")
@click.argument("rev")
@json_option
@pass_invocation
def log_command(invocation: Invocation, rev: str, as_json: bool) -> None:
    """Show every attempt of revision REV, oldest first, with its error and traceback."""
    from . import operations

    records = _run(operations.attempts(invocation.settings(), rev))
    if as_json:
        _emit_json(records)
        return
    if not records:
        _note(f"{rev}: no attempt recorded")
    for record in records:
        _render_attempt(record, traceback=True)


def _render_attempt(record: AttemptRecord, *, traceback: bool) -> None:
    when = record.started_at.strftime("%Y-%m-%d %H:%M:%S") if record.started_at else "-"
    took = f", {record.duration_ms} ms" if record.duration_ms is not None else ""
    who = record.pod_name or record.run_by or "-"
    _echo(
        f"attempt {record.attempt}: {record.direction} {record.status} "
        f"at {when} UTC{took}, by {who} (run {record.run_id})"
    )
    for label, value in (("reason", record.reason), ("error", record.error_message)):
        if value:
            _echo(f"  {label}: {value}")
    if record.checkpoint:
        _echo(f"  checkpoint: {_describe_checkpoint(record.checkpoint)}")
    if traceback and record.error_traceback:
        _echo("  traceback:")
        for line in record.error_traceback.rstrip().splitlines():
            _echo(f"    {line}".rstrip())


@main.command()
@click.argument("revisions", nargs=-1)
@json_option
@pass_invocation
def verify(invocation: Invocation, revisions: tuple[str, ...], as_json: bool) -> None:
    """Re-run verify() of applied revisions (default: all) read-only; exit 1 if any fails."""
    from . import operations

    result = _run(operations.verify(invocation.settings(), revisions))
    if as_json:
        _emit_json({"ok": result.ok, "outcomes": result.outcomes})
    else:
        if not result.outcomes:
            _echo("nothing applied to verify")
        for outcome in result.outcomes:
            error = f": {outcome.error}" if outcome.error else ""
            _echo(f"{outcome.result:<12} {outcome.revision}  {outcome.description}{error}")
    if not result.ok:
        raise click.exceptions.Exit(1)


@main.command()
@json_option
@pass_invocation
def info(invocation: Invocation, as_json: bool) -> None:
    """Show the environment, database (password hidden), project, tracker, lock and versions."""
    from . import operations

    result = _run(operations.info(invocation.settings()))
    if as_json:
        _emit_json(result)
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
        _echo(f"{label + ':':<13}{value}")


if __name__ == "__main__":  # pragma: no cover
    main()
