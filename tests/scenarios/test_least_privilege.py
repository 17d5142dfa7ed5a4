"""Least privilege on PostgreSQL, measured: the grants docs/security.md lists are enough for
each of dm's roles to do its job, and nothing more; a missing grant is one line naming the
object and the right (exit 2). Roles get unique names per test and are dropped after it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from conftest import Project
from conftest import run_dm
from conftest import run_in_process
from conftest import spawn_dm
from conftest import wait_for

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("db", ["postgresql"], indirect=True),
]

SCHEMA = "dm_tracker"
TRACKER = f"{SCHEMA}.script_run_tracker"
BOTH_TABLES = f"{TRACKER}, {TRACKER}_meta"
RANGES = f"{TRACKER}_ranges"
INSERT_PERSON = "await session.execute(sa.text(\"INSERT INTO people VALUES ('{}')\"))"


@dataclass
class Roles:
    """Login roles on the test's database (trust authentication: no passwords)."""

    project: Project
    names: dict[str, str]

    def url(self, role: str) -> str:
        base = self.project.db.url
        scheme, rest = base.split("://", 1)
        host = rest.split("@", 1)[1]
        return f"{scheme}://{self.names[role]}@{host}"

    def env(self, role: str, **extra: str) -> dict[str, str]:
        return {"DM_DATABASE_URL": self.url(role), "DM_TRACKER_SCHEMA": SCHEMA, **extra}

    def grant(self, sql: str) -> None:
        for role, name in self.names.items():
            sql = sql.replace("{" + role + "}", name)
        self.project.db.query(sql)


