"""dm's pytest plugin, run by pytest's own ``pytester`` on small projects made by ``dm init``:
a good project passes every built-in test (SQLite, PostgreSQL), and each kind of broken
revision fails its built-in test with a message naming the revision, the step, the database
and what went wrong."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

# Imported before pytester snapshots sys.modules, so that its in-process runs share them:
# after each test it unloads what a run imported, and importing a C extension such as
# asyncpg's again later in the same process crashes it.
import aiosqlite  # noqa: F401
import asyncpg  # noqa: F401
import pytest
import sqlalchemy.dialects.postgresql.asyncpg  # noqa: F401
import sqlalchemy.dialects.sqlite.aiosqlite  # noqa: F401
import sqlalchemy.dialects.sqlite.pysqlite  # noqa: F401

import dm.engine.attempts  # noqa: F401
import dm.engine.lock  # noqa: F401
import dm.testing.builtins  # noqa: F401
import dm.verbs  # noqa: F401
from conftest import PG_HOST
from conftest import PG_PORT
from conftest import REPO
from conftest import pg_user
from dm import verbs

pytest_plugins = ["pytester"]

CONFTEST = '''\
"""dm's built-in tests attach here (pytest --dm); the fixtures are dm's."""
'''

TABLES = '''\
"""Create the example tables"""
import sqlalchemy as sa

revision = "a0000000000a"
down_revision = None


async def upgrade(session):
    await session.execute(sa.text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)"))
    await session.execute(sa.text("CREATE TABLE ledger (item_id INTEGER NOT NULL)"))
    await session.execute(sa.text("CREATE TABLE events (kind TEXT)"))


async def downgrade(session):
    for table in ("items", "ledger", "events"):
        await session.execute(sa.text(f"DROP TABLE {table}"))


async def verify(session):
    return await session.scalar(sa.text("SELECT count(*) FROM items")) == 0
'''

ITEMS = '''\
"""Add the catalogue's items"""
import sqlalchemy as sa

revision = "b0000000000b"
down_revision = "a0000000000a"
idempotent = True
ITEMS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


async def upgrade(session):
    present = set((await session.scalars(sa.text("SELECT id FROM items"))).all())
    for id_, name in ITEMS.items():
        if id_ not in present:
            await session.execute(
                sa.text("INSERT INTO items VALUES (:id, :name)"), {"id": id_, "name": name}
            )


async def downgrade(session):
    await session.execute(sa.text("DELETE FROM items WHERE id <= 5"))


async def verify(session):
    return await session.scalar(sa.text("SELECT count(*) FROM items WHERE id <= 5")) == 5
'''

LEDGER = '''\
"""Fill the ledger, one batch at a time"""
import sqlalchemy as sa
from dm import batched

revision = "c0000000000c"
down_revision = "b0000000000b"
transactional = False
items = sa.table("items", sa.column("id", sa.Integer))
ledger = sa.table("ledger", sa.column("item_id", sa.Integer))


async def upgrade(session):
    async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=100):
        await session.execute(
            sa.insert(ledger).from_select(["item_id"], sa.select(items.c.id).where(batch.where()))
        )


async def downgrade(session):
    await session.execute(sa.text("DELETE FROM ledger"))
    await session.commit()


async def verify(session):
    ledger = await session.scalar(sa.text("SELECT count(*) FROM ledger"))
    return ledger == await session.scalar(sa.text("SELECT count(*) FROM items"))
'''

# The bug: its own position counter starts at 0 again when the loop resumes, so the
# first resumed batch writes the rows of a committed batch again (and the last rows never).
LEDGER_REDOES = LEDGER.replace(
    """    async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=100):
        await session.execute(
            sa.insert(ledger).from_select(["item_id"], sa.select(items.c.id).where(batch.where()))
        )""",
    """    position = 0
    async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=100):
        await session.execute(
            sa.text(
                "INSERT INTO ledger SELECT id FROM items ORDER BY id LIMIT :n OFFSET :at"
            ),
            {"n": len(batch), "at": position},
        )
        position += len(batch)""",
)

STAGING_CLEANUP = '''\
"""Remove the demo item (staging only)"""
import sqlalchemy as sa

