"""Shared fixtures: real databases (a SQLite file and a fresh PostgreSQL database per test),
a real dm project made by ``dm init``, and helpers to write revisions and run dm."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from click.testing import Result

from dm import verbs
from dm.cli import main

PG_HOST = os.environ.get("DM_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DM_TEST_PG_PORT", "5432"))
PG_DRIVER = os.environ.get("DM_TEST_PG_DRIVER", "asyncpg")
"""dm's PostgreSQL driver in tests: ``asyncpg`` (``postgresql://``) or ``psycopg``
(``postgresql+psycopg://``); ``.ci/run`` runs the driver-specific tests on both."""
if PG_DRIVER not in ("asyncpg", "psycopg"):
    raise RuntimeError(f"DM_TEST_PG_DRIVER={PG_DRIVER!r}: use asyncpg or psycopg")
IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent


def _pg_user() -> str | None:
    """Return a PostgreSQL superuser that can log in over TCP, or None when there is none."""
    import asyncpg

    async def probe(user: str) -> bool:
        try:
            conn = await asyncpg.connect(
                host=PG_HOST, port=PG_PORT, user=user, database="postgres", timeout=5
            )
        except Exception:
            return False
        await conn.close()
        return True

    for user in filter(None, [os.environ.get("DM_TEST_PG_USER"), "postgres", "root"]):
        if asyncio.run(probe(user)):
            return user
    return None


_PG_USER: list[str | None] = []


def pg_user() -> str:
    """Return the PostgreSQL user; skip (or fail under CI=true) when the server is missing."""
    if not _PG_USER:
        _PG_USER.append(_pg_user())
    user = _PG_USER[0]
    if user is None:
        message = f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}"
        if IN_CI:
            pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(message)
    return user


