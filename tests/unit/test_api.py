"""The programmatic API (``import dm``), on SQLite and PostgreSQL: the same commands as the
CLI, awaited from an application's event loop or called from synchronous code."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

import dm
from conftest import Project
from dm.core.errors import LockTimeout
from dm.core.errors import RevisionFailed
from dm.core.errors import UnknownTarget
from dm.core.errors import UsageError
from dm.engine.execution import tracker_for
from dm.engine.lock import migration_lock
from dm.engine.tracker import Status

CREATE_T = "await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))"
INSERT_T = "await session.execute(sa.text('INSERT INTO t VALUES (1)'))"
DEV_ONLY = 'environments = ("development",)\n'


@pytest.fixture
def env_project(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    """The project, with its database in DM_DATABASE_URL as an application would set it."""
    monkeypatch.setenv("DM_DATABASE_URL", project.db.url)
    return project


def statuses(project: Project) -> list[tuple[str, str]]:
    return [(r.revision, r.status) for r in project.db.tracker()]


def test_await_upgrade_current_status_in_a_running_loop(env_project: Project) -> None:
    project = env_project
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, verify="return True")

    async def startup() -> None:
        planned = await dm.upgrade("heads", config=project.config, dry_run=True)
        assert [p.revision for p in planned.planned] == ["a1", "b2"] and planned.dry_run
        result = await dm.upgrade("heads", config=str(project.config))
        assert [(s.revision, s.status) for s in result.steps] == [
            ("a1", Status.SUCCESS),
            ("b2", Status.SUCCESS),
        ]
        assert (await dm.current(config=project.config)).heads == ["b2"]
        rows = await dm.status(config=project.config)
        assert [(r.revision, r.status, r.applied) for r in rows] == [
            ("a1", "success", True),
            ("b2", "success", True),
        ]
        assert (await dm.check(config=project.config)).ok
        assert (await dm.verify(config=project.config)).ok
        again = await dm.upgrade(config=project.config)
        assert again.nothing_to_do

    asyncio.run(startup())
    assert statuses(project) == [("a1", "success"), ("b2", "success")]


def test_settings_object_instead_of_a_config_path(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    settings = project.settings()
    result = dm.upgrade_sync(settings=settings)
    assert [s.revision for s in result.steps] == ["a1"]
    assert dm.downgrade_sync("base", settings=settings).steps[0].status is Status.ROLLED_BACK
    assert statuses(project) == [("a1", "success"), ("a1", "rolled_back")]
    with pytest.raises(UsageError, match="either config= or settings="):
        dm.upgrade_sync(config=project.config, settings=settings)


def test_sync_wrappers_work_outside_and_inside_a_running_loop(env_project: Project) -> None:
    project = env_project
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T)
    assert [s.revision for s in dm.upgrade_sync("a1", config=project.config).steps] == ["a1"]

    async def sync_call_from_async_code() -> tuple[list[str], str]:
        # e.g. a synchronous start-up hook invoked by an async framework
        result = dm.upgrade_sync(config=project.config)
        return [s.revision for s in result.steps], threading.current_thread().name

    revisions, thread = asyncio.run(sync_call_from_async_code())
    assert revisions == ["b2"] and thread == "MainThread"
    assert dm.current_sync(config=project.config).heads == ["b2"]
    assert [r.status for r in dm.status_sync(config=project.config)] == ["success", "success"]
    assert dm.check_sync(config=project.config).ok
    assert dm.verify_sync(config=project.config).ok


def test_run_and_rollback_one_revision(env_project: Project) -> None:
    project = env_project
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, downgrade="await session.execute(sa.text('DELETE FROM t'))")
    with pytest.raises(UsageError, match="not applied yet: a1"):
        dm.run_sync("b2", config=project.config)

    async def operate() -> None:
        await dm.run("a1", config=project.config)
        await dm.run("b2", config=project.config)
        assert (await dm.run("b2", config=project.config)).nothing_to_do
        forced = await dm.run("b2", config=project.config, force=True, reason="re-sync")
        assert [s.status for s in forced.steps] == [Status.SUCCESS]
        with pytest.raises(UsageError, match="depend on it: b2"):
            await dm.rollback("a1", config=project.config)
        await dm.rollback("b2", config=project.config)

    asyncio.run(operate())
    assert statuses(project) == [
        ("a1", "success"),
        ("b2", "success"),
        ("b2", "success"),
        ("b2", "rolled_back"),
    ]
    assert project.db.tracker()[2].reason == "forced: re-sync"
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 0
    assert dm.rollback_sync("a1", config=project.config).steps[0].status is Status.ROLLED_BACK


def test_environment_guard_through_the_api(
    env_project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = env_project
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, extra=DEV_ONLY)
    project.write("c3", "b2")
    result = dm.upgrade_sync(config=project.config)
    assert [(s.revision, s.status) for s in result.steps] == [
        ("a1", Status.SUCCESS),
        ("b2", Status.SKIPPED),
        ("c3", Status.SUCCESS),
    ]
    assert result.planned[1].action == "skip"
    assert "'production' not in ('development',)" in (result.planned[1].reason or "")
    assert dm.check_sync(config=project.config).ok
    monkeypatch.setenv("DM_ENVIRONMENT", "development")
    assert dm.check_sync(config=project.config).pending == ["b2"]
    again = dm.upgrade_sync(config=project.config)
    assert [(s.revision, s.status) for s in again.steps] == [("b2", Status.SUCCESS)]
    assert project.db.query("SELECT count(*) AS n FROM t")[0].n == 1


def test_errors_are_raised_not_exited(env_project: Project) -> None:
    project = env_project
    project.write("a1", None, "raise RuntimeError('boom')")
    with pytest.raises(RevisionFailed, match="revision a1 failed: RuntimeError: boom"):
        dm.upgrade_sync(config=project.config)
    with pytest.raises(UnknownTarget):
        dm.run_sync("nope", config=project.config)
    with pytest.raises(dm.DmError):
        asyncio.run(dm.upgrade("zzz", config=project.config))
    assert statuses(project) == [("a1", "failed")]


def test_api_takes_the_migration_lock(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    settings = project.settings(lock_timeout=0)
    dm.status_sync(settings=settings)  # creates nothing
    tracker = tracker_for(settings)

    async def upgrade_while_locked() -> None:
        async with migration_lock(settings.lock_url(), tracker, 5, "dm:other-pod"):
            await dm.upgrade(settings=settings)

    with pytest.raises(LockTimeout):
        asyncio.run(upgrade_while_locked())
    assert dm.upgrade_sync(settings=settings).steps[0].status is Status.SUCCESS


@pytest.mark.process
def test_importing_dm_is_light() -> None:
    heavy = ("sqlalchemy", "alembic", "click", "pydantic")
    code = f"import sys, dm; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_dry_runs_change_nothing(env_project: Project) -> None:
    project = env_project
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, extra=DEV_ONLY)
    dm.upgrade_sync("a1", config=project.config)
    run = dm.run_sync("b2", config=project.config, dry_run=True)
    assert [(p.revision, p.direction, p.action) for p in run.planned] == [("b2", "upgrade", "skip")]
    rollback = dm.rollback_sync("a1", config=project.config, dry_run=True)
    assert [(p.revision, p.direction, p.action) for p in rollback.planned] == [
        ("a1", "downgrade", "run")
    ]
    down = dm.downgrade_sync("base", config=project.config, dry_run=True)
    assert [p.revision for p in down.planned] == ["a1"] and down.steps == []
    assert statuses(project) == [("a1", "success")]


def test_drift_verify_resolve_and_info(env_project: Project) -> None:
    project = env_project
    path = project.write(
        "a1", None, CREATE_T, verify="return (await session.scalar(sa.text('SELECT 1'))) == 1"
    )
    project.write("b2", "a1", "raise RuntimeError('needs a manual fix')")
    with pytest.raises(RevisionFailed):
        dm.upgrade_sync(config=project.config)
    path.write_text(path.read_text() + "\n# edited\n")
    modified = {r.revision: r.modified for r in dm.status_sync(config=project.config)}
    assert modified == {"a1": True, "b2": False}
    check = dm.check_sync(config=project.config)
    assert (check.ok, check.modified, check.failed) == (False, ["a1"], ["b2"])
    resolved = dm.resolve_sync(
        "b2", as_status="success", reason="fixed in psql", config=project.config
    )
    assert (resolved.status, resolved.previous_status) == ("success", "failed")
    assert dm.check_sync(config=project.config, allow_modified=True).ok
    verified = dm.verify_sync(["a1"], config=project.config)
    assert [(o.revision, o.result) for o in verified.outcomes] == [("a1", "passed")]
    info = dm.info_sync(config=project.config)
    assert (info.environment, info.lock, info.tracker_table) == (
        "production",
        "free",
        "script_run_tracker",
    )
    with pytest.raises(UsageError, match="latest attempt is success"):
        dm.resolve_sync("b2", as_status="rolled_back", reason="x", config=project.config)


def test_generator_validation_is_the_same_function(project: Project) -> None:
    from dm import verbs

    settings = project.settings()
    with pytest.raises(UsageError, match="too short"):
        verbs.revision(settings, "x1")
    info = verbs.revision(settings, "Delete test users")
    assert info.description == "Delete test users"
    with pytest.raises(UsageError, match="same slug 'delete_test_users'"):
        verbs.revision(settings, "delete  TEST users!")
    assert verbs.revision(settings, "delete test users", allow_duplicate_slug=True).revision
