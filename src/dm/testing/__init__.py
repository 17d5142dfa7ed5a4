"""Drive a dm project against a throwaway database, for tests: what dm's pytest plugin
(``dm.testing.plugin``) hands to test functions as ``dm_runner``.

:class:`DmRunner` runs dm's own commands (``dm.verbs`` / ``dm.verbs``, the code the
CLI runs, lock and tracker included) on one database URL given explicitly, seeds rows right
before a revision runs, and snapshots the data to compare two states. Its methods are
coroutines; each has a blocking ``*_sync`` twin that also works from a running event loop
(``dm.api``'s rule). :class:`Databases` makes fresh databases: SQLite files, or databases
created on a PostgreSQL server and dropped afterwards. Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeAlias

import pytest
import sqlalchemy as sa

from dm.api import blocking
from dm.backfill.batching import Probe
from dm.backfill.batching import RunUnit
from dm.backfill.batching import probing
from dm.core.errors import UsageError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from dm.config.settings import Settings
    from dm.core.graph import Graph
    from dm.core.graph import Revision
    from dm.engine.execution import RunResult
    from dm.verbs import AttemptRecord
    from dm.verbs import RevisionStatus

Rows: TypeAlias = Mapping[str, Sequence[Mapping[str, Any]]]
Seed: TypeAlias = (
    "str | sa.Executable | Rows | Callable[[AsyncSession], Awaitable[Any]] "
    "| Callable[[Session], Any]"
)
"""Rows to put in place: a SQL script, a SQLAlchemy statement, ``{table: [row, ...]}``, an
``async def f(session)`` (an ``AsyncSession``) or a ``def f(session)`` (a sync ``Session``)."""

Snapshot: TypeAlias = dict[str, Counter[tuple[Any, ...]]]
"""Every table's rows (the tracker's excepted), as a multiset of tuples."""


@dataclass(frozen=True)
class ProjectConfig:
    """Where the dm project lives: its config file and dm's section in it."""

    file: Path
    section: str = "data_migrations"


