"""Parallel backfills: ``dm.batched(..., workers=N)`` and ``dm work`` processes joining it.

Every test counts, per row, how often the batch body touched it: every row must end at
exactly one, whatever worker was killed, frozen or stopped on the way.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Project
from conftest import make_sqlite
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.process]

REV = "c0ffee000001"
QUICK = {"DM_TEST_PAUSE": "0"}
"""For the run that finishes a loop after the scenario: no pause in its batches."""

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
    await asyncio.sleep(float(os.environ.get("DM_TEST_PAUSE", {pause})))
    while os.path.exists("hold"):  # the test holds every worker mid-batch
        await asyncio.sleep(0.01)
"""


@pytest.fixture(params=["postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """PostgreSQL (parallel loops need it), unless a test asks for SQLite."""
    if request.param == "sqlite":
        return make_sqlite(tmp_path)
    return request.getfixturevalue("postgres_db")


Start = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def start(project: Project) -> Iterator[Start]:
    """Start ``dm ARGS`` in the project; whatever still runs at the end is killed and reaped."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        process = spawn_dm(project, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate()


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


def a_new_run_finishes(project: Project, rows: int, statuses: list[str]) -> None:
    """The next run finishes the loop: every row exactly once, and the attempts' statuses."""
    again = run_dm(project, "upgrade", "heads", env=QUICK)
    assert again.returncode == 0, again.stderr
    assert counters(project) == {1: rows}
    assert [a.status for a in project.db.tracker()] == statuses


def test_workers_in_one_run_process_every_row_once(project: Project) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=3)
    ran = run_dm(project, "upgrade", "heads")
    assert ran.returncode == 0, ran.stderr
    assert counters(project) == {1: 20_000}
    assert "key ranges for 3 workers" in ran.stderr
    # The last progress line: the whole, then each worker's rate.
    assert re.search(r"20,000 rows, [\d,]+ rows/s \([\d,]+ \+ [\d,]+ \+ [\d,]+\), done", ran.stderr)
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


def committed_rows(project: Project) -> int:
    """Rows the loop's ranges committed, all workers together."""
    if not has_table(project):
        return 0
    found = project.db.query(
        "SELECT coalesce(sum(rows_done), 0) AS n FROM script_run_tracker_ranges"
    )
    return int(found[0].n)


def leased_ranges(project: Project) -> int:
    """Ranges some worker holds."""
    found = project.db.query(
        "SELECT count(*) AS n FROM script_run_tracker_ranges WHERE owner IS NOT NULL"
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


@pytest.mark.slow
def test_dm_work_joins_and_a_killed_worker_loses_nothing(project: Project, start: Start) -> None:
    make_items(project, 30_000)
    write_backfill(project, workers=2, size=200, lease=2, pause=0.01)
    run = start("upgrade", "heads")
    slow = {"DM_TEST_PAUSE": "0.05"}  # alive when the kill comes
    workers = [start("work", REV, "--wait", "30", env=slow) for _ in range(2)]
    wait_for(lambda: range_rows(project, "work:%") >= 1_000, timeout=60)
    assert workers[0].poll() is None
    workers[0].send_signal(signal.SIGKILL)
    code, stderr = finish(run)
    assert code == 0, stderr
    assert finish(workers[1]) == (0, finish(workers[1])[1])
    assert finish(workers[0])[0] == -signal.SIGKILL
    assert counters(project) == {1: 30_000}
    assert [a.status for a in project.db.tracker()] == ["success"]
    assert ranges_left(project) == 0


@pytest.mark.slow
def test_the_run_killed_its_workers_go_on_and_the_next_run_finishes(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=200, lease=2, pause=0.01)
    run = start("upgrade", "heads", env={"DM_TEST_PAUSE": "0.2"})  # alive at the kill
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    worker = start("work", REV, "--wait", "30")
    wait_for(lambda: range_rows(project, "work:%") >= 1_000, timeout=60)
    assert run.poll() is None
    run.send_signal(signal.SIGKILL)
    assert finish(run)[0] == -signal.SIGKILL
    code, stderr = finish(worker)  # it takes over the run's ranges once their leases expire
    assert code == 0, stderr
    assert counters(project) == {1: 20_000}
    again = run_dm(project, "upgrade", "heads", env=QUICK)
    assert again.returncode == 0, again.stderr
    assert "resuming its ranges, 0 not finished" in again.stderr
    assert [a.status for a in project.db.tracker()] == ["failed", "success"]
    assert counters(project) == {1: 20_000}


@pytest.mark.slow
def test_a_frozen_worker_past_its_lease_commits_nothing(project: Project, start: Start) -> None:
    make_items(project, 4_000)
    write_backfill(project, workers=2, size=100, lease=1, pause=0.05)
    run = start("upgrade", "heads", env={"DM_TEST_PAUSE": "0.2"})  # still running
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    # Frozen inside a transaction, its session ends after 3 s (the idle-in-transaction guard):
    # its range row and row locks are then free to take over.
    worker = start("work", REV, "--wait", "30", env={"DM_IDLE_IN_TRANSACTION_TIMEOUT": "3"})
    wait_for(lambda: worker.poll() is not None or range_rows(project, "work:%") >= 300, timeout=60)
    assert worker.poll() is None and run.poll() is None
    os.kill(worker.pid, signal.SIGSTOP)
    try:  # its lease expires; the run's workers take its range over
        wait_for(lambda: run.poll() is not None or not owned_by_work(project), timeout=60)
        before = counters(project)
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    code, stderr = finish(run)
    assert code == 0, stderr
    code, stderr = finish(worker)
    # Woken, it commits nothing of the range it lost: refused at its checkpoint (it goes on
    # and ends 0), or its session was ended while it was frozen (exit 75).
    assert (code == 0 and "was taken over" in stderr) or code == 75, stderr
    assert counters(project) == {1: 4_000}, before


GAP_BODY = """
query = sa.select(items.c.id)
async for batch in batched(session, query, key=items.c.id, size=100, workers=2, lease_seconds=60):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    if batch.upper > {dense}:  # a worker past the gap is slow
        await asyncio.sleep(float(os.environ.get("DM_TEST_PAUSE", 0.1)))
"""


@pytest.mark.slow
def test_a_range_whose_rows_sit_behind_a_gap_is_split(project: Project, start: Start) -> None:
    # Ids 1-2,000, then nothing up to 190,000, then 190,001-193,000: of the 8 ranges cut by
    # value, the last, (168,875, 193,000], holds 3,000 rows (30 batches) behind 21,000 empty
    # keys. After its first batches its worker has done few rows over many keys: estimated
    # from them, what it has left looks under 4 batches.
    dense, gap_end, rows_after = 2_000, 190_000, 3_000
    make_items(project, dense)
    project.db.query(
        f"INSERT INTO items SELECT g, 0 FROM generate_series({gap_end + 1}, "
        f"{gap_end + rows_after}) AS g"
    )
    project.write(REV, None, GAP_BODY.format(dense=dense), extra=EXTRA)
    run = start("upgrade", "heads")

    def seen() -> str | None:
        """Return "split" once a range split off the planned ones has rows done (the
        other worker's, in the gap range's keys), "ended" if the run ended first."""
        if has_table(project) and project.db.query(
            "SELECT 1 FROM script_run_tracker_ranges WHERE number >= 8 AND rows_done > 0"
        ):
            return "split"
        return None if run.poll() is None else "ended"

    # Unsplit, the slow worker does the 30 batches alone (3 s) while the other one idles.
    outcome = wait_for(seen, timeout=60)
    code, stderr = finish(run)
    assert code == 0, stderr
    assert "8 key ranges for 2 workers" in stderr
    assert outcome == "split", stderr
    assert counters(project) == {1: dense + rows_after}
    assert ranges_left(project) == 0


def work_owners(project: Project) -> set[str]:
    """The ``dm work`` processes holding a range now."""
    rows = project.db.query(
        "SELECT DISTINCT owner FROM script_run_tracker_ranges WHERE owner LIKE 'work:%'"
    )
    return {row.owner for row in rows}


def owned_by_work(project: Project) -> bool:
    """Whether a ``dm work`` process holds an unfinished range."""
    return bool(
        project.db.query(
            "SELECT 1 FROM script_run_tracker_ranges WHERE owner LIKE 'work:%' AND NOT finished"
        )
    )


@pytest.mark.slow
def test_pause_stops_every_worker_and_resume_finishes_the_ranges(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=100, lease=600, pause=0.03)
    run = start("upgrade", "heads")
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    worker = start("work", REV, "--wait", "30")
    wait_for(lambda: run.poll() is not None or range_rows(project, "work:%") >= 500, timeout=60)
    (project.root / "hold").touch()  # every worker waits in its batch
    paused = run_dm(project, "pause", REV, "--reason", "peak traffic")
    (project.root / "hold").unlink()
    assert paused.returncode == 0, paused.stderr
    code, stderr = finish(run)
    assert code == 5, stderr
    code, worker_err = finish(worker)
    assert code == 5, worker_err
    assert "paused by" in worker_err and "peak traffic" in worker_err
    done = counters(project)
    assert set(done) == {0, 1}, done  # stopped part-way, nothing twice
    assert [a.status for a in project.db.tracker()] == ["paused"]
    # Every worker gave its range up (the resumed run need not wait out the 600 s lease),
    # and dm status shows the rows all of them committed.
    assert leased_ranges(project) == 0
    assert status_rows(project) == committed_rows(project) == done[1]
    # A worker started now does nothing: the attempt is paused.
    late = run_dm(project, "work", REV)
    assert late.returncode == 5, late.stderr
    assert "nothing done" in late.stderr and "peak traffic" in late.stderr
    assert counters(project) == done
    resumed = run_dm(project, "resume", REV, env=QUICK)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming its ranges" in resumed.stderr
    assert counters(project) == {1: 20_000}
    assert [a.status for a in project.db.tracker()] == ["paused", "success"]
    assert ranges_left(project) == 0


@pytest.mark.slow
def test_max_runtime_stops_all_workers_and_the_next_run_goes_on(project: Project) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=3, size=100, pause=0.05)
    stopped = run_dm(project, "upgrade", "heads", "--max-runtime", "1")
    assert stopped.returncode == 5, stopped.stderr
    done = counters(project)
    assert set(done) == {0, 1} and done[1] >= 100, done
    assert leased_ranges(project) == 0  # every worker gave its range up at the stop
    a_new_run_finishes(project, 20_000, ["stopped", "success"])


def stop_requested(project: Project) -> bool:
    """Whether the run left a ``stop`` request on its attempt (its time box is up)."""
    found = project.db.query("SELECT request FROM script_run_tracker ORDER BY id DESC LIMIT 1")
    return bool(found) and found[0].request == "stop"


HELD_BODY = """
query = sa.select(items.c.id)
async for batch in batched(session, query, key=items.c.id, size=100, workers=2, lease_seconds=60):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    await asyncio.sleep(0.01)
    while os.path.exists("gate") and not os.environ.get("HOLD_ME"):  # until dm work joined
        await asyncio.sleep(0.01)
    while os.environ.get("HOLD_ME") and os.path.exists("hold"):  # dm work only
        await asyncio.sleep(0.01)
"""


@pytest.mark.slow
def test_max_runtime_stops_a_run_that_waits_for_another_worker_s_range(
    project: Project, start: Start
) -> None:
    make_items(project, 4_000)
    project.write(REV, None, HELD_BODY, extra=EXTRA)
    (project.root / "hold").touch()  # the dm work process holds its range, mid-batch
    (project.root / "gate").touch()  # the run's workers wait in their first batch
    run = start("upgrade", "heads", "--max-runtime", "8")
    worker = start("work", REV, "--wait", "30", env={"HOLD_ME": "1"})
    try:  # the run does every other range, then waits for the held one: its time box ends it
        wait_for(
            lambda: run.poll() is not None or (has_table(project) and bool(work_owners(project))),
            timeout=60,
        )
        (project.root / "gate").unlink()
        wait_for(lambda: run.poll() is not None or stop_requested(project), timeout=60)
    finally:  # the held worker ends its batch, reads the run's stop request and stops
        (project.root / "hold").unlink()
    code, stderr = finish(run)
    assert code == 5, stderr
    assert "no range left to claim; waiting for 1 range(s)" in stderr
    assert "the run's max runtime of 8s was reached" in stderr
    code, told = finish(worker)
    assert code == 5 and "its run stopped" in told, told
    a_new_run_finishes(project, 4_000, ["stopped", "success"])


@pytest.mark.slow
def test_max_runtime_stops_dm_work_too_and_records_the_rows_of_every_worker(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=100, pause=0.05)
    run = start("upgrade", "heads", "--max-runtime", "3")
    worker = start("work", REV, "--wait", "30")
    code, stderr = finish(run)
    assert code == 5, stderr
    code, told = finish(worker)
    assert code == 5, told
    assert "its run stopped: the run's max runtime of 3s was reached" in told, told
    done = counters(project)
    assert set(done) == {0, 1}, done
    assert status_rows(project) == done[1]  # dm status tells every worker's rows
    assert leased_ranges(project) == 0


def test_a_failing_worker_fails_the_attempt_and_the_next_run_resumes(project: Project) -> None:
    make_items(project, 10_000)
    body = BODY.format(size=100, workers=3, lease=5, pause=0.0) + (
        "    if batch.lower is not None and batch.lower < 7_000 <= batch.upper "
        "and not os.path.exists('fixed'):\n"
        "        raise ValueError('bad row 7000')\n"
    )
    project.write(REV, None, body, extra=EXTRA)
    failed = run_dm(project, "upgrade", "heads")
    assert failed.returncode == 1, failed.stderr
    assert "bad row 7000" in failed.stderr
    done = counters(project)
    assert set(done) <= {0, 1}, done
    assert status_rows(project) == done.get(1, 0)  # the rows of every worker, recorded
    assert leased_ranges(project) == 0  # each worker gave its ranges up, the run's own too
    (project.root / "fixed").touch()
    a_new_run_finishes(project, 10_000, ["failed", "success"])


@pytest.mark.slow
def test_a_worker_whose_connection_is_terminated_loses_nothing(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=100, lease=2, pause=0.03)
    run = start("upgrade", "heads")
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    worker = start("work", REV, "--wait", "30", env={"DM_POD_NAME": "worker-1"})
    wait_for(lambda: run.poll() is not None or range_rows(project, "work:%") >= 500, timeout=60)
    killed = project.db.query(
        "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
        "WHERE application_name = 'dm:worker-1'"
    )
    assert [row.done for row in killed] == [True]
    code, worker_err = finish(worker)
    assert code == 75, worker_err
    code, stderr = finish(run)
    assert code == 0, stderr
    assert counters(project) == {1: 20_000}


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_on_sqlite_workers_run_as_one_and_dm_work_is_refused(project: Project) -> None:
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, hits INTEGER NOT NULL)")
    project.db.query(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000) "
        "INSERT INTO items SELECT x, 0 FROM c"
    )
    write_backfill(project, workers=4)
    ran = run_dm(project, "upgrade", "heads")
    assert ran.returncode == 0, ran.stderr
    assert "batched(workers=4) runs as one worker here (SQLite has one writer)" in ran.stderr
    assert counters(project) == {1: 1000}
    refused = run_dm(project, "work", REV)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "dm: error: dm work needs PostgreSQL: on SQLite, which has one writer, a batched loop "
        "runs as one worker"
    ]


