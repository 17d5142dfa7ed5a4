"""Real ``python -m dm`` processes: concurrent pods, SIGKILL, SIGTERM/SIGINT, PID 1, timeouts.

Every scenario synchronises by polling what a user could observe (files a revision writes,
tracker rows, ``pg_stat_activity``), never by sleeping, and asserts what a user cares
about: each revision's rows exactly once, exit codes, messages and a free lock.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import Project
from conftest import run_dm
from conftest import wait_for
from support.processes import Chain
from support.processes import Dm
from support.processes import Spawn
from support.processes import advisory_locks
from support.processes import assert_lock_free
from support.processes import block_in
from support.processes import running_statements
from support.processes import write_chain

# -- concurrency -----------------------------------------------------------------------------------


def run_concurrently(chain: Chain, spawn: Spawn, processes: int) -> list[Dm]:
    procs = [
        spawn(chain.project, "upgrade", "heads", env={"DM_POD_NAME": f"pod-{i}"})
        for i in range(processes)
    ]
    for proc in procs:
        proc.wait(timeout=120)
    return procs


@pytest.mark.parametrize(
    "db",
    [
        pytest.param("sqlite", marks=pytest.mark.slow),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ],
    indirect=True,
)
@pytest.mark.process
def test_concurrent_upgrades_run_each_revision_exactly_once(project: Project, spawn: Spawn) -> None:
    """Six pods start ``dm upgrade heads`` at once: one does the work, all exit 0."""
    chain = write_chain(project, 20)
    procs = run_concurrently(chain, spawn, 6)
    assert [p.popen.returncode for p in procs] == [0] * 6, [p.stderr() for p in procs]
    chain.assert_exactly_once()
    # One run did all of it; the others found the work done (before or after the lock).
    assert len({r.run_id for r in project.db.tracker()}) == 1


# -- SIGKILL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["asyncio", pytest.param("statement", marks=pytest.mark.slow)])
@pytest.mark.process
def test_sigkill_mid_revision_then_next_run_recovers(
    project: Project, spawn: Spawn, mode: str
) -> None:
    """A pod killed inside a revision leaves no rows of it and a free lock; the next run
    marks the attempt interrupted and applies the revision, with no manual step."""
    chain = write_chain(project, 4)
    proc = block_in(chain, spawn, "r02", mode)

    code, _ = proc.signal_and_time(signal.SIGKILL)

    assert code == -signal.SIGKILL
    assert chain.rows() == Counter({"r00": 3, "r01": 3})  # r02's uncommitted rows are gone
    assert chain.side_tables() == {"r00", "r01"}  # and so is the table it created
    assert chain.latest_status("r02") == "pending"  # nobody could record the death
    if project.db.kind == "postgresql":
        wait_for(lambda: not advisory_locks(project), timeout=3)  # the lock session ended
    started = time.monotonic()
    result = run_dm(project, "upgrade", "heads", "--lock-timeout", "5")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 15
    assert "r02" in result.stderr and "marked failed" in result.stderr
    assert chain.rows() == Counter(dict.fromkeys(chain.revisions, 3))
    history = [r for r in project.db.tracker() if r.revision == "r02"]
    assert [(r.status, r.reason) for r in history] == [("failed", "interrupted"), ("success", None)]
    assert history[0].finished_at is not None
    assert chain.statuses().count(("r03", "success")) == 1
    if mode == "statement" and project.db.kind == "postgresql":
        # client_connection_check_interval: the orphaned statement ends within seconds.
        wait_for(lambda: not running_statements(project, "pg_sleep(60)"), timeout=5)


# -- SIGTERM / SIGINT ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)
@pytest.mark.process
def test_signal_mid_revision_rolls_back_records_and_frees_the_lock(
    project: Project, spawn: Spawn, signum: signal.Signals, code: int
) -> None:
    chain = write_chain(project, 4)
    proc = block_in(chain, spawn, "r02")

    exit_code, seconds = proc.signal_and_time(signum)

    assert exit_code == code, proc.stderr()
    assert seconds < 10
    assert f"interrupted by {signum.name}" in proc.stderr()
    assert chain.rows() == Counter({"r00": 3, "r01": 3})
    assert chain.side_tables() == {"r00", "r01"}
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.reason) == ("r02", "failed", "interrupted")
    assert last.error_traceback is None  # a stop dm caused: no traceback of dm's own frames
    assert "r03" not in {r.revision for r in project.db.tracker()}
    assert_lock_free(project)  # and that run applies r02 and r03
    assert chain.rows() == Counter(dict.fromkeys(chain.revisions, 3))


@pytest.mark.process
@pytest.mark.slow
def test_sigterm_cancels_a_running_statement(project: Project, spawn: Spawn) -> None:
    """SIGTERM while one long SQL statement runs: it is cancelled (PostgreSQL: asyncpg's
    cancel request; SQLite: interrupt()), recorded, and dm exits 143 within seconds."""
    chain = write_chain(project, 3)
    proc = block_in(chain, spawn, "r01", mode="statement")

    exit_code, seconds = proc.signal_and_time(signal.SIGTERM)

    assert exit_code == 143, proc.stderr()
    assert seconds < 10
    if project.db.kind == "postgresql":
        assert running_statements(project, "pg_sleep(60)") == []
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.reason) == ("r01", "failed", "interrupted")
    assert chain.rows() == Counter({"r00": 3})
    assert chain.side_tables() == {"r00"}
    assert_lock_free(project)


def _pid1_supported() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _pid1_supported(), reason="needs unshare --pid (root or user namespaces)")
@pytest.mark.process
@pytest.mark.slow
def test_sigterm_as_pid_1_of_a_container(project: Project, spawn: Spawn) -> None:
    """As PID 1 (no tini) the kernel drops signals without a handler; dm handles SIGTERM."""
    chain = write_chain(project, 3)
    proc = spawn(
        project,
        "upgrade",
        "heads",
        env={"DM_TEST_BLOCK": "r01"},
        prefix=("unshare", "--pid", "--fork", "--kill-child"),
    )
    wait_for(lambda: chain.started("r01").exists() or not proc.running(), timeout=60)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1
    # Inside its namespace the child is PID 1 (its NSpid line ends in 1).
    status = Path(f"/proc/{children[0]}/status").read_text()
    assert [line.split()[-1] for line in status.splitlines() if line.startswith("NSpid")] == ["1"]

    sent = time.monotonic()
    os.kill(int(children[0]), signal.SIGTERM)
    exit_code = proc.wait(30)

    assert exit_code == 143, proc.stderr()
    assert time.monotonic() - sent < 10
    assert chain.latest_status("r01") == "failed"
    assert chain.rows() == Counter({"r00": 3})


def test_signal_handling_in_process_restores_the_previous_handlers() -> None:
    """``run_until_signal`` turns SIGTERM into ``Interrupted`` (143) and leaves the
    process's own handlers as it found them."""
    import asyncio

    from dm.core.errors import Interrupted
    from dm.engine.signals import run_until_signal

    async def stopped_by_sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(30)

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    started = time.monotonic()
    with pytest.raises(Interrupted) as excinfo:
        run_until_signal(stopped_by_sigterm())
    assert excinfo.value.exit_code == 143
    assert time.monotonic() - started < 5
    assert {s: signal.getsignal(s) for s in before} == before

    async def finished() -> str:
        return "done"

    assert run_until_signal(finished()) == "done"
    assert {s: signal.getsignal(s) for s in before} == before


