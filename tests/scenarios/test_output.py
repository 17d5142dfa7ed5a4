"""What an operator reads: errors as JSON, revision code's prints kept off dm's output,
every attempt's traceback, one line per ``verify`` result. Text and exit codes are checked
in-process; a real ``dm`` process where only one can show it (its own stdout and stderr, a
signal, the environment it starts in)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import Project
from conftest import pg_user
from conftest import run_dm
from conftest import run_in_process
from conftest import spawn_dm
from conftest import wait_for
from dm.cli import main


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Revision files are rewritten within one second; never reuse their cached bytecode."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Parse every stderr line as one JSON object (fails on any other line)."""
    return [json.loads(line) for line in stderr.splitlines()]


# -- item 16: machine-readable errors --------------------------------------------------------------

ERRORS = [
    (("upgrade", "nope"), 2, "unknown_target"),
    (("run", "nope"), 2, "unknown_target"),
    (("status",), 75, "database_unreachable"),
    (("upgrade", "heads"), 1, "revision_failed"),
]


@pytest.mark.parametrize(("args", "code", "kind"), ERRORS)
def test_json_option_prints_the_error_as_json_on_stdout(
    project: Project, args: tuple[str, ...], code: int, kind: str
) -> None:
    project.write("r1", None, "1 / 0")
    env = {}
    if kind == "database_unreachable":
        env["DM_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
        env["DM_CONNECT_RETRY_SECONDS"] = "0"
    result = run_in_process(project, *args, "--json", env=env)
    assert result.returncode == code, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == code
    assert error["kind"] == kind
    assert error["message"] and "\n" not in error["message"]
    assert result.stderr.splitlines()[-1] == f"dm: error: {error['message']}"
    if kind == "revision_failed":
        assert error["revision"] == "r1"
        assert "ZeroDivisionError" in error["message"]


@pytest.mark.parametrize(("args", "code"), [(("upgrade", "nope"), 2), (("upgrade", "heads"), 1)])
@pytest.mark.process
def test_json_logs_print_the_final_error_as_json(
    project: Project, args: tuple[str, ...], code: int
) -> None:
    project.write("r1", None, "1 / 0")
    result = run_dm(project, "--log-format", "json", *args)  # all a real process's stderr
    assert result.returncode == code
    entries = json_lines(result.stderr)  # every line is one JSON object
    last = entries[-1]
    assert (last["level"], last["exit_code"]) == ("error", code)
    assert "Traceback" not in result.stderr


def test_json_logs_print_usage_errors_as_json(project: Project) -> None:
    result = run_in_process(project, "--log-format", "json", "frobnicate")
    assert result.returncode == 2
    [entry] = json_lines(result.stderr)
    assert entry["kind"] == "usage_error" and "frobnicate" in entry["message"]


@pytest.mark.process
def test_json_logs_print_interrupted_by_sigterm_as_json(project: Project) -> None:
    started = project.root / "started"
    release = project.root / "release"
    project.write(
        "r1",
        None,
        "open(STARTED, 'w').close()\n"
        "while not os.path.exists(RELEASE):\n"
        "    await asyncio.sleep(0.05)",
        extra=f"import asyncio\nimport os\nSTARTED = {str(started)!r}\n"
        f"RELEASE = {str(release)!r}\n",
    )
    proc = spawn_dm(project, "--log-format", "json", "upgrade", "heads")
    try:
        wait_for(lambda: started.exists() or proc.poll() is not None, timeout=60)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    last = json_lines(stderr)[-1]
    assert (last["message"], last["exit_code"], last["kind"]) == (
        "interrupted by SIGTERM",
        143,
        "interrupted",
    )


# -- item 17: what revision code prints ----------------------------------------------------------

PRINTING = """
print("printed at import")
"""


def printing_project(project: Project) -> None:
    project.write(
        "r1",
        None,
        'print("printed by upgrade")\nprint("partial", end="")',
        verify='print("printed by verify")\nreturn True',
        extra=PRINTING,
    )


@pytest.mark.parametrize(
    "args", [("upgrade", "heads"), ("status",), ("history",), ("current",), ("log", "r1")]
)
@pytest.mark.process
def test_prints_in_revision_code_do_not_corrupt_json_output(
    project: Project, args: tuple[str, ...]
) -> None:
    printing_project(project)
    if args[0] != "upgrade":
        assert run_in_process(project, "upgrade", "heads").returncode == 0
    # upgrade on a real process (its own stdout and stderr), the read-only commands in-process
    run = run_dm if args[0] == "upgrade" else run_in_process
    result = run(project, *args, "--json")
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout is exactly the JSON document
    assert "printed" not in result.stdout
    assert "printed at import" in result.stderr  # not lost: a log line
    if args[0] == "upgrade":
        for text in ("printed by upgrade", "printed by verify", "partial"):
            assert text in result.stderr


def test_prints_in_revision_code_become_json_log_lines(project: Project) -> None:
    printing_project(project)
    project.write("r2", "r1", 'print("to stderr", file=sys.stderr)', extra="import sys\n")
    result = run_in_process(project, "--log-format", "json", "upgrade", "heads", "--json")
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    messages = {entry["message"]: entry for entry in json_lines(result.stderr)}
    assert messages["printed by upgrade"]["logger"] == "dm.output"
    assert messages["to stderr"]["level"] == "warning"


# -- item 19: every attempt with its error and traceback -------------------------------------------


def test_log_shows_every_attempt_with_its_error_and_traceback(project: Project) -> None:
    flag = project.root / "fixed"
    project.write(
        "r1",
        None,
        "if not os.path.exists(FLAG):\n    raise ValueError('bad row 42')",
        extra=f"import os\nFLAG = {str(flag)!r}\n",
    )
    assert run_in_process(project, "upgrade", "heads").returncode == 1
    assert run_in_process(project, "upgrade", "heads").returncode == 1
    flag.touch()
    assert run_in_process(project, "upgrade", "heads").returncode == 0

    text = run_in_process(project, "log", "r1")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("ValueError: bad row 42") >= 4  # error and traceback, twice
    assert "Traceback (most recent call last)" in text.stdout
    assert [line.split(":")[0] for line in text.stdout.splitlines() if line[:1] != " "] == [
        "attempt 1",
        "attempt 2",
        "attempt 3",
    ]

    result = run_in_process(project, "log", "r1", "--json")
    records = json.loads(result.stdout)
    assert [(r["attempt"], r["status"]) for r in records] == [
        (1, "failed"),
        (2, "failed"),
        (3, "success"),
    ]
    assert records[0]["error_message"] == "ValueError: bad row 42"
    assert "raise ValueError('bad row 42')" in records[0]["error_traceback"]
    assert records[2]["error_traceback"] is None


def test_log_of_a_revision_whose_file_is_gone(project: Project) -> None:
    path = project.write("r1", None, "1 / 0")
    assert run_in_process(project, "upgrade", "heads").returncode == 1
    path.unlink()
    result = run_in_process(project, "log", "r1", "--json")
    assert result.returncode == 0, result.stderr
    [record] = json.loads(result.stdout)
    assert record["error_message"].startswith("ZeroDivisionError")
    unknown = run_in_process(project, "log", "zz9")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().startswith("dm: error:") and "zz9" in unknown.stderr


@pytest.mark.slow  # partial ids resolve in one place (dm.core.graph), tested fast in test_graph
def test_log_accepts_a_partial_revision_id_as_every_command_does(project: Project) -> None:
    project.write("a1b2c3d4e5f6", None, "raise ValueError('bad row 7')")
    project.write("f6e5d4c3b2a1", "a1b2c3d4e5f6", "pass")
    assert run_dm(project, "upgrade", "heads").returncode == 1
    result = run_dm(project, "log", "a1b2", "--json")
    assert result.returncode == 0, result.stderr
    [record] = json.loads(result.stdout)
    assert (record["revision"], record["status"]) == ("a1b2c3d4e5f6", "failed")
    assert record["error_message"] == "ValueError: bad row 7"
    text = run_dm(project, "log", "a1b2")
    assert text.returncode == 0 and "attempt 1: upgrade failed" in text.stdout, text.stderr
    never = run_dm(project, "log", "f6e5")
    assert never.returncode == 0, never.stderr
    assert "f6e5: no attempt recorded" in never.stdout + never.stderr


@pytest.mark.slow
def test_log_of_a_gone_revision_wins_over_a_partial_id_of_a_file(project: Project) -> None:
    path = project.write("ab", None, "pass")
    assert run_dm(project, "upgrade", "heads").returncode == 0
    path.unlink()
    project.write("abc123", None, "pass")
    result = run_dm(project, "log", "ab", "--json")
    assert result.returncode == 0, result.stderr
    assert [(r["revision"], r["status"]) for r in json.loads(result.stdout)] == [("ab", "success")]


# -- item 20: one line per verify result -----------------------------------------------------------


def test_verify_prints_each_result_once(project: Project) -> None:
    project.write("r1", None, "pass", verify="return True")
    project.write("r2", "r1", "pass", verify="return True")
    assert run_in_process(project, "upgrade", "heads").returncode == 0
    result = run_in_process(project, "verify")
    assert result.returncode == 0
    terminal = (result.stdout + result.stderr).splitlines()  # what a terminal shows
    for rev in ("r1", "r2"):
        assert sum(rev in line for line in terminal) == 1, terminal


# -- item 21: messages that misled -----------------------------------------------------------------


def one_error(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("dm: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_stamp_errors_say_stamp(project: Project) -> None:
    project.write("r1", None)
    result = run_in_process(project, "stamp", "nope")
    assert result.returncode == 2
    line = one_error(result)
    assert line.startswith("dm: error: cannot stamp 'nope':"), line
    assert "upgrade" not in line


def test_nul_byte_names_the_file(project: Project) -> None:
    project.write("r1", None)
    (project.versions / "r2_bad.py").write_bytes(b'revision = "r2"\x00\n')
    result = run_in_process(project, "heads")
    assert result.returncode == 2
    line = one_error(result)
    assert "r2_bad.py" in line and "NUL byte" in line and "None" not in line


@pytest.mark.parametrize("command", ["upgrade", "downgrade", "stamp", "run", "rollback"])
def test_sql_option_says_offline_sql_is_not_supported(project: Project, command: str) -> None:
    project.write("r1", None)
    result = run_in_process(project, command, "--sql")
    assert result.returncode == 2
    line = one_error(result)
    assert "offline SQL (--sql) is not supported" in line
    assert "locate" not in line
    other = run_in_process(project, command, "--frobnicate")
    assert other.returncode == 2
    assert one_error(other) == "dm: error: no such option: --frobnicate"


def test_relative_targets_still_work(project: Project) -> None:
    project.write("r1", None)
    project.write("r2", "r1")
    assert run_in_process(project, "upgrade", "heads").returncode == 0
    result = run_in_process(project, "downgrade", "-1")
    assert result.returncode == 0, result.stderr


def test_init_in_another_directory_says_cd_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init", "my project"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "next: cd 'my project', dm revision" in result.stdout
    monkeypatch.chdir(tmp_path / "my project" / "data_migrations")
    here = CliRunner().invoke(main, ["init"], catch_exceptions=False)
    assert "next: dm revision" in here.stdout


def skipped_chain(project: Project) -> None:
    """r1 runs everywhere; r2 only in development, so production skips it."""
    project.write("r1", None)
    project.write("r2", "r1", extra='environments = ("development",)\n')
    result = run_in_process(project, "upgrade", "heads")
    assert result.returncode == 0, result.stderr
    assert "1 skipped" in result.stdout


def test_rollback_does_not_call_a_skipped_revision_applied(project: Project) -> None:
    skipped_chain(project)
    result = run_in_process(project, "rollback", "r1")
    assert result.returncode == 2
    line = one_error(result)
    assert "skipped revisions come after it: r2" in line, line
    assert "applied revisions" not in line, line


def test_downgrade_does_not_count_recorded_only_steps_as_done(project: Project) -> None:
    skipped_chain(project)
    result = run_in_process(project, "downgrade", "base")
    assert result.returncode == 0, result.stderr
    assert "downgrade: 1 revision(s) done, 1 recorded only" in result.stdout, result.stdout
    rollback = run_in_process(project, "upgrade", "heads")
    assert rollback.returncode == 0
    only = run_in_process(project, "rollback", "r2")
    assert "rollback: 0 revision(s) done, 1 recorded only" in only.stdout, only.stdout


def test_upgrade_none_fails_the_pre_run_check(project: Project) -> None:
    path = project.write("r1", None)
    path.write_text(path.read_text().replace("async def upgrade(session):", "async def _x(s):"))
    path.write_text(path.read_text() + "\nupgrade = None\n")
    result = run_in_process(project, "upgrade", "heads")
    assert result.returncode == 2
    line = one_error(result)
    assert "r1_r1.py" in line and "upgrade is None" in line


def test_merge_refuses_a_single_head_and_names_itself(project: Project) -> None:
    project.write("r1", None)
    before = sorted(project.versions.iterdir())
    result = run_in_process(project, "merge")
    assert result.returncode == 2
    assert "nothing to merge" in one_error(result)
    assert sorted(project.versions.iterdir()) == before  # no file written
    project.write("r2", "r1")
    project.write("r3", "r1")
    merged = run_in_process(project, "merge", "--json")
    assert merged.returncode == 0, merged.stderr
    info = json.loads(merged.stdout)
    assert info["description"] == "merge r2 and r3"
    assert info["path"].endswith("_merge_r2_and_r3.py")
    assert sorted(info["down_revisions"]) == ["r2", "r3"]


@pytest.mark.process
def test_info_inside_kubernetes_without_a_url(project: Project) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dm", "info"],
        cwd=project.root,
        env={
            **{k: v for k, v in os.environ.items() if k not in {"DM_DATABASE_URL", "DATABASE_URL"}},
            "DM_CONFIG": str(project.config),
            "KUBERNETES_SERVICE_HOST": "10.0.0.1",
        },
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "database:    no database configured" in result.stdout


def test_a_run_starts_by_naming_its_database_and_environment(project: Project) -> None:
    """One INFO line: the database (password hidden) and the environment, and where each
    came from, so that a run against the wrong database or environment shows at once."""
    project.write("r1", None)
    (project.root / ".env").write_text("DM_ENVIRONMENT=staging\n")
    url = project.db.url
    if project.db.kind == "postgresql":  # trust auth ignores the password
        url = url.replace(f"//{pg_user()}@", f"//{pg_user()}:s3cret-pw@", 1)
    result = run_in_process(project, "upgrade", env={"DM_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert "s3cret-pw" not in result.stderr
    assert " INFO  database " in first and "(from DM_DATABASE_URL)" in first
    assert f"environment 'staging' (from DM_ENVIRONMENT in {project.root / '.env'})" in first