class DmRunner:
    """dm's commands on one project and one database, with the helpers tests need.

    :param environment: dm's environment for the guards (default: as configured, else
        ``production``).
    """

    def __init__(
        self, config: ProjectConfig, database_url: str, *, environment: str | None = None
    ) -> None:
        self.config = config
        self.database_url = database_url
        self.environment = environment

    def settings(self) -> Settings:
        """Return dm's settings for this project and database (explicit values win)."""
        from dm.config.settings import Settings

        return Settings.load(
            config_file=self.config.file,
            ini_section=self.config.section,
            database_url=self.database_url,
            environment=self.environment,
            connect_retry_seconds=0.0,  # the test made the database: nothing to wait for
        )

    def in_environment(self, environment: str) -> DmRunner:
        """Return a runner on the same database, with dm's environment set to ``environment``."""
        return DmRunner(self.config, self.database_url, environment=environment)

    @property
    def redacted_url(self) -> str:
        """Return the database URL without its password, for messages."""
        return self.settings().redacted_url()

    def graph(self) -> Graph:
        """Load the project's revision graph."""
        from dm.engine.execution import load_graph

        return load_graph(self.settings())

    # -- dm's commands --------------------------------------------------------------------

    async def upgrade(
        self, target: str = "heads", *, dry_run: bool = False, probe: Probe | None = None
    ) -> RunResult:
        """Upgrade to ``target``, as ``dm upgrade``.

        :param probe: see :class:`dm.backfill.batching.Probe`."""
        from dm.verbs import upgrade

        with probing(probe) if probe is not None else contextlib.nullcontext():
            return await upgrade(self.settings(), target, dry_run=dry_run)

    async def downgrade(self, target: str, *, dry_run: bool = False) -> RunResult:
        """Downgrade to ``target``, as ``dm downgrade``."""
        from dm.verbs import downgrade

        return await downgrade(self.settings(), target, dry_run=dry_run)

    async def run(self, revision: str, *, force: bool = False) -> RunResult:
        """Run one revision's upgrade, as ``dm run`` (``force``: again, though applied)."""
        from dm.verbs import run

        return await run(self.settings(), revision, force=force)

    async def rollback(self, revision: str) -> RunResult:
        """Run one revision's downgrade, as ``dm rollback``."""
        from dm.verbs import rollback

        return await rollback(self.settings(), revision)

    async def status(self) -> list[RevisionStatus]:
        """Return every revision's state and latest attempt, as ``dm status``."""
        from dm.verbs import status

        return await status(self.settings())

    async def attempts(self, revision: str) -> list[AttemptRecord]:
        """Return every tracker row of ``revision``, oldest first, as ``dm log REV``."""
        from dm.verbs import attempts

        return await attempts(self.settings(), revision)

    # -- data -------------------------------------------------------------------------------

    async def seed(self, data: Seed, *, before: str) -> None:
        """Upgrade to the parents of ``before`` (``depends_on`` included), then put ``data``
        in place and commit it: the rows ``before`` will find when it runs next."""
        from dm.core.alembic_compat import all_down_revisions

        graph = self.graph()
        found = graph.resolve(before)
        if len(found) != 1:
            raise UsageError(f"seed(before={before!r}): name exactly one revision")
        for parent in all_down_revisions(found[0]):
            await self.upgrade(parent)
        await self.execute(data)

    async def execute(self, data: Seed) -> None:
        """Put ``data`` (see :data:`Seed`) in place, in one committed transaction."""
        from sqlalchemy.ext.asyncio import AsyncSession

        async with self.connect() as conn:
            session = AsyncSession(bind=conn)
            try:
                await _apply(session, data)
                await session.commit()
            finally:
                await session.close()

    async def snapshot(self) -> Snapshot:
        """Return every table's rows, dm's tracker tables excepted."""
        settings = self.settings()
        skip = {settings.tracker_table, f"{settings.tracker_table}_meta"}
        async with self.connect() as conn:
            return await conn.run_sync(_snapshot, skip)

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """Yield a connection to the database (no pool; closed afterwards)."""
        from dm.config.engines import create_engine

        engine = create_engine(self.settings().url(), application_name="dm-test")
        try:
            async with engine.connect() as conn:
                yield conn
        finally:
            await engine.dispose()

    # -- blocking twins -------------------------------------------------------------------

    def upgrade_sync(
        self, target: str = "heads", *, dry_run: bool = False, probe: Probe | None = None
    ) -> RunResult:
        """Blocking :meth:`upgrade`."""
        return blocking(self.upgrade, target, dry_run=dry_run, probe=probe)

    def downgrade_sync(self, target: str, *, dry_run: bool = False) -> RunResult:
        """Blocking :meth:`downgrade`."""
        return blocking(self.downgrade, target, dry_run=dry_run)

    def run_sync(self, revision: str, *, force: bool = False) -> RunResult:
        """Blocking :meth:`run`."""
        return blocking(self.run, revision, force=force)

    def rollback_sync(self, revision: str) -> RunResult:
        """Blocking :meth:`rollback`."""
        return blocking(self.rollback, revision)

    def status_sync(self) -> list[RevisionStatus]:
        """Blocking :meth:`status`."""
        return blocking(self.status)

    def attempts_sync(self, revision: str) -> list[AttemptRecord]:
        """Blocking :meth:`attempts`."""
        return blocking(self.attempts, revision)

    def seed_sync(self, data: Seed, *, before: str) -> None:
        """Blocking :meth:`seed`."""
        blocking(self.seed, data, before=before)

    def execute_sync(self, data: Seed) -> None:
        """Blocking :meth:`execute`."""
        blocking(self.execute, data)

    def snapshot_sync(self) -> Snapshot:
        """Blocking :meth:`snapshot`."""
        return blocking(self.snapshot)


async def _apply(session: AsyncSession, data: Any) -> None:
    from dm.engine.hooks import execute_script

    if isinstance(data, str):
        await execute_script(session, data)
    elif isinstance(data, sa.Executable):
        await session.execute(data)
    elif isinstance(data, Mapping):
        conn = await session.connection()
        for name, rows in data.items():
            table = await conn.run_sync(_reflect, str(name))
            if rows:
                await session.execute(table.insert(), [dict(row) for row in rows])
    elif inspect.iscoroutinefunction(data):
        await data(session)
    elif callable(data):
        await session.run_sync(data)
    else:
        raise UsageError(
            f"cannot seed {type(data).__name__}: give SQL text, a statement, "
            "{table: [rows]} or a function taking the session"
        )