# Runs ``dm ARGS`` with a signal raised in the main thread at the moment dm's signal
# listener sets its wakeup fd (just before the call, or just after it): the moment a signal
# could slip between the plain handlers and the listener.
_SIGNAL_AT_LISTENER_START = """
import runpy
import signal
import sys

real = signal.set_wakeup_fd
when = sys.argv.pop(1)
raised = []


def set_wakeup_fd(fd, **kwargs):
    if fd < 0 or raised:
        return real(fd, **kwargs)
    raised.append(True)
    if when == "before":
        signal.raise_signal(signal.SIGTERM)
    previous = real(fd, **kwargs)
    if when == "after":
        signal.raise_signal(signal.SIGTERM)
    return previous


signal.set_wakeup_fd = set_wakeup_fd
sys.argv[0] = "dm"
runpy.run_module("dm", run_name="__main__")
"""


@pytest.mark.parametrize("when", ["before", pytest.param("after", marks=pytest.mark.slow)])
def test_a_signal_while_the_listener_starts_is_not_lost(
    project: Project, tmp_path: Path, when: str
) -> None:
    chain = write_chain(project, 2)
    out, err = tmp_path / "dm.out", tmp_path / "dm.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGNAL_AT_LISTENER_START, when, "upgrade", "heads"],
            cwd=project.root,
            env={**os.environ, **project.env(), "DM_TEST_BLOCK": "r00"},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        # Lost, the signal lets the run go on into r00, which waits there for a minute.
        exit_code = proc.wait(30)
    except subprocess.TimeoutExpired:
        exit_code = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert exit_code == 143, f"the signal was lost (exit {exit_code}): {err.read_text()}"
    assert "interrupted by SIGTERM" in err.read_text()
    assert chain.rows() == Counter()  # stopped before r00, or r00 rolled back
    assert "r01" not in chain.executions()
    assert_lock_free(project)
    assert chain.rows() == Counter(dict.fromkeys(chain.revisions, 3))
    assert [chain.latest_status(rev) for rev in chain.revisions] == ["success", "success"]


