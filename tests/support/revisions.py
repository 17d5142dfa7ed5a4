"""Helpers that write revision files and read what they did: the revision-file cases the
graph must refuse, a graph from a few revisions, and revisions that log their runs to a
table."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import Result

from conftest import Project
from conftest import invoke
from conftest import ok
from dm import verbs
from dm.config.settings import Settings
from dm.core.graph import Graph


@dataclass(frozen=True)
class BadFiles:
    """Revision files that break the revision contract, and what the error must name."""

    id: str
    files: dict[str, str]
    expected: tuple[str, ...]


def _source(rev: str, down: str | None, body: str = "", *, depends_on: str | None = None) -> str:
    head = f"revision = {rev!r}\ndown_revision = {down!r}\ndepends_on = {depends_on!r}\n"
    return head + textwrap.dedent(body)


_ASYNC_UPGRADE = "async def upgrade(session):\n    pass\n"

# Each case is added to a project that already holds the valid revision ``base0001``.
BAD_REVISION_FILES = [
    BadFiles(
        "no-down-revision",
        {"no_down.py": "revision = 'bad10001'\n" + _ASYNC_UPGRADE},
        ("no_down.py: no down_revision at module level", "down_revision = None"),
    ),
    BadFiles(
        "no-revision",
        {"no_rev.py": "down_revision = 'base0001'\n" + _ASYNC_UPGRADE},
        ("no_rev.py: no revision at module level",),
    ),
    BadFiles(
        "down-revision-not-an-id",
        {"int_down.py": "revision = 'bad10001'\ndown_revision = 5\n" + _ASYNC_UPGRADE},
        ("int_down.py", "down_revision must be None, a revision id or a tuple of them, not 5"),
    ),
    BadFiles(
        "depends-on-not-an-id",
        {
            "int_dep.py": "revision = 'bad10001'\ndown_revision = 'base0001'\ndepends_on = 7\n"
            + _ASYNC_UPGRADE
        },
        ("int_dep.py", "depends_on must be None"),
    ),
    BadFiles(
        "syntax-error",
        {"bad_syntax.py": _source("bad10001", "base0001", "async def upgrade(session)\n  pass\n")},
        ("bad_syntax.py:4", "syntax error"),
    ),
    BadFiles(
        "missing-upgrade",
        {"no_upgrade.py": _source("bad10001", "base0001", "async def downgrade(s):\n  pass\n")},
        ("no_upgrade.py", "missing 'async def upgrade(session)'"),
    ),
    BadFiles(
        "sync-upgrade-two-args",
        {"sync_up.py": _source("bad10001", "base0001", "def upgrade(session, x):\n    pass\n")},
        ("sync_up.py", "upgrade() must be 'async def upgrade(session)'", "takes 2 arguments"),
    ),
    BadFiles(
        "sync-downgrade",
        {
            "sync_down.py": _source(
                "bad10001", "base0001", _ASYNC_UPGRADE + "async def downgrade(a, b):\n    pass\n"
            )
        },
        ("sync_down.py", "downgrade() must be 'async def downgrade(session)'", "takes 2"),
    ),
    BadFiles(
        "sync-verify",
        {"sync_verify.py": _source("bad10001", "base0001", _ASYNC_UPGRADE + "verify = 3\n")},
        ("sync_verify.py", "verify() must be", "'def verify()' using op", "not int"),
    ),
    BadFiles(
        "import-error",
        {
            "imports.py": "import dm_no_such_module_xyz\n"
            + _source("bad10001", "base0001", _ASYNC_UPGRADE)
        },
        ("imports.py:1", "cannot import", "ModuleNotFoundError", "dm_no_such_module_xyz"),
    ),
    BadFiles(
        "duplicate-id",
        {
            "dup_one.py": _source("dup00001", "base0001", _ASYNC_UPGRADE),
            "dup_two.py": _source("dup00001", "base0001", _ASYNC_UPGRADE),
        },
        ("duplicate revision id 'dup00001'", "dup_one.py", "dup_two.py"),
    ),
    BadFiles(
        "unknown-down-revision",
        {"orphan.py": _source("bad10001", "nowhere1", _ASYNC_UPGRADE)},
        ("orphan.py", "down_revision 'nowhere1' names no revision file"),
    ),
    BadFiles(
        "unknown-depends-on",
        {"depends.py": _source("bad10001", "base0001", _ASYNC_UPGRADE, depends_on="nothing1")},
        ("depends.py", "depends_on 'nothing1' names no revision or branch label"),
    ),
    BadFiles(
        "cycle",
        {
            "cycle_one.py": _source("cyc00001", "cyc00002", _ASYNC_UPGRADE),
            "cycle_two.py": _source("cyc00002", "cyc00001", _ASYNC_UPGRADE),
        },
        ("Cycle is detected", "cyc00001", "cyc00002"),
    ),
    BadFiles(
        "bad-timeout",
        {"timeout.py": _source("bad10001", "base0001", "timeout = -3\n" + _ASYNC_UPGRADE)},
        ("timeout.py", "timeout must be a number of seconds above 0"),
    ),
    BadFiles(
        "max-runtime-transactional",
        {"boxed.py": _source("bad10001", "base0001", "max_runtime = 60\n" + _ASYNC_UPGRADE)},
        ("boxed.py", "max_runtime needs transactional = False", "cannot stop midway"),
    ),
    BadFiles(
        "bad-max-runtime",
        {
            "boxed.py": _source(
                "bad10001",
                "base0001",
                "transactional = False\nmax_runtime = '1h'\n" + _ASYNC_UPGRADE,
            )
        },
        ("boxed.py", "max_runtime must be a number of seconds above 0"),
    ),
    BadFiles(
        "bad-blocks-deploy",
        {"gate.py": _source("bad10001", "base0001", "blocks_deploy = 'no'\n" + _ASYNC_UPGRADE)},
        ("gate.py", "blocks_deploy must be True or False"),
    ),
]


def write_bad_files(project: Project, case: BadFiles) -> None:
    """Add the valid base revision and ``case``'s files to ``project``."""
    project.write("base0001", None)
    for name, text in case.files.items():
        (project.versions / name).write_text(text)


