"""Time-boxed runs, and pause / resume / cancel of a running backfill from another shell.

Real ``dm`` processes on SQLite and PostgreSQL. A ``transactional = False`` revision adds
one to every row of a 60-row table in batches of 5; a second revision after it records
that it ran. Where the interleaving matters, the backfill waits at the start of its fourth
batch (three batches committed) until the test touches a go-file, so a request made from
another process is always in place before that batch's checkpoint is written.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for
from dm import api
from dm.core.errors import UsageError

POSTGRES_ONLY = pytest.mark.parametrize(
    "db", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
ROWS = 60
SIZE = 5
REV = "c0ffee000001"
AFTER = "c0ffee000002"

LOOP = f"""
async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size={SIZE}):
    if (batch.lower or 0) >= 15 and not Path(GO).exists():
        Path(STARTED).touch()
        while not Path(GO).exists():
            await asyncio.sleep(0.02)
    began = time.monotonic()
    await session.execute(items.update().where(batch.where()).values(n=items.c.n + 1))
    await asyncio.sleep(PAUSE)
    await session.execute(beats.insert().values(began=began, ended=time.monotonic()))
"""


def make_project(
    project: Project, files: Path, *, pause: float = 0.0, attributes: str = ""
) -> None:
    """The items table, the backfill ``REV`` and the revision ``AFTER`` that follows it."""
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    project.db.query("CREATE TABLE after_ran (id INTEGER PRIMARY KEY)")
    project.db.query("CREATE TABLE beats (began FLOAT NOT NULL, ended FLOAT NOT NULL)")
    values = ", ".join(f"({i}, 0)" for i in range(1, ROWS + 1))
    project.db.query(f"INSERT INTO items VALUES {values}")
    extra = f"""
import asyncio
import time
from pathlib import Path
from dm import batched

transactional = False
{attributes}
items = sa.table("items", sa.column("id"), sa.column("n"))
beats = sa.table("beats", sa.column("began"), sa.column("ended"))
STARTED = {str(files / "started")!r}
GO = {str(files / "go")!r}
PAUSE = {pause!r}
"""
    project.write(REV, None, LOOP, extra=extra)
    project.write(AFTER, REV, "await session.execute(sa.text('INSERT INTO after_ran VALUES (1)'))")


def counts(project: Project) -> dict[int, int]:
    """How many rows were updated how many times."""
    rows = project.db.query("SELECT n, count(*) AS c FROM items GROUP BY n")
    return {row.n: row.c for row in rows}


def after_ran(project: Project) -> bool:
    return bool(project.db.query("SELECT id FROM after_ran"))


def attempts(project: Project) -> list[str]:
    return [row.status for row in project.db.tracker() if row.revision == REV]


def status(project: Project) -> dict[str, dict[str, Any]]:
    return {row["revision"]: row for row in as_json(invoke(project, "status", "--json"))}


def check(project: Project) -> tuple[int, dict[str, Any]]:
    result = invoke(project, "check", "--json")
    return result.exit_code, json.loads(result.stdout)


def last_line(process: subprocess.CompletedProcess[str] | tuple[str, str]) -> str:
    stderr = process.stderr if isinstance(process, subprocess.CompletedProcess) else process[1]
    return stderr.strip().splitlines()[-1]


def started_and_waiting(project: Project, files: Path, *args: str) -> subprocess.Popen[str]:
    """Start ``dm upgrade`` and wait until its backfill waits at the fourth batch."""
    first = spawn_dm(project, "upgrade", *args, env={"DM_POD_NAME": "job-1"})
    wait_for(lambda: (files / "started").exists() or first.poll() is not None, 60)
    assert first.poll() is None, first.communicate()
    return first


def request_at_the_wait(
    project: Project, files: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``dm ARGS`` (pause or cancel) while the backfill waits, then let it go on.

    Return that command's outcome and the rows the backfill has done when it stops. On
    PostgreSQL the request is written at once (the running batch locks only its rows), so
    the batch in flight (keys 16-20) is the last. On SQLite the running batch holds the
    database's write lock: the request gets in right after that batch commits, so the
    next one (keys 21-25) is the last.
    """
    if project.db.kind == "postgresql":
        done = run_dm(project, *args)
        # Still running, with the request on its attempt (dm status shows both).
        action = "abandon" if "--skip" in args else args[0]
        running = status(project)[REV]
        shown = "pausing" if action == "pause" else "cancelling"
        assert (running["state"], running["request"]) == (shown, action), done.stderr
        table = run_dm(project, "status").stdout  # the text view says so too
        assert shown in table and "requested by" in table, table
        assert running["request_by"]
        (files / "go").touch()
        return done, 20
    database = project.db.url.removeprefix("sqlite:///")
    waiting = Path(f"{database}.script_run_tracker.writer-waiting")
    requester = spawn_dm(project, *args)
    wait_for(lambda: waiting.exists() or requester.poll() is not None, 60)
    (files / "go").touch()
    code, out, err = finish(requester)
    return subprocess.CompletedProcess(args, code, out, err), 25


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, out, err


