"""Stress dm's exactly-once and crash-recovery guarantees with real processes.

Each round runs two scenarios on a fresh tracker, in a temporary ``dm init`` project:

(a) **concurrent**: ``--processes`` (default 6) ``dm upgrade heads`` start at once on a
    chain of ``--revisions`` (default 20) revisions. Each revision appends its id to a file
    outside the database, then inserts ``--rows`` rows. Afterwards every revision must have
    run once (one file line), its rows once, and one ``success`` tracker row; every process
    must exit 0 and the lock must be free.
(b) **kill**: one ``dm upgrade heads`` on a chain of ``--kill-revisions`` (default 8)
    revisions that each write their rows in batches, pausing between batches (in asyncio
    and, on PostgreSQL, in ``SELECT pg_sleep``), is SIGKILLed at a random instant of its
    run. Then, before anything else, the database must hold no partial work: a revision
    has all of its rows and a ``success`` row, or none of its rows. Then a new run with
    ``--lock-timeout 5`` must get the lock and finish the chain, each revision once.

The summary counts, per scenario:

* **duplicates**: a revision whose upgrade began more than once without an intervening
  kill, more than one ``success`` row, or more rows than one run writes;
* **partial writes**: a revision's rows present while its latest tracker status is not
  ``success`` (e.g. the killed revision's rows), or a row count other than 0 or ``--rows``;
* **stuck locks**: the next run could not acquire the lock within 5 s (exit 3), or the
  lock was still held after every process had exited;
* **failed runs**: any other non-zero exit of a process that was not killed.

Usage (PostgreSQL at 127.0.0.1:5432 as postgres by default; SQLite needs nothing)::

    .venv/bin/python bench/stress.py                       # 20 rounds on PostgreSQL
    .venv/bin/python bench/stress.py --rounds 5 --db sqlite
    .venv/bin/python bench/stress.py --db both --rounds 10

Exit status: 0 when every count is zero, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TRACKER_TABLES = ("script_run_tracker", "script_run_tracker_meta")


# -- databases ---------------------------------------------------------------------------------


class Database:
    """A scratch database: ``url`` for dm, ``query()`` for the checks."""

    kind: str
    url: str

    def query(self, sql: str, **params: Any) -> list[Any]:
        return asyncio.run(self._query(sql, params))

    async def _query(self, sql: str, params: dict[str, Any]) -> list[Any]:
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import NullPool

        engine = create_async_engine(self.async_url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(sa.text(sql), params)
                rows = list(result.all()) if result.returns_rows else []
                await conn.commit()
                return rows
        finally:
            await engine.dispose()

    @property
    def async_url(self) -> str:
        raise NotImplementedError

    def has_table(self, name: str) -> bool:
        raise NotImplementedError

    def lock_free(self, project: Path) -> bool:
        raise NotImplementedError

    def drop(self, tables: list[str]) -> None:
        for table in tables:
            self.query(f"DROP TABLE IF EXISTS {table}")

    def close(self) -> None:
        pass


class Postgres(Database):
    kind = "postgresql"

    def __init__(self, admin_url: str) -> None:
        import sqlalchemy as sa

        self.admin = sa.make_url(admin_url)
        self.name = f"dm_stress_{uuid.uuid4().hex[:10]}"
        self._admin(f'CREATE DATABASE "{self.name}"')
        self.url = self.admin.set(database=self.name).render_as_string(hide_password=False)

    def _admin(self, sql: str) -> None:
        import asyncpg

        async def run() -> None:
            conn = await asyncpg.connect(
                host=self.admin.host,
                port=self.admin.port or 5432,
                user=self.admin.username,
                password=self.admin.password,
                database=self.admin.database,
            )
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    @property
    def async_url(self) -> str:
        return self.url.replace("postgresql://", "postgresql+asyncpg://", 1)

    def has_table(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM pg_tables WHERE tablename = :n", n=name))

    def lock_free(self, project: Path) -> bool:
        rows = self.query(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return not rows

    def close(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class Sqlite(Database):
    kind = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.path = directory / "stress.sqlite3"
        self.url = f"sqlite:///{self.path}"

    @property
    def async_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.path}"

    def has_table(self, name: str) -> bool:
        if not self.path.exists():
            return False
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :n"
        return bool(self.query(sql, n=name))

    def lock_free(self, project: Path) -> bool:
        lock = self.path.with_name(f"{self.path.name}.script_run_tracker.lock")
        if not lock.exists():
            return True
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def drop(self, tables: list[str]) -> None:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


# -- the project -------------------------------------------------------------------------------

_EXTRA = """
import asyncio
import os

