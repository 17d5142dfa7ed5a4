"""Exactly once when a run loses its lock without noticing: every tracker write is fenced.

The first run's lock connection goes through a proxy that the test freezes (a hung network:
the first run's watchdog sees nothing for its whole ping timeout), and its PostgreSQL
session is terminated, which frees the advisory lock. A second run then takes the lock and
the revision over while the first one is still working. The first run must commit nothing
more: its next tracker write is refused, its transaction rolls back, and it exits 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import PG_HOST
from conftest import PG_PORT
from conftest import Project
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for
from proxy import tcp_proxy
from test_process import advisory_locks

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("db", ["postgresql"], indirect=True)]

ROWS = 60
REV = "f3c1a0b2c4d5"

BATCHED = """
async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=5):
    await session.execute(
        items.update()
        .where(items.c.id.between(batch.first_key, batch.last_key))
        .values(n=items.c.n + 1)
    )
    await asyncio.sleep(0.3)
"""

# The whole table in one transaction, then wait (holding the row locks) for the go file.
TRANSACTIONAL = """
await session.execute(items.update().values(n=items.c.n + 1))
Path(STARTED).touch()
while not Path(GO).exists():
    await asyncio.sleep(0.05)
"""


def make_items(project: Project) -> None:
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    project.db.query(f"INSERT INTO items SELECT g, 0 FROM generate_series(1, {ROWS}) AS g")


def write_revision(project: Project, body: str, *, transactional: bool, files: Path) -> None:
    extra = f"""
import asyncio
from pathlib import Path
from dm import batched

transactional = {transactional}
items = sa.table("items", sa.column("id"), sa.column("n"))
STARTED = {str(files / "started")!r}
GO = {str(files / "go")!r}
"""
    project.write(REV, None, body, extra=extra)


def counts(project: Project) -> dict[int, int]:
    """How many rows were updated how many times."""
    rows = project.db.query("SELECT n, count(*) AS c FROM items GROUP BY n")
    return {row.n: row.c for row in rows}


def attempts(project: Project) -> list[tuple[str, str | None]]:
    if project.db.query("SELECT to_regclass('script_run_tracker') AS found")[0].found is None:
        return []
    return [(row.status, row.reason) for row in project.db.tracker() if row.revision == REV]


def lock_url(project: Project, port: int) -> str:
    url = sa.make_url(project.db.url).set(host="127.0.0.1", port=port)
    return url.render_as_string(hide_password=False)


def checkpoint_done(project: Project) -> int:
    if project.db.query("SELECT to_regclass('script_run_tracker') AS found")[0].found is None:
        return 0
    rows = project.db.query(
        "SELECT checkpoint FROM script_run_tracker WHERE status = 'pending' AND revision = :r",
        r=REV,
    )
    if not rows or not rows[0].checkpoint:
        return 0
    return int(rows[0].checkpoint["rows_done"])


def lose_the_lock(project: Project, proxy_freeze: object) -> None:
    """Hang the first run's lock connection, then end its session: the lock is free."""
    (holder,) = advisory_locks(project)
    proxy_freeze()  # type: ignore[operator]
    project.db.query("SELECT pg_terminate_backend(:pid)", pid=holder)
    wait_for(lambda: not advisory_locks(project), timeout=10)


def test_batches_of_a_run_that_lost_its_lock_are_never_committed(
    project: Project, tmp_path: Path
) -> None:
    make_items(project)
    write_revision(project, BATCHED, transactional=False, files=tmp_path)
    with tcp_proxy((PG_HOST, PG_PORT)) as proxy:
        first = spawn_dm(
            project,
            "upgrade",
            "heads",
            env={"DM_LOCK_DATABASE_URL": lock_url(project, proxy.port), "DM_POD_NAME": "pod-1"},
        )
        try:
            wait_for(lambda: checkpoint_done(project) >= 15, timeout=60)
            lose_the_lock(project, proxy.freeze)

            second = run_dm(project, "upgrade", "heads", env={"DM_POD_NAME": "pod-2"})
            assert second.returncode == 0, second.stderr
            assert "resuming after key" in second.stderr

            _, stderr = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.communicate()

    assert first.returncode == 3, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("dm: error: lost the migration lock: another run took it over")
    assert "the batches it committed before stay" in error
    assert counts(project) == {1: ROWS}  # every row exactly once
    assert attempts(project) == [("failed", "interrupted"), ("success", None)]


def test_transactional_revision_of_a_run_that_lost_its_lock_rolls_back(
    project: Project, tmp_path: Path
) -> None:
    make_items(project)
    write_revision(project, TRANSACTIONAL, transactional=True, files=tmp_path)
    with tcp_proxy((PG_HOST, PG_PORT)) as proxy:
        first = spawn_dm(
            project,
            "upgrade",
            "heads",
            env={"DM_LOCK_DATABASE_URL": lock_url(project, proxy.port), "DM_POD_NAME": "pod-1"},
        )
        try:
            wait_for(lambda: (tmp_path / "started").exists(), timeout=60)
            lose_the_lock(project, proxy.freeze)

            second = spawn_dm(project, "upgrade", "heads", env={"DM_POD_NAME": "pod-2"})
            # The second run took the revision over: the first one's attempt is failed and
            # the second's pending (its UPDATE waits for the first run's row locks).
            taken_over = [("failed", "interrupted"), ("pending", None)]
            wait_for(lambda: attempts(project) == taken_over, timeout=30)
            (tmp_path / "go").touch()

            _, second_stderr = second.communicate(timeout=60)
            _, stderr = first.communicate(timeout=30)
        finally:
            for proc in (first, second):
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()

    assert second.returncode == 0, second_stderr
    assert first.returncode == 3, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("dm: error: lost the migration lock: another run took it over")
    assert "work in progress was rolled back" in error
    assert "batches" not in error
    assert counts(project) == {1: ROWS}  # applied once, by the second run
    assert attempts(project) == [("failed", "interrupted"), ("success", None)]