revision = "d0000000000d"
down_revision = "c0000000000c"
environments = ("staging",)


async def upgrade(session):
    await session.execute(sa.text("DELETE FROM items WHERE name = 'demo'"))


async def downgrade(session):
    pass


async def verify(session):
    return await session.scalar(sa.text("SELECT count(*) FROM items WHERE name = 'demo'")) == 0
'''

# docs/testing.md's conftest.py for the example project: rows seeded right before the backfill.
EXAMPLE_CONFTEST = '''\
"""dm's pytest plugin: `pytest --dm` runs its built-in tests on data_migrations/."""

import pytest

from dm.pytest_plugin import DmTestConfig


@pytest.fixture
def dm_test_config() -> DmTestConfig:
    return DmTestConfig(
        # Rows in place right before a revision runs: SQL text, a statement,
        # {table: [rows]} or a function taking the session.
        seeds={
            "94fea9b2a5d5": {
                "users": [
                    {"id": 10, "email": "carol@example.com", "is_test": False},
                    {"id": 11, "email": "dave@example.org", "is_test": False},
                ]
            },
        },
        # A revision without downgrade() ends the round trip; to keep the walk
        # above it, make it the floor:
        # minimum_downgrade_revision="9f3b7d2e5a61",
    )
'''

GOOD = {"a0_tables": TABLES, "b0_items": ITEMS, "c0_ledger": LEDGER, "d0_cleanup": STAGING_CLEANUP}


def make_project(pytester: pytest.Pytester, revisions: dict[str, str]) -> Path:
    """A dm project (``dm init``) with ``revisions`` and docs/testing.md's conftest.py."""
    verbs.init(pytester.path)
    versions = pytester.path / "data_migrations" / "versions"
    for name, text in revisions.items():
        (versions / f"{name}.py").write_text(text)
    (pytester.path / "tests").mkdir(exist_ok=True)
    (pytester.path / "tests" / "conftest.py").write_text(CONFTEST)
    return pytester.path


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DM_DATABASE_URL", "DATABASE_URL", "DM_CONFIG", "DM_ENVIRONMENT", "ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)


def failure_text(result: pytest.RunResult) -> str:
    return "\n".join(result.outlines)


# -- a good project --------------------------------------------------------------------------


def test_good_project_passes_every_builtin_test_on_sqlite(pytester: pytest.Pytester) -> None:
    make_project(pytester, GOOD)
    result = pytester.runpytest("--dm", "-rA")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(
        [
            "*dm: environment 'production': a0000000000a run, *d0000000000d skip",
            "*dm: environment 'staging': *d0000000000d run",
        ]
    )


def test_builtin_tests_stay_out_without_dm(pytester: pytest.Pytester) -> None:
    make_project(pytester, GOOD)
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_dm_without_its_conftest_is_a_usage_error(pytester: pytest.Pytester) -> None:
    verbs.init(pytester.path)
    result = pytester.runpytest("--dm")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--dm: *tests*conftest.py does not exist*dm_tests_path*"])


@pytest.mark.postgres
@pytest.mark.slow
def test_good_project_passes_every_builtin_test_on_postgresql(pytester: pytest.Pytester) -> None:

    server = f"postgresql://{pg_user()}@{PG_HOST}:{PG_PORT}/postgres"

    async def test_databases() -> set[str]:
        conn = await asyncpg.connect(server)
        try:
            rows = await conn.fetch("SELECT datname FROM pg_database")
        finally:
            await conn.close()
        return {row["datname"] for row in rows if row["datname"].startswith("dm_test_")}

    before = asyncio.run(test_databases())
    make_project(pytester, GOOD)
    result = pytester.runpytest("--dm", f"--dm-database-url={server}", "-rA")
    result.assert_outcomes(passed=7)
    assert asyncio.run(test_databases()) <= before  # each test's databases were dropped


def test_fixtures_seed_upgrade_and_read_the_tracker(pytester: pytest.Pytester) -> None:
    """A user's own tests: rows seeded right before a revision, then the upgrade, from sync
    and async tests (the async one run on an event loop by a minimal hook, as an async
    plugin would)."""
    make_project(pytester, GOOD)
    pytester.makeconftest(
        """
        import asyncio
        import inspect

        import pytest


        @pytest.hookimpl(tryfirst=True)
        def pytest_pyfunc_call(pyfuncitem):
            if inspect.iscoroutinefunction(pyfuncitem.obj):
                names = pyfuncitem._fixtureinfo.argnames
                asyncio.run(pyfuncitem.obj(**{n: pyfuncitem.funcargs[n] for n in names}))
                return True
        """
    )
    pytester.makepyfile(
        test_ledger="""
        import sqlalchemy as sa


        def test_seeded_rows_reach_the_ledger(dm_runner):
            dm_runner.seed_sync({"items": [{"id": 7, "name": "seven"}]}, before="c0000000000c")
            assert [r.state for r in dm_runner.status_sync()][:3] == [
                "applied", "applied", "not_run"
            ]
            dm_runner.upgrade_sync("heads")
            attempts = dm_runner.attempts_sync("c0000000000c")
            assert [a.status for a in attempts] == ["success"]
            assert attempts[0].checkpoint["rows_done"] == 6
            rows = dm_runner.snapshot_sync()["ledger"]
            assert sorted(rows.elements()) == [(1,), (2,), (3,), (4,), (5,), (7,)]


        async def test_async_fixtures(dm_runner):
            async def seed(session):
                await session.execute(sa.text("INSERT INTO items VALUES (8, 'eight')"))

            await dm_runner.seed(seed, before="c0000000000c")
            result = await dm_runner.upgrade("c0000000000c")
            assert [step.status.value for step in result.steps] == ["success"]
            await dm_runner.downgrade("b0000000000b")
            statuses = {row.revision: row.status for row in await dm_runner.status()}
            assert statuses["c0000000000c"] == "rolled_back"
            dm_runner.run_sync("c0000000000c")  # a sync twin inside a running loop
            assert (await dm_runner.attempts("c0000000000c"))[-1].status == "success"
        """
    )
    result = pytester.runpytest("tests", "test_ledger.py")
    result.assert_outcomes(passed=2)


# -- each broken revision fails its built-in test, readably ------------------------------------


def test_a_failing_verify_names_the_revision_step_and_database(pytester: pytest.Pytester) -> None:
    broken = ITEMS.replace('WHERE id <= 5")) == 5', 'WHERE id <= 5")) == 6')
    make_project(pytester, {**GOOD, "b0_items": broken})
    result = pytester.runpytest("--dm", "-k", "test_upgrade_from_base")
    result.assert_outcomes(failed=1, deselected=6)
    result.stdout.fnmatch_lines(
        [
            "*revision b0000000000b (Add the catalogue's items): upgrade from base",
            "*  file:      data_migrations/versions/b0_items.py",
            "*  database:  sqlite+aiosqlite:///*dm_test_*.sqlite3",
            "*  failed:    VerifyFailed: verify() returned False",
        ]
    )
    assert "Traceback" not in failure_text(result)
    assert "pytest_builtins.py" not in failure_text(result)


def test_a_batched_revision_that_redoes_committed_batches_fails(
    pytester: pytest.Pytester,
) -> None:
    make_project(pytester, {**GOOD, "c0_ledger": LEDGER_REDOES})
    result = pytester.runpytest("--dm", "-k", "resume or upgrade_from_base")
    # Uninterrupted, the revision is right: only the interruption shows the bug.
    result.assert_outcomes(passed=1, failed=1, deselected=5)
    result.stdout.fnmatch_lines(
        [
            "*revision c0000000000c (Fill the ledger, one batch at a time): "
            "upgrade interrupted after its first batch, then resumed",
            "*  database:  sqlite+aiosqlite:///*",
            "*  failed:    the data differs from an uninterrupted run's:",
            "*table ledger: 1 row(s) too many ((1,)); 1 row(s) missing ((5,))",
            "*tracker:",
            "*attempt 1 failed, checkpoint rows_done=1: Interruption: interrupted by the test*",
            "*attempt 2 success, checkpoint rows_done=5",
        ]
    )


def test_a_batched_revision_without_a_checkpoint_fails(pytester: pytest.Pytester) -> None:
    by_hand = LEDGER.replace(
        "    async for batch in batched(",
        "    await session.execute(sa.text('INSERT INTO ledger SELECT id FROM items'))\n"
        "    await session.commit()\n"
        "    return\n"
        "    async for batch in batched(",
    )
    make_project(pytester, {**GOOD, "c0_ledger": by_hand})
    result = pytester.runpytest("--dm", "-k", "resume")
    result.assert_outcomes(failed=1, deselected=6)
    result.stdout.fnmatch_lines(["*failed:    its upgrade committed no dm.batched checkpoint*"])


def test_a_revision_marked_idempotent_that_is_not_fails(pytester: pytest.Pytester) -> None:
    counted = ITEMS.replace(
        "async def upgrade(session):\n",
        "async def upgrade(session):\n"
        "    await session.execute(sa.text(\"INSERT INTO events VALUES ('items added')\"))\n",
    )
    make_project(pytester, {**GOOD, "b0_items": counted})
    result = pytester.runpytest("--dm", "-k", "idempotent")
    result.assert_outcomes(failed=1, deselected=6)
    result.stdout.fnmatch_lines(
        [
            "*revision b0000000000b (Add the catalogue's items): run again (idempotent = True)",
            "*  failed:    the second run changed the data:",
            "*table events: 1 row(s) too many (('items added',))",
        ]
    )


def test_two_heads_fail(pytester: pytest.Pytester) -> None:
    second = ITEMS.replace('"b0000000000b"', '"e0000000000e"').replace(
        "Add the catalogue's items", "Add more items"
    )
    make_project(pytester, {**GOOD, "e0_more": second})
    result = pytester.runpytest("--dm", "-k", "single_head")
    result.assert_outcomes(failed=1, deselected=6)
    result.stdout.fnmatch_lines(
        [
            "*the revision graph has 2 heads: *e0000000000e (Add more items)*",
            "*merge them with 'dm merge heads'*",
        ]
    )


def test_a_revision_touching_the_database_at_import_fails(pytester: pytest.Pytester) -> None:
    touching = TABLES.replace(
        "import sqlalchemy as sa\n",
        "import os\nimport sqlalchemy as sa\n\n"
        "_engine = sa.create_engine(os.environ.get('DATABASE_URL', 'sqlite://'))\n"
        "with _engine.connect() as _conn:\n"
        "    KNOWN = _conn.execute(sa.text('SELECT 1')).scalar()\n",
    )
    make_project(pytester, {**GOOD, "a0_tables": touching})
    result = pytester.runpytest("--dm", "-k", "import")
    result.assert_outcomes(failed=1, deselected=6)
    result.stdout.fnmatch_lines(
        [
            "*a revision file touched the database or network at import:",
            "*data_migrations/versions/a0_tables.py:6: opened the SQLite database *dm_test_*"
            " at import",
        ]
    )


# -- configuration ------------------------------------------------------------------------------


def test_an_irreversible_revision_ends_the_round_trip_unless_it_is_the_floor(
    pytester: pytest.Pytester,
) -> None:
    one_way = ITEMS.replace("async def downgrade(session):", "async def _not_downgrade(session):")
    make_project(pytester, {**GOOD, "b0_items": one_way})
    result = pytester.runpytest("--dm", "-k", "up_down_up", "-rs")
    result.assert_outcomes(skipped=1, deselected=6)
    result.stdout.fnmatch_lines(
        [
            "*round trip ended at b0000000000b (Add the catalogue's items): it has no "
            "downgrade(); not round-tripped: a0000000000a (make b0000000000b the floor with "
            "dm_minimum_downgrade_revision = b0000000000b*"
        ]
    )
    pytester.makeini("[pytest]\ndm_minimum_downgrade_revision = b0000000000b\n")
    result = pytester.runpytest("--dm", "-k", "up_down_up")
    result.assert_outcomes(passed=1, deselected=6)


def test_skipped_revisions_are_left_out(pytester: pytest.Pytester) -> None:
    make_project(pytester, {**GOOD, "c0_ledger": LEDGER_REDOES})
    pytester.makeini("[pytest]\ndm_skip_revisions = c0000000000c\n")
    result = pytester.runpytest("--dm", "-k", "resume", "-rs")
    result.assert_outcomes(skipped=1, deselected=6)
    result.stdout.fnmatch_lines(["*no revision is transactional = False*"])


# -- the repository's example project ------------------------------------------------------------


@pytest.mark.slow
def test_the_example_project_passes_every_builtin_test(pytester: pytest.Pytester) -> None:
    shutil.copy(REPO / "alembic.ini", pytester.path / "alembic.ini")
    shutil.copytree(
        REPO / "data_migrations",
        pytester.path / "data_migrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "conftest.py").write_text(EXAMPLE_CONFTEST)
    readme = (REPO / "docs" / "testing.md").read_text()
    start = readme.index("def test_backfill_names_a_seeded_user")
    (pytester.path / "tests" / "test_readme.py").write_text(
        readme[start : readme.index("```", start)]
    )
    result = pytester.runpytest("--dm", "-rA", "tests")
    result.assert_outcomes(passed=8)  # the built-in tests and the manual's own test
    # The seeded users made the backfill's resume test span several batches.
    result.stdout.fnmatch_lines(
        ["*94fea9b2a5d5*Interruption: interrupted by the test after the first committed batch*"]
    )


def test_readme_conftest_is_the_one_tested() -> None:
    readme = (REPO / "docs" / "testing.md").read_text()
    assert EXAMPLE_CONFTEST in readme


# -- configuration however it is given -------------------------------------------------------------

OVERRIDE = """
import pytest

from dm.pytest_plugin import DmTestConfig


@pytest.fixture
def dm_test_config() -> DmTestConfig:
    return DmTestConfig(seeds={})
"""


def test_ini_keys_apply_when_the_conftest_overrides_dm_test_config(
    pytester: pytest.Pytester,
) -> None:
    """The docs' conftest overrides the fixture: the ini keys still fill what it leaves."""
    one_way = ITEMS.replace("async def downgrade(session):", "async def _not_downgrade(session):")
    make_project(pytester, {**GOOD, "b0_items": one_way})
    (pytester.path / "tests" / "conftest.py").write_text(CONFTEST + OVERRIDE)
    pytester.makeini("[pytest]\ndm_minimum_downgrade_revision = b0000000000b\n")
    result = pytester.runpytest("--dm", "-k", "up_down_up")
    result.assert_outcomes(passed=1, deselected=6)


def test_a_value_the_fixture_sets_wins_over_the_ini_key(pytester: pytest.Pytester) -> None:
    from dm.testing import DmTestConfig
    from dm.testing import with_ini

    pytester.makeini(
        "[pytest]\ndm_batch_size = 500\ndm_skip_revisions = r1 r2\ndm_environments = qa\n"
    )
    config = pytester.parseconfig()
    merged = with_ini(DmTestConfig(seeds={"r3": "SELECT 1"}, environments=("demo",)), config)
    assert merged.batch_size == 500 and merged.skip_revisions == ("r1", "r2")
    assert merged.environments == ("demo",) and merged.seeds == {"r3": "SELECT 1"}
    assert with_ini(DmTestConfig(batch_size=20), config).batch_size == 20


PREPARE = '''
import pytest
import sqlalchemy as sa