@pytest.mark.process
@pytest.mark.slow
def test_pause_from_another_process_stops_within_one_batch_and_resume_finishes(
    project: Project, tmp_path: Path
) -> None:
    make_project(project, tmp_path)
    first = started_and_waiting(project, tmp_path)
    try:
        paused, done = request_at_the_wait(
            project, tmp_path, "pause", REV, "--reason", "peak traffic", "--json"
        )
        assert paused.returncode == 0, paused.stderr
        request = json.loads(paused.stdout)
        assert (request["outcome"], request["action"], request["reason"]) == (
            "requested",
            "pause",
            "peak traffic",
        )
    finally:
        code, _, stderr = finish(first)

    # The batch the request found in flight committed with its checkpoint, then it stopped.
    assert code == 5, stderr
    assert "paused by" in last_line(("", stderr)) and "peak traffic" in stderr
    assert counts(project) == {1: done, 0: ROWS - done}
    assert attempts(project) == ["paused"]
    assert not after_ran(project)  # the revisions after it did not run
    row = status(project)[REV]
    assert (row["state"], row["status"]) == ("paused", "paused")
    assert row["checkpoint"]["rows_done"] == done
    assert row["request_reason"] == "peak traffic" and row["request_by"]
    assert "peak traffic" in row["reason"]
    code, found = check(project)
    assert code == 4 and found["incomplete"] == [REV] and found["pending"] == [AFTER]
    text = invoke(project, "status").stdout
    assert "paused" in text and "dm resume" in text and f"{done} rows done" in text

    resumed = run_dm(project, "resume", REV)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after key {done}" in resumed.stderr
    assert counts(project) == {1: ROWS}  # every row exactly once
    assert attempts(project) == ["paused", "success"]
    assert not after_ran(project)  # resume runs that revision only
    upgraded = run_dm(project, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert after_ran(project)
    assert check(project)[0] == 0


@pytest.mark.parametrize("skip", [False, True], ids=["start-over", "skip"])
@pytest.mark.process
@pytest.mark.slow
def test_cancel_a_running_backfill(project: Project, tmp_path: Path, skip: bool) -> None:
    make_project(project, tmp_path)
    first = started_and_waiting(project, tmp_path)
    try:
        flags = ["--skip"] if skip else []
        cancelled, done = request_at_the_wait(
            project, tmp_path, "cancel", REV, *flags, "--reason", "wrong column"
        )
        assert cancelled.returncode == 0, cancelled.stderr
        assert "requested" in cancelled.stdout
    finally:
        code, _, stderr = finish(first)

    assert code == 5, stderr
    assert counts(project) == {1: done, 0: ROWS - done}
    assert not after_ran(project)
    state = "abandoned" if skip else "cancelled"
    assert attempts(project) == [state]
    assert status(project)[REV]["state"] == state

    again = run_dm(project, "upgrade")
    assert again.returncode == 0, again.stderr
    assert after_ran(project)
    if skip:  # not run again: plans pass it, and the check passes
        assert attempts(project) == ["abandoned"]
        assert counts(project) == {1: done, 0: ROWS - done}
        assert check(project)[0] == 0
    else:  # started over from the first row: the first 20 rows were done twice
        assert "resuming" not in again.stderr
        assert attempts(project) == ["cancelled", "success"]
        assert counts(project) == {2: done, 1: ROWS - done}


@POSTGRES_ONLY
@pytest.mark.process
def test_cancel_settles_a_run_that_no_longer_answers(project: Project, tmp_path: Path) -> None:
    """A run stuck inside a batch (alive, holding the lock, committing nothing) is settled
    by ``dm cancel --stuck-after``: its attempt is recorded cancelled, and when it wakes up
    its batch is refused by the fence."""
    make_project(project, tmp_path)
    stuck = started_and_waiting(project, tmp_path)  # stuck in its fourth batch (keys 16-20)
    try:
        settled = run_dm(project, "cancel", REV, "--stuck-after", "1", "--reason", "hung")
        assert settled.returncode == 0, settled.stderr
        assert "did not answer" in settled.stdout
        assert "stop it" in settled.stdout
        assert attempts(project) == ["cancelled"]
        (row,) = [r for r in project.db.tracker() if r.revision == REV]
        assert "did not answer for 1s" in row.reason and "hung" in row.reason
        assert status(project)[REV]["state"] == "cancelled"
        (tmp_path / "go").touch()  # it wakes up: its batch and checkpoint are refused
        code, _, stderr = finish(stuck)
    finally:
        if stuck.poll() is None:
            finish(stuck)

    assert code == 3, stderr
    assert "lost the migration lock" in last_line(("", stderr))
    assert counts(project) == {1: 15, 0: ROWS - 15}  # the stuck batch committed nothing
    assert attempts(project) == ["cancelled"]

    again = run_dm(project, "upgrade")  # the next run starts it over
    assert again.returncode == 0, again.stderr
    assert attempts(project) == ["cancelled", "success"]
    assert counts(project) == {2: 15, 1: ROWS - 15}


@POSTGRES_ONLY
@pytest.mark.process
@pytest.mark.slow
def test_cancel_stuck_after_leaves_a_run_that_answers_alone(
    project: Project, tmp_path: Path
) -> None:
    """A run that commits batches is not settled from outside: it stops as asked."""
    make_project(project, tmp_path, pause=0.5)
    (tmp_path / "go").touch()  # no wait: it commits a batch every ~0.5 s
    running = spawn_dm(project, "upgrade")
    try:
        wait_for(lambda: running.poll() is not None or status(project)[REV]["state"] == "running")
        assert running.poll() is None, finish(running)
        result = run_dm(project, "cancel", REV, "--stuck-after", "30", "--json")
        code, _, stderr = finish(running)
    finally:
        if running.poll() is None:
            finish(running)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outcome"] == "honoured"
    assert code == 5, stderr
    assert attempts(project) == ["cancelled"]


Beats = list[tuple[float, float]]


def timed_run(
    project: Project, *args: str, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], tuple[float, float, Beats]]:
    """Run ``dm ARGS``; return its outcome, and when it was launched, when it had exited and
    when each of its batches began and ended.

    The batches' times (``time.monotonic()`` in the dm process, the same clock as here on
    one host) are those the backfill recorded with each committed batch.
    """
    launched = time.monotonic()
    result = run_dm(project, *args, env=env)
    returned = time.monotonic()
    rows = project.db.query(
        "SELECT began, ended FROM beats WHERE began >= :t ORDER BY began", t=launched
    )
    return result, (launched, returned, [(row.began, row.ended) for row in rows])


