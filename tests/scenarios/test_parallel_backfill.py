"""Parallel backfills: ``dm.batched(..., workers=N)`` and ``dm work`` processes joining it.

Every test counts, per row, how often the batch body touched it: every row must end at
exactly one, whatever worker was killed, frozen or stopped on the way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

import pytest

from conftest import Project
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.process]

REV = "c0ffee000001"

EXTRA = """
import asyncio
import os
from dm import batched

transactional = False
items = sa.table("items", sa.column("id"), sa.column("hits"))
"""

BODY = """
query = sa.select(items.c.id)
async for batch in batched(
    session, query, key=items.c.id, size={size}, workers={workers}, lease_seconds={lease}
):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    await asyncio.sleep({pause})
"""


@pytest.fixture(params=["postgresql"])
def db(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("postgres_db")


def make_items(project: Project, rows: int) -> None:
    project.db.query("CREATE TABLE items (id BIGINT PRIMARY KEY, hits INTEGER NOT NULL)")
    project.db.query(f"INSERT INTO items SELECT g, 0 FROM generate_series(1, {rows}) AS g")


def write_backfill(
    project: Project,
    *,
    workers: int,
    size: int = 100,
    lease: float = 60,
    pause: float = 0.0,
) -> None:
    body = BODY.format(size=size, workers=workers, lease=lease, pause=pause)
    project.write(REV, None, body, extra=EXTRA)


def counters(project: Project) -> dict[int, int]:
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    return {r.hits: r.n for r in rows}


def ranges_left(project: Project) -> int:
    found = project.db.query("SELECT count(*) AS n FROM script_run_tracker_ranges")
    return int(found[0].n)


def test_workers_in_one_run_process_every_row_once(project: Project) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=3)
    ran = run_dm(project, "upgrade", "heads")
    assert ran.returncode == 0, ran.stderr
    assert counters(project) == {1: 20_000}
    assert "key ranges for 3 workers" in ran.stderr
    (attempt,) = project.db.tracker()
    assert attempt.status == "success"
    checkpoint = attempt.checkpoint
    checkpoint = json.loads(checkpoint) if isinstance(checkpoint, str) else checkpoint
    assert checkpoint["rows_done"] == 20_000 and checkpoint["finished"]
    assert ranges_left(project) == 0


def range_rows(project: Project, owner_like: str) -> int:
    """Rows committed by the ranges whose owner matches (``work:%``: ``dm work`` workers)."""
    if not has_table(project):
        return 0
    found = project.db.query(
        "SELECT coalesce(sum(rows_done), 0) AS n FROM script_run_tracker_ranges "
        "WHERE owner LIKE :owner",
        owner=owner_like,
    )
    return int(found[0].n)


def has_table(project: Project) -> bool:
    found = project.db.query(
        "SELECT 1 FROM pg_tables WHERE tablename = 'script_run_tracker_ranges'"
    )
    return bool(found)


def has_ranges(project: Project) -> bool:
    return has_table(project) and ranges_left(project) > 0


def finish(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stderr


def test_dm_work_joins_and_a_killed_worker_loses_nothing(project: Project) -> None:
    make_items(project, 30_000)
    write_backfill(project, workers=2, size=200, lease=2, pause=0.01)
    run = spawn_dm(project, "upgrade", "heads")
    workers = [spawn_dm(project, "work", REV, "--wait", "30") for _ in range(2)]
    wait_for(lambda: run.poll() is not None or range_rows(project, "work:%") >= 2_000, timeout=60)
    workers[0].send_signal(signal.SIGKILL)
    code, stderr = finish(run)
    assert code == 0, stderr
    assert finish(workers[1]) == (0, finish(workers[1])[1])
    assert finish(workers[0])[0] == -signal.SIGKILL
    assert counters(project) == {1: 30_000}
    assert [a.status for a in project.db.tracker()] == ["success"]
    assert ranges_left(project) == 0


def test_the_run_killed_its_workers_go_on_and_the_next_run_finishes(project: Project) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=200, lease=2, pause=0.01)
    run = spawn_dm(project, "upgrade", "heads")
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    worker = spawn_dm(project, "work", REV, "--wait", "30")
    wait_for(lambda: run.poll() is not None or range_rows(project, "work:%") >= 1_000, timeout=60)
    run.send_signal(signal.SIGKILL)
    assert finish(run)[0] == -signal.SIGKILL
    code, stderr = finish(worker)  # it takes over the run's ranges once their leases expire
    assert code == 0, stderr
    assert counters(project) == {1: 20_000}
    again = run_dm(project, "upgrade", "heads")
    assert again.returncode == 0, again.stderr
    assert "resuming its ranges, 0 not finished" in again.stderr
    assert [a.status for a in project.db.tracker()] == ["failed", "success"]
    assert counters(project) == {1: 20_000}


def test_a_frozen_worker_past_its_lease_commits_nothing(project: Project) -> None:
    make_items(project, 6_000)
    write_backfill(project, workers=2, size=100, lease=1, pause=0.05)
    run = spawn_dm(project, "upgrade", "heads")
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    worker = spawn_dm(project, "work", REV, "--wait", "30")
    wait_for(lambda: worker.poll() is not None or range_rows(project, "work:%") >= 300, timeout=60)
    os.kill(worker.pid, signal.SIGSTOP)
    try:  # its lease expires; the run's workers take its range over
        wait_for(lambda: run.poll() is not None or not owned_by_work(project), timeout=60)
        before = counters(project)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    code, stderr = finish(run)
    assert code == 0, stderr
    code, stderr = finish(worker)
    assert code == 0, stderr
    assert "was taken over" in stderr
    assert counters(project) == {1: 6_000}, before


def owned_by_work(project: Project) -> bool:
    """Whether a ``dm work`` process holds an unfinished range."""
    return bool(
        project.db.query(
            "SELECT 1 FROM script_run_tracker_ranges WHERE owner LIKE 'work:%' AND NOT finished"
        )
    )
