"""Schema prerequisites: a revision declaring ``requires_schema`` runs only once the
application's own Alembic schema migrations (a real Alembic project made here, in the same
database) have reached that revision; before, ``upgrade``, ``--dry-run``, ``run`` and
``check`` refuse it in one line and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from alembic import command as alembic_command
from alembic.config import Config

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok
from conftest import status_of
from dm import verbs

S1 = "5c1a0e2f9b01"
S2 = "ae1027a6acf2"

_ENV = """\
import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine


def _migrate(connection):
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _main():
    engine = create_async_engine(context.config.get_main_option("sqlalchemy.url"))
    async with engine.connect() as connection:
        await connection.run_sync(_migrate)
        await connection.commit()
    await engine.dispose()


asyncio.run(_main())
"""

_S1 = f'''\
"""create items"""
import sqlalchemy as sa
from alembic import op

revision = {S1!r}
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
    )


def downgrade():
    op.drop_table("items")
'''

_S2 = f'''\
"""add items.label"""
import sqlalchemy as sa
from alembic import op

revision = {S2!r}
down_revision = {S1!r}
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("items", sa.Column("label", sa.String(50)))


def downgrade():
    op.drop_column("items", "label")
'''


def add_schema_project(project: Project) -> Config:
    """Add the application's Alembic schema migrations to the project's ``alembic.ini``
    (section ``[alembic]``, two revisions: create ``items``, add ``items.label``)."""
    root = project.root / "schema"
    (root / "versions").mkdir(parents=True)
    (root / "env.py").write_text(_ENV)
    (root / "versions" / f"{S1}_create_items.py").write_text(_S1)
    (root / "versions" / f"{S2}_add_items_label.py").write_text(_S2)
    section = (
        f"\n[alembic]\nscript_location = %(here)s/schema\nsqlalchemy.url = {project.db.async_url}\n"
    )
    project.config.write_text(project.config.read_text() + section)
    return Config(str(project.config), ini_section="alembic")


def write_revisions(project: Project, requires: str = f"({S2!r},)") -> None:
    """d0 needs nothing; d1 (after it) fills ``items.label`` and needs the schema's S2."""
    project.write("d0000001", None, "pass")
    project.write(
        "d0000002",
        "d0000001",
        "await session.execute(sa.text('UPDATE items SET label = upper(name)'))",
        doc="Fill item labels",
        extra=f"requires_schema = {requires}\n",
    )


def refusal(before: str) -> str:
    return (
        f"revision d0000002 needs the application's schema revision {S2} (database is at "
        f"{before}); run the application's `alembic upgrade` first (nothing was run)"
    )


def nothing_ran(project: Project) -> None:
    assert {rev: row["state"] for rev, row in status_of(project).items()} == {
        "d0000001": "not_run",
        "d0000002": "not_run",
    }


