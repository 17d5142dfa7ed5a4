"""The porting guide's patterns (docs/porting.md), each a revision file written in the style of
real Alembic data migrations (Airflow, Superset, Redash, CTFd, ContentDB, Neutron, RefGeo),
run unchanged under dm apart from ``down_revision``: up, down where they have a downgrade,
and up again. What cannot run says so in one line."""

from __future__ import annotations

import textwrap

import pytest

from conftest import PG_DRIVER
from conftest import Project
from conftest import invoke
from conftest import ok

# The real migrations ran on PostgreSQL; so do these. Most are slow: the fast suite keeps the
# offline check, the script with '%' and the one-line failure.
pytestmark = pytest.mark.parametrize(
    "db", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)

HEADER = '''"""{doc}"""
import sqlalchemy as sa
from alembic import context
from alembic import op
from sqlalchemy import text

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None
'''

# The table the data migrations work on, as the application's schema migration left it.
SCHEMA = """
def upgrade():
    op.create_table(
        "dag_run",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("state", sa.String(20)),
        sa.Column("conf", sa.LargeBinary),
        sa.Column("note", sa.Text),
        sa.Column("run_type", sa.String(20)),
    )
    op.execute(
        "INSERT INTO dag_run (id, state, run_type) VALUES "
        "(1, 'old', NULL), (2, 'old', NULL), (3, 'new', NULL), (4, 'old', NULL), (5, NULL, NULL)"
    )


def downgrade():
    op.drop_table("dag_run")
"""


def write(project: Project, rev: str, down: str | None, body: str) -> None:
    text = HEADER.format(doc=f"Revision {rev}", rev=rev, down=down)
    (project.versions / f"{rev}_{rev}.py").write_text(text + "\n" + textwrap.dedent(body))


def with_schema(project: Project, rev: str, body: str) -> None:
    write(project, "s0", None, SCHEMA)
    write(project, rev, "s0", body)


def up_down_up(project: Project, down_to: str = "s0") -> None:
    ok(invoke(project, "upgrade", "heads"))
    ok(invoke(project, "downgrade", down_to))
    ok(invoke(project, "upgrade", "heads"))


def column(project: Project, name: str, table: str = "dag_run") -> list[object]:
    return [row[0] for row in project.db.query(f"SELECT {name} FROM {table} ORDER BY id")]


# Airflow: a paged text() loop that returns early in offline mode.
PAGED_LOOP = """
BATCH = 2


def upgrade():
    if context.is_offline_mode():
        print("-- run the backfill online: it reads rows")
        return
    conn = op.get_bind()
    while True:
        rows = conn.execute(
            text("SELECT id FROM dag_run WHERE run_type IS NULL ORDER BY id LIMIT :n"),
            {"n": BATCH},
        ).fetchall()
        if not rows:
            break
        for (run_id,) in rows:
            conn.execute(
                text("UPDATE dag_run SET run_type = :t WHERE id = :id"),
                {"t": "manual" if run_id % 2 else "scheduled", "id": run_id},
            )


def downgrade():
    op.execute("UPDATE dag_run SET run_type = NULL")
"""


def test_paged_text_loop_with_offline_check(project: Project) -> None:
    with_schema(project, "p1", PAGED_LOOP)
    up_down_up(project)
    assert column(project, "run_type") == ["manual", "scheduled", "manual", "scheduled", "manual"]


# Superset / Redash: a BYTEA column rewritten as JSONB, the old column dropped.
BYTEA_TO_JSONB = """
from sqlalchemy.dialects import postgresql


def upgrade():
    op.execute(
        "UPDATE dag_run SET conf = "
        "convert_to('{\\"k\\": ' || id || ', \\"city\\": \\"Zürich\\"}', 'UTF8')"
    )
    op.add_column("dag_run", sa.Column("conf_json", postgresql.JSONB))
    conn = op.get_bind()
    for run_id, raw in conn.execute(text("SELECT id, conf FROM dag_run")).fetchall():
        conn.execute(
            text("UPDATE dag_run SET conf_json = CAST(:v AS JSONB) WHERE id = :id"),
            {"v": bytes(raw).decode("utf-8"), "id": run_id},
        )
    op.drop_column("dag_run", "conf")
    op.alter_column("dag_run", "conf_json", new_column_name="conf")


def downgrade():
    op.alter_column("dag_run", "conf", new_column_name="conf_json")
    op.add_column("dag_run", sa.Column("conf", sa.LargeBinary))
    op.execute("UPDATE dag_run SET conf = convert_to(conf_json::text, 'UTF8')")
    op.drop_column("dag_run", "conf_json")
"""


