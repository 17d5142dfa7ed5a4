"""dm's pytest plugin: fixtures for testing data migrations, and built-in tests under ``--dm``.

Installed with dm (a ``pytest11`` entry point) and inert unless used: the fixtures do
nothing until a test asks for one, and the built-in tests (``dm.testing.builtins``) are
collected only with ``pytest --dm``, attached to ``dm_tests_path`` (default
``tests/conftest.py``).

Fixtures, each overridable in a ``conftest.py``:

- ``dm_config``: the project (:class:`dm.testing.ProjectConfig`: config file and section).
- ``dm_databases``: makes fresh databases (SQLite files; with ``--dm-database-url`` or the
  ini key ``dm_database_url``, databases created on that PostgreSQL server and dropped).
- ``dm_database_url``: one fresh database for the test.
- ``dm_runner``: a :class:`dm.testing.DmRunner` on that database.
- ``dm_test_config``: the built-in tests' settings (:class:`DmTestConfig`); the ``dm_*``
  ini keys fill what an overriding fixture leaves at its default (:func:`with_ini`).
- ``dm_prepare_database``: None, or a function called with each fresh database's URL
  before dm runs on it (e.g. the application's ``alembic upgrade`` for ``requires_schema``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dm.testing import DmTestConfig
from dm.testing import _ini
from dm.testing import with_ini

if TYPE_CHECKING:
    from dm.testing import Databases
    from dm.testing import DmRunner
    from dm.testing import ProjectConfig

DEFAULT_TESTS_PATH = "tests/conftest.py"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--dm``, ``--dm-database-url`` and the ``dm_*`` ini keys."""
    group = parser.getgroup("dm", "dm data migrations")
    group.addoption(
        "--dm",
        action="store_true",
        default=False,
        help="run dm's built-in tests of the data migrations",
    )
    group.addoption(
        "--dm-database-url",
        default=None,
        metavar="URL",
        help="a PostgreSQL server (user allowed to create databases): each test gets a fresh "
        "database there, dropped afterwards; default: a SQLite file per test",
    )
    parser.addini("dm_config", "dm's config file (default: alembic.ini in the rootdir)")
    parser.addini("dm_ini_section", "dm's section in the config file (default: data_migrations)")
    parser.addini("dm_database_url", "like --dm-database-url")
    parser.addini(
        "dm_database_prefix",
        "the start of each PostgreSQL test database's name (default dm_test_)",
    )
    parser.addini("dm_tests_path", f"the file the built-in tests attach to ({DEFAULT_TESTS_PATH})")
    parser.addini("dm_minimum_downgrade_revision", "the round trip's floor")
    parser.addini("dm_skip_revisions", "revisions left out of the built-in tests", type="args")
    parser.addini("dm_batch_size", "batch size in the resume test (default 1; 0: the revision's)")
    parser.addini("dm_environments", "more environments to test the guards in", type="args")


def pytest_configure(config: pytest.Config) -> None:
    """Add the ``dm`` marker; with ``--dm``, check that the built-ins have a place."""
    config.addinivalue_line("markers", "dm: dm's built-in data migration tests")
    if config.getoption("--dm") and not _tests_path(config).is_file():
        raise pytest.UsageError(
            f"--dm: {_tests_path(config)} does not exist; the built-in tests attach to it "
            "(create it, or set dm_tests_path in the pytest configuration)"
        )


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """With ``--dm``, collect the built-in tests under ``dm_tests_path``."""
    config = parent.config
    if config.getoption("--dm") and file_path.resolve() == _tests_path(config).resolve():
        return DmBuiltins.from_parent(parent, path=file_path)
    return None


class DmBuiltins(pytest.File):
    """The built-in tests (``dm.testing.builtins``), as one collector."""

    def collect(self) -> Iterator[pytest.Item]:
        """Yield one test item per built-in test function."""
        from dm.testing.builtins import BUILTINS

        # From sys.modules, as every module the tests run imports its neighbours (a package
        # attribute may name a module object pytest's own tests have since unloaded).
        builtins = sys.modules["dm.testing.builtins"]
        for name in BUILTINS:
            function = pytest.Function.from_parent(
                self, name=f"dm::{name}", callobj=getattr(builtins, name)
            )
            function.add_marker("dm")
            yield function


