"""The tracker's own layout: created fresh, upgraded in place from layout 1, guarded."""

from __future__ import annotations

import json

import pytest

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok
from conftest import run_in_process
from dm.engine.tracker import SCHEMA_VERSION
from dm.engine.tracker import Tracker
from support.revisions import current_lines
from support.revisions import error_line
from support.revisions import logged
from support.revisions import logged_rev
from support.revisions import make_log
from support.revisions import rows

A, B, C = "aaaa1111", "bbbb2222", "cccc3333"

# Layout 1 (the pre-release prototype), frozen here as it was written then.
V1_TRACKER = {
    "sqlite": """
        CREATE TABLE script_run_tracker (
            id INTEGER PRIMARY KEY,
            revision VARCHAR(64) NOT NULL,
            status VARCHAR(16) NOT NULL,
            started_at DATETIME NOT NULL,
            finished_at DATETIME,
            error TEXT
        )
    """,
    "postgresql": """
        CREATE TABLE script_run_tracker (
            id SERIAL PRIMARY KEY,
            revision VARCHAR(64) NOT NULL,
            status VARCHAR(16) NOT NULL,
            started_at TIMESTAMP WITH TIME ZONE NOT NULL,
            finished_at TIMESTAMP WITH TIME ZONE,
            error TEXT
        )
    """,
}
V1_ROWS = [
    (A, "failed", "2025-01-01 10:00:00", "2025-01-01 10:00:05", "ValueError: first try"),
    (A, "success", "2025-01-01 11:00:00", "2025-01-01 11:00:02", None),
    (B, "success", "2025-01-01 11:00:03", "2025-01-01 11:00:04", None),
]


def three_revisions(project: Project) -> None:
    make_log(project)
    logged_rev(project, A, None, doc="First")
    logged_rev(project, B, A, doc="Second")
    logged_rev(project, C, B, doc="Third")


def columns(project: Project, table: str) -> set[str]:
    if project.db.kind == "postgresql":
        found = project.db.query(
            "SELECT column_name AS name FROM information_schema.columns WHERE table_name = :t",
            t=table,
        )
    else:
        found = project.db.query(f"SELECT name FROM pragma_table_info('{table}')")
    return {row.name for row in found}


def meta(project: Project) -> dict[str, str]:
    return {r.key: r.value for r in project.db.query("SELECT * FROM script_run_tracker_meta")}


@pytest.mark.matrix
def test_fresh_tracker_has_current_layout(project: Project) -> None:
    three_revisions(project)
    ok(invoke(project, "upgrade", A))
    expected = {column.name for column in Tracker().table.columns}
    assert columns(project, "script_run_tracker") == expected
    # The fence names the run that last took the lock: the one that wrote the rows.
    (run_id,) = {row.run_id for row in project.db.tracker()}
    assert meta(project) == {"schema_version": str(SCHEMA_VERSION), "fence": run_id}


