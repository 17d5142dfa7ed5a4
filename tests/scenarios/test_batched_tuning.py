"""dm.batched's self-tuning batch size, ``pause_when`` and ``dm.backfill.backoff``'s predicates."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from conftest import Project
from conftest import invoke
from conftest import run_dm
from conftest import wait_for

A = "a1b2c3d4e5f6"

EXTRA = """
import asyncio
import os
from dm import batched
transactional = False
items = sa.table("items", sa.column("id"), sa.column("hits"))
sizes = sa.table("sizes", sa.column("upper"), sa.column("size"))
"""


def make_items(project: Project, n: int) -> None:
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, hits INTEGER NOT NULL)")
    project.db.query("CREATE TABLE sizes (upper INTEGER NOT NULL, size INTEGER NOT NULL)")
    project.db.query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < :n) "
        "INSERT INTO items SELECT x, 0 FROM c",
        n=n,
    )


def hits(project: Project) -> dict[int, int]:
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    return {r.hits: r.n for r in rows}


# Rows above SLOW_FROM cost ROW_COST each: the loop sleeps once per batch for that many times
# the batch's such rows (ids run 1..n, so the key range counts them). One sleep of a tenth of a
# second or more, not one per row, keeps the cost what the test says it is on a fast or a slow
# machine and on every Python; only the real per-row work comes on top, small beside TARGET.
SLOW_FROM = 3000
SLOW_ROWS = 1800
ROW_COST = 0.002
TARGET = 0.4
ADAPTIVE = f"""
query = sa.select(items.c.id)
async for batch in batched(
    session, query, key=items.c.id, size=100, target_seconds={TARGET}, min_size=10, max_size=1000
):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    slow_rows = max(0, batch.upper - max(batch.lower or 0, {SLOW_FROM}))
    await asyncio.sleep(slow_rows * {ROW_COST})
    await session.execute(sizes.insert().values(upper=batch.upper, size=batch.size))
"""


@pytest.mark.slow  # seconds of timed batches; pause_when and the predicates stay fast
@pytest.mark.matrix
def test_the_batch_size_adapts_toward_the_target_time(project: Project) -> None:
    make_items(project, SLOW_FROM + SLOW_ROWS)
    project.write(A, None, ADAPTIVE, extra=EXTRA)

    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 0, result.stderr
    assert hits(project) == {1: SLOW_FROM + SLOW_ROWS}
    recorded = [(r.upper, r.size) for r in project.db.query("SELECT * FROM sizes ORDER BY upper")]
    fast = [size for upper, size in recorded if upper <= SLOW_FROM]
    slow = [size for upper, size in recorded if upper > SLOW_FROM]
    # Fast rows: a batch takes far less than TARGET, so the size grows from 100 (up to the
    # ceiling); slow rows cost at least ROW_COST each, so it comes back down to about
    # TARGET / ROW_COST = 200 rows: never above it by more than the 10% dead band and the
    # smoothing, and below it only by what the real per-row work adds.
    ideal = TARGET / ROW_COST
    assert fast[0] == 100 and max(fast) > 100 and fast == sorted(fast), recorded
    assert slow[-1] < max(fast), recorded
    assert ideal / 2 <= slow[-1] <= ideal * 1.25, recorded
    assert all(10 <= size <= 1000 for _, size in recorded), recorded


def test_a_resumed_self_tuning_loop_goes_on_at_the_size_it_reached(project: Project) -> None:
    make_items(project, 3200)
    failing = (
        ADAPTIVE
        + """
    if os.environ.get("DM_TEST_FAIL") and batch.upper > 2500:
        raise RuntimeError("stopped mid-way")
"""
    )
    project.write(A, None, failing, extra=EXTRA)
    assert invoke(project, "upgrade", "heads", DM_TEST_FAIL="1").exit_code == 1
    (failed,) = project.db.tracker()
    checkpoint = (
        json.loads(failed.checkpoint) if isinstance(failed.checkpoint, str) else failed.checkpoint
    )
    # The checkpoint is the last batch that committed before the failing one (how many that
    # is depends on how fast the machine is), at the size that batch had grown to.
    committed = project.db.query("SELECT upper, size FROM sizes ORDER BY upper DESC LIMIT 1")[0]
    assert 0 < checkpoint["rows_done"] <= 2500, checkpoint
    assert (checkpoint["rows_done"], checkpoint["batch_size"]) == tuple(committed), checkpoint
    assert checkpoint["batch_size"] > 100, checkpoint
    project.db.query("DELETE FROM sizes")

    resumed = invoke(project, "upgrade", "heads")

    assert resumed.exit_code == 0, resumed.stderr
    first = project.db.query("SELECT size FROM sizes ORDER BY upper LIMIT 1")[0].size
    assert first == checkpoint["batch_size"]
    assert hits(project) == {1: 3200}


# A loop that waits while the flag table holds a reason.
PAUSED = """
async def flagged(session):
    return await session.scalar(sa.text("SELECT reason FROM pause_flag"))

