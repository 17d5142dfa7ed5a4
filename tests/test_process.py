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
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Project
from conftest import run_dm
from conftest import wait_for

ROWS_PER_REVISION = 3

# Module-level code of every test revision. ``DM_TEST_BLOCK=<rev>`` makes that revision
# stop after writing its rows: by default it creates WORK/started-<rev> and waits (in
# asyncio) until WORK/release exists; with ``DM_TEST_BLOCK_MODE=statement`` it runs one
# long SQL statement instead (PostgreSQL: pg_sleep(60); SQLite: a recursive count through
# a function that creates the started file from inside the running statement).
_REVISION_EXTRA = """
import asyncio
import os

LOG = {log!r}
WORK = {work!r}
LONG_SQLITE = (
    "WITH RECURSIVE c(x) AS (SELECT dm_test_started() UNION ALL "
    "SELECT x + 1 FROM c WHERE x < 5000000000) SELECT COUNT(*) FROM c"
)


def _started():
    open(os.path.join(WORK, "started-" + revision), "w").close()
    return 1


async def long_statement(session):
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        _started()
        await session.execute(sa.text("SELECT pg_sleep(60)"))
    else:
        raw = await conn.get_raw_connection()
        await raw.driver_connection.create_function("dm_test_started", 0, _started)
        await session.execute(sa.text(LONG_SQLITE))


async def _hold(session):
    if os.environ.get("DM_TEST_BLOCK") != revision:
        return
    if os.environ.get("DM_TEST_BLOCK_MODE") == "statement":
        await long_statement(session)
        return
    _started()
    for _ in range(1200):
        if os.path.exists(os.path.join(WORK, "release")):
            return
        await asyncio.sleep(0.05)
"""

_CREATE = """\
await session.execute(sa.text("CREATE TABLE hits (rev VARCHAR(32) NOT NULL, n INTEGER NOT NULL)"))
"""

_BODY = f"""\
with open(LOG, "a") as f:
    f.write(revision + "\\n")
await session.execute(sa.text(f"CREATE TABLE side_{{revision}} (x INTEGER)"))
await session.execute(
    sa.text("INSERT INTO hits (rev, n) VALUES (:rev, :n)"),
    [{{"rev": revision, "n": n}} for n in range({ROWS_PER_REVISION})],
)
await _hold(session)
"""


@dataclass
class Chain:
    """A linear chain of test revisions that count their executions."""

    project: Project
    revisions: list[str]
    work: Path

    @property
    def log(self) -> Path:
        return self.work / "executions.log"

    def started(self, rev: str) -> Path:
        return self.work / f"started-{rev}"

    def release(self) -> None:
        (self.work / "release").touch()

    def executions(self) -> Counter[str]:
        """How often each revision's upgrade() began (the file is outside the database)."""
        if not self.log.exists():
            return Counter()
        return Counter(self.log.read_text().split())

    def rows(self) -> Counter[str]:
        """Rows in ``hits`` per revision (committed data only)."""
        if not self.has_hits():
            return Counter()
        query = "SELECT rev, COUNT(*) AS count FROM hits GROUP BY rev"
        return Counter({r.rev: r.count for r in self.project.db.query(query)})

    def has_hits(self) -> bool:
        return has_table(self.project, "hits")

    def side_tables(self) -> set[str]:
        """Revisions whose ``side_<rev>`` table exists (DDL must roll back with the rows)."""
        return {rev for rev in self.revisions if has_table(self.project, f"side_{rev}")}

    def statuses(self) -> list[tuple[str, str]]:
        return [(r.revision, r.status) for r in self.project.db.tracker()]

    def latest_status(self, rev: str) -> str | None:
        found = [status for revision, status in self.statuses() if revision == rev]
        return found[-1] if found else None

    def assert_exactly_once(self) -> None:
        """Every revision ran once: one file line, its rows once, one success row, no other."""
        once = Counter(dict.fromkeys(self.revisions, 1))
        assert self.executions() == once
        assert self.rows() == Counter(dict.fromkeys(self.revisions, ROWS_PER_REVISION))
        assert sorted(self.statuses()) == sorted((rev, "success") for rev in self.revisions)


def has_table(project: Project, name: str) -> bool:
    if project.db.kind == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' AND name = :name"
    else:
        sql = "SELECT tablename FROM pg_tables WHERE tablename = :name"
    return bool(project.db.query(sql, name=name))


def write_chain(project: Project, count: int, work: Path | None = None) -> Chain:
    """Write revisions r00..r<count-1>; r00 creates ``hits``; each inserts rows into it."""
    work = work or project.root.parent / "work"
    work.mkdir(exist_ok=True)
    extra = _REVISION_EXTRA.format(log=str(work / "executions.log"), work=str(work))
    revisions = [f"r{i:02d}" for i in range(count)]
    for i, rev in enumerate(revisions):
        body = (_CREATE if i == 0 else "") + _BODY
        project.write(rev, revisions[i - 1] if i else None, body, extra=extra)
    return Chain(project, revisions, work)