@pytest.fixture
def roles(project: Project) -> Iterator[Roles]:
    """A migration role, a read-only status/gate role, a pause/cancel role and a worker
    role (``dm work``), with CONNECT only (PUBLIC's rights on the database revoked), and the
    application's table."""
    suffix = uuid.uuid4().hex[:10]
    names = {role: f"dm_{role}_{suffix}" for role in ("migrate", "gate", "control", "work")}
    database = project.db.url.rsplit("/", 1)[1]
    db = project.db
    for name in names.values():
        db.query(f"CREATE ROLE {name} LOGIN")
    made = Roles(project, names)
    try:
        db.query(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
        db.query(f"GRANT CONNECT ON DATABASE {database} TO {', '.join(names.values())}")
        db.query("CREATE TABLE people (email TEXT PRIMARY KEY)")
        made.grant("GRANT SELECT, INSERT ON people TO {migrate}")
        db.query(f"CREATE SCHEMA {SCHEMA}")
        yield made
    finally:
        for name in names.values():
            db.query(f"DROP OWNED BY {name}")
            db.query(f"DROP ROLE {name}")


def grant_migration_rows(roles: Roles) -> None:
    """The migration role's grants on a tracker a DBA created (docs/security.md)."""
    roles.grant(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {{migrate}}")
    roles.grant(f"GRANT SELECT, INSERT, UPDATE ON {BOTH_TABLES} TO {{migrate}}")
    roles.grant(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {RANGES} TO {{migrate}}")
    roles.grant(f"GRANT USAGE ON SEQUENCE {TRACKER}_id_seq TO {{migrate}}")


def grant_readers(roles: Roles) -> None:
    """The gate's and the controller's grants (docs/security.md)."""
    roles.grant(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {{gate}}, {{control}}")
    roles.grant(f"GRANT SELECT ON {BOTH_TABLES} TO {{gate}}, {{control}}")
    roles.grant(f"GRANT UPDATE (request, request_by, request_reason) ON {TRACKER} TO {{control}}")


def test_the_migration_role_creates_its_tracker_without_create_on_the_database(
    project: Project, roles: Roles
) -> None:
    roles.grant(f"GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO {{migrate}}")
    project.write("a1", None, INSERT_PERSON.format("a@example.org"))
    first = run_in_process(project, "upgrade", env=roles.env("migrate"))
    assert first.returncode == 0, first.stderr
    project.write("b2", "a1", INSERT_PERSON.format("b@example.org"))
    second = run_in_process(project, "upgrade", env=roles.env("migrate"))
    assert second.returncode == 0, second.stderr
    assert [row.status for row in project.db.tracker(TRACKER)] == ["success", "success"]

    # Nothing more: no schema of its own, no table outside the tracker's schema.
    made = roles.project.db.query(
        "SELECT has_database_privilege(:r, current_database(), 'CREATE') AS c",
        r=roles.names["migrate"],
    )
    assert made[0].c is False


def test_the_migration_role_runs_on_a_tracker_a_dba_created_with_dml_grants_only(
    project: Project, roles: Roles
) -> None:
    project.write("a1", None)
    by_dba = run_in_process(project, "upgrade", env={"DM_TRACKER_SCHEMA": SCHEMA})
    assert by_dba.returncode == 0, by_dba.stderr
    grant_migration_rows(roles)
    project.write("b2", "a1", INSERT_PERSON.format("b@example.org"))
    ran = run_in_process(project, "upgrade", env=roles.env("migrate"))
    assert ran.returncode == 0, ran.stderr
    assert project.db.query("SELECT email FROM people")[0].email == "b@example.org"

    # Without INSERT on the tracker: one line naming the table and the right, exit 2.
    roles.grant(f"REVOKE INSERT ON {TRACKER} FROM {{migrate}}")
    project.write("c3", "b2")
    denied = run_in_process(project, "upgrade", env=roles.env("migrate"))
    assert denied.returncode == 2, denied.stderr
    (line,) = denied.stderr.strip().splitlines()[-1:]
    assert line.startswith("dm: error: the database role lacks INSERT on table script_run_tracker")
    assert "internal error" not in denied.stderr and "Traceback" not in denied.stderr


def test_the_gate_role_reads_status_and_checks_and_can_write_nothing(
    project: Project, roles: Roles
) -> None:
    roles.grant(f"GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO {{migrate}}")
    project.write("a1", None, INSERT_PERSON.format("a@example.org"))
    assert run_in_process(project, "upgrade", env=roles.env("migrate")).returncode == 0
    grant_readers(roles)

    gate = roles.env("gate")
    assert run_in_process(project, "status", "--json", env=gate).returncode == 0
    assert run_in_process(project, "check", env=gate).returncode == 0
    project.write("b2", "a1", INSERT_PERSON.format("b@example.org"))
    assert run_in_process(project, "check", env=gate).returncode == 4
    assert run_in_process(project, "check", "--wait", "--timeout", "0", env=gate).returncode == 4

    denied = run_in_process(project, "upgrade", env=gate)
    assert denied.returncode == 2, denied.stderr
    assert "the database role lacks UPDATE on table script_run_tracker_meta" in denied.stderr
    denied = run_in_process(project, "upgrade", "--json", env=gate)
    error = json.loads(denied.stdout)["error"]
    assert (error["exit_code"], error["kind"]) == (2, "privilege_missing"), error
    assert [row.revision for row in project.db.tracker(TRACKER)] == ["a1"]
    assert project.db.query("SELECT count(*) AS n FROM people")[0].n == 1


BATCHED = """
import asyncio
from pathlib import Path
from dm import batched

transactional = False
people = sa.table("people", sa.column("email"))
"""
LOOP = """
async for batch in batched(session, sa.select(people.c.email), key=people.c.email, size=1):
    Path(STARTED).touch()
    while not Path(GO).exists():
        await asyncio.sleep(0.02)
"""


@pytest.mark.process
@pytest.mark.slow
def test_the_control_role_pauses_a_running_backfill_and_can_do_nothing_else(
    project: Project, roles: Roles, tmp_path: Path
) -> None:
    roles.grant(f"GRANT USAGE, CREATE ON SCHEMA {SCHEMA} TO {{migrate}}")
    project.db.query("INSERT INTO people VALUES ('a@example.org'), ('b@example.org')")
    files = f"STARTED = {str(tmp_path / 'started')!r}\nGO = {str(tmp_path / 'go')!r}\n"
    project.write("a1", None, LOOP, extra=BATCHED + files)
    running = spawn_dm(project, "upgrade", env=roles.env("migrate"))
    try:
        wait_for(lambda: (tmp_path / "started").exists() or running.poll() is not None, 60)
        assert running.poll() is None
        grant_readers(roles)
        control = roles.env("control")
        paused = run_in_process(project, "pause", "a1", "--reason", "peak", env=control)
        assert paused.returncode == 0, paused.stderr
    finally:
        (tmp_path / "go").touch()
        out, err = running.communicate(timeout=60)
    assert running.returncode == 5, err
    assert [row.status for row in project.db.tracker(TRACKER)] == ["paused"]

    # Nothing more: it cannot resume (or run) anything.
    denied = run_in_process(project, "resume", "a1", env=control)
    assert denied.returncode == 2, denied.stderr
    assert "the database role lacks UPDATE on table script_run_tracker_meta" in denied.stderr

    # Column-level: the request columns only.
    control_db = type(project.db)("postgresql", roles.url("control"), roles.url("control"))
    with pytest.raises(Exception, match="permission denied for table script_run_tracker"):
        control_db.query(f"UPDATE {TRACKER} SET status = 'success'")


PARALLEL = """
import asyncio
from pathlib import Path
from dm import batched

transactional = False
items = sa.table("items", sa.column("id"), sa.column("hits"))
"""
PARALLEL_LOOP = """
query = sa.select(items.c.id)
async for batch in batched(session, query, key=items.c.id, size=100, workers=2):
    while not Path(GO).exists():
        await asyncio.sleep(0.02)
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
"""
ITEMS = 2_000


def documented_worker_grants(roles: Roles) -> list[str]:
    """The worker role's grants exactly as docs/security.md lists them, for this test's
    schema, database and role."""
    text = (REPO / "docs" / "security.md").read_text()
    section = text.split("### The worker role (`dm work`)", 1)[1]
    found = re.search(r"```sql\n(.+?)```", section, re.S)
    assert found, "docs/security.md lost the worker role's grants"
    sql = re.sub(r"--[^\n]*", "", found.group(1)).replace("dm_work", "{work}")
    sql = re.sub(r"\bdm\b", SCHEMA, sql)
    database = roles.project.db.url.rsplit("/", 1)[1]
    sql = sql.replace("DATABASE app", f"DATABASE {database}")
    return [statement.strip() for statement in sql.split(";") if statement.strip()]


def ranges_held(project: Project, owner: str) -> int:
    """Unfinished ranges whose owner matches ``owner`` (``run:%``, ``work:%``)."""
    rows = project.db.query(
        f"SELECT count(*) AS n FROM {RANGES} WHERE owner LIKE :owner AND NOT finished",
        owner=owner,
    )
    return int(rows[0].n)


def hits(project: Project) -> dict[int, int]:
    """How many items were updated how many times."""
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    return {row.hits: row.n for row in rows}


@pytest.mark.process
@pytest.mark.slow
def test_the_worker_role_joins_a_parallel_backfill_with_the_documented_grants(
    project: Project, roles: Roles, tmp_path: Path
) -> None:
    project.write("a1", None)
    by_dba = run_in_process(project, "upgrade", env={"DM_TRACKER_SCHEMA": SCHEMA})
    assert by_dba.returncode == 0, by_dba.stderr
    grant_migration_rows(roles)
    project.db.query("CREATE TABLE items (id BIGINT PRIMARY KEY, hits INTEGER NOT NULL)")
    project.db.query(f"INSERT INTO items SELECT g, 0 FROM generate_series(1, {ITEMS}) AS g")
    roles.grant("GRANT SELECT, UPDATE ON items TO {migrate}")
    for statement in documented_worker_grants(roles):
        roles.grant(statement)

    # The run (migration role) and a dm work process (worker role) share the loop: its
    # batches wait until the worker holds a range of its own.
    go = tmp_path / "go"
    project.write("b2", "a1", PARALLEL_LOOP, extra=f"{PARALLEL}GO = {str(go)!r}\n")
    run = spawn_dm(project, "upgrade", env=roles.env("migrate"))
    worker = None
    try:
        wait_for(lambda: run.poll() is not None or ranges_held(project, "run:%") == 2, 60)
        worker = spawn_dm(project, "work", "b2", "--wait", "60", "--json", env=roles.env("work"))
        wait_for(lambda: worker.poll() is not None or ranges_held(project, "work:%"), 60)
    finally:
        go.touch()
        _, run_err = run.communicate(timeout=60)
        out, err = worker.communicate(timeout=60) if worker else ("", "")
    assert run.returncode == 0, run_err
    assert worker.returncode == 0, err
    assert json.loads(out) == {"revision": "b2", "joined": True, "direction": "upgrade"}
    assert hits(project) == {1: ITEMS}
    assert [row.status for row in project.db.tracker(TRACKER)] == ["success", "success"]

    # Without UPDATE on the ranges: one line naming the table and the right, exit 2.
    roles.grant(f"REVOKE UPDATE ON {RANGES} FROM {{work}}")
    go = tmp_path / "go-again"
    project.write("c3", "b2", PARALLEL_LOOP, extra=f"{PARALLEL}GO = {str(go)!r}\n")
    run = spawn_dm(project, "upgrade", env=roles.env("migrate"))
    try:
        wait_for(lambda: run.poll() is not None or ranges_held(project, "run:%") == 2, 60)
        denied = run_dm(project, "work", "c3", "--wait", "60", env=roles.env("work"))
    finally:
        go.touch()
        _, run_err = run.communicate(timeout=60)
    assert denied.returncode == 2, denied.stderr
    (line,) = denied.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "dm: error: the database role lacks UPDATE on table script_run_tracker_ranges"
    ), denied.stderr
    assert "Traceback" not in denied.stderr
    assert run.returncode == 0, run_err
    assert hits(project) == {2: ITEMS}


@pytest.mark.process
@pytest.mark.slow
def test_two_names_for_one_tracker_take_one_lock(project: Project, tmp_path: Path) -> None:
    """``DM_TRACKER_SCHEMA=dm_tracker`` and ``search_path=dm_tracker`` name the same
    relation: a run of each excludes the other (the lock key is the resolved relation)."""
    project.db.query(f"CREATE SCHEMA {SCHEMA}")
    project.db.query("CREATE TABLE people (email TEXT PRIMARY KEY)")
    files = f"STARTED = {str(tmp_path / 'started')!r}\nGO = {str(tmp_path / 'go')!r}\n"
    wait = (  # a second run inside it at the same time fails at once, instead of waiting
        "if Path(STARTED).exists():\n"
        "    raise RuntimeError('two runs at once')\n"
        "Path(STARTED).touch()\n"
        "while not Path(GO).exists():\n"
        "    await asyncio.sleep(0.02)\n"
    )
    project.write("a1", None, wait, extra="import asyncio\nfrom pathlib import Path\n" + files)
    by_schema = {"DM_TRACKER_SCHEMA": SCHEMA, "DM_LOCK_TIMEOUT": "0"}
    by_path = {
        "DM_DATABASE_URL": f"{project.db.url}?options=-c%20search_path%3D{SCHEMA}",
        "DM_LOCK_TIMEOUT": "0",
    }
    for holder_env, other_env in ((by_schema, by_path), (by_path, by_schema)):
        holder = spawn_dm(project, "upgrade", env=holder_env)
        try:
            wait_for(lambda h=holder: (tmp_path / "started").exists() or h.poll() is not None)
            assert holder.poll() is None
            other = run_in_process(project, "upgrade", env=other_env)
            assert other.returncode == 3, other.stderr
            assert "lock" in other.stderr
        finally:
            (tmp_path / "go").touch()
            _out, err = holder.communicate(timeout=60)
        assert holder.returncode == 0, err
        project.db.query(f"DELETE FROM {TRACKER}")
        (tmp_path / "started").unlink()
        (tmp_path / "go").unlink()
