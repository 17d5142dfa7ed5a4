"""Accepting an edit of an applied revision (dm repair), and settling a revision whose file
is gone: dm check and dm status say which command does it."""

from __future__ import annotations

import pytest

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok
from conftest import status_of

INSERT = "await session.execute(sa.text(\"INSERT INTO ran (rev) VALUES ('a1b2c3d4e5f6')\"))"


@pytest.fixture
def applied(project: Project) -> Project:
    create = "await session.execute(sa.text('CREATE TABLE ran (rev TEXT)'))"
    project.write("000000000000", None, create)
    project.write("a1b2c3d4e5f6", "000000000000", INSERT)
    ok(invoke(project, "upgrade"))
    return project


def runs(project: Project) -> int:
    return len(project.db.query("SELECT rev FROM ran"))


def test_repair_accepts_a_cosmetic_edit_without_running_it(applied: Project) -> None:
    path = applied.versions / "a1b2c3d4e5f6_a1b2c3d4e5f6.py"
    path.write_text(path.read_text() + "\n# a comment fixed after the deploy\n")
    check = invoke(applied, "check")
    assert check.exit_code == 4
    assert "modified since applied: a1b2c3d4e5f6" in check.stdout
    assert 'dm repair a1b2c3d4e5f6 --reason "..."' in check.stdout  # the way out, named

    result = ok(invoke(applied, "repair", "a1b", "--reason", "comment only"))
    assert result.stdout.startswith("a1b2c3d4e5f6: edit accepted (checksum ")
    assert "nothing was run" in result.stdout
    assert runs(applied) == 1  # upgrade() did not run again
    ok(invoke(applied, "check"))
    last = applied.db.tracker()[-1]
    assert (last.revision, last.status) == ("a1b2c3d4e5f6", "success")
    assert last.reason == "repaired: file edit accepted without running it: comment only"
    assert status_of(applied)["a1b2c3d4e5f6"]["state"] == "applied"

    again = invoke(applied, "repair", "a1b2c3d4e5f6", "--reason", "again")
    assert again.exit_code == 2 and "nothing to repair" in again.stderr
    assert len(applied.db.tracker()) == 3


def test_repair_refuses_a_revision_that_is_not_applied(project: Project) -> None:
    project.write("000000000000", None)
    result = invoke(project, "repair", "000000000000", "--reason", "x")
    assert result.exit_code == 2
    assert "cannot repair 000000000000: it is not_run, not applied" in result.stderr
    assert project.db.tracker() == []


def test_a_failed_revision_whose_file_is_gone_says_how_to_settle_it(project: Project) -> None:
    path = project.write("a1b2c3d4e5f6", None, "raise RuntimeError('boom')")
    assert invoke(project, "upgrade").exit_code == 1
    path.unlink()
    rows = ok(invoke(project, "status")).stdout
    assert "(file missing)" in rows
    assert 'dm resolve a1b2c3d4e5f6 --as rolled_back --reason "file removed"' in rows
    # A partial id names it, as it does a revision whose file exists.
    ok(invoke(project, "resolve", "a1b2", "--as", "rolled_back", "--reason", "file removed"))
    (row,) = as_json(invoke(project, "status", "--json"))
    assert row["state"] == "rolled_back"
    assert "dm resolve" not in ok(invoke(project, "status")).stdout  # settled
    ok(invoke(project, "check"))
