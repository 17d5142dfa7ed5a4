"""The README's commands stay true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from conftest import REPO
from dm.cli import main

README = (REPO / "README.md").read_text()


def _command_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```sh\n(.+?)\n```", README, re.S)
    assert match, f"README.md has no command after <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    result = subprocess.run(
        [
            "awk",
            "/<!-- test-command -->/{found=1; next} found && /^```sh/{inside=1; next} "
            "inside && /^```/{exit} inside{print}",
            "README.md",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == _command_after("test-command")
    assert 'eval "$test_command"' in (REPO / ".ci" / "run").read_text()


@pytest.mark.process
@pytest.mark.slow
def test_readme_main_command_upgrades_the_example_project(tmp_path: Path) -> None:
    """The main command's `dm upgrade heads`, on a copy of the example project, on SQLite."""
    command = _command_after("main-command")
    assert command.endswith("dm upgrade heads")
    shutil.copy(REPO / "alembic.ini", tmp_path / "alembic.ini")
    shutil.copytree(
        REPO / "data_migrations",
        tmp_path / "data_migrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DM_DATABASE_URL", "DATABASE_URL", "DM_CONFIG", "KUBERNETES_SERVICE_HOST"}
    }
    dm = [sys.executable, "-m", "dm"]
    first = subprocess.run(
        [*dm, "upgrade", "heads"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "dm.sqlite3").exists()
    check = subprocess.run([*dm, "check"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    again = subprocess.run(
        [*dm, "upgrade", "heads"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0
    assert "nothing to upgrade" in again.stdout


# -- docs/reference.md stays in step with the CLI ---------------------------------------------

REFERENCE = (REPO / "docs" / "reference.md").read_text()


def _section(heading: str) -> str:
    """Return the text under ``heading`` up to the next heading of the same or higher level."""
    level = heading.split(" ", 1)[0]
    match = re.search(
        rf"^{re.escape(heading)}\n(.*?)(?=^#{{1,{len(level)}}} |\Z)", REFERENCE, re.S | re.M
    )
    assert match, f"docs/reference.md has no section {heading!r}"
    return match.group(1)


def _option_names(command: click.Command) -> list[str]:
    return [
        name
        for param in command.params
        if isinstance(param, click.Option)
        for name in [*param.opts, *param.secondary_opts]
    ]


def test_reference_names_every_command_and_option() -> None:
    """Each command of ``dm --help`` has a section naming each of its options."""
    listed = subprocess.run(
        [sys.executable, "-m", "dm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    names = re.findall(r"^  ([a-z]+)\s", listed.split("Commands:", 1)[1], re.M)
    assert sorted(names) == sorted(main.commands)
    for name, command in main.commands.items():
        section = _section(f"### dm {name}")
        missing = [o for o in _option_names(command) if f"`{o}" not in section]
        assert not missing, f"docs/reference.md, dm {name}: {missing}"
    global_section = _section("## Global options")
    missing = [o for o in _option_names(main) if f"`{o}" not in global_section]
    assert not missing, f"docs/reference.md, global options: {missing}"


def test_reference_names_every_setting_and_exit_code() -> None:
    from dm.config.settings import _ENV_NAMES
    from dm.config.settings import Settings
    from dm.core import errors

    settings = _section("## Settings")
    for field in Settings.model_fields:
        name = _ENV_NAMES.get(field, f"DM_{field.upper()}")
        assert f"`{name}`" in settings, f"docs/reference.md does not name {name}"
    codes = {0, 4, 130, 143} | {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.DmError)
    }
    table = _section("## Exit codes")
    for code in codes:
        assert re.search(rf"^\| {code} \|", table, re.M), f"exit code {code} missing"


def test_operations_guide_covers_what_operators_meet() -> None:
    guide = (REPO / "docs" / "operations.md").read_text()
    headings = re.findall(r"^#+ (.+)$", guide, re.M)
    for heading in (
        "Writing a revision",
        "Batching",
        "Environment guards",
        "Running in Kubernetes",
        "Exit codes and podFailurePolicy",
        "What `kubectl logs` shows",
        "Helm",
        "Behind a connection pooler",
        "a revision failed",
        "a lock is held",
        "a run was killed",
        "a file changed after it was applied",
        "the tracker needs repair",
        "Upgrading dm itself",
    ):
        assert heading in headings, heading
    for path in re.findall(r"`((?:deploy|requirements|tests)/[\w./-]+)`", guide):
        assert (REPO / path).exists(), path
    for code in (0, 1, 2, 3, 4, 75, 143):
        assert re.search(rf"^\| {code} \|", guide, re.M), code
