"""Operator features through the CLI, on SQLite and PostgreSQL: environment guards, one
revision at a time (run/rollback/resolve), --dry-run, verify, checksum drift, info and
the revision generator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok
from conftest import spawn_dm
from conftest import status_of
from conftest import wait_for
from dm import verbs
from dm.engine.execution import tracker_for
from dm.engine.lock import migration_lock

DEV_ONLY = 'environments = ("development", "staging")\n'
CREATE_T = "await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))"
INSERT_T = "await session.execute(sa.text('INSERT INTO t VALUES (1)'))"
DELETE_T = "await session.execute(sa.text('DELETE FROM t'))"
COUNT_T = "return (await session.scalar(sa.text('SELECT count(*) FROM t'))) == 1"
SKIP_REASON = "environment 'production' not in ('development', 'staging')"


def rows(project: Project) -> list[tuple[str, str, str, str | None]]:
    return [(r.revision, r.direction, r.status, r.reason) for r in project.db.tracker()]


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dm: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def guarded_chain(project: Project) -> None:
    """a creates t; b (development/staging only) inserts a row; c after b."""
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, downgrade=DELETE_T, extra=DEV_ONLY, doc="Delete test users")
    project.write("c3", "b2", "pass")


# -- environment guards --------------------------------------------------------------------------


def test_guarded_revision_is_skipped_recorded_and_does_not_block(project: Project) -> None:
    guarded_chain(project)
    result = ok(invoke(project, "upgrade"))
    assert f"skipped b2: {SKIP_REASON}" in result.stdout
    assert f"upgrade b2: skipped ({SKIP_REASON})" in result.stderr
    assert rows(project) == [
        ("a1", "upgrade", "success", None),
        ("b2", "upgrade", "skipped", SKIP_REASON),
        ("c3", "upgrade", "success", None),
    ]
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 0
    assert project.db.tracker()[1].environment == "production"
    status = status_of(project)
    assert (status["b2"]["status"], status["b2"]["applied"]) == ("skipped", False)
    assert status["b2"]["reason"] == SKIP_REASON
    assert "skipped" in ok(invoke(project, "status")).stdout
    ok(invoke(project, "check"))  # nothing to do in production
    assert "nothing to upgrade" in ok(invoke(project, "upgrade")).stdout
    assert len(project.db.tracker()) == 3


def test_current_marks_a_skipped_head(project: Project) -> None:
    project.write("a1", None)
    project.write("b2", "a1", extra=DEV_ONLY)
    ok(invoke(project, "upgrade"))
    assert ok(invoke(project, "current")).stdout == "b2 (head) (skipped)\n"
    assert as_json(invoke(project, "current", "--json")) == {"heads": ["b2"]}


def test_skipped_revision_runs_later_in_an_allowed_environment(project: Project) -> None:
    guarded_chain(project)
    ok(invoke(project, "upgrade"))
    pending = invoke(project, "check", "--json", DM_ENVIRONMENT="staging")
    assert pending.exit_code == 4
    assert json.loads(pending.stdout)["pending"] == ["b2"]
    dry = as_json(invoke(project, "upgrade", "--dry-run", "--json", DM_ENVIRONMENT="staging"))
    assert [(p["revision"], p["action"]) for p in dry["planned"]] == [("b2", "run")]
    text = ok(invoke(project, "upgrade", "--dry-run", DM_ENVIRONMENT="staging")).stdout
    allowed = "environment 'staging' in ('development', 'staging')"
    assert text == f"upgrade b2  Delete test users  [run: {allowed}]\n"
    ok(invoke(project, "upgrade", DM_ENVIRONMENT="staging"))
    assert rows(project)[-1] == ("b2", "upgrade", "success", allowed)  # why it ran (#22)
    assert project.db.tracker()[-1].attempt == 2
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 1
    ok(invoke(project, "check", DM_ENVIRONMENT="staging"))


def test_info_names_the_environment_from_the_environment_variables(project: Project) -> None:
    assert as_json(invoke(project, "info", "--json"))["environment"] == "production"
    assert as_json(invoke(project, "info", "--json", ENVIRONMENT="qa"))["environment"] == "qa"
    info = as_json(invoke(project, "info", "--json", DM_ENVIRONMENT="staging"))
    assert (info["environment"], info["environment_source"]) == ("staging", "DM_ENVIRONMENT")
    shown = ok(invoke(project, "info", ENVIRONMENT="qa")).stdout
    assert "environment: qa (from ENVIRONMENT)" in shown


def test_environment_variable_allows_the_revision(project: Project) -> None:
    guarded_chain(project)
    ok(invoke(project, "upgrade", ENVIRONMENT="development"))
    assert [r[2] for r in rows(project)] == ["success", "success", "success"]


def test_dry_run_shows_the_environment_decision_and_changes_nothing(project: Project) -> None:
    guarded_chain(project)
    text = ok(invoke(project, "upgrade", "--dry-run")).stdout
    assert f"upgrade b2  Delete test users  [skip: {SKIP_REASON}]" in text
    assert "upgrade a1  Revision a1\n" in text
    planned = as_json(invoke(project, "upgrade", "--dry-run", "--json"))["planned"]
    assert [(p["revision"], p["action"], p["reversible"]) for p in planned] == [
        ("a1", "run", True),
        ("b2", "skip", True),
        ("c3", "run", True),
    ]
    assert planned[1]["reason"] == SKIP_REASON
    assert all(row["status"] is None for row in status_of(project).values())


def test_downgrade_past_a_skipped_revision_does_not_run_its_downgrade(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write(
        "b2", "a1", INSERT_T, downgrade="raise RuntimeError('must not run')", extra=DEV_ONLY
    )
    ok(invoke(project, "upgrade"))
    planned = as_json(invoke(project, "downgrade", "base", "--dry-run", "--json"))["planned"]
    assert [(p["revision"], p["action"]) for p in planned] == [("b2", "record"), ("a1", "run")]
    ok(invoke(project, "downgrade", "base"))
    assert rows(project)[-2:] == [
        ("b2", "downgrade", "rolled_back", "its upgrade was skipped; nothing to undo"),
        ("a1", "downgrade", "rolled_back", None),
    ]


def test_downgrade_of_an_applied_guarded_revision_is_refused_outside_its_environments(
    project: Project,
) -> None:
    guarded_chain(project)
    ok(invoke(project, "upgrade", DM_ENVIRONMENT="development"))
    line = one_error_line(invoke(project, "downgrade", "a1"), 2)
    assert f"cannot downgrade b2: {SKIP_REASON}" in line
    assert len(project.db.tracker()) == 3
    ok(invoke(project, "downgrade", "a1", DM_ENVIRONMENT="development"))


def test_bad_guard_attributes_are_revision_file_errors(project: Project) -> None:
    path = project.write("a1", None, extra='environments = "development"\n')
    line = one_error_line(invoke(project, "upgrade"), 2)
    assert path.name in line and "environments must be a tuple" in line
    project.write("a1", None, extra='environments = ("dev", "")\n')
    assert "environments must be" in one_error_line(invoke(project, "status"), 2)
    project.write("a1", None, extra="transactional = 'yes'\n")
    assert "transactional must be True or False" in one_error_line(invoke(project, "upgrade"), 2)
    project.write("a1", None, extra="idempotent = 1\n")
    assert "idempotent must be True or False" in one_error_line(invoke(project, "upgrade"), 2)
    project.write("a1", None, extra='environments = ["dev"]\ntransactional = False\n')
    ok(invoke(project, "upgrade", DM_ENVIRONMENT="dev"))


# -- one revision at a time ------------------------------------------------------------------------


def test_run_one_revision_requires_its_ancestors(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T)
    project.write("c3", "b2", "pass")
    line = one_error_line(invoke(project, "run", "c3"), 2)
    assert "cannot run c3: not applied yet: a1, b2" in line
    ok(invoke(project, "run", "a1"))
    assert rows(project) == [("a1", "upgrade", "success", None)]
    assert "a1 already succeeded" in ok(invoke(project, "run", "a1")).stdout
    result = as_json(invoke(project, "run", "b2", "--json"))
    assert [(s["revision"], s["status"]) for s in result["steps"]] == [("b2", "success")]
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 1


def test_run_force_reruns_a_succeeded_revision_as_a_new_attempt(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, verify=COUNT_T.replace("== 1", ">= 1"))
    ok(invoke(project, "upgrade"))
    dry = ok(invoke(project, "run", "b2", "--force", "--dry-run")).stdout
    assert dry.startswith("upgrade b2")
    assert len(project.db.tracker()) == 2
    ok(invoke(project, "run", "b2", "--force"))
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.attempt, last.reason) == ("b2", "success", 2, "forced")
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 2
    ok(invoke(project, "run", "b2", "--force", "--reason", "restore lost the row"))
    assert project.db.tracker()[-1].reason == "forced: restore lost the row"
    assert "--reason goes with --force" in one_error_line(
        invoke(project, "run", "b2", "--reason", "x"), 2
    )


def test_run_of_a_guarded_revision_is_skipped_even_with_force(project: Project) -> None:
    guarded_chain(project)
    ok(invoke(project, "run", "a1"))
    result = ok(invoke(project, "run", "b2", "--force"))
    assert f"skipped b2: {SKIP_REASON}" in result.stdout
    assert rows(project)[-1] == ("b2", "upgrade", "skipped", SKIP_REASON)


def test_rollback_one_revision_refuses_while_dependants_are_applied(project: Project) -> None:
    project.write("a1", None, CREATE_T, downgrade="await session.execute(sa.text('DROP TABLE t'))")
    project.write("b2", "a1", INSERT_T, downgrade=DELETE_T)
    project.write("c3", "a1", "pass", downgrade=None)
    ok(invoke(project, "upgrade"))
    line = one_error_line(invoke(project, "rollback", "a1"), 2)
    assert "cannot roll back a1: applied revisions depend on it: " in line
    assert "b2" in line and "c3" in line
    refused = one_error_line(invoke(project, "rollback", "c3"), 2)
    assert "cannot roll back c3: no downgrade() in c3 (" in refused  # the verb used, not downgrade
    dry = ok(invoke(project, "rollback", "b2", "--dry-run")).stdout
    assert dry.startswith("downgrade b2")
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 1
    result = as_json(invoke(project, "rollback", "b2", "--json"))
    assert [(s["revision"], s["status"]) for s in result["steps"]] == [("b2", "rolled_back")]
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 0
    assert "b2 is not applied" in ok(invoke(project, "rollback", "b2")).stdout
    ok(invoke(project, "run", "b2"))  # can be applied again
    assert rows(project)[-1] == ("b2", "upgrade", "success", None)


def test_resolve_records_a_manual_fix_of_a_failed_revision(project: Project) -> None:
    project.write("a1", None, "raise RuntimeError('boom')")
    project.write("b2", "a1", "pass")
    assert invoke(project, "upgrade").exit_code == 1
    missing = invoke(project, "resolve", "a1", "--as", "success")
    assert missing.exit_code == 2 and "--reason" in missing.stderr
    result = as_json(
        invoke(
            project, "resolve", "a1", "--as", "success", "--reason", "ran the SQL by hand", "--json"
        )
    )
    assert (result["status"], result["previous_status"]) == ("success", "failed")
    last = project.db.tracker()[-1]
    assert (last.status, last.direction, last.attempt) == ("success", "upgrade", 2)
    assert last.reason == "resolved by hand: ran the SQL by hand"
    assert last.run_by and last.run_by == result["run_by"] and last.started_at is not None
    line = one_error_line(invoke(project, "resolve", "a1", "--as", "success", "--reason", "x"), 2)
    assert "latest attempt is success, not failed" in line
    ok(invoke(project, "upgrade"))  # b2 is no longer blocked
    assert rows(project)[-1][:3] == ("b2", "upgrade", "success")


def test_resolve_as_rolled_back_makes_the_revision_pending_again(project: Project) -> None:
    project.write("a1", None, "raise RuntimeError('boom')")
    assert invoke(project, "upgrade").exit_code == 1
    text = ok(
        invoke(project, "resolve", "a1", "--as", "rolled_back", "--reason", "reverted")
    ).stdout
    assert "a1: recorded rolled_back (was failed)" in text
    assert rows(project)[-1] == ("a1", "downgrade", "rolled_back", "resolved by hand: reverted")
    assert json.loads(invoke(project, "check", "--json").stdout)["pending"] == ["a1"]


# -- verify and drift ---------------------------------------------------------------------------


def test_verify_reruns_verify_hooks_and_fails_when_data_drifted(project: Project) -> None:
    project.write("a1", None, CREATE_T, verify="return True")
    project.write("b2", "a1", INSERT_T, verify=COUNT_T)
    project.write("c3", "b2", "pass")
    ok(invoke(project, "upgrade"))
    result = as_json(invoke(project, "verify", "--json"))
    assert result["ok"] is True
    assert [(o["revision"], o["result"]) for o in result["outcomes"]] == [
        ("a1", "passed"),
        ("b2", "passed"),
        ("c3", "no verify()"),
    ]
    project.db.query("DELETE FROM t")  # e.g. a restore lost the row
    failed = invoke(project, "verify")
    assert failed.exit_code == 1
    assert "failed       b2  Revision b2: verify() returned False" in failed.stdout
    only = json.loads(invoke(project, "verify", "a1", "--json").stdout)
    assert [o["revision"] for o in only["outcomes"]] == ["a1"]
    assert len(project.db.tracker()) == 3  # verify records nothing


def test_verify_is_read_only(project: Project, tmp_path: Path) -> None:
    ran = tmp_path / "verify-ran"
    verify = f"Path({str(ran)!r}).touch()\n{INSERT_T}\nreturn True"
    project.write("a1", None, CREATE_T, verify=verify, extra="from pathlib import Path")
    ok(invoke(project, "upgrade"))
    project.db.query("DELETE FROM t")
    ran.unlink()
    result = invoke(project, "verify")
    assert ran.exists()  # verify() did run, and tried its write
    if project.db.kind == "postgresql":  # the transaction is READ ONLY: the write fails
        assert result.exit_code == 1
        assert "read-only transaction" in result.stdout + result.stderr
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 0  # SQLite: rolled back


def test_verify_that_raises_timeout_error_without_a_time_limit_is_a_failure(
    project: Project,
) -> None:
    project.write("a1", None, CREATE_T, verify="return True")
    project.write("b2", "a1", INSERT_T, verify="return True")
    ok(invoke(project, "upgrade"))
    project.write("b2", "a1", INSERT_T, verify="raise TimeoutError('billing API did not answer')")
    result = invoke(project, "verify", "--json")
    assert result.exit_code == 1, result.stdout + result.stderr
    outcomes = {o["revision"]: o for o in json.loads(result.stdout)["outcomes"]}
    assert outcomes["a1"]["result"] == "passed"
    assert outcomes["b2"]["result"] == "failed"
    assert "TimeoutError: billing API did not answer" in outcomes["b2"]["error"]
    assert "timed out after" not in outcomes["b2"]["error"]


def test_verify_refuses_a_revision_that_is_not_applied(project: Project) -> None:
    project.write("a1", None, verify="return True")
    assert "not applied" in one_error_line(invoke(project, "verify", "a1"), 2)
    assert "nothing applied to verify" in ok(invoke(project, "verify")).stdout


def test_modified_revision_file_is_reported_and_fails_check(project: Project) -> None:
    path = project.write("a1", None, CREATE_T)
    ok(invoke(project, "upgrade"))
    assert status_of(project)["a1"]["modified"] is False
    path.write_text(path.read_text() + "\n# edited after it ran\n")
    assert status_of(project)["a1"]["modified"] is True
    assert "applied (modified)" in ok(invoke(project, "status")).stdout
    check = invoke(project, "check")
    assert check.exit_code == 4 and "modified since applied: a1" in check.stdout
    assert json.loads(invoke(project, "check", "--json").stdout)["modified"] == ["a1"]
    ok(invoke(project, "check", "--allow-modified"))
    project.write("a1", None, "pass")  # make re-running harmless, then accept the new file
    ok(invoke(project, "run", "a1", "--force"))
    assert status_of(project)["a1"]["modified"] is False
    ok(invoke(project, "check"))


def test_tracker_rows_whose_file_is_gone_are_shown_missing(project: Project) -> None:
    project.write("a1", None)
    path = project.write("b2", "a1")
    ok(invoke(project, "upgrade"))
    path.unlink()
    assert status_of(project)["b2"]["missing_file"] is True
    assert "applied (file missing)" in ok(invoke(project, "status")).stdout
    check = invoke(project, "check")
    assert check.exit_code == 4 and "applied but file missing: b2" in check.stdout


# -- info ------------------------------------------------------------------------------------------


def test_info_shows_configuration_with_the_password_hidden(project: Project) -> None:
    url = project.db.url
    if project.db.kind == "postgresql":  # trust auth ignores the password
        url = url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@", 1)
    result = ok(invoke(project, "info", DM_DATABASE_URL=url))
    assert "s3cret" not in result.stdout + result.stderr
    assert "environment: production" in result.stdout
    assert "lock:        free" in result.stdout
    info = as_json(invoke(project, "info", "--json", DM_DATABASE_URL=url))
    if project.db.kind == "postgresql":
        assert ":***@" in info["database_url"]
    assert info["tracker_table"] == "script_run_tracker"
    assert info["script_location"].endswith("data_migrations")
    assert info["lock"] == "free" and info["lock_holder"] is None
    drivers = {"asyncpg", "psycopg", "aiosqlite"}
    assert set(info["versions"]) >= {"dm", "alembic", "sqlalchemy", *drivers}


def test_info_reports_a_held_lock(project: Project) -> None:
    project.write("a1", None)
    ok(invoke(project, "upgrade"))  # creates the database (and SQLite lock file)
    settings = project.settings()
    tracker = tracker_for(settings)

    async def probe_while_locked() -> tuple[str, str | None]:
        async with migration_lock(settings.lock_url(), tracker, 5, "dm:test-holder"):
            return await verbs.lock_state(settings, tracker)

    state, holder = asyncio.run(probe_while_locked())
    assert state == "held"
    assert holder is not None
    if project.db.kind == "postgresql":
        assert "(dm on test-holder, " in holder  # the holder's application_name
    else:
        assert holder.startswith(f"pid {os.getpid()} on ")
    assert asyncio.run(verbs.lock_state(settings, tracker)) == ("free", None)


# -- generator and listing ------------------------------------------------------------------


def test_revision_validates_the_message_slug(project: Project) -> None:
    for message, expected in (
        ("ab", "too short"),
        ("class", "Python keyword"),
        ("users/cleanup", "path separator"),
        ("Проверка данных", "ASCII"),
        ("2026 01", "at least one letter"),
    ):
        line = one_error_line(invoke(project, "revision", "-m", message), 2)
        assert expected in line, (message, line)
    assert list(project.versions.glob("*.py")) == []
    ok(invoke(project, "revision", "-m", "2fa backfill"))
    german = as_json(invoke(project, "revision", "-m", "Überprüfung der Daten", "--json"))
    assert german["path"].endswith("_uberprufung_der_daten.py")  # the file name in ASCII
    assert german["description"] == "Überprüfung der Daten"  # the message as written
    first = as_json(invoke(project, "revision", "-m", "Backfill display names", "--json"))
    text = (project.root / first["path"]).read_text()
    assert "environments: Sequence[str] | None = None" in text
    assert "transactional: bool = True" in text
    line = one_error_line(invoke(project, "revision", "-m", "backfill display-names"), 2)
    assert "same slug 'backfill_display_names'" in line and "--allow-duplicate-slug" in line
    ok(invoke(project, "revision", "-m", "backfill display names", "--allow-duplicate-slug"))
    ok(invoke(project, "upgrade"))  # the template runs as written


def test_list_is_history(project: Project) -> None:
    project.write("a1", None, doc="Delete test users")
    project.write("b2", "a1", doc="Sync the plan catalogue")
    listed = ok(invoke(project, "list")).stdout
    assert listed == ok(invoke(project, "history")).stdout
    assert "a1 -> b2 (head), Sync the plan catalogue" in listed


def test_new_commands_have_help(project: Project) -> None:
    for name in ("run", "rollback", "resolve", "verify", "info", "list"):
        result = ok(invoke(project, name, "--help"))
        assert "Usage:" in result.stdout


def test_downgrade_past_a_skipped_irreversible_revision_needs_no_downgrade(
    project: Project,
) -> None:
    project.write("a1", None)
    project.write("b2", "a1", downgrade=None, extra=DEV_ONLY)
    ok(invoke(project, "upgrade"))
    ok(invoke(project, "downgrade", "base"))
    assert [r[:3] for r in rows(project)[-2:]] == [
        ("b2", "downgrade", "rolled_back"),
        ("a1", "downgrade", "rolled_back"),
    ]
    ok(invoke(project, "upgrade", DM_ENVIRONMENT="development"))
    line = one_error_line(invoke(project, "downgrade", "base", DM_ENVIRONMENT="development"), 2)
    assert "no downgrade() in b2" in line


@pytest.mark.process
def test_alembic_command_line_honours_the_environment_guard(project: Project) -> None:
    guarded_chain(project)
    alembic = Path(sys.executable).parent / "alembic"
    result = subprocess.run(
        [str(alembic), "-c", "alembic.ini", "-n", "data_migrations", "upgrade", "heads"],
        cwd=project.root,
        env={**os.environ, **project.env(), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [r[:3] for r in rows(project)] == [
        ("a1", "upgrade", "success"),
        ("b2", "upgrade", "skipped"),
        ("c3", "upgrade", "success"),
    ]


def test_info_reports_an_unreachable_lock_database(project: Project) -> None:
    info = as_json(
        invoke(
            project,
            "info",
            "--json",
            DM_DATABASE_URL="postgresql://dm:hunter2@127.0.0.1:1/nowhere",
        )
    )
    assert info["lock"] == "unknown"
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/nowhere" in info["lock_holder"]
    assert "hunter2" not in json.dumps(info)
    assert info["database_url"] == "postgresql+asyncpg://dm:***@127.0.0.1:1/nowhere"


@pytest.mark.process
@pytest.mark.slow
def test_concurrent_runs_of_one_revision_apply_it_once(project: Project, tmp_path: Path) -> None:
    flag = tmp_path / "release"
    project.write(
        "a1",
        None,
        f"""
        import asyncio, pathlib
        await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))
        while not pathlib.Path({str(flag)!r}).exists():
            await asyncio.sleep(0.02)
        """,
    )
    first = spawn_dm(project, "run", "a1")
    try:

        def pending() -> bool:
            try:
                return any(r.status == "pending" for r in project.db.tracker())
            except Exception:  # the tracker table does not exist yet
                return False

        wait_for(pending, timeout=60)
        second = spawn_dm(project, "run", "a1")
        flag.touch()
        out1, err1 = first.communicate(timeout=60)
        out2, err2 = second.communicate(timeout=60)
    finally:
        flag.touch()
        first.kill()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert rows(project) == [("a1", "upgrade", "success", None)]
    assert "nothing to run: a1 already succeeded" in out2


def test_info_shows_an_invalid_url_instead_of_failing(project: Project) -> None:
    url = "postgresql://user:s3cret@db.example:notaport/app"
    result = invoke(project, "info", "--json", DM_DATABASE_URL=url)
    info = as_json(result)
    assert info["database_url"].startswith("(invalid: database URL is not a valid URL")
    assert (info["lock"], info["lock_holder"]) == ("unknown", "the database URL is invalid")
    assert "s3cret" not in result.stdout + result.stderr