KILL_ROUNDS = int(os.environ.get("DM_STRESS_ROUNDS", "20"))


@pytest.mark.stress
def test_sigkill_of_random_workers_at_random_moments_loses_and_repeats_nothing(
    project: Project, start: Start
) -> None:
    seed = int(os.environ.get("DM_TEST_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    rows = 20_000
    make_items(project, rows)
    down = None
    for number in range(KILL_ROUNDS):
        context = f"seed {seed}, round {number + 1}"
        project.db.query("UPDATE items SET hits = 0")
        rev = f"c0ffee{number:06d}"
        body = BODY.format(size=100, workers=2, lease=1, pause=0.002)
        project.write(rev, down, body, extra=EXTRA)
        down = rev
        processes = [start("upgrade", "heads", "--lock-timeout", "60")]
        processes += [start("work", rev, "--wait", "30") for _ in range(2)]
        for _ in range(3):  # three kills, each after a random share of the rows
            target = counters(project).get(1, 0) + rng.randrange(500, 3_000)
            wait_for(
                lambda t=target, ps=processes: (
                    counters(project).get(1, 0) >= t or all(p.poll() is not None for p in ps)
                ),
                timeout=60,
            )
            alive = [p for p in processes if p.poll() is None]
            if not alive:
                break
            victim = rng.choice(alive)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            command = victim.args[3:]  # [python, -m, dm, ...]: the same command again
            processes.append(start(*command))
        ended = [(p.args[3:], *finish(p, timeout=120)) for p in processes]
        odd = [e for e in ended if e[1] not in (0, -signal.SIGKILL)]
        assert not odd, f"{context}: {odd}"
        finished = run_dm(project, "upgrade", "heads")
        assert finished.returncode == 0, f"{context}: {finished.stderr}"
        assert counters(project) == {1: rows}, context
        assert ranges_left(project) == 0, context


WAITING_BODY = """
async def held_here(session):  # asks the database, as dm.backoff's predicates do
    await session.execute(sa.text("SELECT 1"))
    if os.environ.get("DM_TEST_WAIT") and os.path.exists("wait"):
        return "the test holds this process"
    return None

query = sa.select(items.c.id)
async for batch in batched(
    session, query, key=items.c.id, size=100, workers=2, lease_seconds=2,
    pause_when=held_here, pause_poll=30,
):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    await asyncio.sleep(0.02)
"""


@pytest.mark.slow
def test_workers_held_by_pause_when_past_their_lease_keep_their_ranges(
    project: Project, start: Start
) -> None:
    make_items(project, 6_000)
    project.write(REV, None, WAITING_BODY, extra=EXTRA)
    (project.root / "wait").touch()  # the run's workers wait after their first batch
    run = start("upgrade", "heads", env={"DM_TEST_WAIT": "1"})
    worker = start("work", REV, "--wait", "30")  # does every other range, then waits
    try:

        def run_holds_the_rest() -> bool:
            found = project.db.query(
                "SELECT count(*) FILTER (WHERE owner LIKE 'run:%') AS run, count(*) AS left, "
                "max(lease_until) FILTER (WHERE owner LIKE 'run:%') AS until "
                "FROM script_run_tracker_ranges WHERE NOT finished"
            )
            return found[0].left > 0 and found[0].run == found[0].left

        wait_for(lambda: run.poll() is not None or (has_ranges(project) and run_holds_the_rest()))
        assert run.poll() is None
        leased = project.db.query(
            "SELECT max(lease_until) AS until FROM script_run_tracker_ranges "
            "WHERE owner LIKE 'run:%' AND NOT finished"
        )[0].until
        # Well past the leases the run's waiting workers held then (dm work looks for a
        # range to claim every 0.2 s): renewed, the ranges are still theirs.
        wait_for(
            lambda: bool(
                project.db.query(
                    "SELECT clock_timestamp() > CAST(:t AS timestamptz) + interval '2 seconds' "
                    "AS past",
                    t=leased,
                )[0].past
            ),
            timeout=30,
        )
        assert run_holds_the_rest()
    finally:
        (project.root / "wait").unlink()
    code, stderr = finish(run)
    assert code == 0, stderr
    code, stderr = finish(worker)
    assert code == 0, stderr
    assert counters(project) == {1: 6_000}
    assert ranges_left(project) == 0


@pytest.mark.slow
def test_status_shows_the_rows_of_all_workers_while_the_loop_runs(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=100, pause=0.1)
    run = start("upgrade", "heads")
    worker = start("work", REV, "--wait", "30")
    try:
        wait_for(lambda: run.poll() is not None or status_rows(project) > 0, timeout=60)
        (project.root / "hold").touch()  # the loop stays where it is while status is read
        text = run_dm(project, "status")
        assert "rows done in key ranges (2 workers)" in text.stdout, text.stdout
    finally:
        (project.root / "hold").unlink(missing_ok=True)
        assert finish(run)[0] == 0
        assert finish(worker)[0] == 0
    assert counters(project) == {1: 20_000}


def status_rows(project: Project) -> int:
    (row,) = json.loads(run_dm(project, "status", "--json").stdout)
    return int((row.get("checkpoint") or {}).get("rows_done") or 0)


@pytest.mark.slow
def test_sigterm_ends_the_run_and_its_workers_and_records_it(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=3, size=100, pause=0.01)
    run = start("upgrade", "heads", env={"DM_TEST_PAUSE": "0.1"})  # alive till then
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    workers = [start("work", REV, "--wait", "30") for _ in range(2)]
    wait_for(lambda: run.poll() is not None or len(work_owners(project)) == 2, timeout=60)
    (project.root / "hold").touch()  # every worker waits in a batch when the signals come
    workers[0].send_signal(signal.SIGTERM)
    run.send_signal(signal.SIGTERM)
    code, stderr = finish(run)
    assert code == 143, stderr
    assert "interrupted by SIGTERM" in stderr
    code, first = finish(workers[0])
    assert code == 143, first
    (project.root / "hold").unlink()
    # The other worker stops too: the attempt failed, and no new run resumes it.
    code, second = finish(workers[1])
    assert code == 5 and "its attempt failed" in second, second
    held = project.db.query("SELECT number, owner FROM script_run_tracker_ranges WHERE owner <> ''")
    assert not held, (held, first[-400:], second[-400:])  # each gave its range up as it ended
    idle = project.db.query(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'dm:%'"
    )
    assert idle[0].n == 0  # no worker connection outlives the run
    assert set(counters(project)) == {0, 1}
    assert [a.status for a in project.db.tracker()] == ["failed"]
    again = run_dm(project, "upgrade", "heads", env=QUICK)
    assert again.returncode == 0, again.stderr
    assert counters(project) == {1: 20_000}


@pytest.mark.slow
def test_cancel_stops_every_worker_and_the_next_run_starts_over(
    project: Project, start: Start
) -> None:
    make_items(project, 20_000)
    write_backfill(project, workers=2, size=100, lease=5, pause=0.03)
    run = start("upgrade", "heads")
    worker = start("work", REV, "--wait", "30")
    wait_for(lambda: run.poll() is not None or range_rows(project, "work:%") >= 300, timeout=60)
    (project.root / "hold").touch()
    cancelled = run_dm(project, "cancel", REV, "--reason", "wrong table")
    (project.root / "hold").unlink()
    assert cancelled.returncode == 0, cancelled.stderr
    assert finish(run)[0] == 5
    code, worker_err = finish(worker)
    assert code == 5 and "cancelled by" in worker_err, worker_err
    assert [a.status for a in project.db.tracker()] == ["cancelled"]
    first = counters(project)
    assert set(first) == {0, 1}, first
    project.db.query("UPDATE items SET hits = 0")  # what an operator's fix would do
    again = run_dm(project, "upgrade", "heads", env=QUICK)
    assert again.returncode == 0, again.stderr
    assert "resuming" not in again.stderr  # started over: new ranges
    assert counters(project) == {1: 20_000}


def test_an_autocommit_block_before_a_parallel_loop_fails_with_one_clear_line(
    project: Project,
) -> None:
    make_items(project, 2_000)
    body = "async with dm.autocommit(session):\n    pass\n" + BODY.format(
        size=100, workers=2, lease=5, pause=0.0
    )
    project.write(REV, None, body, extra=EXTRA + "import dm\n")
    failed = run_dm(project, "upgrade", "heads")
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines()[-1] == (
        f"dm: error: revision {REV} failed: UsageError: revision {REV}: an autocommit block "
        "cannot run in a worker of a parallel loop (each worker runs the code before the loop "
        "again): move it into a revision of its own before this one, or after the loop"
    )
    assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_a_revision_failing_in_dm_work_is_told_as_the_revision_s_failure(
    project: Project, start: Start
) -> None:
    make_items(project, 4_000)
    body = BODY.format(size=100, workers=2, lease=5, pause=0.02) + (
        "    if os.environ.get('BOOM'):\n        raise ValueError('bad row in a worker')\n"
    )
    project.write(REV, None, body, extra=EXTRA)
    run = start("upgrade", "heads", env={"DM_TEST_PAUSE": "0.2"})  # still running
    wait_for(lambda: run.poll() is not None or has_ranges(project), timeout=60)
    failed = run_dm(project, "work", REV, "--wait", "30", env={"BOOM": "1"})
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines()[-1] == (
        f"dm: error: revision {REV} failed: ValueError: bad row in a worker"
    )
    code, stderr = finish(run)
    assert code == 0, stderr  # the run takes the failed worker's range over at once
    assert counters(project) == {1: 4_000}
