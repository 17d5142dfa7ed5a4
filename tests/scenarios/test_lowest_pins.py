"""``.ci/lowest-pins``: the lowest-pins leg's constraints come from pyproject.toml itself."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / ".ci" / "lowest-pins"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_every_dependency_is_pinned_at_its_declared_lower_bound() -> None:
    result = _run()
    assert result.returncode == 0, result.stderr
    pins = dict(line.split("==") for line in result.stdout.splitlines() if not line.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {}
    for requirement in project["dependencies"]:
        match = re.match(r"([\w.-]+)(?:\[[^\]]*\])?.*>=\s*([^,;\s]+)", requirement)
        assert match, requirement
        declared[match.group(1)] = match.group(2)
    assert pins == declared
    assert _run("--python").stdout.strip() == project["requires-python"].removeprefix(">=")


def test_a_dependency_without_a_lower_bound_is_named(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\nrequires-python = ">=3.11"\n'
        'dependencies = ["alembic>=1.16,<2", "click<9"]\n'
    )
    result = _run(str(pyproject))
    assert result.returncode == 1
    assert result.stderr.strip() == f"{pyproject}: 'click<9' has no single '>=' lower bound"
    assert "Traceback" not in result.stderr