def test_refused_before_the_schema_revision_and_run_after(project: Project) -> None:
    schema = add_schema_project(project)
    write_revisions(project)

    for args in (["upgrade"], ["upgrade", "--dry-run"], ["upgrade", "d0000002"]):
        result = invoke(project, *args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        assert result.stderr.strip() == "dm: error: " + refusal("no schema revision")
    nothing_ran(project)

    checked = invoke(project, "check")
    assert checked.exit_code == 4
    assert "pending: d0000001, d0000002" in checked.stdout
    assert f"needs schema: {refusal('no schema revision').split(';')[0]}" in checked.stdout

    alembic_command.upgrade(schema, S1)  # the table exists, the column not yet
    project.db.query("INSERT INTO items (id, name) VALUES (1, 'a'), (2, 'b')")
    result = invoke(project, "--log-format", "json", "upgrade", "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)["error"]
    assert error["kind"] == "schema_not_ready"
    assert error["message"] == refusal(S1)
    nothing_ran(project)

    alembic_command.upgrade(schema, "head")
    checked = invoke(project, "check", "--json")
    assert checked.exit_code == 4
    assert json.loads(checked.stdout)["needs_schema"] == []
    assert "upgrade d0000002" in ok(invoke(project, "upgrade", "--dry-run")).stdout
    ok(invoke(project, "upgrade"))
    rows = project.db.query("SELECT id, label FROM items ORDER BY id")
    assert [(r.id, r.label) for r in rows] == [(1, "A"), (2, "B")]
    assert as_json(invoke(project, "check", "--json"))["ok"] is True


def test_run_refuses_it_too(project: Project) -> None:
    schema = add_schema_project(project)
    write_revisions(project)
    ok(invoke(project, "upgrade", "d0000001"))  # needs nothing: runs

    result = invoke(project, "run", "d0000002")
    assert result.exit_code == 2
    assert refusal("no schema revision") in result.stderr

    alembic_command.upgrade(schema, "head")
    ok(invoke(project, "run", "d0000002"))
    assert status_of(project)["d0000002"]["state"] == "applied"


def test_a_later_schema_revision_counts(project: Project) -> None:
    """The requirement is met by the required revision or any descendant of it."""
    schema = add_schema_project(project)
    write_revisions(project, requires=repr(S1))  # a str is one revision
    alembic_command.upgrade(schema, "head")  # the version table holds S2 only
    ok(invoke(project, "upgrade"))


def test_custom_version_table(project: Project) -> None:
    """``DM_SCHEMA_VERSION_TABLE`` names the application's version table; a missing table
    counts as no schema revision."""
    schema = add_schema_project(project)
    write_revisions(project)
    alembic_command.upgrade(schema, "head")

    result = invoke(project, "upgrade", DM_SCHEMA_VERSION_TABLE="app_versions")
    assert result.exit_code == 2
    assert "database is at no schema revision" in result.stderr

    project.db.query("CREATE TABLE app_versions (version_num VARCHAR(32) NOT NULL)")
    project.db.query(f"INSERT INTO app_versions VALUES ('{S2}')")
    ok(invoke(project, "upgrade", DM_SCHEMA_VERSION_TABLE="app_versions"))


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_unknown_schema_revision_is_a_bad_revision_file(project: Project) -> None:
    add_schema_project(project)
    write_revisions(project, requires="('feedface0000',)")

    for args in (["upgrade"], ["check"], ["upgrade", "--dry-run"]):
        result = invoke(project, *args)
        assert result.exit_code == 2, args
        assert result.stderr.startswith("dm: error: ")
        assert "d0000002_d0000002.py: requires_schema 'feedface0000' names no revision" in (
            result.stderr
        )
    assert not (project.root / "dm.sqlite3").exists()


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("value", ["5", "()", "('',)", "(' ae10',)"])
def test_malformed_requires_schema_is_refused(project: Project, value: str) -> None:
    write_revisions(project, requires=value)
    result = invoke(project, "history")
    assert result.exit_code == 2
    assert "d0000002_d0000002.py: requires_schema must be an Alembic schema revision id" in (
        result.stderr
    )


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_no_alembic_section_names_the_settings(project: Project) -> None:
    write_revisions(project)
    result = invoke(project, "upgrade")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "no [alembic] section for the application's Alembic schema migrations" in line
    assert "d0000002_d0000002.py declares requires_schema" in line
    assert "DM_SCHEMA_ALEMBIC_SECTION" in line and "DM_SCHEMA_CONFIG" in line
    # Commands that do not plan an upgrade do not read the application's migrations.
    ok(invoke(project, "history"))


def test_init_wires_an_existing_alembic_section(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "alembic.ini").write_text("[alembic]\nscript_location = %(here)s/schema\n")
    result = verbs.init(app)
    assert result.schema_section == "alembic"
    text = (app / "alembic.ini").read_text()
    assert "\ndm.schema_alembic_section = alembic\n" in text

    fresh = verbs.init(tmp_path / "fresh")
    assert fresh.schema_section is None
    assert (
        "# dm.schema_alembic_section = alembic" in (tmp_path / "fresh" / "alembic.ini").read_text()
    )


def test_schema_settings_are_checked() -> None:
    from dm.config.settings import Settings
    from dm.core.errors import ConfigError

    with pytest.raises(ConfigError, match="setting DM_SCHEMA_VERSION_TABLE"):
        Settings.load(schema_version_table="bad-name")
    with pytest.raises(ConfigError, match="setting DM_LOCK_RETRIES"):
        Settings.load(lock_retries=-1)


def test_downgrade_and_skipped_revisions_need_nothing(project: Project) -> None:
    """Only upgrades that run are checked: a downgrade after the schema went back, and a
    revision the environment guard skips, are not refused."""
    schema = add_schema_project(project)
    write_revisions(project)
    alembic_command.upgrade(schema, "head")
    ok(invoke(project, "upgrade"))
    alembic_command.downgrade(schema, "base")  # the version table is empty again
    ok(invoke(project, "downgrade", "base"))

    path = project.versions / "d0000002_d0000002.py"
    path.write_text(
        path.read_text().replace("requires_schema", "environments = ('dev',)\n" + "requires_schema")
    )
    result = ok(invoke(project, "upgrade"))
    assert status_of(project)["d0000002"]["state"] == "skipped", result.stderr


def test_alembic_command_api_refuses_it_too(project: Project) -> None:
    """``alembic -n data_migrations upgrade`` plans as ``dm upgrade`` does: refused whole until
    the application's schema revision is in the database, then run."""
    schema = add_schema_project(project)
    write_revisions(project)
    data = Config(str(project.config), ini_section="data_migrations")
    data.set_main_option("sqlalchemy.url", project.db.async_url)

    with pytest.raises(Exception, match="needs the application's schema revision"):
        alembic_command.upgrade(data, "heads")
    nothing_ran(project)

    alembic_command.upgrade(schema, "head")
    alembic_command.upgrade(data, "heads")
    assert status_of(project)["d0000002"]["state"] == "applied"
