"""Verbs that write project files: init, revision, merge."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alembic.script.revision import RevisionError
from alembic.util import CommandError

from dm.core.errors import UsageError
from dm.core.graph import Graph
from dm.core.graph import check_new_revision_id
from dm.core.graph import display_path
from dm.verbs.inspect import RevisionInfo

if TYPE_CHECKING:
    from alembic.config import Config

    from dm.config.settings import Settings

log = logging.getLogger("dm.verbs.project")


@dataclass(frozen=True)
class InitResult:
    """Files written by ``init``."""

    config_file: str
    script_location: str
    appended_section: bool
    schema_section: str | None = None
    """The application's Alembic section found in the config file and wired for
    ``requires_schema`` (``dm.schema_alembic_section``), if any."""
    gitignore: str | None = None
    """The ``.gitignore`` written or extended to leave out the embedded database, if any."""


def revision(
    settings: Settings,
    message: str,
    *,
    head: str = "head",
    branch_label: str | None = None,
    depends_on: Sequence[str] = (),
    rev_id: str | None = None,
    splice: bool = False,
    allow_duplicate_slug: bool = False,
    sync: bool = False,
) -> RevisionInfo:
    """Create a revision file from the project's template.

    :param sync: write an Alembic-style revision instead (plain ``def upgrade()`` using
        ``op``), from dm's own template.
    :param allow_duplicate_slug: accept a message whose slug an existing revision has.
    :raises UsageError: the message's slug is unreadable, shorter than 3 letters or digits, a
        Python keyword, holds a path separator, or repeats an existing revision's slug.
    """
    from alembic import command as alembic_command

    from dm.core.slugs import check_message
    from dm.core.slugs import docstring_safe

    config = _quiet(settings.alembic_config())
    graph = Graph.from_config(config)  # refuse to add to a broken graph
    check_message(
        message,
        [rev.description for rev in graph.revisions],
        limit=graph.script_dir.truncate_slug_length,
        allow_duplicate=allow_duplicate_slug,
    )
    if rev_id is not None:
        parents = {head.partition("@")[0], *depends_on}
        check_new_revision_id(graph, rev_id, parents)
    with _remove_on_failure(graph):
        try:
            script = alembic_command.revision(
                config,
                message=docstring_safe(message),
                head=head,
                splice=splice,
                branch_label=branch_label,
                depends_on=list(depends_on) or None,  # type: ignore[arg-type]  # takes a list
                rev_id=rev_id,
            )
        except (CommandError, RevisionError) as exc:
            raise UsageError(f"cannot create revision: {' '.join(str(exc).split())}") from None
        if script is None or isinstance(script, list):  # pragma: no cover - autogenerate only
            raise UsageError("cannot create revision: Alembic returned no single script")
        _name_in_ascii(Path(script.path), message, graph.script_dir.truncate_slug_length)
        if sync:
            from dm.templates import render_sync_revision

            down = script.down_revision
            Path(script.path).write_text(
                render_sync_revision(
                    message=docstring_safe(message),
                    revision=script.revision,
                    down_revision=down if down is None or isinstance(down, str) else tuple(down),
                    branch_labels=branch_label,
                    depends_on=tuple(depends_on) or None,
                )
            )
        # the new file must load; the graph cache is refreshed
        loaded = Graph.from_config(_quiet(settings.alembic_config()), cached=True)
    if len(loaded.heads) > max(len(graph.heads), 1):
        log.warning(
            "revision %s makes a new head: the graph now has %d heads (%s); 'dm upgrade heads' "
            "runs every branch, in no set order, and 'dm upgrade head' refuses; join them "
            "with 'dm merge heads' if one needs the other",
            script.revision,
            len(loaded.heads),
            ", ".join(loaded.heads),
        )
    return RevisionInfo.of(loaded.revision(script.revision))


def _name_in_ascii(path: Path, message: str, limit: int) -> None:
    """Rename the file Alembic wrote when its slug holds letters outside ASCII: the file
    name gets the ASCII slug, the message (docstring, description) stays as written."""
    from dm.core.slugs import alembic_slug
    from dm.core.slugs import slugify

    theirs, ours = alembic_slug(message, limit), slugify(message, limit)
    if theirs != ours and path.name.endswith(f"{theirs}.py"):
        path.rename(path.with_name(path.name[: -len(f"{theirs}.py")] + f"{ours}.py"))


@contextlib.contextmanager
def _remove_on_failure(graph: Graph) -> Iterator[None]:
    """Delete any file written into the revision directories when the block raises."""
    directories = graph.version_dirs

    def files() -> set[Path]:
        return {p for d in directories if d.is_dir() for p in d.iterdir() if p.is_file()}

    before = files()
    try:
        yield
    except BaseException:
        for path in files() - before:
            path.unlink(missing_ok=True)
        raise


def merge(
    settings: Settings,
    revisions: Sequence[str],
    message: str | None = None,
    *,
    branch_label: str | None = None,
    rev_id: str | None = None,
) -> RevisionInfo:
    """Create a revision that merges ``revisions`` (default: every head).

    :param message: the merge's description; default ``merge <rev> and <rev>``.
    :raises UsageError: fewer than two distinct revisions to merge.
    """
    from alembic import command as alembic_command

    config = _quiet(settings.alembic_config())
    graph = Graph.from_config(config)
    targets = list(revisions) or ["heads"]
    parents = sorted({script.revision for target in targets for script in graph.resolve(target)})
    if len(parents) < 2:
        found = ", ".join(parents) or "none"
        raise UsageError(
            f"nothing to merge: {' '.join(targets)} names fewer than two revisions ({found}); "
            "a merge joins two or more heads"
        )
    if message is None or not message.strip():
        message = "merge " + " and ".join(parents)
    from dm.core.slugs import docstring_safe

    if rev_id is not None:
        check_new_revision_id(graph, rev_id, revisions)
    with _remove_on_failure(graph):
        try:
            script = alembic_command.merge(
                config,
                targets,
                message=docstring_safe(message),
                branch_label=branch_label,
                rev_id=rev_id,
            )
        except (CommandError, RevisionError) as exc:
            raise UsageError(f"cannot merge: {' '.join(str(exc).split())}") from None
        if script is None:
            raise UsageError("cannot merge: Alembic returned no script")
        # the new file must load; the graph cache is refreshed
        loaded = Graph.from_config(_quiet(settings.alembic_config()), cached=True)
    return RevisionInfo.of(loaded.revision(script.revision))


def init(directory: Path, *, section: str = "data_migrations") -> InitResult:
    """Create ``alembic.ini`` (or add dm's section to it) and ``data_migrations/``."""
    from dm.config.files import append_regular
    from dm.config.files import write_new
    from dm.templates import render_section
    from dm.templates import write_script_directory

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scripts = directory / "data_migrations"
    if (scripts / "env.py").exists():
        raise UsageError(f"{display_path(scripts)} already exists; refusing to overwrite it")
    config_file = directory / "alembic.ini"
    appended = os.path.lexists(config_file)
    schema_section = None
    if appended:
        if config_file.is_symlink() or not config_file.is_file():
            raise UsageError(
                f"{display_path(config_file)} is not a regular file (a symbolic link?); "
                "dm init does not write through it"
            )
        existing = config_file.read_text(encoding="utf-8")
        if f"[{section}]" in existing:
            raise UsageError(f"{display_path(config_file)} already has a [{section}] section")
        schema_section = _alembic_section_of(existing)
    section_text = render_section(section, schema_section=schema_section)
    write_script_directory(scripts)
    if appended:
        separator = (
            "" if existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
        )
        append_regular(config_file, separator + section_text)
    else:
        write_new(config_file, section_text)
    gitignore = _ignore_embedded_database(directory)
    return InitResult(
        display_path(config_file), display_path(scripts), appended, schema_section, gitignore
    )


_EMBEDDED_DATABASE_PATTERN = "/dm.sqlite3*"


def _ignore_embedded_database(directory: Path) -> str | None:
    """Add the embedded SQLite database (and its lock and journal files) to
    ``directory/.gitignore``; return its path, or None when it already lists them."""
    path = directory / ".gitignore"
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if _EMBEDDED_DATABASE_PATTERN in existing.splitlines():
        return None
    entry = f"# dm's embedded database (dm init)\n{_EMBEDDED_DATABASE_PATTERN}\n"
    if path.exists() or path.is_symlink():
        separator = "\n" if existing and not existing.endswith("\n") else ""
        from dm.config.files import append_regular

        append_regular(path, separator + entry)  # never through a link (dm.config.files)
    else:
        from dm.config.files import write_new

        write_new(path, entry)
    return display_path(path)


def _alembic_section_of(text: str) -> str | None:
    """Return ``alembic`` when ``text`` (an existing config file) has an ``[alembic]``
    section with a ``script_location``: the application's schema migrations."""
    import configparser

    parser = configparser.RawConfigParser()
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    if parser.has_option("alembic", "script_location"):
        return "alembic"
    return None


def _quiet(config: Config) -> Config:
    import argparse

    config.cmd_opts = argparse.Namespace(quiet=True, x=None)
    return config
