"""Every code block of the README and the manual runs as written, or says why not.

A block is preceded by an HTML comment marker:

- ``<!-- run: walkthrough -->`` / ``<!-- run: walkthrough-hooks -->``: the README's path
  from ``dm init`` to a first revision, run in an empty directory with ``dm`` on ``PATH``,
  the hooks added to the file ``dm revision`` wrote;
- ``<!-- run: example -->``: shell commands, run in a copy of the example project;
- ``<!-- run: revision -->``: a whole revision file, added to the example project and
  upgraded; ``<!-- run: revision-body -->``: the same below a header ``dm revision`` writes;
- ``<!-- run: python -->``: executed as a module; ``<!-- run: startup -->``: executed, then
  its ``on_startup()`` awaited in the example project;
- ``<!-- tested: PATH -->``: the test file PATH reads it from the doc;
- ``<!-- not-run: why -->``, and the README's ``main-command``/``test-command`` (checked by
  ``test_docs.py`` and ``.ci/run``).

Shell blocks touching a database run on SQLite and PostgreSQL (the PostgreSQL halves and
the longer tours are ``slow``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO
from conftest import Database
from conftest import copy_example
from conftest import invoke
from conftest import ok

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLE_HEAD = "94fea9b2a5d5"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    marker: str
    text: str

    @property
    def kind(self) -> str:
        return self.marker.split(":", 1)[-1].strip().split(" ", 1)[0]

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^(\s*)```", lines[i])
            if not fence:
                i += 1
                continue
            indent = fence.group(1)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = lines[i - 1].strip() if i else ""
            marker = before[4:-3].strip() if before.startswith("<!--") else ""
            text = textwrap.dedent("\n".join(line for line in lines[i + 1 : end])) + "\n"
            assert all(not line.strip() or line.startswith(indent) for line in lines[i:end])
            found.append(Block(path, i + 1, marker, text))
            i = end + 1
    return found


BLOCKS = _blocks()


def _of(kind: str) -> list[Block]:
    return [b for b in BLOCKS if b.marker.startswith("run:") and b.kind == kind]


def test_every_block_runs_or_says_why_not() -> None:
    runs = {"walkthrough", "walkthrough-hooks", "example", "revision", "revision-body"}
    runs |= {"python", "startup"}
    for block in BLOCKS:
        marker = block.marker
        if marker in ("main-command", "test-command"):
            continue
        if marker.startswith("not-run:"):
            assert marker[len("not-run:") :].strip(), f"{block}: not-run without a reason"
        elif marker.startswith("tested:"):
            test_file = REPO / marker.split(":", 1)[1].strip()
            assert test_file.is_file(), f"{block}: {test_file} does not exist"
            assert block.path.name in test_file.read_text(), f"{block}: {test_file} skips it"
        else:
            assert marker.startswith("run:") and block.kind in runs, (
                f"{block}: a code block needs <!-- run: ... --> or <!-- not-run: why --> "
                f"before it (found {marker!r})"
            )


def test_readme_links_name_files_that_exist() -> None:
    """The manual's own links are checked by ``mkdocs build --strict``; the README's here."""
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), target


# -- running them -------------------------------------------------------------------------------

PG = pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.slow])
PG_FAST = pytest.param("postgresql", marks=pytest.mark.postgres)


def _sqlite(path: Path) -> Database:
    return Database("sqlite", f"sqlite:///{path}", f"sqlite:///{path}")


def _database(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> Database:
    if kind == "sqlite":
        return _sqlite(tmp_path / "db.sqlite3")
    database: Database = request.getfixturevalue("postgres_db")
    return database


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DM_") or name in ("DATABASE_URL", "ENVIRONMENT"):
            monkeypatch.delenv(name)


def _shell(block: Block, cwd: Path, env: dict[str, str]) -> str:
    """Run ``block`` with bash -e, ``dm`` being this interpreter's; return its output."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        ["bash", "-e", "-x", "-c", block.text],
        cwd=cwd,
        env={**env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{block} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.process
@pytest.mark.parametrize("kind", ["sqlite", PG])
def test_readme_walkthrough_runs_as_written(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, clean_env: None
) -> None:
    """From ``dm init`` in an empty repository to an applied first revision, on the
    embedded SQLite file or on the database ``DATABASE_URL`` names."""
    first, last = _of("walkthrough")
    (hooks,) = _of("walkthrough-hooks")
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    db = None
    if kind == "postgresql":
        db = _database(request, kind, tmp_path)
        env["DATABASE_URL"] = db.url
    root = tmp_path / "app"
    root.mkdir()
    _shell(first, root, env)
    (revision,) = (root / "data_migrations" / "versions").glob("*_seed_the_plans_table.py")
    revision.write_text(revision.read_text() + "\n\n" + hooks.text)
    output = _shell(last, root, env)
    assert "seed the plans table" in output
    if db is None:
        db = _sqlite(root / "dm.sqlite3")
    assert [r.code for r in db.query("SELECT code FROM plans ORDER BY code")] == ["free", "pro"]
    assert [r.status for r in db.tracker()] == ["success"]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", PG])
def test_tutorial_commands_run_on_the_example_project(
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = copy_example(tmp_path, _database(request, kind, tmp_path), monkeypatch)
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["DM_DATABASE_URL"] = project.db.url
    ok(invoke(project, "upgrade"))
    for block in _of("example"):
        _shell(block, project.root, env)
    assert project.db.tracker()[-1].status in ("success", "skipped")


@pytest.mark.parametrize("block", _of("revision") + _of("revision-body"), ids=str)
@pytest.mark.parametrize("kind", ["sqlite", PG_FAST])
def test_revision_examples_upgrade_the_example_project(
    block: Block,
    kind: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = copy_example(tmp_path, _database(request, kind, tmp_path), monkeypatch)
    text = block.text
    if block.kind == "revision-body":
        header = (
            '"""An example of the manual"""\n'
            'revision = "d0c5e7a3b1f4"\n'
            f"down_revision = {EXAMPLE_HEAD!r}\n"
            "branch_labels = None\n"
            "depends_on = None\n\n"
        )
        text = header + text
    (project.versions / "example_of_the_manual.py").write_text(text)
    result = ok(invoke(project, "upgrade"))
    assert "example_of_the_manual" not in result.stderr
    ok(invoke(project, "check"))
    (last,) = [r for r in project.db.tracker() if r.revision not in _example_revisions()]
    assert last.status == "success"


def _example_revisions() -> set[str]:
    found = set()
    for path in (REPO / "data_migrations" / "versions").glob("*.py"):
        match = re.search(r'^revision(?:: str)? = "(\w+)"', path.read_text(), re.M)
        if match:
            found.add(match.group(1))
    return found


@pytest.mark.parametrize("block", _of("python"), ids=str)
def test_python_examples_execute(block: Block) -> None:
    exec(compile(block.text, str(block), "exec"), {})


@pytest.mark.parametrize("block", _of("startup"), ids=str)
def test_startup_example_upgrades_the_example_project(
    block: Block, tmp_path: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = copy_example(tmp_path, _sqlite(tmp_path / "db.sqlite3"), monkeypatch)
    monkeypatch.setenv("DM_DATABASE_URL", project.db.url)
    namespace: dict[str, Any] = {}
    exec(compile(block.text, str(block), "exec"), namespace)
    asyncio.run(namespace["on_startup"]())
    assert project.db.tracker()[-1].revision == EXAMPLE_HEAD
