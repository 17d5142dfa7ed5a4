"""Alembic's guard rails for the revision graph: ``dm revision`` says when it makes a second
head, and ``dm check --offline`` checks the revision files and the graph without a database
(for a pre-commit hook or a CI job)."""

from __future__ import annotations

import json

import pytest

from conftest import Project
from conftest import run_in_process

pytestmark = pytest.mark.parametrize("db", ["sqlite"], indirect=True)

# A PostgreSQL URL nothing listens on: a command that tried to connect would fail.
NO_DATABASE = {"DM_DATABASE_URL": "postgresql://app@127.0.0.1:9/nowhere"}


def branches(project: Project) -> None:
    project.write("root0001", None)
    project.write("left0001", "root0001")
    project.write("righ0001", "root0001")


def test_check_offline_passes_with_one_head_and_no_database(project: Project) -> None:
    project.write("a1", None)
    project.write("b2", "a1")
    ran = run_in_process(project, "check", "--offline", env=NO_DATABASE)
    assert ran.returncode == 0
    assert ran.stdout == "ok: 2 revisions load, one head b2 (no database used)\n"
    assert not (project.root / "dm.sqlite3").exists()


def test_check_offline_fails_on_several_heads_unless_allowed(project: Project) -> None:
    branches(project)
    ran = run_in_process(project, "check", "--offline", env=NO_DATABASE)
    assert ran.returncode == 4
    assert ran.stdout.startswith("error: 2 heads (left0001, righ0001) in 3 revisions; ")
    assert "dm merge heads" in ran.stdout
    allowed = run_in_process(
        project, "check", "--offline", "--allow-multiple-heads", "--json", env=NO_DATABASE
    )
    assert allowed.returncode == 0
    assert json.loads(allowed.stdout) == {
        "ok": True,
        "revisions": 3,
        "heads": ["left0001", "righ0001"],
    }


def test_check_offline_names_a_bad_revision_file(project: Project) -> None:
    project.write("a1", None)
    project.write("b2", "nosuch99")
    ran = run_in_process(project, "check", "--offline", env=NO_DATABASE)
    assert ran.returncode == 2
    [line] = ran.stderr.splitlines()
    assert line.startswith("dm: error: ") and "nosuch99" in line, ran.stderr
    (project.versions / "c3_c3.py").write_text("revision = 'c3'\ndown_revision = 'b2'\ndef (\n")
    ran = run_in_process(project, "check", "--offline", env=NO_DATABASE)
    assert ran.returncode == 2
    assert "c3_c3.py" in ran.stderr and "Traceback" not in ran.stderr


def test_check_offline_refuses_database_options(project: Project) -> None:
    for extra in (["--wait"], ["--allow-modified"]):
        ran = run_in_process(project, "check", "--offline", *extra)
        assert ran.returncode == 2
        assert "--offline reads no database" in ran.stderr
    ran = run_in_process(project, "check", "--allow-multiple-heads")
    assert (ran.returncode, "--allow-multiple-heads goes with --offline" in ran.stderr) == (2, True)


def test_revision_that_makes_a_second_head_says_so(project: Project) -> None:
    project.write("a1", None)
    first = run_in_process(project, "revision", "-m", "same branch", "--rev-id", "b2")
    assert first.returncode == 0 and "new head" not in first.stderr
    second = run_in_process(
        project, "revision", "-m", "another branch", "--rev-id", "c3", "--head", "base"
    )
    assert second.returncode == 0, second.stderr
    assert "revision c3 makes a new head: the graph now has 2 heads (b2, c3)" in second.stderr
    assert len(second.stderr.splitlines()) == 1
    assert list(project.versions.glob("*another_branch*.py"))  # created all the same
    assert run_in_process(project, "check", "--offline").returncode == 4
