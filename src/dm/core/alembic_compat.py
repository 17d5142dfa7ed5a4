"""The only module that touches Alembic's private API.

Alembic's own commands and pytest-alembic rely on these names, which have kept their
meaning since Alembic 0.7; they are checked when dm is imported so a future Alembic that
drops one fails at once with a clear message instead of in the middle of a run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alembic import context as alembic_context
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.runtime.migration import RevisionStep
from alembic.script import Script
from alembic.script import ScriptDirectory
from alembic.script.revision import Revision
from alembic.script.revision import RevisionMap
from alembic.util import warn

_REQUIRED = (
    (ScriptDirectory, "_load_revisions"),
    (ScriptDirectory, "_upgrade_revs"),
    (ScriptDirectory, "_catch_revision_errors"),
    (Revision, "_all_down_revisions"),
    (EnvironmentContext, "_install_proxy"),
    (EnvironmentContext, "_remove_proxy"),
    (Script, "_list_py_dir"),
    (Script, "_from_path"),
)
for _owner, _name in _REQUIRED:
    if not hasattr(_owner, _name):  # pragma: no cover - only with an unsupported Alembic
        raise ImportError(
            f"dm needs {_owner.__name__}.{_name}, which this Alembic version lacks; "
            "install a supported Alembic (see pyproject.toml)"
        )


def load_scripts(
    script_dir: ScriptDirectory, reuse: Mapping[str, Script] | None = None
) -> list[Script]:
    """Import every revision file of ``script_dir``, in directory order.

    :param reuse: scripts to take instead of importing their file, by the file's resolved
        path (``dm.core.graph_cache``); the walk is that of ``ScriptDirectory._load_revisions``.
    """
    if not reuse:
        return list(script_dir._load_revisions())
    scripts: list[Script] = []
    seen = set()
    real_dirs: dict[Path, Path] = {}
    for location in [p for p in script_dir._version_locations if p.exists()]:
        for path in Script._list_py_dir(script_dir, location):
            # path.resolve(), resolving each directory once
            if path.is_symlink():
                real_path = path.resolve()
            else:
                parent = real_dirs.get(path.parent)
                if parent is None:
                    parent = real_dirs[path.parent] = path.parent.resolve()
                real_path = parent / path.name
            if real_path in seen:
                warn(f"File {real_path} loaded twice! ignoring.")
                continue
            seen.add(real_path)
            script = reuse.get(str(real_path))
            if script is None:
                script = Script._from_path(script_dir, real_path)
            if script is not None:
                scripts.append(script)
    return scripts


def use_scripts(script_dir: ScriptDirectory, scripts: Sequence[Script]) -> None:
    """Make ``script_dir`` build its revision map from already-loaded ``scripts``."""
    loaded = tuple(scripts)
    script_dir.revision_map = RevisionMap(lambda: iter(loaded))


def upgrade_steps(
    script_dir: ScriptDirectory, target: str, heads: Iterable[str]
) -> list[RevisionStep]:
    """Return Alembic's upgrade steps from ``heads`` to ``target``, in execution order."""
    # Alembic annotates ``current_rev`` as a str; its commands pass a tuple of heads.
    return list(script_dir._upgrade_revs(target, tuple(heads)))  # type: ignore[arg-type]


def downgrade_steps(
    script_dir: ScriptDirectory, target: str | None, heads: Iterable[str]
) -> list[Script]:
    """Return the scripts to downgrade from ``heads`` to ``target``, in execution order.

    The walk of ``_downgrade_revs``, without its ``RevisionStep`` objects: those read
    ``module.downgrade`` at once and fail on a revision without one, before dm can
    refuse the plan naming it.
    """
    with script_dir._catch_revision_errors(
        ancestor="Destination %(end)s is not a valid downgrade target from current head(s)",
        end=target,
    ):
        return list(script_dir.iterate_revisions(tuple(heads), target, select_for_downgrade=True))


def all_down_revisions(revision: Revision) -> tuple[str, ...]:
    """Return the parents of ``revision``, ``depends_on`` included."""
    return tuple(revision._all_down_revisions)


def migrations_fn(context: MigrationContext) -> Any:
    """Return the plan function an ``alembic`` command handed to ``EnvironmentContext``."""
    return context._migrations_fn


def invoked_plan(context: MigrationContext) -> tuple[str | None, str | None]:
    """Return the verb (``upgrade``, ``downgrade``, else None) and target the caller invoked.

    Alembic's ``command.upgrade``/``command.downgrade`` (and pytest-alembic's runner) hand
    ``EnvironmentContext`` a plan function named after the verb and the raw target as
    ``destination_rev``; other commands (``current``, ``stamp``...) pass other functions.
    """
    name = getattr(context._migrations_fn, "__name__", None)
    verb = name if name in ("upgrade", "downgrade") else None
    target = context.opts.get("destination_rev")
    return verb, None if target is None else str(target)


def set_migration_context(context: EnvironmentContext, migration: MigrationContext) -> None:
    """Make ``migration`` what ``context.get_context()`` returns (``configure`` would make a
    new one)."""
    context._migration_context = migration


@contextlib.contextmanager
def environment_installed(context: EnvironmentContext) -> Iterator[None]:
    """Make ``context`` the one ``from alembic import context`` proxies inside the block.

    Unlike ``with context:``, an environment installed before (Alembic's own, under its
    command API) is reinstalled afterwards instead of being removed.
    """
    previous = getattr(alembic_context, "_proxy", None)
    context._install_proxy()
    try:
        yield
    finally:
        if isinstance(previous, EnvironmentContext):
            previous._install_proxy()
        else:
            context._remove_proxy()