def longest_cycle(runs: list[Beats]) -> float:
    """Return the longest measured time from one batch's end to the next one's (its commit,
    the next page, the work), or the longest batch when no run did two."""
    cycles = [b[1] - a[1] for batches in runs for a, b in zip(batches, batches[1:], strict=False)]
    return max(cycles or [ended - began for batches in runs for began, ended in batches])


@pytest.mark.parametrize("how", ["option", "setting", "attribute"])
@pytest.mark.process
@pytest.mark.slow
def test_max_runtime_stops_at_a_boundary_and_the_next_runs_finish(
    project: Project, tmp_path: Path, how: str
) -> None:
    (tmp_path / "go").touch()  # no waiting: each batch takes 0.15 s and its commit
    limit = 1.0
    attributes = f"max_runtime = {limit}" if how == "attribute" else ""
    make_project(project, tmp_path, pause=0.15, attributes=attributes)
    # The run's limit counts from dm's start, the revision's from its attempt's start.
    args = ["--max-runtime", str(limit)] if how == "option" else []
    env = {"DM_MAX_RUNTIME": str(limit)} if how == "setting" else {}

    first, run = timed_run(project, "upgrade", *args, "--json", env=env)
    assert first.returncode == 5, first.stderr
    error = json.loads(first.stdout)["error"]
    assert (error["kind"], error["exit_code"], error["revision"]) == ("incomplete", 5, REV)
    assert "max runtime of 1s was reached" in error["message"]
    done = status(project)[REV]["checkpoint"]["rows_done"]
    assert 0 < done < ROWS and done % SIZE == 0
    assert done == SIZE * len(run[2])
    assert counts(project) == {1: done, 0: ROWS - done}  # stopped at a batch boundary
    assert attempts(project) == ["stopped"]
    assert status(project)[REV]["state"] == "incomplete"
    assert not after_ran(project)
    code, found = check(project)
    assert code == 4 and found["incomplete"] == [REV]
    stopped = [run]

    runs = 1
    while True:  # each run stops after its 1 s, having done one batch at least
        runs += 1
        before = counts(project).get(1, 0)
        resumes = attempts(project)[-1] == "stopped"
        again, run = timed_run(project, "upgrade", *args, env=env)
        if resumes:
            assert f"resuming after key {before}" in again.stderr
        else:  # the backfill finished in the last run, past the run's limit: only AFTER is left
            assert how != "attribute" and not run[2], again.stderr
        if again.returncode == 0:
            break
        assert again.returncode == 5, again.stderr
        if "max runtime of 1s was reached" in again.stderr:
            stopped.append(run)
        else:  # the run's limit was up when the backfill ended: AFTER waits for the next run
            assert f"before upgrade {AFTER} started" in again.stderr, again.stderr
        assert runs < 20
    assert counts(project) == {1: ROWS}  # every row exactly once
    assert attempts(project)[-1] == "success"
    assert after_ran(project) and check(project)[0] == 0

    # Each time-boxed run stopped at the first batch boundary past its limit, which counts
    # from a moment between the run's launch and its first batch: it did not stop before the
    # limit was up, and it went on past it by one batch at most, as long as the longest batch
    # cycle measured (a run's first batch always runs, however late it starts).
    cycle = longest_cycle([batches for _, _, batches in stopped])
    for launched, returned, batches in stopped:
        assert batches, "a time-boxed run does one batch at least"
        assert returned >= launched + limit, (launched, returned, batches)
        if len(batches) > 1:
            assert batches[-2][1] < batches[0][0] + limit, (batches, cycle)
            assert batches[-1][1] < batches[0][0] + limit + cycle, (batches, cycle)


