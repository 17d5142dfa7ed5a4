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



@pytest.mark.parametrize("workers", [1, 3])
def test_debug_output(project: Project, workers: int) -> None:
    make_items(project, 4_000)
    write_backfill(project, workers=workers, pause=0.05)
    ran = run_dm(project, "upgrade", "heads")
    print(ran.stderr)
    assert counters(project) == {1: 4_000}
    assert False