def _tests_path(config: pytest.Config) -> Path:
    value = str(config.getini("dm_tests_path") or DEFAULT_TESTS_PATH)
    return Path(config.rootpath) / value


@pytest.fixture
def dm_config(pytestconfig: pytest.Config) -> ProjectConfig:
    """Return the project under test: ``dm_config`` / ``dm_ini_section`` from the pytest
    configuration, else ``DM_CONFIG`` / ``DM_INI_SECTION``, else ``alembic.ini`` in the
    rootdir and its ``[data_migrations]`` section."""
    import os

    from dm.testing import ProjectConfig

    file = _ini(pytestconfig, "dm_config") or os.environ.get("DM_CONFIG") or "alembic.ini"
    section = (
        _ini(pytestconfig, "dm_ini_section")
        or os.environ.get("DM_INI_SECTION")
        or "data_migrations"
    )
    return ProjectConfig(Path(pytestconfig.rootpath) / file, section)


@pytest.fixture
def dm_databases(
    pytestconfig: pytest.Config, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Databases]:
    """Make fresh databases for the test, dropped afterwards: SQLite files, or databases on
    the PostgreSQL server of ``--dm-database-url`` (ini ``dm_database_url``), named with
    the prefix ``dm_database_prefix``, each prepared by ``dm_prepare_database``."""
    from dm.testing import DEFAULT_PREFIX
    from dm.testing import databases

    server = pytestconfig.getoption("--dm-database-url") or _ini(pytestconfig, "dm_database_url")
    prefix = _ini(pytestconfig, "dm_database_prefix") or DEFAULT_PREFIX
    prepare = request.getfixturevalue("dm_prepare_database")
    with databases(tmp_path / "dm", server, prefix=prefix, prepare=prepare) as made:
        yield made


class SecretUrl(str):
    """A database URL whose ``repr`` (what pytest shows of a failing test's arguments and
    assertions) has its password masked; ``str`` and every string operation see the URL."""

    __slots__ = ()

    def __repr__(self) -> str:
        from dm.config.redaction import scrub

        return repr(scrub(str(self)))


def pytest_assertrepr_compare(op: str, left: object, right: object) -> list[str] | None:
    """Compare a :class:`SecretUrl` without pytest's diff, which shows the password."""
    if not (isinstance(left, SecretUrl) or isinstance(right, SecretUrl)):
        return None
    from dm.config.redaction import scrub

    return [scrub(f"{left!r} {op} {right!r}"), "(the database URL's password is masked)"]


@pytest.fixture
def dm_prepare_database() -> Callable[[str], None] | None:
    """Return None, or a function called with each fresh test database's URL before dm runs
    on it: override it to bring the application's schema to the revisions that
    ``requires_schema`` names, e.g. by running the application's ``alembic upgrade``."""
    return None


@pytest.fixture
def dm_database_url(dm_databases: Databases) -> str:
    """Return the URL of a fresh, empty database for the test (its password masked in
    pytest's reports and in dm's output)."""
    from dm.config.redaction import register
    from dm.config.urls import secrets_of

    url = dm_databases.create()
    register(secrets_of(url))
    return SecretUrl(url)


@pytest.fixture
def dm_runner(dm_config: ProjectConfig, dm_database_url: str) -> DmRunner:
    """Return a :class:`dm.testing.DmRunner`: dm's commands on the test's database."""
    from dm.testing import DmRunner

    return DmRunner(dm_config, dm_database_url)


@pytest.fixture
def dm_test_config(pytestconfig: pytest.Config) -> DmTestConfig:
    """Return the built-in tests' settings from the ``dm_*`` ini keys; override the fixture
    to add seeds (the ini keys still fill what the override leaves at its default)."""
    return with_ini(DmTestConfig(), pytestconfig)


__all__ = [
    "DmBuiltins",
    "SecretUrl",
    "DmTestConfig",
    "dm_config",
    "dm_database_url",
    "dm_databases",
    "dm_prepare_database",
    "dm_runner",
    "dm_test_config",
    "with_ini",
]