def test_max_runtime_between_transactional_revisions(project: Project) -> None:
    """A transactional revision cannot stop midway: the time is checked before each starts."""
    project.db.query("CREATE TABLE ran (rev TEXT)")
    project.write(
        "aaaa00000001",
        None,
        "import asyncio\nawait asyncio.sleep(1)\n"
        "await session.execute(sa.text(\"INSERT INTO ran VALUES ('a')\"))",
    )
    project.write(
        "aaaa00000002",
        "aaaa00000001",
        "await session.execute(sa.text(\"INSERT INTO ran VALUES ('b')\"))",
    )
    # The run's first revision always starts; it cannot stop midway, so it ends past the limit.
    result = invoke(project, "upgrade", "--max-runtime", "0.5")
    assert result.exit_code == 5, result.stderr
    assert "before upgrade aaaa00000002 started" in result.stderr
    # Told once, as a stop (exit 5 is asked for), not as an error.
    assert result.stderr.count("before upgrade aaaa00000002 started") == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith("dm: stopped: max runtime of 0.5s")
    assert "error" not in result.stderr
    assert [row.rev for row in project.db.query("SELECT rev FROM ran")] == ["a"]
    assert invoke(project, "upgrade").exit_code == 0
    assert sorted(row.rev for row in project.db.query("SELECT rev FROM ran")) == ["a", "b"]


@pytest.mark.process
@pytest.mark.slow
def test_check_passes_for_a_backfill_that_does_not_block_deploys(
    project: Project, tmp_path: Path
) -> None:
    (tmp_path / "go").touch()
    make_project(project, tmp_path, pause=0.1, attributes="blocks_deploy = False")
    stopped = run_dm(project, "upgrade", "--max-runtime", "0.3")
    assert stopped.returncode == 5, stopped.stderr
    code, found = check(project)
    # AFTER still blocks (it did not run); the backfill itself is only deferred.
    assert code == 4 and found["incomplete"] == [] and found["deferred"] == [REV]
    assert found["pending"] == [AFTER]