query = sa.select(items.c.id)
async for batch in batched(
    session, query, key=items.c.id, size=10, pause_when=flagged, pause_poll=0.05
):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
"""


def checkpoint_of(project: Project) -> dict[str, Any]:
    (row,) = project.db.query("SELECT checkpoint FROM script_run_tracker ORDER BY id DESC LIMIT 1")
    value = row.checkpoint
    return json.loads(value) if isinstance(value, str) else dict(value)


@pytest.mark.process
@pytest.mark.slow
def test_pause_when_holds_the_loop_until_the_flag_is_cleared(project: Project, spawn: Any) -> None:
    make_items(project, 50)
    project.db.query("CREATE TABLE pause_flag (reason VARCHAR(100))")
    project.db.query("INSERT INTO pause_flag VALUES ('maintenance window')")
    project.write(A, None, PAUSED, extra=EXTRA)

    dm = spawn(project, "upgrade", "heads")
    wait_for(lambda: "waiting: maintenance window" in dm.stderr() or not dm.running())
    assert dm.running(), dm.stderr()
    # Held after its first batch, committed with its checkpoint.
    assert checkpoint_of(project)["rows_done"] == 10
    assert hits(project) == {1: 10, 0: 40}

    project.db.query("DELETE FROM pause_flag")
    assert dm.wait(30) == 0, dm.stderr()
    assert "resuming after waiting" in dm.stderr()
    assert hits(project) == {1: 50}
    assert checkpoint_of(project)["rows_done"] == 50


@pytest.mark.process
@pytest.mark.slow
def test_sigterm_while_waiting_stops_at_once_and_the_next_run_resumes(
    project: Project, spawn: Any
) -> None:
    make_items(project, 50)
    project.db.query("CREATE TABLE pause_flag (reason VARCHAR(100))")
    project.db.query("INSERT INTO pause_flag VALUES ('replica behind')")
    project.write(A, None, PAUSED.replace("pause_poll=0.05", "pause_poll=30"), extra=EXTRA)

    dm = spawn(project, "upgrade", "heads")
    wait_for(lambda: "waiting: replica behind" in dm.stderr() or not dm.running())
    code, seconds = dm.signal_and_time(signal.SIGTERM)
    assert code == 143, dm.stderr()
    assert seconds < 10  # not after the 30 s poll
    ((status, done),) = [
        (r.status, checkpoint_of(project)["rows_done"]) for r in project.db.tracker()
    ]
    assert (status, done) == ("failed", 10)

    project.db.query("DELETE FROM pause_flag")
    resumed = run_dm(project, "upgrade", "heads")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after key 10, 10 rows already done" in resumed.stderr
    assert hits(project) == {1: 50}


BACKOFF = """
from dm.backoff import any_of, lock_waits_above, long_transactions_above, replica_lag_above

query = sa.select(items.c.id)
pause_when = any_of(
    replica_lag_above(5), lock_waits_above(5), long_transactions_above(0, older_than=1)
)
async for batch in batched(
    session, query, key=items.c.id, size=10, pause_when=pause_when, pause_poll=0.05
):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
"""


@pytest.mark.process
@pytest.mark.slow
def test_the_reason_to_wait_is_a_field_of_json_logs(project: Project, spawn: Any) -> None:
    make_items(project, 30)
    project.db.query("CREATE TABLE pause_flag (reason VARCHAR(100))")
    project.db.query("INSERT INTO pause_flag VALUES ('nightly export')")
    project.write(A, None, PAUSED, extra=EXTRA)

    dm = spawn(project, "--log-format", "json", "upgrade", "heads")
    wait_for(lambda: "nightly export" in dm.stderr() or not dm.running())
    project.db.query("DELETE FROM pause_flag")
    assert dm.wait(30) == 0, dm.stderr()
    entries = [json.loads(line) for line in dm.stderr().splitlines()]
    (waiting,) = [e for e in entries if "waiting" in e]
    assert waiting["waiting"] == "nightly export"
    assert waiting["message"].endswith("waiting: nightly export")


def test_the_ready_made_predicates_let_an_idle_database_run(project: Project) -> None:
    make_items(project, 30)
    project.write(A, None, BACKOFF, extra=EXTRA)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    assert "waiting" not in result.stderr
    assert hits(project) == {1: 30}


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.process
@pytest.mark.slow
def test_a_long_transaction_elsewhere_holds_the_loop(project: Project, spawn: Any) -> None:
    make_items(project, 30)
    project.write(A, None, BACKOFF, extra=EXTRA)
    # Another session's transaction, open (and busy) until it is ended.
    other = subprocess.Popen(
        ["psql", project.db.sync_url, "-c", "BEGIN; SELECT pg_sleep(60); COMMIT;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: (
                project.db.query(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                    "AND datname = current_database() "
                    "AND xact_start < now() - interval '1 second' AND query LIKE '%pg_sleep(60)%'"
                )[0].n
            )
        )
        dm = spawn(project, "upgrade", "heads")
        wait_for(lambda: "transaction(s) open for more than 1s" in dm.stderr() or not dm.running())
        assert dm.running(), dm.stderr()
        assert hits(project) == {1: 10, 0: 20}
    finally:
        other.terminate()
        other.wait(10)
    project.db.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%'"
        " AND pid <> pg_backend_pid() AND datname = current_database()"
    )
    assert dm.wait(30) == 0, dm.stderr()
    assert hits(project) == {1: 30}
