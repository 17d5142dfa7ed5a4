"""The README's commands stay true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

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
