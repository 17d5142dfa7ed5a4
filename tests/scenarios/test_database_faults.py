"""The database's bad days that a retry cures: the exit code is 75 (EX_TEMPFAIL), so a
Job's retry runs dm again, with one error line naming the cause."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from conftest import Project
from conftest import _pg_admin
from conftest import run_in_process

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("db", ["postgresql"], indirect=True)]


@pytest.fixture
def limited_role(project: Project) -> Iterator[str]:
    """A login role whose connection limit is reached already (``CONNECTION LIMIT 0``)."""
    name = f"dm_limited_{uuid.uuid4().hex[:12]}"
    project.db.query(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 0")
    try:
        yield name
    finally:
        project.db.query(f"DROP ROLE IF EXISTS {name}")


def test_connection_limit_reached_exits_75_after_the_start_up_retries(
    project: Project, limited_role: str
) -> None:
    url = sa.make_url(project.db.url).set(username=limited_role)
    env = {
        "DM_DATABASE_URL": url.render_as_string(hide_password=False),
        "DM_CONNECT_RETRY_SECONDS": "1",
    }

    ran = run_in_process(project, "upgrade", "heads", env=env)

    assert ran.returncode == 75, ran.stderr
    [line] = [line for line in ran.stderr.splitlines() if line.startswith("dm: error:")]
    assert "too many connections" in line
    assert "gave up after" in line  # retried first
    assert "Traceback" not in ran.stderr


def test_a_database_turned_read_only_exits_75(project: Project) -> None:
    """A primary demoted to a replica mid-deploy (a failover) refuses writes with SQLSTATE
    25006: transient, the next run on the new primary succeeds."""
    project.db.query("CREATE TABLE items (id INTEGER)")
    project.write("r00000000001", None, "pass")
    assert run_in_process(project, "upgrade", "heads").returncode == 0
    project.write(
        "r00000000002",
        "r00000000001",
        'await session.execute(sa.text("INSERT INTO items VALUES (1)"))',
    )
    database = sa.make_url(project.db.url).database
    project.db.query(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')

    ran = run_in_process(project, "upgrade", "heads")

    assert ran.returncode == 75, ran.stderr
    [line] = [line for line in ran.stderr.splitlines() if line.startswith("dm: error:")]
    assert "read-only transaction" in line
    assert "Traceback" not in ran.stderr
    _pg_admin(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    assert run_in_process(project, "upgrade", "heads").returncode == 0
    assert len(project.db.query("SELECT * FROM items")) == 1
