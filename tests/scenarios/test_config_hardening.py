"""Configuration as users write it: secrets never shown, libpq URLs, ``.env`` beside the
config, settings checked up front, and a revision directory that must exist (issue #9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from conftest import PG_HOST
from conftest import PG_PORT
from conftest import Project
from conftest import Ran
from conftest import run_dm
from conftest import run_in_process

PG_ONLY = pytest.mark.parametrize("db", ["postgresql"], indirect=True)


def _one_error_line(result: subprocess.CompletedProcess[str] | Ran) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dm: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


# -- item 4: one masking rule for every URL dm shows -----------------------------------------


@dataclass
class Awkward:
    """A URL (``{user}``/``{db}`` filled in per test) and the secrets it must never show."""

    name: str
    url: str
    secrets: list[str]
    reachable: bool | None = True
    """True: dm must connect (trust auth ignores the password); None: either is fine."""
    lock_url: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


H = f"{PG_HOST}:{PG_PORT}"
AWKWARD = [
    Awkward("unencoded @", f"postgresql://{{user}}:S3cr@tPw01@{H}/{{db}}", ["S3cr@tPw01", "tPw01"]),
    Awkward(
        "several @", f"postgresql://{{user}}:a@b@c@Pw02zz@{H}/{{db}}", ["a@b@c@Pw02zz", "Pw02zz"]
    ),
    Awkward(
        "password in query", f"postgresql://{{user}}@{H}/{{db}}?password=Pw03query", ["Pw03query"]
    ),
    Awkward(
        "sslpassword",
        f"postgresql://{{user}}@{H}/{{db}}?sslmode=disable&sslpassword=Pw04sslpw",
        ["Pw04sslpw"],
    ),
    Awkward(
        "sslkey",
        f"postgresql://{{user}}@{H}/{{db}}?sslmode=disable&sslkey=/keys/Pw05key.pem",
        ["Pw05key"],
        reachable=None,
    ),
    Awkward(
        "percent-encoded",
        f"postgresql://{{user}}:S3cr%40t%2FPw06@{H}/{{db}}",
        ["S3cr%40t%2FPw06", "S3cr@t/Pw06", "Pw06"],
    ),
    Awkward("no user", f"postgresql://{H}/{{db}}?password=Pw07nouser", ["Pw07nouser"], None),
    Awkward(
        "user without password",
        f"postgresql://{{user}}@{H}/{{db}}?application_name=Pw08app",
        [],
    ),
    Awkward("IPv6 host", "postgresql://{user}:Pw09v6pw@[::1]:5432/{db}", ["Pw09v6pw"], None),
    Awkward(
        "unix socket host",
        "postgresql://{user}:Pw10sock@/{db}?host=/var/run/postgresql",
        ["Pw10sock"],
        None,
    ),
    Awkward(
        "lock URL with unencoded @",
        f"postgresql://{{user}}@{H}/{{db}}",
        ["Lock@Pw11", "Pw11"],
        lock_url=f"postgresql://{{user}}:Lock@Pw11@{H}/{{db}}",
    ),
    Awkward(
        "unreachable, @ in password",
        "postgresql://{user}:Dead@Pw12@127.0.0.1:1/{db}?connect_timeout=3",
        ["Dead@Pw12", "Pw12"],
        reachable=False,
    ),
    Awkward(
        "unreachable lock URL",
        f"postgresql://{{user}}@{H}/{{db}}",
        ["Dead@Pw13", "Pw13"],
        reachable=False,
        lock_url="postgresql://{user}:Dead@Pw13@127.0.0.1:1/{db}?password=Pw13q",
    ),
]


# Two cases in the fast suite (a URL that connects, one that cannot); the others in the full one.
FAST_AWKWARD = {"unencoded @", "unreachable, @ in password"}


@PG_ONLY
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case, id=case.name, marks=() if case.name in FAST_AWKWARD else pytest.mark.slow
        )
        for case in AWKWARD
    ],
)
@pytest.mark.process
def test_no_output_path_shows_a_secret_of_an_awkward_url(project: Project, case: Awkward) -> None:
    project.write("a1", None, "await session.execute(sa.text('SELECT 1'))")
    parsed = make_url(project.db.url)
    user, database = parsed.username, parsed.database
    env = {
        "DM_DATABASE_URL": case.url.format(user=user, db=database),
        "DM_CONNECT_RETRY_SECONDS": "0",
        **case.extra,
    }
    if case.lock_url:
        env["DM_LOCK_DATABASE_URL"] = case.lock_url.format(user=user, db=database)
    runs = {
        # a real process: everything it writes, logs and warnings included; the rest in-process
        "upgrade": run_dm(project, "--verbose", "--log-format", "json", "upgrade", env=env),
        "info": run_in_process(project, "info", env=env),
        "info --json": run_in_process(project, "info", "--json", env=env),
        "verbose status": run_in_process(project, "--verbose", "status", env=env),
    }
    for name, result in runs.items():
        assert "Traceback" not in result.stdout, (name, result.stdout)
        for secret in case.secrets:
            shown = result.stdout + result.stderr
            assert secret not in shown, (name, secret, shown)
        assert result.returncode in (0, 2, 75), (name, result.returncode, result.stderr)
    upgrade = runs["upgrade"]
    if case.reachable:
        assert upgrade.returncode == 0, upgrade.stderr
        rows = project.db.tracker()
        assert [row.status for row in rows] == ["success"]
        for row in rows:
            for secret in case.secrets:
                assert secret not in repr(tuple(row))
    if case.reachable is False:
        assert upgrade.returncode == 75  # unreachable is transient
        assert _one_error_line(run_in_process(project, "upgrade", env=env)).startswith(
            "dm: error: cannot connect to PostgreSQL at 127.0.0.1:1/"
        )
    assert json.loads(runs["info --json"].stdout)["database_url"].startswith("postgresql+asyncpg")


# -- item 5: libpq parameters ---------------------------------------------------------------


@PG_ONLY
def test_libpq_parameters_reach_the_server(project: Project) -> None:
    project.write(
        "a1",
        None,
        """\
        row = (await session.execute(sa.text(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'),"
            " current_setting('search_path')"
        ))).one()
        await session.execute(sa.text("CREATE TABLE seen (app text, st text, sp text)"))
        await session.execute(sa.text("INSERT INTO seen VALUES (:a, :b, :c)"),
                              {"a": row[0], "b": row[1], "c": row[2]})
        """,
    )
    url = (
        project.db.url + "?connect_timeout=5&application_name=billing_jobs"
        "&options=-c%20statement_timeout%3D4321%20-c%20search_path%3Dpublic"
        "&sslmode=prefer&target_session_attrs=read-write"
    )
    result = run_in_process(project, "upgrade", env={"DM_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert [tuple(r) for r in project.db.query("SELECT app, st, sp FROM seen")] == [
        ("billing_jobs", "4321ms", "public")
    ]


@PG_ONLY
@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("keepalives=1", "'keepalives'"),
        ("gssencmode=disable", "'gssencmode'"),
        ("connect_timeout=soon", "connect_timeout"),
        ("connect_timeout=0", "connect_timeout"),
        ("options=--search_path", "options"),
        ("options=-x", "options"),
        ("target_session_attrs=whatever", "target_session_attrs"),
        ("sslmode=maybe", "sslmode"),
    ],
)
def test_unsupported_libpq_parameters_are_refused_before_connecting(
    project: Project, query: str, named: str
) -> None:
    # Port 1 refuses connections: a refusal that came after connecting would say so.
    url = project.db.url.replace(f":{PG_PORT}/", ":1/") + "?" + query
    result = run_in_process(project, "upgrade", env={"DM_DATABASE_URL": url})
    assert result.returncode == 2
    line = _one_error_line(result)
    assert named in line
    assert "TypeError" not in line and "cannot connect" not in line


# -- item 6: the .env beside the config file ------------------------------------------------------


@PG_ONLY
@pytest.mark.process
def test_dotenv_beside_the_config_is_read_from_any_directory(
    project: Project, tmp_path: Path
) -> None:
    project.write("a1", None, "await session.execute(sa.text('CREATE TABLE from_dotenv (x int)'))")
    (project.root / ".env").write_text(f"DM_DATABASE_URL={project.db.url}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".env").write_text("DM_DATABASE_URL=sqlite:///wrong.sqlite3\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DM_") and k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "dm", "--verbose", "-c", str(project.config), "upgrade", "heads"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"read settings from {project.root / '.env'}" in result.stderr
    assert project.db.query("SELECT count(*) FROM from_dotenv")[0][0] == 0
    assert not (elsewhere / "wrong.sqlite3").exists()
    assert not (project.root / "dm.sqlite3").exists()


# -- item 7/8: settings checked up front ---------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DM_TIMEOUT": "1e999"}, "DM_TIMEOUT"),
        ({"DM_TIMEOUT": "3000000"}, "DM_TIMEOUT"),
        ({"DM_TIMEOUT": "nan"}, "DM_TIMEOUT"),
        ({"DM_PG_LOCK_TIMEOUT": "1e308"}, "DM_PG_LOCK_TIMEOUT"),
        ({"DM_LOCK_TIMEOUT": "inf"}, "DM_LOCK_TIMEOUT"),
        ({"DM_TRACKER_TABLE": "t" * 50}, "DM_TRACKER_TABLE"),
        ({"DM_TRACKER_TABLE": "1runs"}, "DM_TRACKER_TABLE"),
        ({"DM_TRACKER_SCHEMA": "pg_catalog"}, "DM_TRACKER_SCHEMA"),
        ({"DM_TRACKER_SCHEMA": "information_schema"}, "DM_TRACKER_SCHEMA"),
        ({"DM_POD_NAME": "p" * 300}, "DM_POD_NAME"),
        ({"DM_ENVIRONMENT": "e" * 65}, "DM_ENVIRONMENT"),
    ],
    ids=lambda v: next(iter(v)) + "=" + next(iter(v.values()))[:12] if isinstance(v, dict) else "",
)
def test_settings_out_of_range_exit_2_before_writing(
    project: Project, env: dict[str, str], named: str
) -> None:
    project.write("a1", None, "await session.execute(sa.text('CREATE TABLE t1 (x int)'))")
    result = run_in_process(project, "upgrade", env=env)
    assert result.returncode == 2
    assert named in _one_error_line(result)
    assert _tables(project) == []


def test_an_empty_environment_variable_means_unset(project: Project) -> None:
    result = run_in_process(project, "info", "--json", env={"DM_ENVIRONMENT": "", "DM_TIMEOUT": ""})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["environment"] == "production"


@PG_ONLY
def test_over_long_revision_id_is_refused_naming_its_file(project: Project) -> None:
    path = project.write("r" * 70, None)
    result = run_in_process(project, "upgrade")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert path.name in line and "at most 64" in line
    assert _tables(project) == []


def test_non_utf8_and_unreadable_config_files_are_named(project: Project) -> None:
    ini = project.config
    original = ini.read_bytes()
    ini.write_bytes(original.replace(b"# dm.timeout =", b"# dm.timeout \xff="))
    line = _one_error_line(bad := run_in_process(project, "upgrade"))
    assert bad.returncode == 2 and "alembic.ini" in line and "UTF-8" in line
    ini.write_bytes(original)
    (project.root / ".env").write_bytes(b"DM_ENVIRONMENT=caf\xe9\n")
    line = _one_error_line(bad := run_in_process(project, "upgrade"))
    assert bad.returncode == 2 and ".env" in line and "UTF-8" in line
    assert _tables(project) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_config_file_is_not_reported_as_a_missing_section(project: Project) -> None:
    project.config.chmod(0)
    try:
        result = run_in_process(project, "upgrade")
    finally:
        project.config.chmod(0o644)
    assert result.returncode == 2
    line = _one_error_line(result)
    assert "cannot read config file" in line and "section" not in line


# -- item 9/10: the project's files ----------------------------------------------------------------


def test_missing_revision_directory_exits_2_naming_it(project: Project) -> None:
    project.versions.rename(project.root / "moved")
    for args in (("upgrade",), ("current",), ("heads",)):
        result = run_in_process(project, *args)
        assert result.returncode == 2, (args, result.stdout)
        assert "data_migrations/versions does not exist" in _one_error_line(result)
    assert _tables(project) == []


def test_missing_script_location_exits_2_naming_it(project: Project) -> None:
    text = project.config.read_text()
    project.config.write_text(text.replace("/data_migrations\n", "/nowhere\n", 1))
    result = run_in_process(project, "upgrade")
    assert result.returncode == 2
    assert "nowhere does not exist" in _one_error_line(result)


def test_rev_id_that_exists_is_refused_before_writing(project: Project) -> None:
    first = project.write("feed01", None)
    before = sorted(p.name for p in project.versions.iterdir())
    for args in (
        ("--rev-id", "feed01"),
        ("--rev-id", "zz01", "--head", "zz01"),
        ("--rev-id", "bad-id"),
        ("--rev-id", "x" * 65),
        ("--rev-id", "heads"),
    ):
        result = run_in_process(project, "revision", "-m", "another change", *args)
        assert result.returncode == 2, (args, result.stdout)
        line = _one_error_line(result)
        assert "--rev-id" in line
        if args[1] == "feed01":
            assert first.name in line
        assert sorted(p.name for p in project.versions.iterdir()) == before
    assert run_in_process(project, "heads").returncode == 0


def test_cycles_and_duplicates_name_their_files(project: Project) -> None:
    a = project.write("cyc_a", "cyc_b")
    b = project.write("cyc_b", "cyc_a")
    line = _one_error_line(result := run_in_process(project, "heads"))
    assert result.returncode == 2 and a.name in line and b.name in line
    a.unlink()
    b.unlink()
    loop = project.write("self1", "self1")
    line = _one_error_line(result := run_in_process(project, "heads"))
    assert result.returncode == 2 and loop.name in line and "itself" in line


# -- helpers -------------------------------------------------------------------------------------


def _tables(project: Project) -> list[str]:
    """Return the tables of the test database (none are created by a refused command)."""
    if project.db.kind == "sqlite":
        if not Path(project.db.url.removeprefix("sqlite:///")).exists():
            return []
        sql = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    else:
        sql = (
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        )
    return [row[0] for row in project.db.query(sql)]


@PG_ONLY
def test_double_dash_options_keep_the_dashes_of_their_values(project: Project) -> None:
    project.write(
        "a1",
        None,
        """\
        row = (await session.execute(sa.text(
            "SELECT current_setting('application_name'), current_setting('search_path')"
        ))).one()
        await session.execute(sa.text("CREATE TABLE seen (app text, sp text)"))
        await session.execute(sa.text("INSERT INTO seen VALUES (:a, :b)"),
                              {"a": row[0], "b": row[1]})
        """,
    )
    # libpq's --name=value: a dash in the name means an underscore, one in the value is kept.
    url = project.db.url + "?options=--application-name%3Dbilling-jobs%20--search-path%3Dpublic"
    result = run_dm(project, "upgrade", env={"DM_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert [tuple(r) for r in project.db.query("SELECT app, sp FROM seen")] == [
        ("billing-jobs", "public")
    ]