@pytest.mark.matrix
def test_upgrade_from_layout_1(project: Project) -> None:
    three_revisions(project)
    project.db.query(V1_TRACKER[project.db.kind])
    for values in V1_ROWS:
        literals = ", ".join("NULL" if v is None else f"'{v}'" for v in values)
        project.db.query(
            "INSERT INTO script_run_tracker (revision, status, started_at, finished_at, error) "
            f"VALUES ({literals})"
        )

    # Read-only commands understand the old layout before anything upgrades it.
    status = {s["revision"]: s for s in as_json(invoke(project, "status", "--json"))}
    assert (status[A]["status"], status[A]["attempts"]) == ("success", 2)
    assert status[B]["status"] == "success"
    assert status[C]["status"] is None
    check = invoke(project, "check", "--json")
    assert check.exit_code == 4
    assert json.loads(check.stdout)["pending"] == [C]
    assert current_lines(project) == [B]
    plan = ok(invoke(project, "upgrade", "heads", "--dry-run")).stdout
    assert plan.splitlines() == [f"upgrade {C}  Third"]
    assert columns(project, "script_run_tracker") == {
        "id",
        "revision",
        "status",
        "started_at",
        "finished_at",
        "error",
    }

    ok(invoke(project, "upgrade", "heads"))

    assert logged(project) == [C]  # aaaa1111 and bbbb2222 were not run again
    assert rows(project) == [
        (A, "upgrade", "failed", 1),
        (A, "upgrade", "success", 2),
        (B, "upgrade", "success", 1),
        (C, "upgrade", "success", 1),
    ]
    tracker = project.db.tracker()
    assert tracker[0].error_message == "ValueError: first try"
    assert [r.error_message for r in tracker[1:]] == [None, None, None]
    assert [r.run_id for r in tracker[:3]] == ["pre-v2"] * 3
    assert tracker[3].run_id not in (None, "pre-v2")
    assert tracker[3].description == "Third"
    assert "error" not in columns(project, "script_run_tracker")
    assert {column.name for column in Tracker().table.columns} <= columns(
        project, "script_run_tracker"
    )
    assert meta(project)["schema_version"] == str(SCHEMA_VERSION)
    assert current_lines(project) == [f"{C} (head)"]

    # The upgraded tracker keeps working: a second run changes nothing, then a downgrade.
    assert "nothing to upgrade" in ok(invoke(project, "upgrade", "heads")).stdout
    assert meta(project)["schema_version"] == str(SCHEMA_VERSION)
    ok(invoke(project, "downgrade", "-1"))
    assert logged(project) == []
    assert rows(project)[-1] == (C, "downgrade", "rolled_back", 2)
    ok(invoke(project, "downgrade", A))
    assert rows(project)[-1] == (B, "downgrade", "rolled_back", 2)


def test_upgrade_from_layout_2(project: Project) -> None:
    """A tracker written by the dm before requests existed (layout 2, no request columns)
    is read as it is, and upgraded in place by the next run that takes the lock."""
    three_revisions(project)
    ok(invoke(project, "upgrade", A))
    for column in ("request", "request_by", "request_reason"):
        project.db.query(f"ALTER TABLE script_run_tracker DROP COLUMN {column}")
    project.db.query("UPDATE script_run_tracker_meta SET value = '2' WHERE key = 'schema_version'")

    status = {s["revision"]: s for s in as_json(invoke(project, "status", "--json"))}
    assert (status[A]["state"], status[A]["request"]) == ("applied", None)
    assert json.loads(invoke(project, "check", "--json").stdout)["pending"] == [B, C]
    assert ok(invoke(project, "log", A)).stdout.count("success") == 1
    assert "request" not in columns(project, "script_run_tracker")

    ok(invoke(project, "upgrade", "heads"))
    assert meta(project)["schema_version"] == str(SCHEMA_VERSION)
    assert {"request", "request_by", "request_reason"} <= columns(project, "script_run_tracker")
    assert rows(project) == [
        (A, "upgrade", "success", 1),
        (B, "upgrade", "success", 1),
        (C, "upgrade", "success", 1),
    ]
    assert logged(project) == [A, B, C]


def test_upgrade_from_layout_3(project: Project) -> None:
    """A tracker written before the environment's source and the database user were
    recorded (layout 3) is read as it is, and gains both columns at the next locked run."""
    three_revisions(project)
    ok(invoke(project, "upgrade", A))
    for column in ("environment_source", "db_user"):
        project.db.query(f"ALTER TABLE script_run_tracker DROP COLUMN {column}")
    project.db.query("UPDATE script_run_tracker_meta SET value = '3' WHERE key = 'schema_version'")

    assert json.loads(invoke(project, "check", "--json").stdout)["pending"] == [B, C]
    assert ok(invoke(project, "log", A)).stdout.count("success") == 1
    assert "db_user" not in columns(project, "script_run_tracker")

    ok(invoke(project, "upgrade", "heads", DM_ENVIRONMENT="staging"))
    assert meta(project)["schema_version"] == str(SCHEMA_VERSION)
    found = project.db.tracker()
    assert [(row.environment_source, row.environment) for row in found] == [
        (None, "production"),
        ("DM_ENVIRONMENT", "staging"),
        ("DM_ENVIRONMENT", "staging"),
    ]
    assert logged(project) == [A, B, C]


def test_newer_layout_is_refused(project: Project) -> None:
    three_revisions(project)
    ok(invoke(project, "upgrade", A))
    project.db.query("UPDATE script_run_tracker_meta SET value = '99'")
    line = error_line(invoke(project, "upgrade", "heads"))
    assert "layout 99" in line and "upgrade dm" in line
    assert logged(project) == [A]
    assert len(project.db.tracker()) == 1