# -- reading while a run works ---------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.slow
def test_read_only_commands_do_not_wait_for_the_lock(project: Project, spawn: Spawn) -> None:
    """``status``, ``current`` and ``check`` answer at once while a run is inside r02."""
    chain = write_chain(project, 4)
    proc = block_in(chain, spawn, "r02")

    started = time.monotonic()
    status = run_dm(project, "status", timeout=30)
    current = run_dm(project, "current", timeout=30)
    check = run_dm(project, "check", timeout=30)
    elapsed = time.monotonic() - started

    assert elapsed < 15  # three process starts, no lock wait (the run holds it for minutes)
    assert status.returncode == 0, status.stderr
    r02 = [line for line in status.stdout.splitlines() if line.startswith("r02")]
    assert len(r02) == 1 and "pending" in r02[0]
    assert current.returncode == 0, current.stderr
    assert current.stdout.split()[0] == "r01"
    assert check.returncode == 4
    assert "running: r02" in check.stdout
    assert proc.running()
    chain.release()
    assert proc.wait(60) == 0, proc.stderr()
    chain.assert_exactly_once()


# -- per-revision time limit -----------------------------------------------------------------------


@pytest.mark.process
@pytest.mark.slow
def test_revision_timeout_attribute_stops_a_slow_revision(project: Project) -> None:
    project.write("t1", None, "await session.execute(sa.text('CREATE TABLE slow (x INTEGER)'))")
    project.write(
        "t2",
        "t1",
        "await session.execute(sa.text('INSERT INTO slow VALUES (1)'))\nawait asyncio.sleep(30)",
        extra="import asyncio\ntimeout = 1\n",
    )
    started = time.monotonic()
    result = run_dm(project, "upgrade", "heads")
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert "t2" in result.stderr and "timed out after 1s" in result.stderr
    last = project.db.tracker()[-1]
    assert (last.revision, last.status) == ("t2", "failed")
    assert "timed out after 1s" in last.error_message
    assert project.db.query("SELECT COUNT(*) AS n FROM slow")[0].n == 0


@pytest.mark.process
@pytest.mark.slow
def test_timeout_option_cancels_a_running_statement(project: Project) -> None:
    """``--timeout 1`` stops a revision stuck in one SQL statement, which is cancelled."""
    chain = write_chain(project, 3)
    started = time.monotonic()
    result = run_dm(
        project,
        "upgrade",
        "heads",
        "--timeout",
        "1",
        env={"DM_TEST_BLOCK": "r01", "DM_TEST_BLOCK_MODE": "statement"},
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert "revision r01 failed: timed out after 1s" in result.stderr
    if project.db.kind == "postgresql":
        assert running_statements(project, "pg_sleep(60)") == []
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.error_message) == (
        "r01",
        "failed",
        "timed out after 1s",
    )
    assert chain.rows() == Counter({"r00": 3})
    assert_lock_free(project)


# -- stress ----------------------------------------------------------------------------------------


STRESS_ROUNDS = int(os.environ.get("DM_STRESS_ROUNDS", "10"))


def _reset(project: Project, chain: Chain) -> None:
    tables = ["hits", "script_run_tracker", "script_run_tracker_meta"]
    for table in tables + [f"side_{rev}" for rev in chain.revisions]:
        project.db.query(f"DROP TABLE IF EXISTS {table}")
    chain.log.unlink(missing_ok=True)


@pytest.mark.stress
@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.process
def test_stress_concurrent_rounds_stay_exactly_once(project: Project, spawn: Spawn) -> None:
    """Round after round, six pods race on a fresh tracker: never a duplicate or a failure."""
    chain = write_chain(project, 20)
    for round_number in range(STRESS_ROUNDS):
        _reset(project, chain)
        procs = run_concurrently(chain, spawn, 6)
        codes = [p.popen.returncode for p in procs]
        assert codes == [0] * 6, (round_number, [p.stderr() for p in procs if p.popen.returncode])
        chain.assert_exactly_once()