# -- processes -------------------------------------------------------------------------------------


@dataclass
class Dm:
    """A ``python -m dm`` process whose output goes to files (readable while it runs)."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    started_at: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float = 60) -> int:
        return self.popen.wait(timeout=timeout)

    def signal_and_time(self, signum: int, timeout: float = 30) -> tuple[int, float]:
        """Send ``signum``; return the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        os.kill(self.pid, signum)
        code = self.wait(timeout)
        return code, time.monotonic() - sent


Spawn = Callable[..., Dm]


def spawn_processes(tmp_path: Path) -> Iterator[Spawn]:
    """Yield ``spawn(project, *args, env=..., prefix=...)``; kill leftovers afterwards."""
    started: list[Dm] = []

    def start(
        project: Project,
        *args: str,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> Dm:
        n = len(started)
        out, err = tmp_path / f"dm{n}.out", tmp_path / f"dm{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                [*prefix, sys.executable, "-m", "dm", *args],
                cwd=project.root,
                env={**os.environ, **project.env(), **(env or {})},
                stdout=stdout,
                stderr=stderr,
            )
        proc = Dm(popen, out, err, time.monotonic())
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.running():
            proc.popen.kill()
            proc.popen.wait(10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start dm processes whose output goes to files; none outlives the test."""
    yield from spawn_processes(tmp_path)


def advisory_locks(project: Project) -> list[int]:
    """PIDs of backends holding an advisory lock in the project's PostgreSQL database."""
    rows = project.db.query(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return [r.pid for r in rows]


def running_statements(project: Project, text: str) -> list[int]:
    """PIDs of other backends of the database running a statement containing ``text``."""
    rows = project.db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE :pattern",
        pattern=f"%{text}%",
    )
    return [r.pid for r in rows]


def assert_lock_free(project: Project) -> None:
    """The next run gets the lock at once (``--lock-timeout 0`` tries exactly once)."""
    if project.db.kind == "postgresql":
        assert advisory_locks(project) == []
    result = run_dm(project, "upgrade", "heads", "--lock-timeout", "0")
    assert result.returncode == 0, result.stderr


def block_in(chain: Chain, spawn: Spawn, rev: str, mode: str = "asyncio", **env: str) -> Dm:
    """Start ``dm upgrade heads`` and return once it is inside ``rev`` (rows written, pending)."""
    proc = spawn(
        chain.project,
        "upgrade",
        "heads",
        env={"DM_TEST_BLOCK": rev, "DM_TEST_BLOCK_MODE": mode, **env},
    )
    wait_for(lambda: chain.started(rev).exists() or not proc.running(), timeout=60)
    assert proc.running(), proc.stderr()
    assert chain.latest_status(rev) == "pending"
    if mode == "statement" and chain.project.db.kind == "postgresql":
        wait_for(lambda: running_statements(chain.project, "pg_sleep(60)"), timeout=10)
    return proc


# -- concurrency -----------------------------------------------------------------------------------


def run_concurrently(chain: Chain, spawn: Spawn, processes: int) -> list[Dm]:
    procs = [
        spawn(chain.project, "upgrade", "heads", env={"DM_POD_NAME": f"pod-{i}"})
        for i in range(processes)
    ]
    for proc in procs:
        proc.wait(timeout=120)
    return procs


def test_concurrent_upgrades_run_each_revision_exactly_once(project: Project, spawn: Spawn) -> None:
    """Six pods start ``dm upgrade heads`` at once: one does the work, all exit 0."""
    chain = write_chain(project, 20)
    procs = run_concurrently(chain, spawn, 6)
    assert [p.popen.returncode for p in procs] == [0] * 6, [p.stderr() for p in procs]
    chain.assert_exactly_once()
    # One run did all of it; the others found the work done (before or after the lock).
    assert len({r.run_id for r in project.db.tracker()}) == 1


# -- SIGKILL ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["asyncio", "statement"])
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


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
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
    assert "r03" not in {r.revision for r in project.db.tracker()}
    assert_lock_free(project)  # and that run applies r02 and r03
    assert chain.rows() == Counter(dict.fromkeys(chain.revisions, 3))


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

    from dm.errors import Interrupted
    from dm.signals import run_until_signal

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


# -- reading while a run works ---------------------------------------------------------------------


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
def test_stress_concurrent_rounds_stay_exactly_once(project: Project, spawn: Spawn) -> None:
    """Round after round, six pods race on a fresh tracker: never a duplicate or a failure."""
    chain = write_chain(project, 20)
    for round_number in range(STRESS_ROUNDS):
        _reset(project, chain)
        procs = run_concurrently(chain, spawn, 6)
        codes = [p.popen.returncode for p in procs]
        assert codes == [0] * 6, (round_number, [p.stderr() for p in procs if p.popen.returncode])
        chain.assert_exactly_once()
