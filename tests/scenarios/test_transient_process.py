"""Transient failures, with real ``python -m dm`` processes: exit 75 where a retry may help.

A database that is not listening yet (a local TCP proxy that starts listening while dm
retries), the work connection terminated mid-revision, a deadlock and a serialization failure
provoked between the revision and a connection the test holds; against them, a revision's
own error (exit 1) and a bad target (exit 2). Every scenario synchronises by polling what it
can observe (files a revision writes, dm's log, ``pg_stat_activity``), never by sleeping.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Awaitable
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa

from conftest import Project
from conftest import run_dm
from conftest import wait_for
from support.network import TcpProxy
from support.network import through
from support.processes import Dm
from support.processes import Spawn
from support.processes import block_in
from support.processes import has_table
from support.processes import write_chain

pytestmark = [pytest.mark.process]

TRANSIENT = "transient (a retry may succeed): "


def error_line(stderr: str) -> str:
    """Return dm's one error line: the last line, and the only ``dm: error:`` line."""
    errors = [line for line in stderr.splitlines() if line.startswith("dm: error: ")]
    assert len(errors) == 1, stderr
    assert stderr.strip().splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr
    return errors[0]


def latest(project: Project, revision: str) -> sa.Row[object]:
    return [row for row in project.db.tracker() if row.revision == revision][-1]


# -- start-up: the server is not listening yet ---------------------------------------------------


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.slow
def test_startup_retries_until_the_server_listens(
    project: Project, spawn: Spawn, proxy: TcpProxy
) -> None:
    """The port refuses connections when dm starts; it listens a moment later: the run
    logs its retries (with the reason) and succeeds."""
    chain = write_chain(project, 2)
    url = through(project.db.url, proxy.port)
    proc = spawn(project, "upgrade", "heads", env={"DM_DATABASE_URL": url})

    wait_for(lambda: "retry 1 in" in proc.stderr() or not proc.running(), timeout=20)
    assert proc.running(), proc.stderr()
    proxy.listen()

    assert proc.wait(60) == 0, proc.stderr()
    retry = next(line for line in proc.stderr().splitlines() if "retry 1 in" in line)
    assert "WARNING" in retry
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{proxy.port}/" in retry
    assert "DM_CONNECT_RETRY_SECONDS" in retry
    chain.assert_exactly_once()


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
def test_startup_retry_gives_up_with_exit_75(project: Project, proxy: TcpProxy) -> None:
    """Still refused after ``DM_CONNECT_RETRY_SECONDS``: exit 75, one line, nothing written."""
    write_chain(project, 2)
    url = through(project.db.url, proxy.port)
    started = time.monotonic()
    result = run_dm(
        project,
        "upgrade",
        "heads",
        env={"DM_DATABASE_URL": url, "DM_CONNECT_RETRY_SECONDS": "1.5"},
    )

    assert result.returncode == 75, result.stderr
    assert 1.5 <= time.monotonic() - started < 15
    line = error_line(result.stderr)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{proxy.port}/" in line
    assert "gave up after" in line
    assert result.stderr.count("retry ") >= 1
    assert not project.db.query("SELECT 1 FROM pg_tables WHERE tablename = 'script_run_tracker'")


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.slow
def test_startup_retry_is_bounded_when_the_server_never_answers(project: Project) -> None:
    """A port that accepts TCP but never answers (a hung server, a black hole): each attempt
    is cut at the retry window's end, so dm gives up on time with 75."""
    write_chain(project, 1)
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # never accept()ed
        url = through(project.db.url, silent.getsockname()[1])
        started = time.monotonic()
        result = run_dm(
            project,
            "upgrade",
            "heads",
            env={"DM_DATABASE_URL": url, "DM_CONNECT_RETRY_SECONDS": "2"},
        )
        elapsed = time.monotonic() - started

    assert result.returncode == 75, result.stderr
    assert 2 <= elapsed < 10
    assert "TimeoutError: timed out" in error_line(result.stderr)


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.parametrize("fault", ["database", "role"])
@pytest.mark.slow
def test_login_refused_or_missing_database_fails_at_once_with_2(
    project: Project, fault: str
) -> None:
    """A person must fix these: no retry, even with the default retry window."""
    write_chain(project, 1)
    url = sa.make_url(project.db.url)
    url = url.set(database="dm_no_such_db") if fault == "database" else url.set(username="nobody")
    started = time.monotonic()
    result = run_dm(
        project, "upgrade", "heads", env={"DM_DATABASE_URL": url.render_as_string(False)}
    )

    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 10
    assert "retry" not in result.stderr
    assert "cannot connect to PostgreSQL" in error_line(result.stderr)