def test_pending_row_of_a_dead_run_is_marked_failed(project: Project) -> None:
    three_revisions(project)
    ok(invoke(project, "upgrade", A))
    project.db.query(
        "INSERT INTO script_run_tracker (run_id, revision, direction, status, attempt, "
        "started_at) VALUES ('dead-run', :rev, 'upgrade', 'pending', 1, CURRENT_TIMESTAMP)",
        rev=B,
    )
    result = ok(invoke(project, "upgrade", "heads"))
    assert "died" in result.stderr
    assert logged(project) == [A, B, C]
    assert rows(project) == [
        (A, "upgrade", "success", 1),
        (B, "upgrade", "failed", 1),
        (B, "upgrade", "success", 2),
        (C, "upgrade", "success", 1),
    ]
    dead = project.db.tracker()[1]
    assert dead.reason == "interrupted"
    assert "interrupted" in dead.error_message
    assert dead.finished_at is not None


@pytest.mark.matrix
def test_custom_tracker_table(project: Project) -> None:
    table = "dm_runs"
    three_revisions(project)
    ok(invoke(project, "upgrade", "heads", DM_TRACKER_TABLE=table))
    assert [r.revision for r in project.db.tracker(table)] == [A, B, C]
    assert project.db.query(f"SELECT value FROM {table}_meta")[0].value == str(SCHEMA_VERSION)
    assert current_lines(project) == []  # the default table was never created
    assert as_json(invoke(project, "current", "--json", DM_TRACKER_TABLE=table)) == {"heads": [C]}


# -- a tracker changed by hand: explained, never half-repaired ---------------------------------

DAMAGE = {
    "tracker dropped": (
        "DROP TABLE script_run_tracker",
        "tracker table script_run_tracker is missing while script_run_tracker_meta exists",
    ),
    "meta dropped": (
        "DROP TABLE script_run_tracker_meta",
        "tracker table script_run_tracker_meta is missing while script_run_tracker has layout",
    ),
    "layout row deleted": (
        "DELETE FROM script_run_tracker_meta WHERE key = 'schema_version'",
        "has no valid schema_version row",
    ),
    "column dropped": (
        "ALTER TABLE script_run_tracker DROP COLUMN checksum",
        f"lacks column(s) checksum of layout {SCHEMA_VERSION}",
    ),
    "column renamed": (
        "ALTER TABLE script_run_tracker RENAME COLUMN run_by TO who",
        f"lacks column(s) run_by of layout {SCHEMA_VERSION}",
    ),
    "unknown status": (
        "UPDATE script_run_tracker SET status = 'done'",
        "unknown status 'done' in a row of revision",
    ),
}


def tables(project: Project) -> set[str]:
    if project.db.kind == "postgresql":
        found = project.db.query(
            "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'"
        )
    else:
        found = project.db.query("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row.name for row in found}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_tracker_is_explained_and_left_as_it_is(project: Project, damage: str) -> None:
    three_revisions(project)
    ok(invoke(project, "upgrade", A))
    sql, expected = DAMAGE[damage]
    project.db.query(sql)
    before = tables(project)

    for args in (("upgrade", "heads"), ("status",), ("check",), ("current",)):
        result = run_in_process(project, *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("dm: error: "), (args, result.stderr)
        assert expected in lines[0]
        assert "Traceback" not in result.stderr
    assert tables(project) == before  # nothing created or repaired behind the user's back
    assert logged(project) == [A]  # no revision ran


def test_a_damaged_tracker_rebuilt_on_purpose_as_the_message_says(project: Project) -> None:
    three_revisions(project)
    ok(invoke(project, "upgrade", B))
    project.db.query("DROP TABLE script_run_tracker")
    message = run_in_process(project, "status").stderr
    assert "drop both tables (DROP TABLE script_run_tracker, script_run_tracker_meta)" in message
    assert "dm stamp" in message

    project.db.query("DROP TABLE script_run_tracker_meta")
    ok(invoke(project, "stamp", B))
    ok(invoke(project, "upgrade", "heads"))
    assert logged(project) == [A, B, C]  # A and B ran before the rebuild, only C after it
