"""Lock waits retried like GitLab's ``with_lock_retries``: a transactional revision whose
statement runs past ``DM_PG_LOCK_TIMEOUT`` is rolled back and run again with a doubled
``lock_timeout``, in the same attempt, until ``DM_LOCK_RETRIES`` is spent.

A second PostgreSQL connection (in a thread of the test) holds a row lock the revision
needs; dm runs as a real process.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import Project
from conftest import run_dm
from conftest import wait_for
from support.processes import Spawn

pytestmark = [
    pytest.mark.process,
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.parametrize("db", ["postgresql"], indirect=True),
]


class RowLock:
    """Holds ``SELECT ... FOR UPDATE`` on one row from its own connection until released."""

    def __init__(self, url: str, sql: str) -> None:
        self._url = sa.make_url(url)
        self._sql = sql
        self._locked = threading.Event()
        self._release = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> RowLock:
        self._thread.start()
        assert self._locked.wait(30), self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self._release.set()
        self._thread.join(30)

    def _main(self) -> None:
        try:
            asyncio.run(self._hold())
        except BaseException as exc:  # reported by __enter__
            self._error = exc
            self._locked.set()

    async def _hold(self) -> None:
        import asyncpg

        url = self._url
        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        try:
            async with conn.transaction():
                await conn.execute(self._sql)
                self._locked.set()
                await asyncio.to_thread(self._release.wait, 60)
        finally:
            await conn.close()


def _write(project: Project, tries_log: Path) -> None:
    project.write(
        "acc00001",
        None,
        """
        await session.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY, n INTEGER)"))
        await session.execute(sa.text("INSERT INTO accounts VALUES (1, 0)"))
        """,
    )
    project.write(
        "acc00002",
        "acc00001",
        f"""
        with open({str(tries_log)!r}, "a") as f:
            f.write("try\\n")
        await session.execute(sa.text("UPDATE accounts SET n = n + 1 WHERE id = 1"))
        """,
        doc="Count the account",
    )


@pytest.fixture
def accounts(project: Project, tmp_path: Path) -> Iterator[Path]:
    """Two revisions: one creates ``accounts`` (applied), one updates its row 1 (pending)."""
    tries_log = tmp_path / "tries.log"
    _write(project, tries_log)
    result = run_dm(project, "upgrade", "acc00001")
    assert result.returncode == 0, result.stderr
    yield tries_log


def _tries(log: Path) -> int:
    return len(log.read_text().split()) if log.exists() else 0


LOCK_ROW = "SELECT * FROM accounts WHERE id = 1 FOR UPDATE"


def test_revision_succeeds_after_lock_retries(
    project: Project, accounts: Path, spawn: Spawn
) -> None:
    """The row is locked past two lock timeouts: dm retries with growing timeouts, logs each
    retry, and succeeds once the lock is released; one attempt row, the update once."""
    env = {"DM_PG_LOCK_TIMEOUT": "0.3", "DM_LOCK_RETRIES": "5", "DM_LOCK_RETRY_WAIT": "0.1"}
    with RowLock(project.db.url, LOCK_ROW) as lock:
        proc = spawn(project, "upgrade", "heads", env=env)
        wait_for(lambda: "try 2/6" in proc.stderr() or not proc.running(), timeout=60)
        assert proc.running(), proc.stderr()
        lock.release()
        assert proc.wait(60) == 0, proc.stderr()

    stderr = proc.stderr()
    assert (
        "upgrade acc00002 (Count the account): lock wait timed out (lock_timeout 0.3s), "
        "try 1/6; retrying in 0.1s with lock_timeout 0.6s" in stderr
    )
    assert "lock wait timed out (lock_timeout 0.6s), try 2/6; retrying in 0.2s" in stderr
    assert "got its locks on try" in stderr
    assert _tries(accounts) >= 3
    assert project.db.query("SELECT n FROM accounts")[0].n == 1  # the failed tries rolled back
    rows = [(r.revision, r.status, r.attempt) for r in project.db.tracker()]
    assert rows == [("acc00001", "success", 1), ("acc00002", "success", 1)]


def test_lock_held_past_every_retry_fails_naming_the_settings(
    project: Project, accounts: Path
) -> None:
    """With the lock held throughout, the revision fails after its last try: exit 75, rolled
    back, recorded failed with the lock settings named."""
    env = {"DM_PG_LOCK_TIMEOUT": "0.2", "DM_LOCK_RETRIES": "2", "DM_LOCK_RETRY_WAIT": "0.1"}
    with RowLock(project.db.url, LOCK_ROW):
        result = run_dm(project, "upgrade", "heads", env=env)

    assert result.returncode == 75, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("dm: error: revision acc00002 failed: transient (a retry may succeed)")
    assert "lock wait timed out on each of 3 tries (lock_timeout 0.2s, 0.4s, 0.8s)" in error
    assert "DM_PG_LOCK_TIMEOUT=0.2s, DM_LOCK_RETRIES=2, DM_LOCK_RETRY_WAIT=0.1s" in error
    assert result.stderr.count("lock wait timed out (lock_timeout") == 2  # two retries logged
    assert _tries(accounts) == 3
    assert project.db.query("SELECT n FROM accounts")[0].n == 0
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.attempt) == ("acc00002", "failed", 1)
    assert "DM_LOCK_RETRIES=2" in last.error_message

    # The next run, with the lock gone, applies it as a second attempt.
    assert run_dm(project, "upgrade", "heads", env=env).returncode == 0
    assert project.db.query("SELECT n FROM accounts")[0].n == 1


def test_no_retries_fails_at_the_first_lock_timeout(project: Project, accounts: Path) -> None:
    """``DM_LOCK_RETRIES=0`` restores the single try; the error still names the settings."""
    env = {"DM_PG_LOCK_TIMEOUT": "0.2", "DM_LOCK_RETRIES": "0"}
    with RowLock(project.db.url, LOCK_ROW):
        result = run_dm(project, "upgrade", "heads", env=env)

    assert result.returncode == 75, result.stderr
    assert "lock wait timed out on each of 1 tries (lock_timeout 0.2s)" in result.stderr
    assert "DM_PG_LOCK_TIMEOUT=0.2s, DM_LOCK_RETRIES=0" in result.stderr
    assert "retrying in" not in result.stderr
    assert _tries(accounts) == 1


def test_time_limit_covers_every_try(project: Project, accounts: Path) -> None:
    """The revision's time limit bounds its tries together: no retry starts past it."""
    env = {"DM_PG_LOCK_TIMEOUT": "0.3", "DM_LOCK_RETRIES": "10", "DM_LOCK_RETRY_WAIT": "0.2"}
    with RowLock(project.db.url, LOCK_ROW):
        result = run_dm(project, "upgrade", "heads", "--timeout", "2", env=env)

    assert result.returncode in (1, 75), result.stderr
    assert _tries(accounts) < 5
    last = project.db.tracker()[-1]
    assert (last.revision, last.status) == ("acc00002", "failed")