# -- mid-run: the work connection dies -------------------------------------------------------------


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["statement", "asyncio"])
@pytest.mark.slow
def test_work_connection_terminated_mid_revision(project: Project, spawn: Spawn, mode: str) -> None:
    """``pg_terminate_backend`` of the work connection (failover, PgBouncer restart): mid-
    statement (``admin_shutdown``) or between statements ("connection was closed in the
    middle of operation"). Exit 75; the attempt is recorded failed (on a fresh connection)
    with a transient error; the next run applies it."""
    chain = write_chain(project, 3)
    proc = block_in(chain, spawn, "r01", mode)
    (work,) = project.db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL"
    )  # the one backend inside a write transaction: the revision's

    project.db.query("SELECT pg_terminate_backend(:pid)", pid=work.pid)
    if mode == "asyncio":
        chain.release()  # the revision goes on, and meets the dead connection

    assert proc.wait(60) == 75, proc.stderr()
    line = error_line(proc.stderr())
    assert line.startswith(f"dm: error: revision r01 failed: {TRANSIENT}")
    row = latest(project, "r01")
    assert (row.status, row.reason) == ("failed", None)
    assert row.error_message.startswith(TRANSIENT)
    assert chain.rows() == Counter({"r00": 3})
    assert "r02" not in {r.revision for r in project.db.tracker()}

    rerun = run_dm(project, "upgrade", "heads")
    assert rerun.returncode == 0, rerun.stderr
    assert chain.rows() == Counter(dict.fromkeys(chain.revisions, 3))
    assert [r.status for r in project.db.tracker() if r.revision == "r01"] == [
        "failed",
        "success",
    ]


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.slow
def test_waiting_run_holds_no_idle_work_connection(project: Project, spawn: Spawn) -> None:
    """A run waiting for the lock holds at most one connection, only during a try: its work
    connection is closed before the wait (#29), so a failover meanwhile finds nothing of it
    idle, and a small session pool is not filled by waiters. It exits 0 having run nothing."""
    chain = write_chain(project, 3)
    first = block_in(chain, spawn, "r01", DM_POD_NAME="pod-a")
    second = spawn(project, "upgrade", "heads", env={"DM_POD_NAME": "pod-b"})
    wait_for(lambda: "waiting for the migration lock" in second.stderr() or not second.running())
    assert second.running(), second.stderr()
    seen = []
    for _ in range(20):
        rows = project.db.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'dm:pod-b' "
            "AND datname = current_database()"
        )
        seen.append(len(rows))
        time.sleep(0.1)
    assert max(seen) <= 1, seen

    chain.release()
    assert first.wait(60) == 0, first.stderr()
    assert second.wait(60) == 0, second.stderr()
    chain.assert_exactly_once()
    assert {r.pod_name for r in project.db.tracker()} == {"pod-a"}


# -- mid-run: deadlock and serialization failure ---------------------------------------------------

# r00 creates and fills ``t``; r01 is the revision under test. It writes WORK/started once
# it holds what it must, then waits (polling, in asyncio) for WORK/go before going on.
_WAIT = """
import asyncio
import os

WORK = {work!r}


async def _signal_and_wait():
    open(os.path.join(WORK, "started"), "w").close()
    while not os.path.exists(os.path.join(WORK, "go")):
        await asyncio.sleep(0.02)
"""

_CREATE_T = """\
await session.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"))
await session.execute(sa.text("INSERT INTO t VALUES (1, 0), (2, 0)"))
"""

# Lock row 1, then (after the test locked row 2 and queued behind row 1) want row 2.
_DEADLOCK = """\
await session.execute(sa.text("UPDATE t SET v = v + 1 WHERE id = 1"))
await _signal_and_wait()
await session.execute(sa.text("UPDATE t SET v = v + 1 WHERE id = 2"))
"""

# Take a REPEATABLE READ snapshot; the test then commits a change to row 1; update row 1.
_SERIALIZATION = """\
await session.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
await session.execute(sa.text("SELECT v FROM t WHERE id = 1"))
await _signal_and_wait()
await session.execute(sa.text("UPDATE t SET v = v + 1 WHERE id = 1"))
"""


def _write_conflict(project: Project, body: str) -> Path:
    work = project.root.parent / "work"
    work.mkdir(exist_ok=True)
    project.write("r00", None, _CREATE_T)
    project.write("r01", "r00", body, extra=_WAIT.format(work=str(work)))
    assert run_dm(project, "upgrade", "r00").returncode == 0
    return work


