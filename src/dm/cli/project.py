"""``dm init``, ``revision``, ``merge``."""

from __future__ import annotations

from pathlib import Path

import click

from dm.cli.app import Invocation
from dm.cli.app import emit_json
from dm.cli.app import json_option
from dm.cli.app import main
from dm.cli.app import pass_invocation
from dm.cli.app import write_line


@main.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=".")
@pass_invocation
def init(invocation: Invocation, directory: Path) -> None:
    """Create a dm project: alembic.ini (or dm's section in it) and data_migrations/."""
    import shlex

    from dm import verbs

    result = verbs.init(directory, section=invocation.section or "data_migrations")
    verb = "added a section to" if result.appended_section else "wrote"
    write_line(f"{verb} {result.config_file}; created {result.script_location}/")
    if result.gitignore:
        write_line(f"ignored the embedded database dm.sqlite3 in {result.gitignore}")
    if result.schema_section:
        write_line(
            f"wired the application's Alembic schema migrations ([{result.schema_section}]): "
            "a revision may declare requires_schema = ('<schema revision id>',)"
        )
    enter = "" if directory.resolve() == Path.cwd() else f"cd {shlex.quote(str(directory))}, "
    write_line(f"next: {enter}dm revision -m 'describe the change', then dm upgrade heads")


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
    from dm import verbs

    info = verbs.revision(
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
        emit_json(info)
    else:
        write_line(f"created {info.revision}: {info.path}")


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
    from dm import verbs

    info = verbs.merge(
        invocation.settings(), revisions, message, branch_label=branch_label, rev_id=rev_id
    )
    if as_json:
        emit_json(info)
    else:
        write_line(f"created merge {info.revision}: {info.path}")
