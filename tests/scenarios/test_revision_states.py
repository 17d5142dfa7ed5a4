"""The effective state of a revision, as ``current``, ``status``, ``check``, ``--dry-run``
and refusals show it after each kind of attempt (the rule itself: ``test_state.py``)."""

from __future__ import annotations

import json

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok
from conftest import status_of

CREATE_T = "await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))"
# Inserts a row, then fails when the environment says so: the same file succeeds or fails.
INSERT_OR_FAIL = """
await session.execute(sa.text('INSERT INTO t VALUES (1)'))
if os.environ.get("FAIL_B2"):
    raise RuntimeError("provider unreachable")
"""
DELETE_T = "await session.execute(sa.text('DELETE FROM t'))"


def two_revisions(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_OR_FAIL, downgrade=DELETE_T, extra="import os")


def rows_in_t(project: Project) -> int:
    return int(project.db.query("SELECT count(*) AS n FROM t")[0].n)


def current_heads(project: Project) -> list[str]:
    return list(as_json(invoke(project, "current", "--json"))["heads"])


def planned(project: Project, *args: str) -> list[str]:
    return [
        step["revision"]
        for step in as_json(invoke(project, *args, "--dry-run", "--json"))["planned"]
    ]


def test_failed_forced_rerun_leaves_the_revision_applied(project: Project) -> None:
    two_revisions(project)
    ok(invoke(project, "upgrade", "heads"))

    forced = invoke(project, "run", "b2", "--force", "--reason", "re-sync", FAIL_B2="1")
    assert forced.exit_code == 1
    assert rows_in_t(project) == 1  # the re-run rolled back; the first run's row is there

    b2 = status_of(project)["b2"]
    assert (b2["state"], b2["status"], b2["applied"]) == ("applied", "failed", True)
    assert b2["reason"] == "forced: re-sync"  # kept with the attempt itself
    assert "RuntimeError: provider unreachable" in b2["error"]
    assert current_heads(project) == ["b2"]
    assert ok(invoke(project, "check")).stdout.startswith("ok")
    assert planned(project, "upgrade", "heads") == []
    assert "nothing to" in ok(invoke(project, "run", "b2")).stdout
    assert planned(project, "downgrade", "a1") == ["b2"]  # still applied: it can be undone


def test_failed_first_run_is_failed_and_planned_again(project: Project) -> None:
    two_revisions(project)
    assert invoke(project, "upgrade", "heads", FAIL_B2="1").exit_code == 1

    b2 = status_of(project)["b2"]
    assert (b2["state"], b2["status"], b2["applied"]) == ("failed", "failed", False)
    assert current_heads(project) == ["a1"]
    check = invoke(project, "check", "--json")
    assert check.exit_code == 4 and json.loads(check.stdout)["failed"] == ["b2"]
    assert planned(project, "upgrade", "heads") == ["b2"]
    assert planned(project, "downgrade", "base") == ["a1"]  # nothing of b2 to undo