def graph_of(tmp_path: Path, revisions: dict[str, tuple[str | None, str]]) -> Graph:
    """Make a project in ``tmp_path`` with ``revisions`` ({rev: (down, extra)}); load it."""
    verbs.init(tmp_path)
    for rev, (down, extra) in revisions.items():
        body = f"""
            revision = {rev!r}
            down_revision = {down!r}
            {extra}
            async def upgrade(session):
                pass
        """
        (tmp_path / "data_migrations" / "versions" / f"{rev}.py").write_text(textwrap.dedent(body))
    settings = Settings.load(config_file=tmp_path / "alembic.ini")
    return Graph.from_config(settings.alembic_config())


GUARDED = 'environments = ("development",)'


LOG_TABLE = "log_entries"


def insert_log(rev: str) -> str:
    return f"await session.execute(sa.text(\"INSERT INTO {LOG_TABLE} (rev) VALUES ('{rev}')\"))"


def delete_log(rev: str) -> str:
    return f"await session.execute(sa.text(\"DELETE FROM {LOG_TABLE} WHERE rev = '{rev}'\"))"


def logged_rev(
    project: Project,
    rev: str,
    down: str | tuple[str, ...] | None,
    *,
    reversible: bool = True,
    fail: str | None = None,
    **kw: Any,
) -> Path:
    """Write ``rev``: upgrade logs it (then raises ``fail``), downgrade unlogs it."""
    upgrade = insert_log(rev)
    if fail is not None:
        upgrade += f"\nraise RuntimeError({fail!r})"
    return project.write(
        rev, down, upgrade, downgrade=delete_log(rev) if reversible else None, **kw
    )


def make_log(project: Project) -> None:
    project.db.query(f"CREATE TABLE {LOG_TABLE} (rev VARCHAR(64) NOT NULL)")


def logged(project: Project) -> list[str]:
    return sorted(row.rev for row in project.db.query(f"SELECT rev FROM {LOG_TABLE}"))


def rows(project: Project) -> list[tuple[str, str, str, int]]:
    """Every tracker row as (revision, direction, status, attempt), oldest first."""
    return [(r.revision, r.direction, r.status, r.attempt) for r in project.db.tracker()]


def error_line(result: Result, code: int = 2) -> str:
    """Assert ``result`` failed with ``code`` and one ``dm: error:`` line; return it."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dm: error: ")
    return lines[0]


def current_lines(project: Project) -> list[str]:
    return ok(invoke(project, "current")).stdout.splitlines()


# -- a straight chain up and down -----------------------------------------------------------
