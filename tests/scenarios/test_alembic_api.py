"""Alembic's command API honoured: ``alembic.command.upgrade(cfg, ...)`` run the way callers
run it (a shared connection, a transaction rolled back, a running event loop, a Config built
in code), on SQLite and PostgreSQL, with a bystander ``DATABASE_URL`` that must stay untouched.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import Database
from conftest import Project
from conftest import run_dm

CREATE_T = """
await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))
await session.execute(sa.text('INSERT INTO t VALUES (1)'))
"""
DROP_T = "await session.execute(sa.text('DROP TABLE t'))"
BATCHED = """
from dm import batched
transactional = False
"""
BACKFILL = """
t = sa.table('t', sa.column('x'))
async for batch in batched(session, sa.select(t.c.x).where(t.c.x < 100), key=t.c.x, size=1):
    await session.execute(sa.text('INSERT INTO t VALUES (100)'))
"""
DEV_ONLY = 'environments = ("development",)\n'
SOURCE = "config.attributes['connection']"


@pytest.fixture
def bystanders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """``DM_DATABASE_URL`` and ``DATABASE_URL`` pointing at SQLite files no run may create."""
    files = [tmp_path / "dm_bystander.sqlite3", tmp_path / "bystander.sqlite3"]
    monkeypatch.setenv("DM_DATABASE_URL", f"sqlite:///{files[0]}")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{files[1]}")
    yield files
    assert [f for f in files if f.exists()] == []


def chain(project: Project) -> None:
    """a1 creates t with one row; b2 is a batched backfill; c3 does nothing."""
    project.write("a1", None, CREATE_T, downgrade=DROP_T)
    project.write("b2", "a1", BACKFILL, extra=BATCHED)
    project.write("c3", "b2")


def config_of(project: Project) -> Config:
    return Config(str(project.config), ini_section="data_migrations")


def sync_url(db: Database) -> str:
    """The URL of a synchronous driver (sqlite3, psycopg), as an application's engine has."""
    return db.url.replace("postgresql://", "postgresql+psycopg://", 1)


def tracker_rows(conn: sa.Connection) -> list[tuple[str, str, str]]:
    query = "SELECT revision, direction, status FROM script_run_tracker ORDER BY id"
    return [tuple(row) for row in conn.execute(sa.text(query))]  # type: ignore[misc]


def rows(project: Project) -> list[tuple[str, str, str]]:
    return [(r.revision, r.direction, r.status) for r in project.db.tracker()]