@pytest.mark.slow
def test_bytea_rewritten_as_jsonb(project: Project) -> None:
    with_schema(project, "j1", BYTEA_TO_JSONB)
    ok(invoke(project, "upgrade", "heads"))
    ok(invoke(project, "downgrade", "-1"))
    ok(invoke(project, "upgrade", "heads"))
    assert column(project, "conf->>'city'") == ["Zürich"] * 5
    assert column(project, "jsonb_typeof(conf)") == ["object"] * 5


# Neutron / Prefect: COMMIT before ALTER TYPE ... ADD VALUE (it once had to run outside a
# transaction), then use of the new value.
COMMIT_THEN_ADD_VALUE = """
def upgrade():
    op.execute("CREATE TYPE run_state AS ENUM ('queued', 'running')")
    op.execute(text("COMMIT"))
    op.execute("ALTER TYPE run_state ADD VALUE IF NOT EXISTS 'skipped'")
    op.execute(text("UPDATE dag_run SET state = 'skipped' WHERE state = 'new'"))
"""


@pytest.mark.slow
def test_commit_before_alter_type_add_value(project: Project) -> None:
    with_schema(project, "e1", COMMIT_THEN_ADD_VALUE)
    ok(invoke(project, "upgrade", "heads"))
    labels = project.db.query("SELECT unnest(enum_range(NULL::run_state))::text")
    assert [row[0] for row in labels] == ["queued", "running", "skipped"]
    assert column(project, "state") == ["old", "old", "skipped", "old", None]
    [attempt] = [row for row in project.db.tracker() if row.revision == "e1"]
    assert attempt.status == "success"


# CTFd / ContentDB: ORM models declared inside the revision, session.commit() in the loop.
ORM_LOOP = """
from sqlalchemy.orm import Session
from sqlalchemy.orm import declarative_base

Base = declarative_base()


class DagRun(Base):
    __tablename__ = "dag_run"
    id = sa.Column(sa.Integer, primary_key=True)
    state = sa.Column(sa.String(20))
    note = sa.Column(sa.Text)


def upgrade():
    session = Session(bind=op.get_bind())
    for run in session.query(DagRun).filter(DagRun.state == "old").order_by(DagRun.id):
        run.note = f"was {run.state} (#{run.id})"
        run.state = "archived"
        session.commit()


def downgrade():
    session = Session(bind=op.get_bind())
    for run in session.query(DagRun).filter(DagRun.state == "archived"):
        run.state = "old"
        run.note = None
    session.commit()
"""


@pytest.mark.slow
def test_orm_models_in_the_revision_commit_in_a_loop(project: Project) -> None:
    with_schema(project, "o1", ORM_LOOP)
    up_down_up(project)
    assert column(project, "state") == ["archived", "archived", "new", "archived", None]
    assert column(project, "note") == ["was old (#1)", "was old (#2)", None, "was old (#4)", None]


# Redash / RefGeo: op.bulk_insert of rows read with a query, into a new table.
BULK_INSERT_FROM_QUERY = """
def upgrade():
    archive = op.create_table(
        "dag_run_archive",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20)),
    )
    rows = op.get_bind().execute(
        text("SELECT id, state FROM dag_run WHERE state = 'old' ORDER BY id")
    )
    op.bulk_insert(
        archive,
        [{"id": n, "run_id": row.id, "state": row.state} for n, row in enumerate(rows, 1)],
    )


def downgrade():
    op.drop_table("dag_run_archive")
"""


@pytest.mark.slow
def test_bulk_insert_from_a_query(project: Project) -> None:
    with_schema(project, "b1", BULK_INSERT_FROM_QUERY)
    up_down_up(project)
    assert column(project, "run_id", "dag_run_archive") == [1, 2, 4]


# Airflow: an update written with op.inline_literal on a lightweight table.
INLINE_LITERAL = """
dag_run = sa.table("dag_run", sa.column("id", sa.Integer), sa.column("state", sa.String))


def upgrade():
    op.execute(
        dag_run.update()
        .where(dag_run.c.state == op.inline_literal("old"))
        .values({"state": op.inline_literal("queued")})
    )


def downgrade():
    op.execute(
        dag_run.update()
        .where(dag_run.c.state == op.inline_literal("queued"))
        .values({"state": op.inline_literal("old")})
    )
"""


