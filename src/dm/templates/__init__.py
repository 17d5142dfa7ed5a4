"""dm's project template: the ini section, ``env.py`` and the revision template."""

from __future__ import annotations

import os
from pathlib import Path

from mako.template import Template

from dm.core.errors import UsageError

TEMPLATE_DIR = Path(__file__).parent / "dm"


def render_section(section: str, *, schema_section: str | None = None) -> str:
    """Return dm's ``alembic.ini`` section named ``section``.

    :param schema_section: the application's Alembic section in the same file, wired for
        ``requires_schema`` (else the setting is written commented out).
    """
    text = Template(filename=str(TEMPLATE_DIR / "alembic.ini.mako")).render(
        section=section, schema_section=schema_section
    )
    return str(text)


def render_sync_revision(
    *,
    message: str,
    revision: str,
    down_revision: str | tuple[str, ...] | None,
    branch_labels: str | None,
    depends_on: tuple[str, ...] | None,
) -> str:
    """Return the text of an Alembic-style revision (sync hooks using ``op``)."""
    from datetime import datetime

    parents = (down_revision,) if isinstance(down_revision, str) else down_revision or ()
    text = Template(filename=str(TEMPLATE_DIR / "script_sync.py.mako")).render(
        message=message,
        up_revision=revision,
        down_revision=down_revision,
        revises=", ".join(parents),
        branch_labels=branch_labels,
        depends_on=depends_on,
        create_date=datetime.now(),
    )
    return str(text)


SCRIPT_FILES = ("env.py", "script.py.mako", "README")


def write_script_directory(directory: Path) -> None:
    """Create ``directory`` with ``env.py``, ``script.py.mako``, ``README`` and ``versions/``.

    :raises UsageError: one of the files is already there (a file or a symlink): nothing
        is overwritten, and nothing is written through a link.
    """
    from dm.config.files import write_new

    for name in SCRIPT_FILES:
        if os.path.lexists(directory / name):
            raise UsageError(f"{directory / name} already exists; refusing to overwrite it")
    (directory / "versions").mkdir(parents=True, exist_ok=True)
    for name in SCRIPT_FILES:
        write_new(directory / name, (TEMPLATE_DIR / name).read_text(encoding="utf-8"))
