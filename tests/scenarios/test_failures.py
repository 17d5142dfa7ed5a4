"""What an operator and a Kubernetes Job rely on when revision code misbehaves: the exit
code, one error line (or one JSON object) and the tracker row, checked on the real ``dm``
process on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import Project
from conftest import run_dm
from conftest import spawn_dm
from conftest import wait_for

pytestmark = [pytest.mark.process]


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Revision files are rewritten within one second; never reuse their cached bytecode."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dm: error:")]


def latest(project: Project, revision: str) -> object:
    rows = [r for r in project.db.tracker() if r.revision == revision]
    return rows[-1] if rows else None


# -- item 1: exits and cancellations raised by revision code ------------------------------------

EXITS = {
    "sys.exit(0)": "SystemExit(0)",
    "sys.exit(3)": "SystemExit(3)",
    "sys.exit(143)": "SystemExit(143)",
    "raise KeyboardInterrupt": "KeyboardInterrupt()",
    "raise asyncio.CancelledError()": "CancelledError()",
}


@pytest.mark.parametrize("statement", list(EXITS))
@pytest.mark.slow
def test_exit_or_cancel_raised_by_a_hook_fails_the_revision(
    project: Project, statement: str
) -> None:
    """``sys.exit(0)`` in a hook used to make dm exit 0 (and ``sys.exit(3)`` meant "lock
    not acquired"); a raised ``CancelledError`` printed a long traceback."""
    extra = "import asyncio\nimport sys\n"
    project.write("r1", None, "pass", extra=extra)
    project.write("r2", "r1", statement, extra=extra)
    project.write("r3", "r2", "pass", extra=extra)

    for _ in range(2):  # a retry fails the same way
        result = run_dm(project, "upgrade", "heads")
        assert result.returncode == 1, result.stderr
        assert error_lines(result.stderr) == [
            f"dm: error: revision r2 failed: upgrade() raised {EXITS[statement]}"
        ]
        assert "Traceback" not in result.stderr
        row = latest(project, "r2")
        assert row is not None
        assert (row.status, row.reason) == ("failed", None)
        assert row.error_message == f"upgrade() raised {EXITS[statement]}"
        assert EXITS[statement].split("(")[0] in row.error_traceback
        assert latest(project, "r3") is None


def test_sys_exit_in_verify_fails_the_revision(project: Project) -> None:
    project.write("r1", None, "pass", verify="sys.exit(0)", extra="import sys\n")
    result = run_dm(project, "upgrade", "heads")
    assert result.returncode == 1, result.stderr
    assert error_lines(result.stderr) == [
        "dm: error: revision r1 failed: verify() raised SystemExit(0)"
    ]
    row = latest(project, "r1")
    assert row is not None and row.status == "failed"


def test_sys_exit_in_a_module_body_is_a_bad_revision_file(project: Project) -> None:
    project.write("r1", None, "pass", extra="import sys\nsys.exit(0)\n")
    result = run_dm(project, "upgrade", "heads")
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)
    assert "r1_r1.py" in line and "SystemExit" in line
    assert "Traceback" not in result.stderr