async def _connect(project: Project) -> asyncpg.Connection:
    url = sa.make_url(project.db.url)
    return await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database=url.database
    )


async def _poll(predicate: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Await ``predicate()`` until it is true (polling, not a fixed pause)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.02)


def _assert_transient_failure(project: Project, proc_stderr: str, needle: str) -> None:
    line = error_line(proc_stderr)
    assert line.startswith(f"dm: error: revision r01 failed: {TRANSIENT}"), line
    assert needle in line
    row = latest(project, "r01")
    assert row.status == "failed"
    assert row.error_message.startswith(TRANSIENT) and needle in row.error_message


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.slow
def test_deadlock_exits_75(project: Project, spawn: Spawn) -> None:
    """The revision and the test's connection lock two rows in opposite orders; the
    revision, last to wait, is the deadlock's victim."""
    work = _write_conflict(project, _DEADLOCK)

    async def scenario() -> tuple[int, str]:
        other, watcher = await _connect(project), await _connect(project)
        try:
            await other.execute("SET deadlock_timeout = '60s'")  # never the victim
            proc = spawn(project, "upgrade", "heads")
            await _poll(lambda: _exists(work / "started", proc))
            assert proc.running(), proc.stderr()
            transaction = other.transaction()
            await transaction.start()
            await other.execute("UPDATE t SET v = v + 10 WHERE id = 2")
            queued = asyncio.ensure_future(other.execute("UPDATE t SET v = v + 10 WHERE id = 1"))
            await _poll(lambda: _waits_for_lock(watcher, other.get_server_pid()))
            (work / "go").touch()
            code = await asyncio.to_thread(proc.wait, 60)
            await queued  # the revision's rollback freed row 1
            await transaction.rollback()
            return code, proc.stderr()
        finally:
            await other.close()
            await watcher.close()

    code, stderr = asyncio.run(scenario())
    assert code == 75, stderr
    _assert_transient_failure(project, stderr, "deadlock detected")
    assert [(r.id, r.v) for r in project.db.query("SELECT id, v FROM t ORDER BY id")] == [
        (1, 0),
        (2, 0),
    ]


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
@pytest.mark.slow
def test_serialization_failure_exits_75(project: Project, spawn: Spawn) -> None:
    """The revision reads row 1 in REPEATABLE READ; the test commits a change to it; the
    revision's update of row 1 cannot be serialized."""
    work = _write_conflict(project, _SERIALIZATION)

    async def scenario() -> tuple[int, str]:
        other = await _connect(project)
        try:
            proc = spawn(project, "upgrade", "heads")
            await _poll(lambda: _exists(work / "started", proc))
            assert proc.running(), proc.stderr()
            await other.execute("UPDATE t SET v = 100 WHERE id = 1")  # committed
            (work / "go").touch()
            return await asyncio.to_thread(proc.wait, 60), proc.stderr()
        finally:
            await other.close()

    code, stderr = asyncio.run(scenario())
    assert code == 75, stderr
    _assert_transient_failure(project, stderr, "could not serialize access")
    rerun = run_dm(project, "upgrade", "heads")  # no conflict now: the retry succeeds
    assert rerun.returncode == 0, rerun.stderr
    assert latest(project, "r01").status == "success"


async def _exists(path: Path, proc: Dm) -> bool:
    return path.exists() or not proc.running()


async def _waits_for_lock(watcher: asyncpg.Connection, pid: int) -> bool:
    kind = await watcher.fetchval(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
    )
    return bool(kind == "Lock")


# -- permanent failures keep their codes ----------------------------------------------------------


def test_revision_error_exits_1(project: Project) -> None:
    project.write("r00", None, 'raise ValueError("bad row 42")')
    result = run_dm(project, "upgrade", "heads")

    assert result.returncode == 1, result.stderr
    line = error_line(result.stderr)
    assert line == "dm: error: revision r00 failed: ValueError: bad row 42"
    row = latest(project, "r00")
    assert (row.status, row.error_message) == ("failed", "ValueError: bad row 42")


def test_bad_target_exits_2(project: Project) -> None:
    write_chain(project, 2)
    result = run_dm(project, "upgrade", "nosuchrev")

    assert result.returncode == 2, result.stderr
    assert "nosuchrev" in error_line(result.stderr)
    assert not has_table(project, "script_run_tracker")  # nothing was written
