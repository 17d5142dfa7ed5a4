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