def test_sys_exit_json_error(project: Project) -> None:
    project.write("r1", None, "sys.exit(0)", extra="import sys\n")
    result = run_dm(project, "upgrade", "heads", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["exit_code"] == 1


# -- item 3: a hook that blocks the event loop ---------------------------------------------------

BLOCKERS = {
    "sleep": "time.sleep(60)",
    "cpu": "while True:\n    pass",
    # A synchronous driver call: one long statement in C, on a connection of its own.
    "sync_call": (
        "sqlite3.connect(':memory:').execute('WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
        "SELECT x + 1 FROM c WHERE x < 5000000000) SELECT count(*) FROM c').fetchall()"
    ),
}
BOUND = 10.0  # seconds from the deadline or the signal to the end of dm
# dm's 4 s grace period shortened (a setting for tests only) so each case takes ~1 s, not ~14 s.
FAST_WATCHDOG = {"DM_WATCHDOG_GRACE_SECONDS": "0.5"}


def blocking_project(project: Project, blocker: str) -> Path:
    """r1 creates a table; r2 writes a row, says it started, then blocks the event loop."""
    started = project.root / "started"
    extra = f"import sqlite3\nimport time\nSTARTED = {str(started)!r}\n"
    project.write("r1", None, 'await session.execute(sa.text("CREATE TABLE t (x INTEGER)"))')
    body = (
        'await session.execute(sa.text("INSERT INTO t (x) VALUES (1)"))\n'
        "open(STARTED, 'w').close()\n" + BLOCKERS[blocker]
    )
    project.write("r2", "r1", body, extra=extra)
    return started


def assert_stopped_cleanly(project: Project) -> None:
    """r2's row was rolled back, its attempt is failed and the lock is free."""
    assert project.db.query("SELECT x FROM t") == []
    after = run_dm(project, "current", "--json")
    assert json.loads(after.stdout) == {"heads": ["r1"]}, after.stderr
    if project.db.kind == "postgresql":
        locks = project.db.query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert locks == []


@pytest.mark.parametrize(
    "blocker", [pytest.param(b, marks=pytest.mark.matrix) if b == "sleep" else b for b in BLOCKERS]
)
@pytest.mark.slow
def test_timeout_ends_a_hook_that_blocks_the_event_loop(project: Project, blocker: str) -> None:
    """A 2 s time limit used to run 15 s until killed, leaving the row pending."""
    blocking_project(project, blocker)
    began = time.monotonic()
    result = run_dm(project, "upgrade", "heads", "--timeout", "2", env=FAST_WATCHDOG, timeout=60)
    elapsed = time.monotonic() - began

    assert result.returncode == 1, result.stderr
    assert elapsed < 2 + BOUND, elapsed
    [line] = error_lines(result.stderr)
    assert line.startswith("dm: error: revision r2 failed: timed out after 2s")
    assert "Traceback" not in result.stderr
    row = latest(project, "r2")
    assert row is not None and row.status == "failed", result.stderr
    assert row.error_message.startswith("timed out after 2s")
    assert_stopped_cleanly(project)
    # The next run acquires the lock at once and fails r2 the same way, as a new attempt.
    again = run_dm(
        project, "upgrade", "heads", "--timeout", "1", "--lock-timeout", "0", env=FAST_WATCHDOG
    )
    assert again.returncode == 1, again.stderr
    assert [r.status for r in project.db.tracker() if r.revision == "r2"] == ["failed"] * 2


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_the_watchdog_records_the_attempt_where_the_urls_options_put_the_tracker(
    project: Project,
) -> None:
    """The rescue connection keeps the URL's ``options``: with ``search_path=app`` the
    tracker lives in ``app``, and the timed-out attempt is recorded there, not left pending."""
    project.db.query("CREATE SCHEMA app")
    blocking_project(project, "sleep")
    url = project.db.url + "?options=-c%20search_path%3Dapp"
    result = run_dm(
        project,
        "upgrade",
        "heads",
        "--timeout",
        "2",
        env={"DM_DATABASE_URL": url, **FAST_WATCHDOG},
        timeout=60,
    )

    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert line.startswith("dm: error: revision r2 failed: timed out after 2s"), line
    assert "could not be recorded" not in result.stderr
    rows = project.db.query(
        "SELECT status, error_message FROM app.script_run_tracker WHERE revision = 'r2' ORDER BY id"
    )
    assert [r.status for r in rows] == ["failed"], result.stderr
    assert rows[0].error_message.startswith("timed out after 2s")
    assert project.db.query("SELECT x FROM app.t") == []


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)
def test_signal_ends_a_hook_that_blocks_the_event_loop(
    project: Project, signum: signal.Signals, code: int
) -> None:
    """SIGTERM used to take effect only when the hook gave the event loop back."""
    started = blocking_project(project, "sleep")
    proc = spawn_dm(project, "upgrade", "heads", env=FAST_WATCHDOG)
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, timeout=60)
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signum)
        exit_code = proc.wait(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    _, stderr = proc.communicate()

    assert exit_code == code, stderr
    assert elapsed < BOUND, elapsed
    assert error_lines(stderr) == [f"dm: error: interrupted by {signum.name}"]
    row = latest(project, "r2")
    assert row is not None
    assert (row.status, row.reason) == ("failed", "interrupted")
    assert row.error_message.startswith(f"interrupted by {signum.name}")
    assert_stopped_cleanly(project)