def _reflect(conn: sa.Connection, name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), autoload_with=conn)


def _snapshot(conn: sa.Connection, skip: set[str]) -> Snapshot:
    snapshot: Snapshot = {}
    for name in sorted(sa.inspect(conn).get_table_names()):
        if name in skip or name.startswith("sqlite_"):
            continue
        table = sa.Table(name, sa.MetaData(), autoload_with=conn)
        snapshot[name] = Counter(tuple(row) for row in conn.execute(sa.select(table)))
    return snapshot


def differences(expected: Snapshot, actual: Snapshot, *, limit: int = 5) -> list[str]:
    """Return one line per table whose rows differ between two snapshots (none: equal)."""
    lines = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            lines.append(f"table {name}: missing")
            continue
        if name not in expected:
            lines.append(f"table {name}: not expected")
            continue
        extra = actual[name] - expected[name]
        missing = expected[name] - actual[name]
        if not extra and not missing:
            continue
        parts = []
        if extra:
            parts.append(f"{sum(extra.values())} row(s) too many {_rows(extra, limit)}")
        if missing:
            parts.append(f"{sum(missing.values())} row(s) missing {_rows(missing, limit)}")
        lines.append(f"table {name}: " + "; ".join(parts))
    return lines


def _rows(rows: Counter[tuple[Any, ...]], limit: int) -> str:
    shown = sorted(rows.elements(), key=repr)
    text = ", ".join(repr(row) for row in shown[:limit])
    return f"({text}{', ...' if len(shown) > limit else ''})"


# -- interrupting batched loops ------------------------------------------------------------------


class Interruption(Exception):
    """Raised by :class:`BatchLog` right after the first committed batch (with rows) of a
    revision."""


@dataclass
class BatchLog:
    """What the ``batched`` loops of one revision committed, per loop: rows and batches.

    :param interrupt: raise :class:`Interruption` after the first committed batch.
    """

    revision: str
    interrupt: bool = False
    rows: Counter[int] = field(default_factory=Counter)
    batches: int = 0
    interrupted: bool = False
    report: Callable[[str], None] | None = None
    """Told every ``REPORT_EVERY`` seconds how far a long loop got, and why it is long."""
    _size: int | None = None
    _reported: float = field(default_factory=time.monotonic)

    REPORT_EVERY = 10.0

    def probe(self, size: int | None) -> Probe:
        """Return the probe that fills this log (and interrupts, if asked)."""
        self._size = size
        return Probe(size=size, committed=self._committed)

    def _committed(self, context: RunUnit, checkpoint: Mapping[str, Any], rows: int) -> None:
        if context.revision != self.revision or context.direction != "upgrade":
            return
        self.rows[int(checkpoint["loop"])] += rows
        self.batches += 1
        if self.report is not None and time.monotonic() - self._reported >= self.REPORT_EVERY:
            self._reported = time.monotonic()
            size = "its own batch size" if self._size is None else f"{self._size} row(s)"
            self.report(
                f"{self.revision}: {self.batches:,} batches, {sum(self.rows.values()):,} rows so "
                f"far, at {size} per batch (dm_batch_size): many seeded rows at a small batch "
                "size take long; raise dm_batch_size"
            )
        if self.interrupt and not self.interrupted and rows:
            self.interrupted = True
            raise Interruption(
                f"interrupted by the test after the first committed batch ({rows} row(s))"
            )


# -- fresh databases -------------------------------------------------------------------------------


# The start of each test database's name: --dm-database-url servers may allow only a prefix.
DEFAULT_PREFIX = "dm_test_"
_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,39}")


