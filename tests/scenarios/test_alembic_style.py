"""Alembic-style revisions run unchanged: sync hooks with ``op`` bound to dm's connection,
multi-statement SQL, and autocommit blocks (``CREATE INDEX CONCURRENTLY``)."""

from __future__ import annotations

import signal
import textwrap

import pytest

from conftest import Project
from conftest import invoke
from conftest import ok
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for

POSTGRES_ONLY = pytest.mark.parametrize(
    "db", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
SQLITE_ONLY = pytest.mark.parametrize("db", ["sqlite"], indirect=True)

HEADER = '''"""{doc}"""
import sqlalchemy as sa
from alembic import op

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None
'''


def write(project: Project, rev: str, down: str | None, body: str, doc: str = "") -> None:
    """Write an Alembic-style revision file: the header, then ``body`` unchanged."""
    text = HEADER.format(doc=doc or f"Revision {rev}", rev=rev, down=down)
    path = project.versions / f"{rev}_{rev}.py"
    path.write_text(text + "\n" + textwrap.dedent(body))


# Five revisions as they would be copied from an Alembic project.
CREATE = """
def upgrade():
    users = op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(50), nullable=False),
        sa.Column("email", sa.String(100), nullable=False),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
        sa.Column("note", sa.String(100)),
    )
    op.bulk_insert(
        users,
        [
            {"id": 1, "name": "ann", "email": "ann@example.com"},
            {"id": 2, "name": "bob", "email": "bob@example.org"},
            {"id": 3, "name": "cy", "email": "cy@example.net"},
        ],
    )
    op.execute("INSERT INTO orders (id, user_id) VALUES (10, 1), (11, 2), (12, 2)")


def downgrade():
    op.drop_table("orders")
    op.drop_table("users")
"""

ADD_COLUMN = """
def upgrade():
    op.add_column("users", sa.Column("domain", sa.String(100)))
    op.execute("UPDATE users SET domain = substr(email, instr(email, '@') + 1)"
               if op.get_bind().dialect.name == "sqlite"
               else "UPDATE users SET domain = split_part(email, '@', 2)")


def downgrade():
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("domain")
"""

LOOP = """
import hashlib


def upgrade():
    op.add_column("users", sa.Column("digest", sa.String(64)))
    conn = op.get_bind()
    for row in conn.execute(sa.text("SELECT id, email FROM users")).fetchall():
        digest = hashlib.sha256(row.email.encode()).hexdigest()
        conn.execute(
            sa.text("UPDATE users SET digest = :d WHERE id = :id"), {"d": digest, "id": row.id}
        )


def downgrade():
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("digest")


def verify():
    conn = op.get_bind()
    return conn.execute(sa.text("SELECT count(*) FROM users WHERE digest IS NULL")).scalar() == 0
"""

ORM = """
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import Session
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    note: Mapped[str | None]
    user: Mapped[User] = relationship(lazy="select")


def upgrade():
    session = Session(bind=op.get_bind())
    for order in session.scalars(sa.select(Order).order_by(Order.id)):
        order.note = "for " + order.user.name  # a lazy load
    session.commit()


def downgrade():
    pass
"""

SCRIPT = """
def upgrade():
    op.execute(
        '''
        CREATE TABLE audit (id INTEGER PRIMARY KEY, what VARCHAR(20));
        INSERT INTO audit (id, what) VALUES (1, 'a;b');
        INSERT INTO audit (id, what) VALUES (2, 'two');
        '''
    )


def downgrade():
    op.execute("DROP TABLE audit")
"""


def write_chain(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(project, "a2", "a1", ADD_COLUMN)
    write(project, "a3", "a2", LOOP)
    write(project, "a4", "a3", ORM)
    write(project, "a5", "a4", SCRIPT)


def assert_chain_applied(project: Project) -> None:
    db = project.db
    users = db.query("SELECT id, domain, digest FROM users ORDER BY id")
    assert [(r.id, r.domain) for r in users] == [
        (1, "example.com"),
        (2, "example.org"),
        (3, "example.net"),
    ]
    assert all(len(r.digest) == 64 for r in users)
    notes = db.query("SELECT note FROM orders ORDER BY id")
    assert [r.note for r in notes] == ["for ann", "for bob", "for bob"]
    assert [r.what for r in db.query("SELECT what FROM audit ORDER BY id")] == ["a;b", "two"]


def test_alembic_revisions_upgrade_downgrade_and_upgrade_again(project: Project) -> None:
    write_chain(project)

    ok(invoke(project, "upgrade", "heads"))
    assert_chain_applied(project)
    assert "a3" in ok(invoke(project, "verify", "a3")).stdout  # the sync verify()
    statuses = {r.revision: r.status for r in project.db.tracker()}
    assert statuses == dict.fromkeys(["a1", "a2", "a3", "a4", "a5"], "success")

    ok(invoke(project, "downgrade", "base"))
    tables = (
        "SELECT name FROM sqlite_master WHERE type = 'table'"
        if project.db.kind == "sqlite"
        else "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'"
    )
    assert {r.name for r in project.db.query(tables)} == {
        "script_run_tracker",
        "script_run_tracker_meta",
        "script_run_tracker_ranges",
    }

    ok(invoke(project, "upgrade", "heads"))
    assert_chain_applied(project)


def test_failing_sync_revision_is_rolled_back_and_recorded(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "b1",
        "a1",
        """
        def upgrade():
            op.add_column("users", sa.Column("extra", sa.Integer))
            op.execute("DELETE FROM orders")
            raise RuntimeError("no good")
        """,
    )

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    assert "RuntimeError: no good" in result.stderr
    last = project.db.tracker()[-1]
    assert (last.revision, last.status) == ("b1", "failed")
    assert "no good" in last.error_message
    assert len(project.db.query("SELECT * FROM orders")) == 3  # rolled back
    columns = project.db.query("SELECT * FROM users")[0]._fields
    assert "extra" not in columns


def test_sync_verify_false_fails_the_revision(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "b1",
        "a1",
        """
        def upgrade():
            op.execute("DELETE FROM orders")


        def verify():
            return False
        """,
    )

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    assert "verify() returned False" in project.db.tracker()[-1].error_message
    assert len(project.db.query("SELECT * FROM orders")) == 3


def test_sync_hook_with_a_session(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "b1",
        "a1",
        """
        def upgrade(session):
            session.execute(sa.text("UPDATE orders SET note = 'via session'"))
            session.commit()  # joins dm's transaction: nothing is committed here
            op.execute("UPDATE orders SET note = note || '+op' WHERE id = 10")


        def downgrade(session):
            session.execute(sa.text("UPDATE orders SET note = NULL"))
        """,
    )

    ok(invoke(project, "upgrade", "heads"))
    notes = [r.note for r in project.db.query("SELECT note FROM orders ORDER BY id")]
    assert notes == ["via session+op", "via session", "via session"]
    ok(invoke(project, "downgrade", "a1"))
    assert [r.note for r in project.db.query("SELECT note FROM orders")] == [None] * 3


# -- multi-statement SQL ---------------------------------------------------------------------

PG_SCRIPT = """
CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql AS $$ SELECT upper(t) || '!'; $$;
DO $$
BEGIN
    UPDATE orders SET note = shout('x');
END
$$;
"""


@POSTGRES_ONLY
def test_multi_statement_scripts_on_postgres(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "s1",
        "a1",
        f"""
        def upgrade():
            op.execute({PG_SCRIPT!r})


        def downgrade():
            op.execute("UPDATE orders SET note = NULL; DROP FUNCTION shout(text);")
        """,
    )
    (project.versions / "s2_s2.py").write_text(
        textwrap.dedent(
            '''
            """Async twin."""
            import dm

            revision = "s2"
            down_revision = "s1"


            async def upgrade(session):
                await dm.execute_script(
                    session, "UPDATE orders SET note = note || '1'; "
                    "DO $$ BEGIN UPDATE orders SET note = note || '2'; END $$;"
                )


            async def downgrade(session):
                await dm.execute_script(session, "UPDATE orders SET note = 'X!'; SELECT 1;")
            '''
        )
    )

    ok(invoke(project, "upgrade", "heads"))
    assert {r.note for r in project.db.query("SELECT note FROM orders")} == {"X!12"}
    ok(invoke(project, "downgrade", "a1"))
    assert {r.note for r in project.db.query("SELECT note FROM orders")} == {None}
    ok(invoke(project, "upgrade", "heads"))
    assert {r.note for r in project.db.query("SELECT note FROM orders")} == {"X!12"}


def test_failing_script_rolls_back_the_revision(project: Project) -> None:
    write(project, "a1", None, CREATE)
    (project.versions / "s1_s1.py").write_text(
        textwrap.dedent(
            '''
            """A script whose second statement fails."""
            import dm

            revision = "s1"
            down_revision = "a1"


            async def upgrade(session):
                await dm.execute_script(
                    session, "DELETE FROM orders; INSERT INTO no_such_table VALUES (1);"
                )
            '''
        )
    )

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    assert "no_such_table" in project.db.tracker()[-1].error_message
    assert len(project.db.query("SELECT * FROM orders")) == 3


@SQLITE_ONLY
def test_sqlite_script_with_a_trigger(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "t1",
        "a1",
        """
        def upgrade():
            op.execute('''
                CREATE TRIGGER note_orders AFTER INSERT ON orders BEGIN
                    UPDATE orders SET note = 'new; order' WHERE id = NEW.id;
                END;
                INSERT INTO orders (id, user_id) VALUES (13, 3);
            ''')
        """,
    )

    ok(invoke(project, "upgrade", "heads"))
    assert project.db.query("SELECT note FROM orders WHERE id = 13")[0].note == "new; order"


# -- autocommit blocks -----------------------------------------------------------------------

CONCURRENT_SYNC = """
def upgrade():
    op.execute("UPDATE orders SET note = 'before'")
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY ix_orders_note ON orders (note)")
    op.execute("UPDATE orders SET note = 'after' WHERE id = 10")


def downgrade():
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY ix_orders_note")
"""

CONCURRENT_ASYNC = '''
"""Async twin."""
import dm
import sqlalchemy as sa

revision = "c2"
down_revision = "c1"


CONCURRENTLY = sa.text("CREATE INDEX CONCURRENTLY ix_orders_user ON orders (user_id)")


async def upgrade(session):
    async with dm.autocommit(session):
        await session.execute(CONCURRENTLY)
    await session.execute(sa.text("UPDATE orders SET note = note || '+'"))


async def downgrade(session):
    async with dm.autocommit(session):
        await session.execute(sa.text("DROP INDEX CONCURRENTLY ix_orders_user"))
'''


def valid_indexes(project: Project) -> set[str]:
    rows = project.db.query(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname LIKE 'ix_orders_%' AND i.indisvalid"
    )
    return {r.relname for r in rows}


@POSTGRES_ONLY
def test_create_index_concurrently_in_autocommit_blocks(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(project, "c1", "a1", CONCURRENT_SYNC)
    (project.versions / "c2_c2.py").write_text(CONCURRENT_ASYNC)

    ok(invoke(project, "upgrade", "heads"))

    assert valid_indexes(project) == {"ix_orders_note", "ix_orders_user"}
    notes = [r.note for r in project.db.query("SELECT note FROM orders ORDER BY id")]
    assert notes == ["after+", "before+", "before+"]
    statuses = [(r.revision, r.status) for r in project.db.tracker()]
    assert statuses == [("a1", "success"), ("c1", "success"), ("c2", "success")]

    ok(invoke(project, "downgrade", "a1"))
    assert valid_indexes(project) == set()
    ok(invoke(project, "upgrade", "heads"))
    assert valid_indexes(project) == {"ix_orders_note", "ix_orders_user"}


@POSTGRES_ONLY
def test_failure_after_an_autocommit_block_keeps_what_was_committed(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "c1",
        "a1",
        """
        def upgrade():
            op.execute("UPDATE orders SET note = 'before'")
            with op.get_context().autocommit_block():
                op.execute("CREATE INDEX CONCURRENTLY ix_orders_note ON orders (note)")
            op.execute("UPDATE orders SET note = 'after'")
            raise RuntimeError("late failure")
        """,
    )

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    last = project.db.tracker()[-1]
    assert (last.revision, last.status) == ("c1", "failed")
    assert "late failure" in last.error_message
    # The work before the block and the block itself are committed; the rest is not.
    assert {r.note for r in project.db.query("SELECT note FROM orders")} == {"before"}
    assert valid_indexes(project) == {"ix_orders_note"}


@SQLITE_ONLY
def test_sqlite_vacuum_in_an_autocommit_block(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "v1",
        "a1",
        """
        def upgrade():
            op.execute("DELETE FROM orders WHERE id = 12")
            with op.get_context().autocommit_block():
                op.execute("VACUUM")
            op.execute("DELETE FROM orders WHERE id = 11")
        """,
    )

    ok(invoke(project, "upgrade", "heads"))
    assert [r.id for r in project.db.query("SELECT id FROM orders")] == [10]
    assert project.db.tracker()[-1].status == "success"


def test_autocommit_outside_a_run_is_refused() -> None:
    import asyncio

    import dm
    from dm.backfill.batching import BatchingError

    async def outside() -> None:
        async with dm.autocommit(None):  # type: ignore[arg-type]
            pass

    with pytest.raises(BatchingError, match="autocommit block works only"):
        asyncio.run(outside())


# -- signals -----------------------------------------------------------------------------------


@POSTGRES_ONLY
@pytest.mark.process
def test_sigterm_cancels_a_sync_hook_blocked_in_a_statement(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "p1",
        "a1",
        """
        def upgrade():
            op.execute("DELETE FROM orders")
            op.execute("SELECT pg_sleep(60)")
        """,
    )
    ok(invoke(project, "upgrade", "a1"))
    proc = spawn_dm(project, "upgrade", "heads")

    def sleeping() -> bool:
        rows = project.db.query(
            "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' "
            "AND state = 'active' AND datname = current_database()"
        )
        return bool(rows)

    try:
        wait_for(sleeping)
        second = run_dm(project, "upgrade", "heads", "--lock-timeout", "0.5")
        assert second.returncode == 3, second.stderr  # the lock is held while it runs
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.reason) == ("p1", "failed", "interrupted")
    assert len(project.db.query("SELECT * FROM orders")) == 3
    wait_for(lambda: not sleeping(), timeout=5)  # cancelled, not left to run 60 s
    ok(invoke(project, "current"))  # the lock is free


# -- dm revision --sync --------------------------------------------------------------------


def test_revision_sync_writes_an_alembic_style_revision_that_runs(project: Project) -> None:
    ok(invoke(project, "revision", "-m", "first async one", "--rev-id", "r1"))
    ok(invoke(project, "revision", "-m", "backfill plans", "--sync", "--rev-id", "r2"))

    (path,) = project.versions.glob("*r2*backfill_plans.py")
    text = path.read_text()
    assert "from alembic import op" in text
    assert "def upgrade() -> None:" in text
    assert "down_revision: str | Sequence[str] | None = 'r1'" in text
    ok(invoke(project, "upgrade", "heads"))
    ok(invoke(project, "downgrade", "base"))
    assert [r.status for r in project.db.tracker()][-2:] == ["rolled_back", "rolled_back"]


def test_commit_in_a_non_transactional_sync_hook_is_real(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "n1",
        "a1",
        """
        transactional = False


        def upgrade(session):
            session.execute(sa.text("DELETE FROM orders WHERE id = 10"))
            session.commit()
            session.execute(sa.text("DELETE FROM orders WHERE id = 11"))
            raise RuntimeError("after the commit")
        """,
    )

    assert invoke(project, "upgrade", "heads").exit_code == 1
    assert [r.id for r in project.db.query("SELECT id FROM orders ORDER BY id")] == [11, 12]
    assert project.db.tracker()[-1].status == "failed"


def test_mixed_async_and_sync_hooks_in_one_file(project: Project) -> None:
    write(project, "a1", None, CREATE)
    write(
        project,
        "m1",
        "a1",
        """
        async def upgrade(session):
            await session.execute(sa.text("UPDATE orders SET note = 'async'"))


        def verify():
            notes = op.get_bind().execute(sa.text("SELECT DISTINCT note FROM orders")).all()
            return notes == [("async",)]
        """,
    )

    ok(invoke(project, "upgrade", "heads"))
    assert project.db.tracker()[-1].status == "success"


@pytest.mark.parametrize("style", ["sync", "async"])
def test_autocommit_block_in_a_non_transactional_revision(project: Project, style: str) -> None:
    write(project, "a1", None, CREATE)
    statement = (
        "CREATE INDEX IF NOT EXISTS ix_orders_note ON orders (note)"
        if project.db.kind == "sqlite"
        else "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_note ON orders (note)"
    )
    if style == "sync":
        body = f"""
        transactional = False


        def upgrade():
            op.execute("DELETE FROM orders WHERE id = 10")
            with op.get_context().autocommit_block():
                op.execute({statement!r})
            op.execute("DELETE FROM orders WHERE id = 11")
        """
    else:
        body = f"""
        import dm

        transactional = False


        async def upgrade(session):
            await session.execute(sa.text("DELETE FROM orders WHERE id = 10"))
            async with dm.autocommit(session):
                await session.execute(sa.text({statement!r}))
            await session.execute(sa.text("DELETE FROM orders WHERE id = 11"))
        """
    write(project, "n1", "a1", body)

    ok(invoke(project, "upgrade", "heads"))
    assert [r.id for r in project.db.query("SELECT id FROM orders")] == [12]
    assert project.db.tracker()[-1].status == "success"


def test_sync_hook_past_its_time_limit_is_cancelled(project: Project) -> None:
    write(project, "a1", None, CREATE)
    endless = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        if project.db.kind == "sqlite"
        else "SELECT pg_sleep(30)"
    )
    write(
        project,
        "t1",
        "a1",
        f"""
        timeout = 1


        def upgrade():
            op.execute("DELETE FROM orders")
            op.execute({endless!r})
        """,
    )

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    assert "timed out after 1s" in project.db.tracker()[-1].error_message
    assert len(project.db.query("SELECT * FROM orders")) == 3
