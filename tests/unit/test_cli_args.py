"""Global options after the command, and usage errors on one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import Project
from conftest import cli_runner
from conftest import run_in_process
from dm.cli import main
from dm.cli.args import hoist_global_options


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        (["upgrade", "--verbose"], ["--verbose", "upgrade"]),
        (["upgrade", "x", "--log-format", "json"], ["--log-format", "json", "upgrade", "x"]),
        (["-c", "a", "status", "--log-format=json"], ["-c", "a", "--log-format=json", "status"]),
        (["downgrade", "-1", "-n", "dm2"], ["-n", "dm2", "downgrade", "-1"]),
        (["history", "--verbose"], ["history", "--verbose"]),  # history's own --verbose
        (["revision", "-m", "--verbose"], ["revision", "-m", "--verbose"]),  # -m's value
        (["resolve", "r1", "--", "--verbose"], ["resolve", "r1", "--", "--verbose"]),
        (["frobnicate", "--verbose"], ["frobnicate", "--verbose"]),
    ],
)
def test_global_options_after_the_command_move_before_it(
    given: list[str], parsed: list[str]
) -> None:
    assert hoist_global_options(main, given) == parsed


def test_global_options_work_after_the_command(project: Project) -> None:
    project.write("r1", None)
    result = run_in_process(project, "upgrade", "--log-format", "json", "--verbose")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(line["level"].lower() == "debug" for line in lines), lines  # --verbose too


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--frobnicate", "status"], "dm: error: no such option '--frobnicate' (see 'dm --help')"),
        (["frobnicate"], "dm: error: no such command 'frobnicate' (see 'dm --help')"),
        (["resolve"], "dm: error: missing argument 'REV' (see 'dm resolve --help')"),
        (["status", "--frob"], "dm: error: no such option '--frob' (see 'dm status --help')"),
    ],
)
def test_usage_errors_are_one_line(args: list[str], line: str) -> None:
    result = cli_runner().invoke(main, args, prog_name="dm")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""


def test_a_usage_error_of_a_real_process_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dm", "upgrade", "--frob"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == "dm: error: no such option: --frob\n"
