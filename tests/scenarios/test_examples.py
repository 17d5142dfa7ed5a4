"""The example project's scripts (ported from the old framework), on SQLite and PostgreSQL:
the environment-guarded test-user cleanup, the plan catalogue sync and its rollback, and the
resumable batched backfill of display names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dm
from conftest import Database
from conftest import Project
from conftest import copy_example
from conftest import invoke
from conftest import ok
from dm.core.errors import IrreversiblePlan
from dm.engine.tracker import Status

SYNC, USERS, CLEANUP = "4e8d2a6c1f93", "7a1c5e9b3d20", "9f3b7d2e5a61"
BACKFILL = "94fea9b2a5d5"
GUARD = "environment 'production' not in ('development', 'staging')"


@pytest.fixture
def example(tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A copy of the repository's example project, on each database."""
    for name in ("DM_DATABASE_URL", "DATABASE_URL", "DM_CONFIG", "DM_ENVIRONMENT", "ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    return copy_example(tmp_path, db, monkeypatch)


def users(project: Project) -> list[str]:
    return [r.email for r in project.db.query("SELECT email FROM users ORDER BY id")]


def display_names(project: Project) -> dict[str, str | None]:
    rows = project.db.query("SELECT email, display_name FROM users ORDER BY id")
    return {r.email: r.display_name for r in rows}


def has_display_name_column(project: Project) -> bool:
    if project.db.kind == "sqlite":
        return any(r.name == "display_name" for r in project.db.query("PRAGMA table_info(users)"))
    found = project.db.query(
        "SELECT 1 FROM information_schema.columns"
        " WHERE table_name = 'users' AND column_name = 'display_name'"
    )
    return bool(found)


def plans(project: Project) -> dict[str, tuple[int, bool]]:
    rows = project.db.query("SELECT code, monthly_price_cents, active FROM plans")
    return {r.code: (r.monthly_price_cents, bool(r.active)) for r in rows}


def test_production_upgrade_syncs_plans_and_skips_the_test_user_cleanup(example: Project) -> None:
    result = ok(invoke(example, "upgrade"))
    assert f"skipped {CLEANUP}: {GUARD}" in result.stdout
    cleanup, backfill = example.db.tracker()[-2:]
    assert (cleanup.revision, cleanup.status, cleanup.reason) == (CLEANUP, "skipped", GUARD)
    assert (backfill.revision, backfill.status) == (BACKFILL, "success")
    assert display_names(example) == {  # nothing deleted in production; every name filled
        "alice@example.com": "alice",
        "bob@example.com": "bob",
        "qa-1@test.example": "qa-1",
        "qa-2@test.example": "qa-2",
    }
    assert plans(example) == {
        "free": (0, True),
        "pro": (1900, True),
        "team": (4900, False),  # no longer offered by the provider: kept, inactive
        "business": (9900, True),
    }
    verify = json.loads(ok(invoke(example, "verify", "--json")).stdout)
    assert verify["ok"] and len(verify["outcomes"]) == 6
    ok(invoke(example, "check"))
    history = ok(invoke(example, "list")).stdout
    assert f"{USERS} -> {CLEANUP}, Delete test users (development and staging only)" in history
    assert (
        f"{CLEANUP} -> {BACKFILL} (head), Backfill users' display names from their e-mail"
        in history
    )


def test_the_cleanup_runs_when_the_database_is_used_in_staging(example: Project) -> None:
    ok(invoke(example, "upgrade"))
    result = ok(invoke(example, "upgrade", DM_ENVIRONMENT="staging"))
    assert "upgrade: 1 revision(s) done" in result.stdout
    assert display_names(example) == {"alice@example.com": "alice", "bob@example.com": "bob"}
    assert [
        (o["revision"], o["result"])
        for o in json.loads(ok(invoke(example, "verify", CLEANUP, "--json")).stdout)["outcomes"]
    ] == [(CLEANUP, "passed")]
    # irreversible: in staging, going below it is refused and names the file
    refused = invoke(example, "downgrade", USERS, DM_ENVIRONMENT="staging")
    assert refused.exit_code == 2 and "no downgrade() in 9f3b7d2e5a61" in refused.stderr


def test_plan_sync_rolls_back_to_the_previous_catalogue(
    example: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok(invoke(example, "upgrade"))
    monkeypatch.setenv("DM_DATABASE_URL", example.db.url)
    refused = invoke(example, "rollback", SYNC)
    assert refused.exit_code == 2
    assert f"applied revisions depend on it: {BACKFILL}, {USERS}" in refused.stderr
    assert f"skipped revisions come after it: {CLEANUP}" in refused.stderr
    # The skipped cleanup needs no downgrade(): nothing ran, nothing to undo.
    result = dm.downgrade_sync("d27b95f3e6a4", config=example.config)
    assert [(s.revision, s.status) for s in result.steps] == [
        (BACKFILL, Status.ROLLED_BACK),
        (CLEANUP, Status.ROLLED_BACK),
        (USERS, Status.ROLLED_BACK),
        (SYNC, Status.ROLLED_BACK),
    ]
    assert plans(example) == {"free": (0, True), "pro": (1900, True), "team": (4900, True)}
    assert json.loads(invoke(example, "check", "--json").stdout)["pending"] == [
        SYNC,
        USERS,
        CLEANUP,
        BACKFILL,
    ]


def test_examples_through_the_api(example: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DM_DATABASE_URL", example.db.url)
    monkeypatch.setenv("DM_ENVIRONMENT", "development")
    result = dm.upgrade_sync(config="alembic.ini")
    assert [s.status for s in result.steps] == [Status.SUCCESS] * 7
    assert display_names(example) == {"alice@example.com": "alice", "bob@example.com": "bob"}
    assert dm.verify_sync(config="alembic.ini").ok
    rolled_back = dm.rollback_sync(BACKFILL, config="alembic.ini")
    assert [(s.revision, s.status) for s in rolled_back.steps] == [(BACKFILL, Status.ROLLED_BACK)]
    assert not has_display_name_column(example)
    with pytest.raises(IrreversiblePlan, match="no downgrade"):
        dm.rollback_sync(CLEANUP, config="alembic.ini")


def test_the_display_name_backfill_is_undone_and_redone(example: Project) -> None:
    ok(invoke(example, "upgrade"))
    assert has_display_name_column(example)
    assert display_names(example)["alice@example.com"] == "alice"
    checkpoint = example.db.tracker()[-1].checkpoint
    if isinstance(checkpoint, str):  # SQLite returns the JSON text
        checkpoint = json.loads(checkpoint)
    assert checkpoint["rows_done"] == 4 and checkpoint["finished"]  # committed per batch

    result = ok(invoke(example, "downgrade", "-1"))
    assert "downgrade: 1 revision(s) done" in result.stdout
    assert not has_display_name_column(example)
    assert len(users(example)) == 4  # only the column goes
    last = example.db.tracker()[-1]
    assert (last.revision, last.direction, last.status) == (BACKFILL, "downgrade", "rolled_back")
    check = invoke(example, "check", "--json")
    assert check.exit_code == 4 and json.loads(check.stdout)["pending"] == [BACKFILL]

    ok(invoke(example, "upgrade"))
    assert display_names(example) == {
        "alice@example.com": "alice",
        "bob@example.com": "bob",
        "qa-1@test.example": "qa-1",
        "qa-2@test.example": "qa-2",
    }
    last = example.db.tracker()[-1]
    assert (last.revision, last.direction, last.status) == (BACKFILL, "upgrade", "success")
    ok(invoke(example, "verify", BACKFILL))
    ok(invoke(example, "check"))
