"""Alembic's environment around Alembic-style hooks: ``from alembic import context`` works in
revision code under ``dm`` and under Alembic's command API (``is_offline_mode()``,
``context.config``, ``get_x_argument()``, ``op.get_context().config`` and
``get_current_revision()`` answered from dm's tracker)."""

from __future__ import annotations

import argparse
import json
import textwrap

import pytest
from alembic import command
from alembic.config import Config

from conftest import Project
from conftest import invoke
from conftest import ok
from conftest import run_in_process

# Writes what the environment answers into a table, one row per revision.
PROBE = '''"""Probe {rev}"""
import json

import sqlalchemy as sa
from alembic import context
from alembic import op

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade():
    if {create!r}:
        op.create_table(
            "seen", sa.Column("rev", sa.String(20)), sa.Column("what", sa.Text)
        )
    what = {{
        "offline": context.is_offline_mode(),
        "script_location": context.config.get_main_option("script_location"),
        "same_config": op.get_context().config is context.config,
        "x": context.get_x_argument(as_dictionary=True),
        "current": op.get_context().get_current_revision(),
    }}
    op.get_bind().execute(
        sa.text("INSERT INTO seen (rev, what) VALUES (:rev, :what)"),
        {{"rev": revision, "what": json.dumps(what)}},
    )


def downgrade():
    pass
'''


def probes(project: Project) -> None:
    for rev, down in (("a1", None), ("b2", "a1")):
        text = PROBE.format(rev=rev, down=down, create=down is None)
        (project.versions / f"{rev}_{rev}.py").write_text(textwrap.dedent(text))


def seen(project: Project) -> dict[str, dict[str, object]]:
    rows = project.db.query("SELECT rev, what FROM seen ORDER BY rev")
    return {row.rev: json.loads(row.what) for row in rows}


def expected(project: Project, x: dict[str, str]) -> dict[str, dict[str, object]]:
    def one(current: str | None) -> dict[str, object]:
        return {
            "offline": False,
            "script_location": str(project.root / "data_migrations"),
            "same_config": True,
            "x": x,
            "current": current,
        }

    return {"a1": one(None), "b2": one("a1")}


def test_dm_upgrade_establishes_alembic_environment_with_x_arguments(project: Project) -> None:
    probes(project)
    ran = run_in_process(project, "-x", "tenant=acme", "-x", "dry=1", "upgrade", "heads")
    assert ran.returncode == 0, ran.stderr
    assert seen(project) == expected(project, {"tenant": "acme", "dry": "1"})


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_dm_without_x_gives_no_x_arguments(project: Project) -> None:
    probes(project)
    ok_run = run_in_process(project, "upgrade", "heads")
    assert ok_run.returncode == 0, ok_run.stderr
    assert {rev: what["x"] for rev, what in seen(project).items()} == {"a1": {}, "b2": {}}


def test_alembic_command_api_establishes_the_callers_config(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes(project)
    cfg = Config(str(project.config), ini_section="data_migrations")
    cfg.cmd_opts = argparse.Namespace(x=["tenant=acme"])  # as `alembic -x tenant=acme` sets it
    monkeypatch.setenv("DM_DATABASE_URL", project.db.url)
    command.upgrade(cfg, "heads")
    assert seen(project) == expected(project, {"tenant": "acme"})
    command.downgrade(cfg, "base")  # Alembic's own environment is still in place afterwards


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_help_lists_x(project: Project) -> None:
    assert "-x KEY=VALUE" in ok(invoke(project, "--help")).stdout