LOG = {log!r}
BATCHES = {batches}
ROWS = {rows}
"""

_BODY = """
with open(LOG, "a") as f:
    f.write(revision + "\\n")
bind = (await session.connection()).dialect.name
per_batch = ROWS // BATCHES
for batch in range(BATCHES):
    await session.execute(
        sa.text("INSERT INTO hits (rev, n) VALUES (:rev, :n)"),
        [{{"rev": revision, "n": batch * per_batch + i}} for i in range(per_batch)],
    )
    if {pause}:
        if bind == "postgresql" and batch % 2:
            await session.execute(sa.text("SELECT pg_sleep(0.01)"))
        else:
            await asyncio.sleep(0.01)
"""


@dataclass
class Project:
    root: Path
    db: Database
    log: Path
    revisions: list[str] = field(default_factory=list)
    rows: int = 20

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DM_CONFIG": str(self.root / "alembic.ini"),
            "DM_DATABASE_URL": self.db.url,
        }

    def write_chain(self, count: int, rows: int, batches: int, pause: bool) -> None:
        versions = self.root / "data_migrations" / "versions"
        for old in versions.glob("*.py"):
            old.unlink()
        self.rows = rows
        self.revisions = [f"s{i:03d}" for i in range(count)]
        extra = _EXTRA.format(log=str(self.log), batches=batches, rows=rows)
        for i, rev in enumerate(self.revisions):
            body = _BODY.format(pause=pause)
            if i == 0:
                body = (
                    '\nawait session.execute(sa.text("CREATE TABLE hits '
                    '(rev VARCHAR(32) NOT NULL, n INTEGER NOT NULL)"))' + body
                )
            text = "\n".join(
                [
                    f'"""Stress revision {rev}."""',
                    "import sqlalchemy as sa",
                    f"revision = {rev!r}",
                    f"down_revision = {self.revisions[i - 1] if i else None!r}",
                    "branch_labels = None",
                    "depends_on = None",
                    extra,
                    "async def upgrade(session):" + textwrap.indent(body, "    "),
                    "",
                ]
            )
            (versions / f"{rev}.py").write_text(text)

    def reset(self) -> None:
        self.db.drop(["hits", *TRACKER_TABLES])
        self.log.unlink(missing_ok=True)

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "dm", *args],
            cwd=self.root,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def executions(self) -> Counter[str]:
        return Counter(self.log.read_text().split()) if self.log.exists() else Counter()

    def row_counts(self) -> Counter[str]:
        if not self.db.has_table("hits"):
            return Counter()
        rows = self.db.query("SELECT rev, COUNT(*) AS c FROM hits GROUP BY rev")
        return Counter({r.rev: r.c for r in rows})

    def tracker(self) -> list[Any]:
        if not self.db.has_table("script_run_tracker"):
            return []
        return self.db.query("SELECT revision, status FROM script_run_tracker ORDER BY id")


@contextlib.contextmanager
def make_project(kind: str, admin_url: str) -> Iterator[Project]:
    from dm import verbs

    with tempfile.TemporaryDirectory(prefix="dm-stress-") as tmp:
        directory = Path(tmp)
        db: Database = Postgres(admin_url) if kind == "postgresql" else Sqlite(directory)
        try:
            verbs.init(directory / "proj")
            yield Project(directory / "proj", db, directory / "executions.log")
        finally:
            db.close()


# -- checks ------------------------------------------------------------------------------------


@dataclass
class Tally:
    rounds: int = 0
    duplicates: int = 0
    partial_writes: int = 0
    stuck_locks: int = 0
    failed_runs: int = 0
    seconds: float = 0.0
    inside_revision: int = 0
    """Kills that landed while a revision was running (its tracker row pending)."""
    notes: list[str] = field(default_factory=list)

    def note(self, round_number: int, text: str) -> None:
        self.notes.append(f"round {round_number}: {text}")


def latest_status(tracker: list[Any]) -> dict[str, str]:
    latest: dict[str, str] = {}
    for row in tracker:
        latest[row.revision] = row.status
    return latest


def check_partial(project: Project, tally: Tally, round_number: int) -> None:
    """No revision may have rows unless its latest attempt succeeded, and then all of them."""
    counts = project.row_counts()
    latest = latest_status(project.tracker())
    for rev in project.revisions:
        count = counts.get(rev, 0)
        if count and latest.get(rev) != "success":
            tally.partial_writes += 1
            tally.note(round_number, f"{rev}: {count} rows but status {latest.get(rev)}")
        elif count not in (0, project.rows):
            tally.partial_writes += 1
            tally.note(round_number, f"{rev}: {count} of {project.rows} rows")


def check_complete(project: Project, tally: Tally, round_number: int, killed: bool) -> None:
    """Every revision applied once: one success row and exactly its rows."""
    counts = project.row_counts()
    successes = Counter(r.revision for r in project.tracker() if r.status == "success")
    executions = project.executions()
    for rev in project.revisions:
        # After a kill the killed revision legitimately began twice (it was rolled back).
        allowed = 2 if killed else 1
        if successes[rev] > 1 or counts[rev] > project.rows or executions[rev] > allowed:
            tally.duplicates += 1
            tally.note(
                round_number,
                f"{rev}: {successes[rev]} successes, {counts[rev]} rows, "
                f"{executions[rev]} executions",
            )
        elif successes[rev] == 0 or counts[rev] != project.rows:
            tally.partial_writes += 1
            tally.note(round_number, f"{rev}: not applied ({counts[rev]} rows)")


def concurrent_round(project: Project, processes: int, tally: Tally, round_number: int) -> None:
    project.reset()
    procs = [project.spawn("upgrade", "heads") for _ in range(processes)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 3:
            tally.stuck_locks += 1
            tally.note(round_number, f"lock timeout: {err.decode().strip()[-300:]}")
        elif proc.returncode != 0:
            tally.failed_runs += 1
            tally.note(round_number, f"exit {proc.returncode}: {err.decode().strip()[-300:]}")
    if not project.db.lock_free(project.root):
        tally.stuck_locks += 1
        tally.note(round_number, "lock still held after every process exited")
    check_complete(project, tally, round_number, killed=False)


def kill_round(
    project: Project, window: tuple[float, float], tally: Tally, round_number: int
) -> float:
    """SIGKILL one run at a random instant of ``window``; return it (seconds after start)."""
    project.reset()
    proc = project.spawn("upgrade", "heads")
    at = random.uniform(*window)
    try:
        proc.wait(timeout=at)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    if proc.returncode not in (0, -signal.SIGKILL):
        tally.failed_runs += 1
        tally.note(round_number, f"exit {proc.returncode} before the kill: {err.decode()[-300:]}")
    if "pending" in latest_status(project.tracker()).values():
        tally.inside_revision += 1
    check_partial(project, tally, round_number)
    rerun = subprocess.run(
        [sys.executable, "-m", "dm", "upgrade", "heads", "--lock-timeout", "5"],
        cwd=project.root,
        env=project.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if rerun.returncode == 3:
        tally.stuck_locks += 1
        tally.note(round_number, f"next run: {rerun.stderr.strip()[-300:]}")
    elif rerun.returncode != 0:
        tally.failed_runs += 1
        tally.note(round_number, f"next run exit {rerun.returncode}: {rerun.stderr[-300:]}")
    check_complete(project, tally, round_number, killed=True)
    return at


def calibrate(project: Project) -> tuple[float, float]:
    """Return how long an undisturbed run of the kill chain takes, and a no-op run (process
    start-up, imports and planning: before the first revision begins)."""
    project.reset()
    timings = []
    for _ in range(2):  # the second run finds everything applied
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "dm", "upgrade", "heads"],
            cwd=project.root,
            env=project.env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise SystemExit(f"calibration run failed: {result.stderr}")
        timings.append(time.monotonic() - started)
    return timings[0], timings[1]


# -- main --------------------------------------------------------------------------------------


def run(kind: str, args: argparse.Namespace) -> dict[str, Tally]:
    results = {"concurrent": Tally(), "kill": Tally()}
    with make_project(kind, args.pg_url) as project:
        project.write_chain(args.revisions, args.rows, batches=1, pause=False)
        started = time.monotonic()
        for n in range(1, args.rounds + 1):
            concurrent_round(project, args.processes, results["concurrent"], n)
            results["concurrent"].rounds += 1
            _progress(kind, "concurrent", n, args.rounds, results["concurrent"])
        results["concurrent"].seconds = time.monotonic() - started

        project.write_chain(args.kill_revisions, args.rows, batches=args.batches, pause=True)
        run_seconds, startup_seconds = calibrate(project)
        # Mostly while revisions run; some kills still land during start-up or the end.
        window = (0.8 * startup_seconds, run_seconds)
        started = time.monotonic()
        moments = []
        for n in range(1, args.rounds + 1):
            moments.append(kill_round(project, window, results["kill"], n))
            results["kill"].rounds += 1
            _progress(kind, "kill", n, args.rounds, results["kill"])
        results["kill"].seconds = time.monotonic() - started
        results["kill"].notes.insert(
            0,
            f"undisturbed run {run_seconds:.2f}s (start-up {startup_seconds:.2f}s); "
            f"{results['kill'].inside_revision} of "
            f"{args.rounds} kills landed inside a revision; kills at "
            + ", ".join(f"{m:.2f}" for m in sorted(moments))
            + "s",
        )
    return results


def _progress(kind: str, scenario: str, n: int, total: int, tally: Tally) -> None:
    bad = tally.duplicates + tally.partial_writes + tally.stuck_locks + tally.failed_runs
    print(f"  {kind} {scenario} round {n}/{total}: {'ok' if not bad else f'{bad} problem(s)'}",
          file=sys.stderr, flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per scenario (20)")
    parser.add_argument("--processes", type=int, default=6, help="concurrent processes (6)")
    parser.add_argument("--revisions", type=int, default=20, help="concurrent chain (20)")
    parser.add_argument("--kill-revisions", type=int, default=8, help="kill chain (8)")
    parser.add_argument("--rows", type=int, default=20, help="rows per revision (20)")
    parser.add_argument("--batches", type=int, default=5, help="batches per revision (5)")
    parser.add_argument("--db", choices=["postgresql", "sqlite", "both"], default="postgresql")
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="admin URL to create DBs")
    parser.add_argument("--seed", type=int, default=None, help="random seed for kill times")
    args = parser.parse_args(argv)
    if args.rows % args.batches:
        parser.error("--rows must be a multiple of --batches")
    random.seed(args.seed)

    kinds = ["postgresql", "sqlite"] if args.db == "both" else [args.db]
    failed = False
    lines = []
    header = ("database", "scenario", "rounds", "duplicates", "partial writes", "stuck locks",
              "failed runs", "seconds")  # fmt: skip
    for kind in kinds:
        for scenario, tally in run(kind, args).items():
            failed |= bool(
                tally.duplicates + tally.partial_writes + tally.stuck_locks + tally.failed_runs
            )
            lines.append(
                (
                    kind,
                    scenario,
                    str(tally.rounds),
                    str(tally.duplicates),
                    str(tally.partial_writes),
                    str(tally.stuck_locks),
                    str(tally.failed_runs),
                    f"{tally.seconds:.1f}",
                )  # fmt: skip
            )
            for note in tally.notes:
                print(f"{kind} {scenario}: {note}")
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
