"""What an operator and a Kubernetes Job rely on when revision code misbehaves: the exit
code, one error line (or one JSON object) and the tracker row, checked on the real ``dm``
process on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import Project
from conftest import run_dm


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Revision files are rewritten within one second; never reuse their cached bytecode."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dm: error:")]


def latest(project: Project, revision: str) -> object:
    rows = [r for r in project.db.tracker() if r.revision == revision]
    return rows[-1] if rows else None


# -- item 1: exits and cancellations raised by revision code ------------------------------------

EXITS = {
    "sys.exit(0)": "SystemExit(0)",
    "sys.exit(3)": "SystemExit(3)",
    "sys.exit(143)": "SystemExit(143)",
    "raise KeyboardInterrupt": "KeyboardInterrupt()",
    "raise asyncio.CancelledError()": "CancelledError()",
}


@pytest.mark.parametrize("statement", list(EXITS))
def test_exit_or_cancel_raised_by_a_hook_fails_the_revision(
    project: Project, statement: str
) -> None:
    """``sys.exit(0)`` in a hook used to make dm exit 0 (and ``sys.exit(3)`` meant "lock
    not acquired"); a raised ``CancelledError`` printed a long traceback."""
    extra = "import asyncio\nimport sys\n"
    project.write("r1", None, "pass", extra=extra)
    project.write("r2", "r1", statement, extra=extra)
    project.write("r3", "r2", "pass", extra=extra)

    for _ in range(2):  # a retry fails the same way
        result = run_dm(project, "upgrade", "heads")
        assert result.returncode == 1, result.stderr
        assert error_lines(result.stderr) == [
            f"dm: error: revision r2 failed: upgrade() raised {EXITS[statement]}"
        ]
        assert "Traceback" not in result.stderr
        row = latest(project, "r2")
        assert row is not None
        assert (row.status, row.reason) == ("failed", None)
        assert row.error_message == f"upgrade() raised {EXITS[statement]}"
        assert EXITS[statement].split("(")[0] in row.error_traceback
        assert latest(project, "r3") is None


def test_sys_exit_in_verify_fails_the_revision(project: Project) -> None:
    project.write("r1", None, "pass", verify="sys.exit(0)", extra="import sys\n")
    result = run_dm(project, "upgrade", "heads")
    assert result.returncode == 1, result.stderr
    assert error_lines(result.stderr) == [
        "dm: error: revision r1 failed: verify() raised SystemExit(0)"
    ]
    row = latest(project, "r1")
    assert row is not None and row.status == "failed"


def test_sys_exit_in_a_module_body_is_a_bad_revision_file(project: Project) -> None:
    project.write("r1", None, "pass", extra="import sys\nsys.exit(0)\n")
    result = run_dm(project, "upgrade", "heads")
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result.stderr)
    assert "r1_r1.py" in line and "SystemExit" in line
    assert "Traceback" not in result.stderr


def test_sys_exit_json_error(project: Project) -> None:
    project.write("r1", None, "sys.exit(0)", extra="import sys\n")
    result = run_dm(project, "upgrade", "heads", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["exit_code"] == 1