@pytest.fixture
def dm_prepare_database():
    """The application's schema, as its Alembic upgrade would make it."""

    def prepare(url: str) -> None:
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE app_users (id INTEGER PRIMARY KEY)"))
        engine.dispose()

    return prepare
'''

NEEDS_APP_SCHEMA = '''\
"""Fill the application's table"""
import sqlalchemy as sa

revision = "e0000000000e"
down_revision = None


async def upgrade(session):
    await session.execute(sa.text("INSERT INTO app_users (id) VALUES (1)"))


async def downgrade(session):
    await session.execute(sa.text("DELETE FROM app_users"))
'''


def test_dm_prepare_database_brings_each_test_database_to_the_application_schema(
    pytester: pytest.Pytester,
) -> None:
    make_project(pytester, {"e0_needs_app": NEEDS_APP_SCHEMA})
    result = pytester.runpytest("--dm", "-k", "upgrade_from_base or up_down_up")
    result.assert_outcomes(failed=2, deselected=5)  # no app_users table without the hook
    (pytester.path / "tests" / "conftest.py").write_text(CONFTEST + PREPARE)
    result = pytester.runpytest("--dm", "-k", "upgrade_from_base or up_down_up")
    result.assert_outcomes(passed=2, deselected=5)


def test_test_databases_take_the_prefix(tmp_path: Path) -> None:
    from dm.core.errors import UsageError
    from dm.testing import databases

    prepared: list[str] = []
    with databases(tmp_path, prefix="ci_42_", prepare=prepared.append) as made:
        url = made.create()
    assert Path(url.removeprefix("sqlite:///")).name.startswith("ci_42_")
    assert prepared == [url]
    with pytest.raises(UsageError, match="dm_database_prefix 'CI-42'"):
        databases(tmp_path, prefix="CI-42").__enter__()


@pytest.mark.postgres
def test_postgresql_test_databases_take_the_prefix(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from dm.testing import databases

    server = f"postgresql://{pg_user()}@{PG_HOST}:{PG_PORT}/postgres"
    with databases(tmp_path, server, prefix="team_a_") as made:
        url = sa.make_url(made.create())
        assert url.database is not None and url.database.startswith("team_a_")


def test_the_resume_test_says_how_far_it_got_and_why_it_is_long(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume test over many seeded rows at 1 row per batch runs for minutes: it says so
    while it runs (every 10 s; here at each batch), not only at the end."""
    from dm.testing import BatchLog

    monkeypatch.setattr(BatchLog, "REPORT_EVERY", 0.0)
    make_project(pytester, GOOD)
    result = pytester.runpytest("--dm", "-k", "resume")
    result.assert_outcomes(passed=1, deselected=6)
    result.stdout.fnmatch_lines(
        [
            "dm: c0000000000c: * batches, * rows so far, at 1 row(s) per batch (dm_batch_size): "
            "many seeded rows at a small batch size take long; raise dm_batch_size"
        ]
    )


@pytest.mark.postgres
def test_dm_database_url_shows_no_password_when_a_users_test_fails(
    pytester: pytest.Pytester,
) -> None:
    server = f"postgresql://{pg_user()}:Pw22fixture@{PG_HOST}:{PG_PORT}/postgres"
    make_project(pytester, {})
    pytester.makepyfile(
        test_url="""
        def test_compares_the_url(dm_database_url):
            assert dm_database_url.startswith("postgresql")
            assert dm_database_url == "another"
        """
    )
    result = pytester.runpytest("test_url.py", f"--dm-database-url={server}", "-l")
    result.assert_outcomes(failed=1)
    shown = failure_text(result)
    assert "dm_database_url = 'postgresql" in shown and ":***@" in shown
    assert "Pw22fixture" not in shown