@pytest.mark.process
@pytest.mark.slow
def test_check_wait_waits_for_an_incomplete_backfill(project: Project, tmp_path: Path) -> None:
    (tmp_path / "go").touch()
    make_project(project, tmp_path, pause=0.05)
    stopped = run_dm(project, "upgrade", "--max-runtime", "0.2")
    assert stopped.returncode == 5, stopped.stderr
    gave_up = run_dm(project, "check", "--wait", "--timeout", "0.5", "--interval", "0.1")
    assert gave_up.returncode == 4
    assert "waiting for pending" in gave_up.stderr and f"incomplete {REV}" in gave_up.stderr

    waiting = spawn_dm(project, "check", "--wait", "--timeout", "60", "--interval", "0.2")
    try:
        finished = run_dm(project, "upgrade")
        assert finished.returncode == 0, finished.stderr
        code, out, err = finish(waiting)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert code == 0, err
    assert counts(project) == {1: ROWS}


def test_pause_and_cancel_refuse_what_they_cannot_stop(project: Project, tmp_path: Path) -> None:
    make_project(project, tmp_path)
    not_running = invoke(project, "pause", REV)
    assert not_running.exit_code == 2
    assert f"cannot pause {REV}: it is not running (state not_run)" in not_running.stderr
    transactional = invoke(project, "pause", AFTER)
    assert transactional.exit_code == 2 and "it is transactional" in transactional.stderr
    nothing = invoke(project, "cancel", REV)
    assert nothing.exit_code == 2 and "it is not_run" in nothing.stderr
    resume = invoke(project, "resume", REV)
    assert resume.exit_code == 2 and f"cannot resume {REV}" in resume.stderr
    # The programmatic API refuses the same way.
    with pytest.raises(UsageError, match="it is not running"):
        api.pause_sync(REV, settings=project.settings())
    with pytest.raises(UsageError, match=f"cannot resume {REV}"):
        api.resume_sync(REV, settings=project.settings())


@pytest.mark.parametrize(
    "db",
    ["sqlite", pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.slow])],
    indirect=True,
)
@pytest.mark.process
def test_cancel_settles_a_stopped_backfill_under_the_lock(project: Project, tmp_path: Path) -> None:
    (tmp_path / "go").touch()
    make_project(project, tmp_path, pause=0.05)
    assert run_dm(project, "upgrade", "--max-runtime", "0.2").returncode == 5
    done = status(project)[REV]["checkpoint"]["rows_done"]
    settled = invoke(project, "cancel", REV, "--skip", "--reason", "done by hand")
    assert settled.exit_code == 0, settled.stderr
    assert "recorded abandoned" in settled.stdout
    assert attempts(project) == ["stopped", "abandoned"]
    assert status(project)[REV]["state"] == "abandoned"
    # What to do next is said: dm resume points to dm run; dm check names what it passes.
    refused = invoke(project, "resume", REV)
    assert refused.exit_code == 2 and f"to run it again from its first row: dm run {REV}" in (
        refused.stderr
    )
    assert run_dm(project, "upgrade").returncode == 0
    assert counts(project) == {1: done, 0: ROWS - done} and after_ran(project)
    checked = invoke(project, "check")
    assert checked.exit_code == 0, checked.stdout
    assert f"abandoned by dm cancel --skip, not run again ({REV})" in checked.stdout


@pytest.mark.process
@pytest.mark.slow
def test_a_paused_deferred_backfill_lets_the_run_and_the_deploy_go_on(
    project: Project, tmp_path: Path
) -> None:
    """(#19) A pause of a ``blocks_deploy = False`` backfill defers it: the revisions after
    it run, the run exits 0, ``dm check`` passes, and a later run finishes the backfill."""
    make_project(project, tmp_path, attributes="blocks_deploy = False")
    first = started_and_waiting(project, tmp_path)
    try:
        paused, done = request_at_the_wait(project, tmp_path, "pause", REV)
        assert paused.returncode == 0, paused.stderr
    finally:
        code, out, err = finish(first)
    assert code == 0, err
    assert f"deferred {REV}: paused part-way" in out
    assert counts(project) == {1: done, 0: ROWS - done}
    assert after_ran(project)  # the run went on past the paused backfill
    assert attempts(project) == ["paused"]
    code, found = check(project)
    assert (code, found["deferred"], found["pending"]) == (0, [REV], [])

    finished = run_dm(project, "upgrade")
    assert finished.returncode == 0, finished.stderr
    assert counts(project) == {1: ROWS}  # resumed after the pause: every row exactly once
    assert attempts(project) == ["paused", "success"]
    code, found = check(project)
    assert (code, found["ok"], found["deferred"]) == (0, True, [])
