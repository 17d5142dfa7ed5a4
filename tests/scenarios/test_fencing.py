"""Exactly once when a run loses its lock without noticing: every tracker write is fenced.

The first run's lock connection goes through a proxy that the test freezes (a hung network:
the first run's watchdog sees nothing for its whole ping timeout), and its PostgreSQL
session is terminated, which frees the advisory lock. A second run then takes the lock and
the revision over while the first one still holds uncommitted work. The first run must
commit nothing more: its next tracker write is refused, its transaction rolls back, and it
exits 3. Each revision waits at a known point (a file it touches) for the test's go-ahead,
so the interleaving is the same on every run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import Project
from conftest import spawn_dm
from conftest import wait_for
from support.network import TcpProxy
from support.network import tcp_proxy
from support.network import through
from support.processes import advisory_locks

pytestmark = [
    pytest.mark.process,
    pytest.mark.postgres,
    pytest.mark.parametrize("db", ["postgresql"], indirect=True),
]

ROWS = 60
REV = "f3c1a0b2c4d5"

WAIT_FOR_GO = """
Path(STARTED).touch()
while not Path(GO).exists():
    await asyncio.sleep(0.05)
"""

# Batches of 5; from the fourth batch on, each waits (its write made, not yet committed).
BATCHED = (
    """
async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=5):
    await session.execute(items.update().where(batch.where()).values(n=items.c.n + 1))
    if batch.upper > 15:
"""
    + "\n".join("        " + line for line in WAIT_FOR_GO.strip().splitlines())
    + "\n"
)

# The whole table in one transaction, then the wait (holding the row locks).
TRANSACTIONAL = "await session.execute(items.update().values(n=items.c.n + 1))\n" + WAIT_FOR_GO

KINDS = {
    # kind: (body, transactional, what the first run's error says)
    "batched": (BATCHED, False, "the batches it committed before stay"),
    "transactional": (TRANSACTIONAL, True, "work in progress was rolled back"),
}


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


def start_behind(proxy: TcpProxy, project: Project) -> subprocess.Popen[str]:
    """Start ``dm upgrade heads`` whose lock connection goes through ``proxy``."""
    env = {"DM_LOCK_DATABASE_URL": through(project.db.url, proxy.port), "DM_POD_NAME": "pod-1"}
    return spawn_dm(project, "upgrade", "heads", env=env)


def lose_the_lock(project: Project, proxy: TcpProxy) -> None:
    """Hang the first run's lock connection, then end its session: the lock is free."""
    (holder,) = advisory_locks(project)
    proxy.freeze()
    project.db.query("SELECT pg_terminate_backend(:pid)", pid=holder)
    wait_for(lambda: not advisory_locks(project), timeout=10)


@pytest.mark.parametrize("kind", [pytest.param("batched", marks=pytest.mark.slow), "transactional"])
def test_a_run_that_lost_its_lock_commits_nothing_more(
    project: Project, tmp_path: Path, kind: str
) -> None:
    body, transactional, kept = KINDS[kind]
    make_items(project)
    write_revision(project, body, transactional=transactional, files=tmp_path)
    with tcp_proxy() as proxy:
        first = start_behind(proxy, project)
        second = None
        try:
            wait_for(lambda: (tmp_path / "started").exists() or first.poll() is not None, 60)
            assert first.poll() is None, first.communicate()
            lose_the_lock(project, proxy)

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
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.communicate()

    assert second.returncode == 0, second_stderr
    if not transactional:
        assert "resuming after key 15" in second_stderr
    assert first.returncode == 3, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("dm: error: lost the migration lock: another run took it over")
    assert kept in error
    assert counts(project) == {1: ROWS}  # every row exactly once
    assert attempts(project) == [("failed", "interrupted"), ("success", None)]