@pytest.mark.slow
def test_inline_literal_update(project: Project) -> None:
    with_schema(project, "l1", INLINE_LITERAL)
    up_down_up(project)
    assert column(project, "state") == ["queued", "queued", "new", "queued", None]


# Two statements in one op.execute string, with '%' and non-ASCII text in it.
TWO_STATEMENTS = """
def upgrade():
    op.execute(
        \"\"\"
        UPDATE dag_run SET note = '100% done — déjà vu' WHERE state = 'old';
        UPDATE dag_run SET note = 'résumé: 50%' WHERE state = 'new' OR note LIKE '%vu';
        \"\"\"
    )


def downgrade():
    op.execute("UPDATE dag_run SET note = NULL")
"""


def test_two_statements_with_percent_and_non_ascii(project: Project) -> None:
    with_schema(project, "t1", TWO_STATEMENTS)
    up_down_up(project)
    resume = "résumé: 50%"  # the second statement saw the first one's '... déjà vu'
    assert column(project, "note") == [resume, resume, resume, resume, None]


# RefGeo: tables in a schema of their own, reached by name and by schema=.
SCHEMA_QUALIFIED = """
def upgrade():
    op.execute("CREATE SCHEMA ref_geo")
    areas = op.create_table(
        "l_areas",
        sa.Column("id_area", sa.Integer, primary_key=True),
        sa.Column("area_name", sa.String(50)),
        sa.Column("enable", sa.Boolean),
        schema="ref_geo",
    )
    op.bulk_insert(
        areas,
        [
            {"id_area": 1, "area_name": "Île-de-France", "enable": False},
            {"id_area": 2, "area_name": "Bretagne", "enable": False},
        ],
    )
    op.execute("UPDATE ref_geo.l_areas SET enable = true WHERE area_name LIKE 'Î%'")
    op.add_column("l_areas", sa.Column("size_hectare", sa.Float), schema="ref_geo")


def downgrade():
    op.drop_table("l_areas", schema="ref_geo")
    op.execute("DROP SCHEMA ref_geo")
"""


@pytest.mark.slow
def test_schema_qualified_table(project: Project) -> None:
    with_schema(project, "g1", SCHEMA_QUALIFIED)
    up_down_up(project)
    rows = project.db.query("SELECT area_name, enable FROM ref_geo.l_areas ORDER BY id_area")
    assert [tuple(row) for row in rows] == [("Île-de-France", True), ("Bretagne", False)]


# psycopg2's habits: they fail on asyncpg, each with the one line dm prints, and run on
# psycopg 3 (client-side binding, as psycopg2 had).
PSYCOPG2_HABITS = [
    pytest.param(
        'op.get_bind().exec_driver_sql("UPDATE dag_run SET note = %s WHERE id = %s", ("x", 1))',
        'syntax error at or near "%"',
        [1],
        id="percent-placeholders",
    ),
    pytest.param(
        "op.get_bind().execute(text(\"UPDATE dag_run SET note = 'x' WHERE id = :id\"), "
        '{"id": "1"})',
        "invalid input for query argument $1",
        [1],
        id="string-for-integer",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        'op.get_bind().execute(text("UPDATE dag_run SET note = :n WHERE id = 1; '
        'UPDATE dag_run SET note = :n WHERE id = 2"), {"n": "x"})',
        "cannot insert multiple commands into a prepared statement",
        [1, 2],
        id="two-statements-with-parameters",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("statement", "message", "changed"), PSYCOPG2_HABITS)
def test_psycopg2_habits(
    project: Project, statement: str, message: str, changed: list[int]
) -> None:
    with_schema(project, "q1", f"def upgrade():\n    {statement}\n")
    result = invoke(project, "upgrade", "heads")
    if PG_DRIVER == "psycopg":
        assert result.exit_code == 0, result.stderr
        assert column(project, "note") == ["x" if n in changed else None for n in range(1, 6)]
        return
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("dm: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("dm: error: revision q1 failed: ") and message in errors[0]
    assert column(project, "note") == [None] * 5


def test_psycopg2_habits_run_unchanged_on_psycopg(project: Project) -> None:
    """``postgresql+psycopg://`` (whatever driver the suite runs on): all three at once."""
    habits = "\n".join(f"    {param.values[0]}" for param in PSYCOPG2_HABITS)
    with_schema(project, "q1", f"def upgrade():\n{habits}\n")
    url = project.db.sync_url.replace("postgresql://", "postgresql+psycopg://", 1)
    ok(invoke(project, "upgrade", "heads", DM_DATABASE_URL=url))
    assert column(project, "note") == ["x", "x", None, None, None]