class Databases:
    """Fresh databases for one test, removed by :meth:`drop_all`.

    :param directory: where SQLite files go.
    :param server_url: a PostgreSQL URL whose user may create databases: each database is
        created there (``CREATE DATABASE``) and dropped afterwards. None: SQLite files.
    """

    def __init__(
        self,
        directory: Path,
        server_url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        prepare: Callable[[str], None] | None = None,
    ) -> None:
        """:param prefix: the start of each database's name (shared servers often let a
            test user create only databases whose names start with a given prefix).
        :param prepare: called with each new database's URL before it is handed out, e.g.
            to bring the application's schema to a revision (``requires_schema``)."""
        if not _PREFIX.fullmatch(prefix):
            raise UsageError(
                f"dm_database_prefix {prefix!r}: use lower-case letters, digits and _ "
                "(at most 40), starting with a letter"
            )
        self.directory = directory
        self.server_url = server_url
        self.prefix = prefix
        self.prepare = prepare
        self._created: list[str] = []

    def create(self) -> str:
        """Create an empty database (then ``prepare`` it); return its URL."""
        name = f"{self.prefix}{uuid.uuid4().hex[:12]}"
        if self.server_url is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            made = f"sqlite:///{self.directory / f'{name}.sqlite3'}"
        else:
            url = self._server().set(database=name)
            blocking(self._admin, f'CREATE DATABASE "{name}"')
            self._created.append(name)
            made = url.render_as_string(hide_password=False)
        if self.prepare is not None:
            self.prepare(made)
        return made

    def drop_all(self) -> None:
        """Drop every database :meth:`create` made on the server (SQLite files stay)."""
        while self._created:
            name = self._created.pop()
            blocking(self._admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _server(self) -> sa.URL:
        from dm.config.urls import normalise_url

        assert self.server_url is not None
        url = normalise_url(self.server_url, "--dm-database-url")
        if url.get_backend_name() != "postgresql":
            raise UsageError(
                f"--dm-database-url must be a PostgreSQL URL, not {url.get_backend_name()}"
            )
        return url

    async def _admin(self, sql: str) -> None:
        from dm.config.engines import create_engine

        engine = create_engine(self._server(), application_name="dm-test", autocommit=True)
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text(sql))
        finally:
            await engine.dispose()


@contextlib.contextmanager
def databases(
    directory: Path,
    server_url: str | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    prepare: Callable[[str], None] | None = None,
) -> Iterator[Databases]:
    """Yield :class:`Databases`; drop what it created afterwards."""
    made = Databases(directory, server_url, prefix=prefix, prepare=prepare)
    try:
        yield made
    finally:
        made.drop_all()


def describe(rev: Revision | None, step: str, database: str, assertion: str) -> str:
    """Return a failure as dm reports one: the revision, the step, the database, what failed."""
    from dm.core.graph import display_path

    lines = []
    if rev is not None:
        title = f" ({rev.description})" if rev.description else ""
        lines.append(f"revision {rev.id}{title}: {step}")
        lines.append(f"  file:      {display_path(rev.path)}")
    else:
        lines.append(step)
    lines.append(f"  database:  {database}")
    lines.extend(
        f"  {'failed:' if i == 0 else '':<10} {text}"
        for i, text in enumerate(assertion.splitlines())
    )
    return "\n".join(lines)


# -- revision files import offline -------------------------------------------------------------


class DatabaseTouched(Exception):
    """A revision file opened a connection (a socket, DNS, a SQLite file) while imported."""