def test_batched_revision_is_not_retried_in_place(project: Project, accounts: Path) -> None:
    """A ``transactional = False`` revision's lock timeout is not retried in place: the
    message says the next run resumes it from its checkpoint."""
    path = project.versions / "acc00002_acc00002.py"
    path.write_text(
        path.read_text().replace(
            "import sqlalchemy as sa", "import sqlalchemy as sa\ntransactional = False"
        )
    )
    env = {"DM_PG_LOCK_TIMEOUT": "0.2", "DM_LOCK_RETRIES": "3"}
    with RowLock(project.db.url, LOCK_ROW):
        result = run_dm(project, "upgrade", "heads", env=env)

    assert result.returncode == 75, result.stderr
    assert "a transactional = False revision is not retried in place" in result.stderr
    assert "DM_PG_LOCK_TIMEOUT=0.2s" in result.stderr
    assert _tries(accounts) == 1


def test_sigterm_during_the_pause_between_tries(
    project: Project, accounts: Path, spawn: Spawn
) -> None:
    """A pod stopped while dm pauses before a retry exits 143 at once; the attempt is
    recorded failed (interrupted) and nothing of the revision is kept."""
    env = {"DM_PG_LOCK_TIMEOUT": "0.2", "DM_LOCK_RETRIES": "3", "DM_LOCK_RETRY_WAIT": "60"}
    with RowLock(project.db.url, LOCK_ROW):
        proc = spawn(project, "upgrade", "heads", env=env)
        wait_for(lambda: "retrying in 60s" in proc.stderr() or not proc.running(), timeout=60)
        assert proc.running(), proc.stderr()
        code, seconds = proc.signal_and_time(signal.SIGTERM)

    assert code == 143, proc.stderr()
    assert seconds < 5
    assert project.db.query("SELECT n FROM accounts")[0].n == 0
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.reason) == ("acc00002", "failed", "interrupted")
