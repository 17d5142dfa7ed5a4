"""The ``dm`` group: global options, the invocation, output streams and the one place
errors become exit codes."""

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
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import TextIO
from typing import TypeVar

import click

from dm.config.pooler import pooler_problem
from dm.core.errors import DmError
from dm.core.errors import Incomplete
from dm.core.errors import RevisionFailed
from dm.core.errors import TransientFailure
from dm.core.errors import describe_error
from dm.core.printable import printable
from dm.core.privileges import privilege_problem
from dm.core.transient import is_transient
from dm.core.version import __version__

if TYPE_CHECKING:
    from dm.config.settings import Settings

T = TypeVar("T")


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
    as_json: bool = False
    stdout: TextIO = dataclasses.field(default_factory=lambda: sys.stdout)
    """dm's own output; revision code's ``sys.stdout`` goes to the log instead."""
    stderr: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)

    def settings(self, **overrides: Any) -> Settings:
        """Resolve settings from options, environment, ini file and defaults."""
        from dm.config.settings import Settings

        return Settings.load(
            config_file=self.config_file,
            ini_section=self.section,
            database_url=self.database_url,
            **overrides,
        )  # Settings.load registers their secrets with dm.config.redaction

    def scrub(self, text: str) -> str:
        """Return ``text`` with every URL masked and every known secret removed."""
        from dm.config.redaction import scrub

        return scrub(text)


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
        from dm.config import log

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
        from dm.cli.args import hoist_global_options

        return super().parse_args(ctx, hoist_global_options(self, args))

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        from dm.cli.args import one_line

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
            from dm.cli.args import one_line

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
                _fail(ctx, str(problem), problem.exit_code, exc, told_as=problem)
            denied = privilege_problem(exc)  # the role lacks a grant: a configuration problem
            if denied is not None:
                _fail(ctx, str(denied), denied.exit_code, exc, told_as=denied)
            if is_transient(exc):  # e.g. the connection died between two revisions
                failure = TransientFailure(f"transient database failure: {describe_error(exc)}")
                message = f"{failure} (a retry may succeed)"
                _fail(ctx, message, failure.exit_code, exc, told_as=failure)
            message = (
                f"internal error: {describe_error(exc)}; this is a bug in dm, please report it "
                "with the output of --verbose"
            )
            _fail(ctx, message, 1, exc)
        except BaseException as exc:  # SystemExit or CancelledError from code dm ran
            _fail(ctx, f"unexpected {exc!r}", 1, exc)


def _fail(
    ctx: click.Context,
    message: str,
    code: int,
    exc: BaseException,
    *,
    told_as: DmError | None = None,
) -> None:
    """Report ``exc`` in one line and exit ``code``.

    :param told_as: the error of dm's that ``exc`` (a driver's, say) is told as: its kind
        names the failure in JSON output; the traceback stays ``exc``'s.
    """
    from dm.config.redaction import scrub as scrub_text

    invocation = ctx.find_object(Invocation)
    scrub = invocation.scrub if invocation is not None else scrub_text
    trace = None
    if invocation is not None and invocation.verbose:
        trace = scrub("".join(traceback.format_exception(exc)).rstrip())
    elif code == 1 and not isinstance(exc, DmError):
        message += " (run with --verbose for the traceback)"
    extra = {"revision": exc.revision} if isinstance(exc, RevisionFailed | Incomplete) else {}
    _report(invocation, scrub(message), code, _kind(told_as or exc), trace, **extra)
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
        from dm.config.log import json_line

        fields = {key: value for key, value in error.items() if key != "message"}
        level = "warning" if kind == "incomplete" else "error"  # a stop asked for, exit 5
        click.echo(json_line(level, "dm", message, traceback=trace, **fields), file=stderr)
        return
    if trace:
        click.echo(trace, file=stderr)
    # A stop that was asked for (time box, dm pause, dm cancel: exit 5) is no error.
    label = "stopped" if kind == "incomplete" else "error"
    click.echo(f"dm: {label}: {printable(message)}", file=stderr)


def current_invocation() -> Invocation | None:
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(Invocation) if ctx is not None else None


def write_line(message: str = "", *, err: bool = False) -> None:
    """Print on dm's own stdout (or stderr), which revision code cannot write to."""
    invocation = current_invocation()
    message = printable(message)  # stored reasons, pod names, run_by: no terminal escapes
    if invocation is None:
        click.echo(message, err=err)
    else:
        click.echo(message, file=invocation.stderr if err else invocation.stdout)


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
    from dm.backfill import progress
    from dm.config import log
    from dm.config.redaction import register
    from dm.config.urls import secrets_of

    if database_url:  # masked from here on, before any settings load
        register([database_url, *secrets_of(database_url)])
    ctx.obj = Invocation(config_file, section, database_url, verbose, log_format)
    log.configure(verbose=verbose, json_lines=log_format == "json")
    progress.use_bar(log_format == "text" and sys.stderr.isatty())
    if x_arguments or "dm.engine.alembic_context" in sys.modules:  # Alembic loads only when needed
        from dm.engine.alembic_context import set_x_arguments

        set_x_arguments(x_arguments)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    from dm.engine import loop_watchdog
    from dm.engine.signals import run_until_signal

    invocation = current_invocation()

    def report(message: str, code: int, kind: str) -> None:
        _report(invocation, message, code, kind)

    # What is loaded by now (click, SQLAlchemy, dm...) lives to the end of the command:
    # frozen, it is left out of the collector's full passes, which a batched run over
    # millions of rows triggers again and again (about half the client CPU of a 1M-row
    # dm.batched backfill, bench/batched.py). Unfrozen afterwards for an embedding process.
    gc.freeze()
    try:
        with loop_watchdog.installed(report):
            return run_until_signal(coro)
    finally:
        gc.unfreeze()


def emit_json(value: Any) -> None:
    write_line(json.dumps(_jsonable(value), indent=2, sort_keys=False))


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


if __name__ == "__main__":  # pragma: no cover
    main()