def import_offline(config: ProjectConfig) -> list[str]:
    """Load the project's revision files with connections refused; return what they tried.

    Every socket connection, DNS lookup and ``sqlite3.connect`` made while the files are
    imported raises :class:`DatabaseTouched` and is reported, naming the revision file and
    line, even when the revision's code catches the error. Run it in a fresh interpreter
    (:func:`import_offline_in_subprocess`) so that nothing is imported already.
    """
    import socket
    import sqlite3
    import traceback

    from alembic.script import ScriptDirectory

    from dm.config.settings import Settings
    from dm.core.graph import Graph

    settings = Settings.load(config_file=config.file, ini_section=config.section)
    alembic_config = settings.alembic_config()
    script_dir = ScriptDirectory.from_config(alembic_config)
    versions = [Path(p).resolve() for p in script_dir._version_locations]
    found: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            target = next((a for a in args if not isinstance(a, socket.socket)), "")
            where = "a revision file"
            for frame in reversed(traceback.extract_stack()[:-1]):
                path = Path(frame.filename).resolve()
                if any(directory in path.parents for directory in versions):
                    where = f"{_relative(path)}:{frame.lineno}"
                    break
            message = f"{where}: {what} {target!r} at import"
            found.append(message)
            raise DatabaseTouched(message)

        return refused

    patches: list[tuple[Any, str, Any]] = [
        (socket.socket, "connect", refuse("connected to")),
        (socket.socket, "connect_ex", refuse("connected to")),
        (socket, "create_connection", refuse("connected to")),
        (socket, "getaddrinfo", refuse("looked up")),
        (sqlite3, "connect", refuse("opened the SQLite database")),
        (sqlite3.dbapi2, "connect", refuse("opened the SQLite database")),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        try:
            Graph.from_config(alembic_config)
        except Exception as exc:
            if not found:
                found.append(" ".join(str(exc).split()))
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    return list(dict.fromkeys(found))


def _relative(path: Path) -> str:
    from dm.core.graph import display_path

    return display_path(path)


def import_offline_in_subprocess(config: ProjectConfig, database_url: str) -> list[str]:
    """Run :func:`import_offline` in a fresh interpreter, with ``DM_DATABASE_URL`` and
    ``DATABASE_URL`` naming ``database_url``, so a file that reads them would connect."""
    import json
    import os
    import subprocess

    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from dm.testing import ProjectConfig, import_offline\n"
        "print(json.dumps(import_offline(ProjectConfig(Path(sys.argv[1]), sys.argv[2]))))\n"
    )
    env = {**os.environ, "DM_DATABASE_URL": database_url, "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-c", code, str(config.file), config.section],
        cwd=Path(config.file).resolve().parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [f"importing the revision files failed: {last}"]
    found: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


@dataclass(frozen=True)
class DmTestConfig:
    """How the built-in tests treat the project.

    :param minimum_downgrade_revision: the round trip goes down no further than this
        revision (it stays applied).
    :param skip_revisions: revisions left out of the per-revision checks (idempotency,
        resume); the round trip ends above the highest of them.
    :param seeds: rows to put in place right before a revision runs, by revision id (see
        :data:`dm.testing.Seed`); used by every built-in test that runs that revision.
    :param batch_size: the batch size of every ``dm.batched`` loop in the resume test, so
        that a few seeded rows make several batches (None: the revision's own).
    :param environments: environments to test besides those the revisions name and dm's
        default (``production``).
    """

    minimum_downgrade_revision: str | None = None
    skip_revisions: tuple[str, ...] = ()
    seeds: Mapping[str, Seed] = field(default_factory=dict)
    batch_size: int | None = 1
    environments: tuple[str, ...] = ()


def with_ini(config: DmTestConfig, pytestconfig: pytest.Config) -> DmTestConfig:
    """Return ``config`` with each ``dm_*`` ini key applied to the setting it left at its
    default: a value the ``dm_test_config`` fixture sets wins, an ini key fills the rest,
    however the fixture builds its :class:`DmTestConfig`."""
    import dataclasses

    size = _ini(pytestconfig, "dm_batch_size")
    if size is not None and not size.isdigit():
        raise pytest.UsageError(f"dm_batch_size must be a whole number, not {size!r}")
    from_ini: dict[str, Any] = {
        "minimum_downgrade_revision": _ini(pytestconfig, "dm_minimum_downgrade_revision"),
        "skip_revisions": tuple(pytestconfig.getini("dm_skip_revisions") or ()),
        "batch_size": None if size is None else (int(size) or None),
        "environments": tuple(pytestconfig.getini("dm_environments") or ()),
    }
    default = DmTestConfig()
    changes = {
        name: value
        for name, value in from_ini.items()
        if getattr(config, name) == getattr(default, name)
        and (value is not None or name == "batch_size" and size is not None)
        and value != ()
    }
    return dataclasses.replace(config, **changes)


def _ini(config: pytest.Config, name: str) -> str | None:
    """Return the ini key's value, None when it is unset or empty."""
    value = str(config.getini(name) or "").strip()
    return value or None
