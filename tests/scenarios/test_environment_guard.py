"""The environment guard trusts only what it should (issue #22, section 3): the environment
and where it came from are logged and recorded on every attempt, names compare as
documented, a declared list catches typos, and a guarded revision that runs says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import Project
from conftest import invoke
from conftest import ok
from conftest import pg_user
from conftest import run_in_process

SQLITE_ONLY = pytest.mark.parametrize("db", ["sqlite"], indirect=True)
GUARDED = 'environments = ("development", "staging")\n'


def _set_ini(project: Project, line: str) -> None:
    text = project.config.read_text()
    project.config.write_text(text.replace("\nsqlalchemy.url =\n", f"\nsqlalchemy.url =\n{line}\n"))


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dm: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("DM_ENVIRONMENT", "DM_ENVIRONMENT"),
        ("ENVIRONMENT", "ENVIRONMENT"),
        (".env", "DM_ENVIRONMENT in {root}/.env"),
        ("ini", "dm.environment in {root}/alembic.ini"),
        ("nowhere", "the default"),
    ],
)
def test_the_environment_and_its_source_are_logged_and_recorded(
    project: Project, where: str, expected: str
) -> None:
    project.write("a1", None)
    env: dict[str, str] = {}
    if where in ("DM_ENVIRONMENT", "ENVIRONMENT"):
        env[where] = "staging"
    elif where == ".env":
        (project.root / ".env").write_text("DM_ENVIRONMENT=staging\n")
    elif where == "ini":
        _set_ini(project, "dm.environment = staging")
    ran = run_in_process(project, "upgrade", "heads", env=env)
    assert ran.returncode == 0, ran.stderr
    value = "production" if where == "nowhere" else "staging"
    source = expected.format(root=project.root)
    assert f"environment {value!r} (from {source})" in ran.stderr
    (row,) = project.db.tracker()
    assert (row.environment, row.environment_source) == (value, source)


@SQLITE_ONLY
def test_every_source_in_order_of_precedence(project: Project) -> None:
    """DM_ENVIRONMENT, then ENVIRONMENT, then the .env beside the config, then the ini."""
    _set_ini(project, "dm.environment = from-ini")
    (project.root / ".env").write_text("ENVIRONMENT=from-dotenv\n")
    settings = project.settings
    assert settings().environment_source == f"ENVIRONMENT in {project.root / '.env'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENVIRONMENT", "from-environment")
        assert settings().environment == "from-environment"
        assert settings().environment_source == "ENVIRONMENT"
        patch.setenv("DM_ENVIRONMENT", "from-dm-environment")
        assert settings().environment_source == "DM_ENVIRONMENT"
    (project.root / ".env").unlink()
    assert settings().environment_source == f"dm.environment in {project.config}"


def test_the_database_session_user_is_recorded_beside_run_by(project: Project) -> None:
    project.write("a1", None)
    ok(invoke(project, "upgrade", "heads"))
    (row,) = project.db.tracker()
    assert row.run_by  # self-asserted: $USER@host
    expected = pg_user() if project.db.kind == "postgresql" else None
    assert row.db_user == expected
    (logged,) = json.loads(ok(invoke(project, "log", "a1", "--json")).stdout)
    assert (logged["db_user"], logged["environment_source"]) == (expected, "the default")


@SQLITE_ONLY
def test_a_guarded_revision_that_runs_records_why(project: Project) -> None:
    project.write("a1", None, extra=GUARDED)
    ok(invoke(project, "upgrade", "heads", DM_ENVIRONMENT="staging"))
    (row,) = project.db.tracker()
    assert row.status == "success"
    assert row.reason == "environment 'staging' in ('development', 'staging')"


@SQLITE_ONLY
def test_names_compare_without_regard_to_case(project: Project) -> None:
    """`Staging` is `staging` (it used to match nothing and skip silently)."""
    project.write("a1", None, extra=GUARDED)
    ok(invoke(project, "upgrade", "heads", DM_ENVIRONMENT="Staging"))
    (row,) = project.db.tracker()
    assert (row.status, row.environment) == ("success", "Staging")


@SQLITE_ONLY
def test_a_declared_list_refuses_an_unknown_environment(project: Project) -> None:
    _set_ini(project, "dm.environments = development, staging, production")
    project.write("a1", None, extra=GUARDED)
    ran = run_in_process(project, "upgrade", "heads", env={"DM_ENVIRONMENT": "stagign"})
    assert ran.returncode == 2
    line = _one_error_line(ran.stderr)
    assert "'stagign' (from DM_ENVIRONMENT)" in line and "development, staging, production" in line
    assert not Path(project.db.url.removeprefix("sqlite:///")).exists()  # nothing written
    ok(invoke(project, "upgrade", "heads", DM_ENVIRONMENT="STAGING"))


@SQLITE_ONLY
def test_a_declared_list_refuses_a_revision_naming_an_unknown_environment(
    project: Project,
) -> None:
    project.write("a1", None, extra='environments = ("developement",)\n')
    ok(invoke(project, "upgrade", "heads", "--dry-run"))  # undeclared: any name goes
    _set_ini(project, "dm.environments = development, staging, production")
    for args in (("upgrade", "heads"), ("status",)):
        ran = run_in_process(project, *args)
        assert ran.returncode == 2
        line = _one_error_line(ran.stderr)
        assert "a1_a1.py" in line and "'developement'" in line


@SQLITE_ONLY
def test_a_malformed_declared_list_is_a_config_error(project: Project) -> None:
    _set_ini(project, "dm.environments = development,, production")
    ran = run_in_process(project, "status")
    assert ran.returncode == 2
    assert "DM_ENVIRONMENTS" in _one_error_line(ran.stderr)
