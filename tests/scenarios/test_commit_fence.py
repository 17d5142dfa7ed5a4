"""No commit escapes the fence: every way a run's work connection commits is checked.

Each revision below inserts a ledger row, then another run takes the fence away (the
revision's code updates the meta row from a connection of its own, as a run that took
the lock over does), then commits in one of the ways revision code, ``dm.batched``, an
autocommit block or dm itself commit. The run must exit 3 with the ledger row not
committed, and the next run must apply the revision exactly once.

The second half: a raw ``COMMIT`` statement that the fence lets through (the run still
holds the lock) commits the work before it and goes on in a new transaction, as the
Alembic idiom before ``ALTER TYPE ... ADD VALUE`` expects.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import Project
from conftest import invoke
from conftest import ok

POSTGRES_ONLY = pytest.mark.parametrize(
    "db", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)

REV = "c0ffee000001"

HEADER = '''"""Fence test revision."""
import sqlalchemy as sa
from pathlib import Path

revision = {rev!r}
down_revision = None
branch_labels = None
depends_on = None
transactional = {transactional}

STOLEN = {stolen!r}
DSN = {dsn!r}
INSERT = "INSERT INTO ledger (note) VALUES ('done')"
'''

ASYNC_STEAL = '''
async def steal():
    """Take the fence, as a run that took the lock over does (once: the rerun keeps it)."""
    import asyncpg

    if Path(STOLEN).exists():
        return
    # Noted first: once the fence is taken, the run may cancel this task (another worker
    # met the loss) before it gets here again.
    Path(STOLEN).touch()
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(
            "UPDATE script_run_tracker_meta SET value = 'another-run' WHERE key = 'fence'"
        )
    finally:
        await conn.close()
'''

SYNC_STEAL = '''
from alembic import op

def steal():
    """Take the fence from a connection of its own (once: the rerun keeps it)."""
    import psycopg

    if Path(STOLEN).exists():
        return
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(
            "UPDATE script_run_tracker_meta SET value = 'another-run' WHERE key = 'fence'"
        )
    Path(STOLEN).touch()
'''

# commit path: (transactional, steal helper, the hooks)
COMMIT_PATHS = {
    "final status of a transactional revision": (
        True,
        ASYNC_STEAL,
        """
        async def upgrade(session):
            await session.execute(sa.text(INSERT))
            await steal()
        """,
    ),
    "final commit of a transactional = False revision": (
        False,
        ASYNC_STEAL,
        """
        async def upgrade(session):
            await session.execute(sa.text(INSERT))
            await steal()
        """,
    ),
    "session.commit() in revision code": (
        False,
        ASYNC_STEAL,
        """
        async def upgrade(session):
            await session.execute(sa.text(INSERT))
            await steal()
            await session.commit()
        """,
    ),
    "a batch's checkpoint commit": (
        False,
        ASYNC_STEAL,
        """
        from dm import batched

        async def upgrade(session):
            items = sa.table("items", sa.column("id"))
            async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=2):
                if batch.upper == 4:  # the second batch: the first one's commit stays
                    await session.execute(sa.text(INSERT))
                    await steal()
        """,
    ),
    "a parallel worker's batch commit (workers=2)": (
        False,
        ASYNC_STEAL,
        """
        from dm import batched

        async def upgrade(session):
            items = sa.table("items", sa.column("id"))
            query = sa.select(items.c.id)
            async for batch in batched(session, query, key=items.c.id, size=2, workers=2):
                if (batch.lower or 0) < 4 <= batch.upper:  # the one batch holding key 4
                    await session.execute(sa.text(INSERT))
                    await steal()
        """,
    ),
    "the commit that opens dm.autocommit": (
        True,
        ASYNC_STEAL,
        """
        from dm import autocommit

        async def upgrade(session):
            await session.execute(sa.text(INSERT))
            await steal()
            async with autocommit(session):
                pass
        """,
    ),
    "a statement inside dm.autocommit": (
        True,
        ASYNC_STEAL,
        """
        from dm import autocommit

        async def upgrade(session):
            async with autocommit(session):
                await steal()
                await session.execute(sa.text(INSERT))
        """,
    ),
    "the commit that opens op's autocommit_block()": (
        True,
        SYNC_STEAL,
        """
        def upgrade():
            op.execute(INSERT)
            steal()
            with op.get_context().autocommit_block():
                pass
        """,
    ),
    "op.execute('COMMIT')": (
        True,
        SYNC_STEAL,
        """
        def upgrade():
            op.execute(INSERT)
            steal()
            op.execute("COMMIT")
        """,
    ),
    "session.execute(text('COMMIT'))": (
        False,
        ASYNC_STEAL,
        """
        async def upgrade(session):
            await session.execute(sa.text(INSERT))
            await steal()
            await session.execute(sa.text("commit;"))
        """,
    ),
    "op.get_bind().commit() in a transactional revision": (
        True,
        SYNC_STEAL,
        """
        def upgrade():
            op.execute(INSERT)
            steal()
            op.get_bind().commit()
        """,
    ),
    "op.get_bind().commit() in a transactional = False revision": (
        False,
        SYNC_STEAL,
        """
        def upgrade():
            op.execute(INSERT)
            steal()
            op.get_bind().commit()
        """,
    ),
}


def write_revision(
    project: Project, tmp_path: Path, body: str, *, transactional: bool, helpers: str = ""
) -> None:
    header = HEADER.format(
        rev=REV,
        transactional=transactional,
        stolen=str(tmp_path / "stolen"),
        dsn=project.db.sync_url,  # a plain libpq URL, whatever the driver
    )
    text = header + textwrap.dedent(helpers) + "\n" + textwrap.dedent(body)
    (project.versions / f"{REV}_fence.py").write_text(text)


def make_tables(project: Project) -> None:
    project.db.query("CREATE TABLE ledger (id SERIAL PRIMARY KEY, note TEXT NOT NULL)")
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY)")
    project.db.query("INSERT INTO items SELECT g FROM generate_series(1, 6) AS g")


def ledger(project: Project) -> int:
    return int(project.db.query("SELECT count(*) AS n FROM ledger")[0].n)


def statuses(project: Project) -> list[str]:
    return [row.status for row in project.db.tracker() if row.revision == REV]


@POSTGRES_ONLY
@pytest.mark.parametrize("path", list(COMMIT_PATHS))
def test_no_commit_escapes_the_fence(project: Project, tmp_path: Path, path: str) -> None:
    transactional, helpers, body = COMMIT_PATHS[path]
    make_tables(project)
    write_revision(project, tmp_path, body, transactional=transactional, helpers=helpers)

    lost = invoke(project, "upgrade", "heads")

    assert lost.exit_code == 3, (lost.stdout, lost.stderr)
    assert "lost the migration lock" in lost.stderr
    assert "Traceback" not in lost.stderr
    assert ledger(project) == 0  # the row inserted before the fence was lost: not committed
    assert "success" not in statuses(project)

    ok(invoke(project, "upgrade", "heads"))  # the next run takes the fence back
    assert ledger(project) == 1  # exactly once
    assert statuses(project)[-1] == "success"


@pytest.mark.parametrize("style", ["session", "op", "op.get_bind().commit()"])
def test_a_commit_statement_passes_the_fence_and_the_revision_goes_on(
    project: Project, tmp_path: Path, style: str
) -> None:
    project.db.query("CREATE TABLE ledger (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
    if style == "session":
        body = """
        async def upgrade(session):
            await session.execute(sa.text("INSERT INTO ledger VALUES (1, 'before')"))
            await session.execute(sa.text("COMMIT"))
            await session.execute(sa.text("INSERT INTO ledger VALUES (2, 'after')"))
        """
        helpers = ""
    else:
        commit = 'op.execute("COMMIT")' if style == "op" else style
        body = f"""
        def upgrade():
            op.execute("INSERT INTO ledger VALUES (1, 'before')")
            {commit}
            op.execute("INSERT INTO ledger VALUES (2, 'after')")
        """
        helpers = "from alembic import op\n"
    write_revision(project, tmp_path, body, transactional=True, helpers=helpers)

    result = ok(invoke(project, "upgrade", "heads"))

    assert "not atomic" in result.stderr
    notes = project.db.query("SELECT note FROM ledger ORDER BY id")
    assert [row.note for row in notes] == ["before", "after"]
    assert statuses(project) == ["success"]


def test_work_after_a_commit_statement_rolls_back_on_failure(
    project: Project, tmp_path: Path
) -> None:
    project.db.query("CREATE TABLE ledger (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
    body = """
    async def upgrade(session):
        await session.execute(sa.text("INSERT INTO ledger VALUES (1, 'before')"))
        await session.execute(sa.text("COMMIT"))
        await session.execute(sa.text("INSERT INTO ledger VALUES (2, 'after')"))
        raise RuntimeError("boom")
    """
    write_revision(project, tmp_path, body, transactional=True)

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1, (result.stdout, result.stderr)
    notes = project.db.query("SELECT note FROM ledger ORDER BY id")
    assert [row.note for row in notes] == ["before"]  # committed by the COMMIT; the rest not
    assert statuses(project) == ["failed"]


@POSTGRES_ONLY
def test_alembic_commit_idiom_before_alter_type_add_value(project: Project, tmp_path: Path) -> None:
    """The idiom real Alembic migrations use runs unchanged, and a rerun is not needed."""
    project.db.query("CREATE TYPE mood AS ENUM ('sad', 'ok')")
    project.db.query("CREATE TABLE people (id INTEGER PRIMARY KEY, mood mood NOT NULL)")
    project.db.query("INSERT INTO people VALUES (1, 'sad')")
    body = """
    def upgrade():
        op.execute("COMMIT")
        op.execute("ALTER TYPE mood ADD VALUE 'happy'")
        op.add_column("people", sa.Column("note", sa.Text()))
        op.execute("UPDATE people SET note = 'checked'")
    """
    write_revision(project, tmp_path, body, transactional=True, helpers="from alembic import op\n")

    ok(invoke(project, "upgrade", "heads"))

    labels = project.db.query("SELECT unnest(enum_range(NULL::mood))::text AS label")
    assert [row.label for row in labels] == ["sad", "ok", "happy"]
    assert project.db.query("SELECT note FROM people")[0].note == "checked"
    assert statuses(project) == ["success"]
    ok(invoke(project, "upgrade", "heads"))  # nothing left to do, nothing fails
    assert statuses(project) == ["success"]


@POSTGRES_ONLY
def test_a_script_with_a_commit_statement_is_refused_before_it_is_sent(
    project: Project, tmp_path: Path
) -> None:
    project.db.query("CREATE TABLE ledger (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
    body = """
    async def upgrade(session):
        from dm import execute_script

        script = "INSERT INTO ledger VALUES (1, 'a'); COMMIT; INSERT INTO ledger VALUES (2, 'b')"
        await execute_script(session, script)
    """
    write_revision(project, tmp_path, body, transactional=True)

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "COMMIT statement" in result.stderr
    assert project.db.query("SELECT count(*) AS n FROM ledger")[0].n == 0
    assert statuses(project) == ["failed"]