def _pg_admin(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=pg_user(), database="postgres", timeout=10
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@dataclass
class Database:
    """A throwaway database: ``url`` for dm (``postgresql+psycopg://`` under
    ``DM_TEST_PG_DRIVER=psycopg``), ``sync_url`` a plain libpq URL (psql, raw drivers)."""

    kind: str
    url: str
    sync_url: str

    def query(self, sql: str, **params: Any) -> list[sa.Row[Any]]:
        """Run ``sql`` on a short-lived synchronous-looking connection and return rows."""
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import NullPool

        async def run() -> list[sa.Row[Any]]:
            engine = create_async_engine(self.async_url, poolclass=NullPool)
            try:
                async with engine.connect() as conn:
                    result = await conn.execute(sa.text(sql), params)
                    rows = list(result.all()) if result.returns_rows else []
                    await conn.commit()
                    return rows
            finally:
                await engine.dispose()

        return asyncio.run(run())

    @property
    def async_url(self) -> str:
        if self.kind == "postgresql":
            return self.url.replace("postgresql://", "postgresql+asyncpg://", 1)
        return self.url.replace("sqlite:///", "sqlite+aiosqlite:///", 1)

    def tracker(self, table: str = "script_run_tracker") -> list[sa.Row[Any]]:
        """Return every tracker row, oldest first."""
        return self.query(f"SELECT * FROM {table} ORDER BY id")


def make_sqlite(tmp_path: Path) -> Database:
    path = tmp_path / "test.sqlite3"
    return Database("sqlite", f"sqlite:///{path}", f"sqlite:///{path}")


class _Databases:
    """Fresh PostgreSQL databases, made and dropped on a thread of their own.

    ``CREATE DATABASE`` and ``DROP DATABASE`` take about a second each on a busy server; the
    thread makes the next test's database while a test runs and drops the finished ones
    meanwhile, so a test waits for neither. Each test still gets a new, empty database.
    """

    def __init__(self) -> None:
        self._spare: queue.Queue[str | BaseException] = queue.Queue()
        self._jobs: queue.Queue[str | None] = queue.Queue()  # "" makes one, a name drops it
        self._thread = threading.Thread(target=self._work, name="test-databases", daemon=True)
        self._thread.start()
        for _ in range(2):  # two spares: a run of short tests outpaces one CREATE at a time
            self._jobs.put("")

    def take(self) -> str:
        """Return a new empty database's name, and start making the next one."""
        name = self._spare.get(timeout=120)
        if isinstance(name, BaseException):
            raise name
        self._jobs.put("")
        return name

    def drop(self, name: str) -> None:
        self._jobs.put(name)

    def close(self) -> None:
        """Drop every database made, in use or spare; return when done."""
        self._jobs.put(None)
        self._thread.join(300)
        while not self._spare.empty():
            spare = self._spare.get_nowait()
            if isinstance(spare, str):
                _pg_admin(f'DROP DATABASE IF EXISTS "{spare}" WITH (FORCE)')

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job:
                _pg_admin(f'DROP DATABASE IF EXISTS "{job}" WITH (FORCE)')
                continue
            name = f"dm_t_{uuid.uuid4().hex[:12]}"
            try:
                _pg_admin(f'CREATE DATABASE "{name}"')
            except BaseException as exc:
                self._spare.put(exc)
            else:
                self._spare.put(name)


_DATABASES: list[_Databases] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the test databases still left (each pytest-xdist worker drops its own)."""
    for databases in _DATABASES:
        databases.close()


@pytest.fixture
def postgres_db() -> Iterator[Database]:
    """A fresh PostgreSQL database, dropped afterwards."""
    user = pg_user()
    if not _DATABASES:
        _DATABASES.append(_Databases())
    name = _DATABASES[0].take()
    url = f"postgresql://{user}@{PG_HOST}:{PG_PORT}/{name}"
    if PG_DRIVER == "psycopg":
        dm_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    else:
        dm_url = url
    try:
        yield Database("postgresql", dm_url, url)
    finally:
        _DATABASES[0].drop(name)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Database:
    """A SQLite file in the test's temporary directory."""
    return make_sqlite(tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """Each test using it runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield make_sqlite(tmp_path)
    else:
        yield request.getfixturevalue("postgres_db")


@dataclass
class Project:
    """A dm project made by the real ``dm init``, bound to one test database."""

    root: Path
    db: Database

    @property
    def versions(self) -> Path:
        return self.root / "data_migrations" / "versions"

    @property
    def config(self) -> Path:
        return self.root / "alembic.ini"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for dm: the project's config and database, nothing inherited."""
        values = {"DM_CONFIG": str(self.config), "DM_DATABASE_URL": self.db.url}
        values.update(extra)
        return values

    def write(
        self,
        rev: str,
        down: str | tuple[str, ...] | None,
        upgrade: str = "pass",
        *,
        downgrade: str | None = "pass",
        verify: str | None = None,
        doc: str | None = None,
        extra: str = "",
        branch_labels: str | tuple[str, ...] | None = None,
        depends_on: str | tuple[str, ...] | None = None,
    ) -> Path:
        """Write revision ``rev`` with the given hook bodies (``session`` is in scope)."""
        parts = [
            f'"""{doc or f"Revision {rev}"}"""',
            "import sqlalchemy as sa",
            f"revision = {rev!r}",
            f"down_revision = {down!r}",
            f"branch_labels = {branch_labels!r}",
            f"depends_on = {depends_on!r}",
            textwrap.dedent(extra),
            "async def upgrade(session):\n" + textwrap.indent(textwrap.dedent(upgrade), "    "),
        ]
        if downgrade is not None:
            parts.append(
                "async def downgrade(session):\n"
                + textwrap.indent(textwrap.dedent(downgrade), "    ")
            )
        if verify is not None:
            parts.append(
                "async def verify(session):\n" + textwrap.indent(textwrap.dedent(verify), "    ")
            )
        path = self.versions / f"{rev}_{rev}.py"
        path.write_text("\n\n".join(parts) + "\n")
        return path

    def settings(self, **values: Any) -> Any:
        from dm.config.settings import Settings

        return Settings.load(config_file=self.config, database_url=self.db.url, **values)


def copy_example(tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> Project:
    """Copy the repository's example project (``alembic.ini``, ``data_migrations/``) to
    ``tmp_path / "example"``, make it the working directory and return it on ``db``."""
    root = tmp_path / "example"
    root.mkdir()
    shutil.copy(REPO / "alembic.ini", root / "alembic.ini")
    shutil.copytree(
        REPO / "data_migrations",
        root / "data_migrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    monkeypatch.chdir(root)
    return Project(root, db)


@pytest.fixture
def project(tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> Project:
    """An empty dm project (``dm init``) on each database, with the working directory in it."""
    for name in ("DM_DATABASE_URL", "DATABASE_URL", "DM_CONFIG", "DM_ENVIRONMENT", "ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "proj"
    verbs.init(root)
    monkeypatch.chdir(root)
    return Project(root, db)


def cli_runner() -> CliRunner:
    """Return a CliRunner that keeps stdout and stderr apart on every supported click.

    click 8.2 always does; click 8.1 mixes them unless told ``mix_stderr=False``.
    """
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def invoke(project: Project, *args: str, **env: str) -> Result:
    """Run ``dm ARGS`` in-process with CliRunner; stdout and stderr stay apart."""
    runner = cli_runner()
    return runner.invoke(main, list(args), env=project.env(**env), catch_exceptions=False)


@dataclass
class Ran:
    """What a finished dm command left: exit code, stdout, stderr (as ``run_dm`` returns)."""

    returncode: int
    stdout: str
    stderr: str


def run_in_process(project: Project, *args: str, env: dict[str, str] | None = None) -> Ran:
    """Run ``dm ARGS`` in-process, like ``run_dm`` but without starting a process.

    For checks of text and exit codes; a real process (``run_dm``) is for what only one can
    show: stdout and stderr of the process itself, signals, ``os._exit``, the environment.
    """
    result = invoke(project, *args, **(env or {}))
    return Ran(result.exit_code, result.stdout, result.stderr)


def attempt_of(rev: str, status: Any, direction: str = "upgrade") -> Any:
    """A revision's latest tracker attempt, as ``Tracker.latest`` returns it, for planners."""
    from datetime import UTC
    from datetime import datetime

    from dm.core.state import Attempt
    from dm.engine.tracker import Status

    now = datetime.now(UTC)
    in_effect = None if status is Status.FAILED else status  # a failed one rolled back whole
    return Attempt(
        *(1, rev, None, direction, status, 1, now, now, 0, None, None, None, None, None, 1),
        in_effect=in_effect,
    )


def applied(*revisions: str) -> dict[str, Any]:
    """Latest attempts in which each of ``revisions`` is applied."""
    from dm.engine.tracker import Status

    return {rev: attempt_of(rev, Status.SUCCESS) for rev in revisions}


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start dm processes whose output goes to files; none outlives the test
    (``support.processes.spawn_processes``)."""
    from support.processes import spawn_processes

    yield from spawn_processes(tmp_path)


@pytest.fixture
def proxy() -> Iterator[Any]:
    """A :class:`support.network.TcpProxy` to PostgreSQL that refuses until ``listen()``."""
    from support.network import TcpProxy

    proxy = TcpProxy(listen=False)
    yield proxy
    proxy.close()


def ok(result: Result) -> Result:
    """Assert that an in-process dm command exited 0; return its result."""
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result


def as_json(result: Result) -> Any:
    """Assert that an in-process dm command exited 0; return its stdout parsed as JSON."""
    return json.loads(ok(result).stdout)


def status_of(project: Project) -> dict[str, dict[str, Any]]:
    """``dm status --json`` by revision."""
    return {row["revision"]: row for row in as_json(invoke(project, "status", "--json"))}


def run_dm(
    project: Project, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dm ARGS`` as a real process in the project directory."""
    return subprocess.run(
        [sys.executable, "-m", "dm", *args],
        cwd=project.root,
        env={**os.environ, **project.env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_dm(
    project: Project, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``python -m dm ARGS`` without waiting for it."""
    return subprocess.Popen(
        [sys.executable, "-m", "dm", *args],
        cwd=project.root,
        env={**os.environ, **project.env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
