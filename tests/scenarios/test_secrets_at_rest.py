"""Secrets and personal data at rest: what the tracker keeps of a failure, and what every
later ``dm status``/``dm log`` (and Alembic's command line, and pytest's report) shows of it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from alembic.config import main as alembic_main

from conftest import Project
from conftest import run_dm
from conftest import run_in_process

PASSWORD = "Pw22at!rest"
EMAIL = "alice.private@example.org"

DUPLICATE = """
await session.execute(sa.text('CREATE TABLE people (email TEXT UNIQUE)'))
email = "".join(reversed(EMAIL))  # row data, as a revision reads it: not in its source
await session.execute(sa.text("INSERT INTO people VALUES (:e)"), {"e": email})
await session.execute(sa.text("INSERT INTO people VALUES (:e)"), {"e": email})
"""
LEAKS_URL = """
import os
raise RuntimeError("cannot reach " + os.environ["DM_DATABASE_URL"] + " token " + PASSWORD)
"""


def with_password(url: str) -> str:
    """``url`` with a password (PostgreSQL's trust auth ignores it; dm must hide it)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD.replace('!', '%21')}@{host}"


def everything_shown(project: Project, rev: str, **env: str) -> str:
    """What ``dm status``, ``dm status --json`` and ``dm log`` print."""
    shown = []
    for args in (("status",), ("status", "--json"), ("log", rev), ("log", rev, "--json")):
        ran = run_in_process(project, *args, env=env)
        shown.append(ran.stdout + ran.stderr)
    return "\n".join(shown)


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_failing_statements_row_values_are_neither_stored_nor_shown(project: Project) -> None:
    project.write("a1", None, DUPLICATE, extra=f"EMAIL = {EMAIL[::-1]!r}")
    failed = run_in_process(project, "upgrade")
    assert failed.returncode == 1
    assert "duplicate key value" in failed.stderr
    assert EMAIL not in failed.stderr  # the live run: only under --verbose
    (row,) = project.db.tracker()
    stored = f"{row.error_message}\n{row.error_traceback}"
    assert "duplicate key value" in stored and "Traceback" in stored
    assert EMAIL not in stored and "DETAIL" not in stored
    assert EMAIL not in everything_shown(project, "a1")

    verbose = run_in_process(project, "--verbose", "upgrade")
    assert verbose.returncode == 1
    assert f"Key (email)=({EMAIL})" in verbose.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_secret_in_an_exception_is_scrubbed_before_storing_and_before_printing(
    project: Project,
) -> None:
    url = with_password(project.db.url)
    project.write("a1", None, LEAKS_URL, extra=f"PASSWORD = {PASSWORD!r}")
    failed = run_in_process(project, "upgrade", env={"DM_DATABASE_URL": url})
    assert failed.returncode == 1
    assert PASSWORD not in failed.stderr
    (row,) = project.db.tracker()
    assert "cannot reach" in row.error_message
    for text in (row.error_message, row.error_traceback):
        assert PASSWORD not in text and "Pw22at%21rest" not in text, text
    assert PASSWORD not in everything_shown(project, "a1", DM_DATABASE_URL=url)

    # A row written by an older dm holds the secret: it is masked when printed.
    leaked = f"RuntimeError: cannot reach {url} token {PASSWORD}"
    project.db.query(
        "UPDATE script_run_tracker SET error_message = :m, error_traceback = :m", m=leaked
    )
    shown = everything_shown(project, "a1", DM_DATABASE_URL=url)
    assert "cannot reach" in shown
    assert PASSWORD not in shown and "Pw22at%21rest" not in shown


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)  # the same on both
@pytest.mark.process
def test_loggers_outside_dm_are_masked_in_text_logs(project: Project) -> None:
    url = "postgresql://app:Pw22logger@db.example/app"
    project.write(
        "a1",
        None,
        f"logging.getLogger('myapp.client').warning('connecting to %s', {url!r})",
        extra="import logging",
    )
    ran = run_dm(project, "upgrade")
    assert ran.returncode == 0, ran.stderr
    assert "connecting to postgresql://app:***@db.example/app" in ran.stderr
    assert "Pw22logger" not in ran.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_alembic_command_line_redacts_log_lines_and_the_failed_line(
    project: Project, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = with_password(project.db.url)
    monkeypatch.setenv("DM_DATABASE_URL", url)
    project.write("a1", None, LEAKS_URL, extra=f"PASSWORD = {PASSWORD!r}")
    with pytest.raises(SystemExit) as exited:
        alembic_main(["-c", str(project.config), "-n", "data_migrations", "upgrade", "heads"])
    assert exited.value.code != 0
    out, err = capsys.readouterr()
    assert "FAILED: revision a1 failed: RuntimeError: cannot reach" in out + err
    assert PASSWORD not in out + err and "Pw22at%21rest" not in out + err
    (row,) = project.db.tracker()
    assert PASSWORD not in row.error_traceback
    logging.getLogger("dm").handlers.clear()  # alembic_main configured dm's handler on capsys


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)  # the same on both
def test_percent_encoded_password_in_the_ini_is_a_config_error_naming_the_key(
    project: Project,
) -> None:
    for key in ("sqlalchemy.url", "dm.lock_database_url"):
        text = project.config.read_text().replace(
            "sqlalchemy.url =", f"{key} = postgresql://u:%21s3cr3t%40x@h/db\n#"
        )
        (project.root / "pct.ini").write_text(text)
        ran = run_in_process(project, "-c", "pct.ini", "status", env={"DM_DATABASE_URL": ""})
        assert ran.returncode == 2, ran.stderr
        assert f"[data_migrations] {key}: a '%' must be written '%%'" in ran.stderr
        assert "s3cr3t" not in ran.stderr and "internal error" not in ran.stderr


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)  # the same on both
def test_database_url_file_and_its_lock_twin(project: Project, tmp_path: Path) -> None:
    secret = tmp_path / "secret-url"
    secret.write_text(project.db.url + "\n")
    project.write("a1", None)
    env = {"DM_DATABASE_URL": "", "DM_DATABASE_URL_FILE": str(secret)}
    assert run_in_process(project, "upgrade", env=env).returncode == 0
    assert [row.status for row in project.db.tracker()] == ["success"]

    both = run_in_process(project, "status", env={"DM_DATABASE_URL_FILE": str(secret)})
    assert both.returncode == 2
    assert "DM_DATABASE_URL_FILE and DM_DATABASE_URL are both set" in both.stderr
    lock_env = {
        "DM_LOCK_DATABASE_URL_FILE": str(secret),
        "DM_LOCK_DATABASE_URL": project.db.url,
    }
    both = run_in_process(project, "status", env=lock_env)
    assert both.returncode == 2
    assert "DM_LOCK_DATABASE_URL_FILE and DM_LOCK_DATABASE_URL are both set" in both.stderr
    missing = run_in_process(
        project, "status", env={**env, "DM_DATABASE_URL_FILE": str(tmp_path / "absent")}
    )
    assert missing.returncode == 2
    assert "absent: cannot read the file DM_DATABASE_URL_FILE names" in missing.stderr
