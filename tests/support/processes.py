"""Helpers for tests that drive real ``python -m dm`` processes: a chain of revisions that
write rows and can be made to block, processes whose output goes to files, and the
PostgreSQL lock and activity they can be observed through."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