def table_names(db: Database) -> list[str]:
    engine = sa.create_engine(sync_url(db))
    try:
        with engine.connect() as conn:
            return sorted(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


APPLIED = [("a1", "upgrade", "success"), ("b2", "upgrade", "success"), ("c3", "upgrade", "success")]


# -- the caller's connection ---------------------------------------------------------------------


@pytest.mark.matrix
def test_caller_transaction_rolled_back_leaves_nothing(
    project: Project, bystanders: list[Path], capfd: pytest.CaptureFixture[str]
) -> None:
    chain(project)
    cfg = config_of(project)
    engine = sa.create_engine(sync_url(project.db))
    with engine.connect() as conn:
        transaction = conn.begin()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
        # dm worked inside the caller's transaction: the caller sees it all...
        assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 2
        assert tracker_rows(conn) == APPLIED
        transaction.rollback()
    engine.dispose()
    # ...and its rollback undoes it all, the tracker included.
    assert table_names(project.db) == []
    err = capfd.readouterr().err
    assert f"(the connection in {SOURCE}, inside its transaction)" in err
    assert "b2: transactional = False, but inside the caller's transaction" in err


def test_caller_transaction_committed_keeps_the_work(
    project: Project, bystanders: list[Path]
) -> None:
    chain(project)
    cfg = config_of(project)
    engine = sa.create_engine(sync_url(project.db))
    with engine.begin() as conn:  # Alembic's "sharing a connection" recipe
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
    engine.dispose()
    assert rows(project) == APPLIED
    assert project.db.query("SELECT count(*) FROM t")[0][0] == 2


@pytest.mark.matrix
def test_caller_engine_commits_each_revision(project: Project, bystanders: list[Path]) -> None:
    """An engine (pytest-alembic's way): dm opens one connection and commits per revision."""
    chain(project)
    project.write("d4", "c3", "raise RuntimeError('boom')")
    cfg = config_of(project)
    engine = sa.create_engine(sync_url(project.db))
    cfg.attributes["connection"] = engine
    with pytest.raises(CommandError, match="d4"):
        command.upgrade(cfg, "heads")
    engine.dispose()
    assert rows(project) == [*APPLIED, ("d4", "upgrade", "failed")]


def test_caller_connection_without_a_transaction_is_left_clean(
    project: Project, bystanders: list[Path], capfd: pytest.CaptureFixture[str]
) -> None:
    """dm commits its own work on it, releases its lock and leaves no transaction open; the
    log line names the database without its password."""
    chain(project)
    cfg = config_of(project)
    url = sa.make_url(sync_url(project.db))
    if project.db.kind == "postgresql":
        url = url.set(password="s3cret-pw")  # trust auth: accepted and ignored
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
        assert not conn.in_transaction()
        if project.db.kind == "postgresql":
            held = (
                "SELECT count(*) FROM pg_locks "
                "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            assert conn.execute(sa.text(held)).scalar() == 0
            conn.rollback()
    engine.dispose()
    assert rows(project) == APPLIED
    err = capfd.readouterr().err
    assert f"(the connection in {SOURCE})" in err
    assert "s3cret-pw" not in err


def test_current_reads_the_tracker_inside_the_callers_transaction(
    project: Project, bystanders: list[Path]
) -> None:
    chain(project)
    out = io.StringIO()
    cfg = Config(str(project.config), ini_section="data_migrations", stdout=out)
    engine = sa.create_engine(sync_url(project.db))
    with engine.connect() as conn:
        transaction = conn.begin()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "b2")
        command.current(cfg)
        transaction.rollback()
    engine.dispose()
    assert out.getvalue().split() == ["b2"]


def test_autocommit_block_is_refused_inside_the_callers_transaction(
    project: Project, bystanders: list[Path]
) -> None:
    project.write(
        "a1",
        None,
        "async with dm.autocommit(session):\n    pass",
        extra="import dm\n",
    )
    cfg = config_of(project)
    engine = sa.create_engine(sync_url(project.db))
    with engine.connect() as conn:
        transaction = conn.begin()
        cfg.attributes["connection"] = conn
        with pytest.raises(CommandError, match="cannot run inside the caller's transaction"):
            command.upgrade(cfg, "heads")
        assert tracker_rows(conn) == [("a1", "upgrade", "failed")]
        transaction.rollback()
    engine.dispose()


@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK"])
def test_commit_or_rollback_statement_is_refused_inside_the_callers_transaction(
    project: Project, bystanders: list[Path], statement: str
) -> None:
    """A raw COMMIT or ROLLBACK would end the caller's own transaction: refused, and the
    caller's work before dm stays the caller's to commit or roll back."""
    project.write("a1", None, f"await session.execute(sa.text({statement!r}))")
    cfg = config_of(project)
    engine = sa.create_engine(sync_url(project.db))
    with engine.connect() as conn:
        transaction = conn.begin()
        conn.execute(sa.text("CREATE TABLE callers (id INTEGER)"))
        cfg.attributes["connection"] = conn
        with pytest.raises(CommandError, match=f"sent a {statement} statement inside the caller"):
            command.upgrade(cfg, "heads")
        assert tracker_rows(conn) == [("a1", "upgrade", "failed")]
        transaction.rollback()
    engine.dispose()
    if project.db.kind == "postgresql":  # (sqlite3 commits DDL at once)
        assert "callers" not in table_names(project.db)  # the caller's rollback undid it all


@pytest.mark.postgres
@pytest.mark.process
def test_lock_is_held_until_the_caller_ends_its_transaction(
    postgres_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside the caller's transaction the lock is a transaction lock: another run waits for
    the caller's commit, which is when dm's work becomes visible."""
    from dm import verbs as dm_command

    for name in ("DM_DATABASE_URL", "DATABASE_URL", "DM_CONFIG", "DM_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    dm_command.init(tmp_path / "proj")
    project = Project(tmp_path / "proj", postgres_db)
    chain(project)
    cfg = config_of(project)
    engine = sa.create_engine(sync_url(project.db))
    with engine.connect() as conn:
        transaction = conn.begin()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
        other = run_dm(project, "upgrade", "heads", env={"DM_LOCK_TIMEOUT": "0.5"})
        assert other.returncode == 3, other.stderr
        assert "migration lock not acquired" in other.stderr
        transaction.commit()
    engine.dispose()
    again = run_dm(project, "upgrade", "heads", env={"DM_LOCK_TIMEOUT": "5"})
    assert again.returncode == 0, again.stderr
    assert "nothing to upgrade" in again.stdout
    assert rows(project) == APPLIED


# -- a Config built in code; precedence ----------------------------------------------------------


@pytest.mark.matrix
@pytest.mark.parametrize("file", ["none", "without the section"])
def test_config_built_in_code(
    project: Project,
    bystanders: list[Path],
    tmp_path: Path,
    file: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    chain(project)
    if file == "none":
        cfg = Config(ini_section="dm_tests")
    else:
        other = tmp_path / "other.ini"
        other.write_text("[alembic]\nscript_location = nowhere\n")
        cfg = Config(str(other), ini_section="dm_tests")
    cfg.set_main_option("script_location", str(project.root / "data_migrations"))
    cfg.set_main_option("sqlalchemy.url", project.db.url)
    command.upgrade(cfg, "heads")
    assert rows(project) == APPLIED
    assert "(from sqlalchemy.url set on the Alembic Config)" in capfd.readouterr().err


@pytest.mark.matrix
def test_set_main_option_url_beats_the_environment(
    project: Project, bystanders: list[Path]
) -> None:
    chain(project)
    cfg = config_of(project)
    cfg.set_main_option("sqlalchemy.url", project.db.url)
    command.upgrade(cfg, "heads")
    assert rows(project) == APPLIED


@pytest.mark.matrix
def test_the_environment_beats_the_files_url_as_for_dm(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL written in alembic.ini stays below DM_DATABASE_URL, as ``dm`` has it."""
    chain(project)
    bystander = tmp_path / "in_the_file.sqlite3"
    text = project.config.read_text().replace(
        "sqlalchemy.url =\n", f"sqlalchemy.url = sqlite:///{bystander}\n"
    )
    project.config.write_text(text)
    monkeypatch.setenv("DM_DATABASE_URL", project.db.url)
    command.upgrade(config_of(project), "heads")
    assert rows(project) == APPLIED
    assert not bystander.exists()


# -- a running event loop ------------------------------------------------------------------------


@pytest.mark.matrix
@pytest.mark.parametrize(
    ("outcome", "given"),
    [("commit", "sync"), ("rollback", "sync"), ("rollback", "async")],
)
def test_asyncio_recipe_runs_on_the_callers_loop_and_connection(
    project: Project, bystanders: list[Path], outcome: str, given: str
) -> None:
    """Alembic's asyncio cookbook: ``await conn.run_sync(...)`` calling ``command.upgrade``,
    with the sync connection (the recipe) or the AsyncConnection itself in the attributes."""
    chain(project)
    cfg = config_of(project)
    callers: list[AsyncConnection] = []

    def upgrade(sync_conn: sa.Connection) -> list[tuple[str, str, str]]:
        cfg.attributes["connection"] = sync_conn if given == "sync" else callers[0]
        command.upgrade(cfg, "heads")
        return tracker_rows(sync_conn)

    async def main() -> list[tuple[str, str, str]]:
        engine = create_async_engine(project.db.async_url)
        try:
            async with engine.connect() as conn:
                callers.append(conn)
                transaction = await conn.begin()
                seen = await conn.run_sync(upgrade)
                await (transaction.commit() if outcome == "commit" else transaction.rollback())
                return seen
        finally:
            await engine.dispose()

    assert asyncio.run(main()) == APPLIED
    if outcome == "commit":
        assert rows(project) == APPLIED
    else:
        assert table_names(project.db) == []


@pytest.mark.parametrize("where", ["async code", "run_sync"])
def test_no_connection_inside_a_running_loop(
    project: Project, bystanders: list[Path], where: str
) -> None:
    """No asyncio.run error: dm runs on a worker thread, or (inside ``run_sync``) on the
    caller's loop, with its own connection to the Config's database."""
    chain(project)
    cfg = config_of(project)
    cfg.set_main_option("sqlalchemy.url", project.db.url)

    async def main() -> None:
        if where == "async code":
            command.upgrade(cfg, "heads")  # a sync call from async code
            return
        engine = create_async_engine(project.db.async_url)
        try:
            async with engine.connect() as conn:
                await conn.run_sync(lambda _: command.upgrade(cfg, "heads"))
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert rows(project) == APPLIED


@pytest.mark.matrix
@pytest.mark.parametrize("where", ["sync code", "a running loop"])
def test_async_engine(project: Project, bystanders: list[Path], where: str) -> None:
    """pytest-alembic's async mode hands over an AsyncEngine."""
    chain(project)
    cfg = config_of(project)
    engine = create_async_engine(project.db.async_url)
    cfg.attributes["connection"] = engine
    if where == "sync code":
        command.upgrade(cfg, "heads")
        asyncio.run(engine.dispose())
    else:

        async def main() -> None:
            command.upgrade(cfg, "heads")
            await engine.dispose()

        asyncio.run(main())
    assert rows(project) == APPLIED


@pytest.mark.parametrize("outcome", ["success", "failure"])
@pytest.mark.parametrize("used", [True, False])
def test_an_async_engine_from_async_code_leaves_the_apps_pool_usable(
    project: Project, bystanders: list[Path], outcome: str, used: bool
) -> None:
    """From async code dm runs on a loop of its own: it neither takes a connection of the
    app's loop from the app's pool nor leaves one of its own loop there, failed or not."""
    project.write("a1", None, CREATE_T, downgrade=DROP_T)
    project.write("b2", "a1", "raise ValueError('bad row')" if outcome == "failure" else "pass")
    cfg = config_of(project)

    async def main() -> tuple[str | None, int]:
        engine = create_async_engine(project.db.async_url)
        try:
            if used:
                async with engine.connect() as conn:  # the app's pool now holds a connection
                    await conn.execute(sa.text("SELECT 1"))
            cfg.attributes["connection"] = engine
            error = None
            try:
                command.upgrade(cfg, "heads")  # a sync call from async code
            except CommandError as exc:
                error = str(exc)
            async with engine.connect() as conn:  # the app goes on with its engine
                count = (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar_one()
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
            return error, count
        finally:
            await engine.dispose()

    error, count = asyncio.run(main())
    assert count == 1
    if outcome == "success":
        assert error is None
        assert rows(project) == [("a1", "upgrade", "success"), ("b2", "upgrade", "success")]
    else:
        assert error is not None and "bad row" in error
        assert rows(project) == [("a1", "upgrade", "success"), ("b2", "upgrade", "failed")]


def test_async_connection_outside_its_loop_is_refused(
    project: Project, bystanders: list[Path]
) -> None:
    chain(project)
    cfg = config_of(project)

    async def main() -> None:
        engine = create_async_engine(project.db.async_url)
        try:
            async with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "heads")
        finally:
            await engine.dispose()

    with pytest.raises(CommandError, match=r"can be used only on its own event loop"):
        asyncio.run(main())
    assert "script_run_tracker" not in table_names(project.db)


@pytest.mark.parametrize("given", ["engine", "connection"])
def test_in_memory_sqlite_inside_a_running_loop_is_refused(project: Project, given: str) -> None:
    """dm would have to move to a worker thread, where that database does not exist."""
    chain(project)
    cfg = config_of(project)
    engine = sa.create_engine("sqlite://")

    async def main() -> None:
        with engine.connect() as conn:
            cfg.attributes["connection"] = engine if given == "engine" else conn
            command.upgrade(cfg, "heads")

    with pytest.raises(CommandError, match=r"in-memory SQLite database .* exists only in"):
        asyncio.run(main())
    engine.dispose()


def test_something_else_in_attributes_is_refused(project: Project) -> None:
    cfg = config_of(project)
    cfg.attributes["connection"] = "postgresql://somewhere/else"
    with pytest.raises(CommandError, match=r"holds a str; dm runs on a SQLAlchemy Connection"):
        command.upgrade(cfg, "heads")


# -- parity with dm upgrade / dm downgrade -------------------------------------------------------


def _upgrade(project: Project, monkeypatch: pytest.MonkeyPatch, environment: str) -> None:
    monkeypatch.setenv("DM_ENVIRONMENT", environment)
    cfg = config_of(project)
    cfg.set_main_option("sqlalchemy.url", project.db.url)
    command.upgrade(cfg, "heads")


def test_upgrade_runs_a_skipped_revision_now_allowed(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write("a1", None)
    project.write("b2", "a1", extra=DEV_ONLY)
    project.write("c3", "b2")
    _upgrade(project, monkeypatch, "production")
    assert [r[2] for r in rows(project)] == ["success", "skipped", "success"]
    _upgrade(project, monkeypatch, "development")
    assert rows(project)[-1] == ("b2", "upgrade", "success")


def test_downgrade_below_a_skipped_irreversible_revision_records_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write("a1", None)
    project.write("b2", "a1", downgrade=None, extra=DEV_ONLY)
    project.write("c3", "b2")
    _upgrade(project, monkeypatch, "production")
    cfg = config_of(project)
    cfg.set_main_option("sqlalchemy.url", project.db.url)
    command.downgrade(cfg, "-1")
    command.downgrade(cfg, "-1")
    assert rows(project)[-2:] == [
        ("c3", "downgrade", "rolled_back"),
        ("b2", "downgrade", "rolled_back"),
    ]
    # Where it ran, the same downgrade is refused, naming the revision (as dm downgrade does).
    _upgrade(project, monkeypatch, "development")
    with pytest.raises(CommandError, match=r"no downgrade\(\) in b2"):
        command.downgrade(cfg, "a1")