def test_failed_downgrade_leaves_the_revision_applied(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", "pass", downgrade="raise RuntimeError('cannot undo')")
    ok(invoke(project, "upgrade", "heads"))
    assert invoke(project, "downgrade", "a1").exit_code == 1

    b2 = status_of(project)["b2"]
    assert (b2["state"], b2["status"], b2["direction"]) == ("applied", "failed", "downgrade")
    assert current_heads(project) == ["b2"]
    assert ok(invoke(project, "check")).stdout.startswith("ok")
    assert planned(project, "downgrade", "a1") == ["b2"]  # the downgrade is retried


def test_rolled_back_then_failed_is_failed(project: Project) -> None:
    two_revisions(project)
    ok(invoke(project, "upgrade", "heads"))
    ok(invoke(project, "downgrade", "a1"))
    assert status_of(project)["b2"]["state"] == "rolled_back"
    assert invoke(project, "upgrade", "heads", FAIL_B2="1").exit_code == 1

    assert status_of(project)["b2"]["state"] == "failed"
    assert current_heads(project) == ["a1"]
    assert planned(project, "upgrade", "heads") == ["b2"]


PARTIAL = """
from dm import batched

transactional = False
t = sa.table("t", sa.column("x"))
"""
BATCHES = """
n = 0
async for batch in batched(session, sa.select(t.c.x), key=t.c.x, size=2):
    n += 1
    if n == 3 and os.environ.get("FAIL_C3"):
        raise RuntimeError("stopped mid-way")
"""


def test_failed_batched_attempt_with_committed_batches_is_partial(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write(
        "b2", "a1", "await session.execute(sa.text('INSERT INTO t VALUES (1),(2),(3),(4),(5)'))"
    )
    project.write("c3", "b2", BATCHES, extra="import os\n" + PARTIAL)
    assert invoke(project, "upgrade", "heads", FAIL_C3="1").exit_code == 1

    c3 = status_of(project)["c3"]
    assert (c3["state"], c3["status"], c3["applied"]) == ("partial", "failed", False)
    assert c3["checkpoint"]["rows_done"] == 4
    assert "partial" in ok(invoke(project, "status")).stdout
    check = invoke(project, "check", "--json")
    assert check.exit_code == 4 and json.loads(check.stdout)["failed"] == ["c3"]
    assert current_heads(project) == ["b2"]
    assert planned(project, "upgrade", "heads") == ["c3"]  # resumed by the next run

    ok(invoke(project, "upgrade", "heads"))
    assert status_of(project)["c3"]["state"] == "applied"


def test_skipped_revision_blocks_rolling_back_its_parent_as_skipped_not_applied(
    project: Project,
) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", "pass", extra='environments = ("development",)')
    ok(invoke(project, "upgrade", "heads"))
    assert status_of(project)["b2"]["state"] == "skipped"

    refused = invoke(project, "rollback", "a1")
    assert refused.exit_code == 2
    assert "skipped revisions come after it: b2" in refused.stderr
    assert "applied revisions depend" not in refused.stderr


RAW_END = """
await session.execute(sa.text('INSERT INTO t VALUES (1)'))
await session.execute(sa.text('{statement}'))
await session.execute(sa.text('INSERT INTO t VALUES (2)'))
"""


def test_raw_commit_in_a_transactional_revision_commits_and_goes_on(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", RAW_END.format(statement="COMMIT"))
    result = ok(invoke(project, "upgrade", "heads"))

    assert "was not atomic" in result.stderr
    assert status_of(project)["b2"]["state"] == "applied"
    assert rows_in_t(project) == 2


def test_raw_commit_as_a_transactional_revisions_last_statement_leaves_it_applied(
    project: Project,
) -> None:
    project.write("a1", None, CREATE_T)
    project.write(
        "b2",
        "a1",
        "await session.execute(sa.text('INSERT INTO t VALUES (1)'))\n"
        "await session.execute(sa.text('COMMIT'))",
    )
    result = ok(invoke(project, "upgrade", "heads"))

    assert "was not atomic" in result.stderr
    assert status_of(project)["b2"]["state"] == "applied"
    assert rows_in_t(project) == 1


DRIVER_COMMIT = """
await session.execute(sa.text('INSERT INTO t VALUES (1)'))
raw = await (await session.connection()).get_raw_connection()
driver = raw.driver_connection
await (driver.commit() if hasattr(driver, "commit") else driver.execute("COMMIT"))
"""


def test_commit_on_the_drivers_own_connection_fails_a_transactional_revision(
    project: Project,
) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", DRIVER_COMMIT)
    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("dm: error:")]
    assert len(error) == 1 and "ended dm's transaction itself" in error[0]
    b2 = status_of(project)["b2"]
    assert (b2["state"], b2["status"]) == ("failed", "failed")
    assert "ended dm's transaction itself" in b2["error"]


def test_raw_rollback_in_a_transactional_revision_fails_it_and_commits_nothing(
    project: Project,
) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", RAW_END.format(statement="ROLLBACK"))
    result = invoke(project, "upgrade", "heads")

    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("dm: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr
    assert "ended dm's transaction itself (a ROLLBACK statement" in error[0]
    b2 = status_of(project)["b2"]
    assert (b2["state"], b2["status"]) == ("failed", "failed")
    assert "ended dm's transaction itself" in b2["error"]
    # The ROLLBACK undid the first row, and dm's rollback the second: nothing committed
    # on its own after it.
    assert rows_in_t(project) == 0


def test_rows_of_a_deleted_revision_are_settled_with_resolve(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    b2 = project.write("b2", "a1", "raise RuntimeError('boom')")
    c3 = project.write("c3", "a1", "pass")  # a second branch, applied
    assert invoke(project, "upgrade", "heads").exit_code == 1
    ok(invoke(project, "upgrade", "c3"))
    b2.unlink()
    c3.unlink()
    check = invoke(project, "check", "--json")
    assert check.exit_code == 4
    assert (json.loads(check.stdout)["failed"], json.loads(check.stdout)["missing"]) == (
        ["b2"],
        ["c3"],
    )

    for rev in ("b2", "c3"):
        resolved = invoke(project, "resolve", rev, "--as", "rolled_back", "--reason", "removed")
        assert resolved.exit_code == 0, resolved.stderr

    assert ok(invoke(project, "check")).stdout.startswith("ok")
    last = {row.revision: row for row in project.db.tracker()}
    for rev in ("b2", "c3"):
        assert (last[rev].status, last[rev].direction) == ("rolled_back", "downgrade")
        assert last[rev].reason == "resolved by hand: removed (file missing)"
        assert last[rev].run_by
    unknown = invoke(project, "resolve", "zz99", "--as", "rolled_back", "--reason", "x")
    assert unknown.exit_code == 2 and "zz99" in unknown.stderr


def test_a_stamped_revision_edited_afterwards_is_flagged_modified(project: Project) -> None:
    path = project.write("a1", None, "pass")
    ok(invoke(project, "stamp", "a1"))
    assert status_of(project)["a1"]["modified"] is False
    path.write_text(path.read_text() + "\n# edited after it was stamped\n")
    assert status_of(project)["a1"]["modified"] is True
    check = invoke(project, "check", "--json")
    assert check.exit_code == 4 and json.loads(check.stdout)["modified"] == ["a1"]
