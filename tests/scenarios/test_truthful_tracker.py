"""The tracker never records what did not happen (#19), on SQLite and PostgreSQL: hooks
hidden by decorators are awaited, forced runs and stamps respect environment guards, and
a backfill that does not block deploys lets the rest of the plan run."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import Result

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok
from conftest import run_dm

CREATE_T = "await session.execute(sa.text('CREATE TABLE t (x INTEGER)'))"
INSERT_T = "await session.execute(sa.text('INSERT INTO t VALUES (1)'))"
DELETE_T = "await session.execute(sa.text('DELETE FROM t'))"
DEV_ONLY = 'environments = ("development",)\n'
GUARD = "environment 'production' not in ('development',)"


def rows(project: Project) -> list[tuple[str, str, str, str | None]]:
    return [(r.revision, r.direction, r.status, r.reason) for r in project.db.tracker()]


def count_t(project: Project) -> int:
    return int(project.db.query("SELECT count(*) AS n FROM t")[0].n)


def error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dm: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def write_file(project: Project, rev: str, down: str | None, body: str) -> None:
    header = f'"""Revision {rev}"""\nimport functools\nimport sqlalchemy as sa\n'
    header += f"revision = {rev!r}\ndown_revision = {down!r}\n"
    header += "branch_labels = None\ndepends_on = None\n"
    (project.versions / f"{rev}_{rev}.py").write_text(header + textwrap.dedent(body))


# -- 1. a hook hidden by a decorator ------------------------------------------------------------

DECORATOR = """
def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def dropping(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        fn(*args, **kwargs)  # the coroutine is created and dropped
    return wrapper
"""


def test_a_decorated_async_hook_is_awaited(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    write_file(
        project,
        "b2",
        "a1",
        DECORATOR
        + f"""
@logged
async def upgrade(session):
    {INSERT_T}


@logged
async def downgrade(session):
    {DELETE_T}


@logged
async def verify(session):
    return (await session.scalar(sa.text('SELECT count(*) FROM t'))) == 1
""",
    )
    ok(invoke(project, "upgrade"))
    assert count_t(project) == 1  # the work ran, not only the record
    assert rows(project)[-1] == ("b2", "upgrade", "success", None)
    assert as_json(invoke(project, "verify", "--json"))
    ok(invoke(project, "rollback", "b2"))
    assert count_t(project) == 0
    assert rows(project)[-1] == ("b2", "downgrade", "rolled_back", None)


def test_a_coroutine_left_unawaited_fails_the_revision(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    write_file(
        project,
        "b2",
        "a1",
        DECORATOR
        + f"""
@dropping
async def upgrade(session):
    {INSERT_T}
""",
    )
    result = invoke(project, "upgrade")
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "dropped a coroutine without awaiting it" in result.stderr
    assert count_t(project) == 0
    last = project.db.tracker()[-1]
    assert (last.revision, last.status) == ("b2", "failed")
    assert "never awaited" in last.error_message


# -- 2. a forced run in an environment the guard excludes ---------------------------------------


def test_forced_run_never_records_an_applied_revision_skipped(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, downgrade=DELETE_T, extra=DEV_ONLY)
    ok(invoke(project, "upgrade", DM_ENVIRONMENT="development"))
    assert count_t(project) == 1
    before = rows(project)
    allowed = "environment 'development' in ('development',)"  # why it ran (#22)
    assert before[-1] == ("b2", "upgrade", "success", allowed)

    line = error_line(invoke(project, "run", "b2", "--force"), 2)
    assert f"cannot run b2: {GUARD}, and it is applied here" in line
    assert "--ignore-environment" in line
    assert rows(project) == before  # nothing recorded: still applied
    # So a rollback here cannot pretend there is nothing to undo: the guard refuses it.
    line = error_line(invoke(project, "rollback", "b2"), 2)
    assert f"cannot downgrade b2: {GUARD}" in line
    assert rows(project) == before and count_t(project) == 1

    # The explicit override runs it, and says so on the attempt.
    result = as_json(
        invoke(
            project, "run", "b2", "--force", "--reason", "restore", "--ignore-environment", "--json"
        )
    )
    assert [(s["revision"], s["status"]) for s in result["steps"]] == [("b2", "success")]
    assert count_t(project) == 2
    revision, direction, status, reason = rows(project)[-1]
    assert (revision, direction, status) == ("b2", "upgrade", "success")
    assert reason == (
        f"forced: restore; environment guard overridden (--ignore-environment): {GUARD}"
    )


def test_ignore_environment_runs_a_guarded_revision_and_records_why(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, extra=DEV_ONLY)
    ok(invoke(project, "run", "a1"))
    dry = ok(invoke(project, "run", "b2", "--ignore-environment", "--dry-run")).stdout
    assert "[run: environment guard overridden (--ignore-environment)" in dry
    assert count_t(project) == 0 and len(rows(project)) == 1
    ok(invoke(project, "run", "b2", "--ignore-environment"))
    assert count_t(project) == 1
    assert rows(project)[-1] == (
        "b2",
        "upgrade",
        "success",
        f"environment guard overridden (--ignore-environment): {GUARD}",
    )


# -- 3. stamp: the guard, what it records and why, --dry-run -----------------------------------

STAMPED_UP = "stamped as applied; upgrade() not run"
STAMPED_DOWN = "stamped as not applied; downgrade() not run"


def guarded_chain(project: Project) -> None:
    project.write("a1", None, CREATE_T)
    project.write("b2", "a1", INSERT_T, downgrade=DELETE_T, extra=DEV_ONLY)
    project.write("c3", "b2", "pass")


def states(project: Project) -> dict[str, str]:
    return {r["revision"]: r["state"] for r in as_json(invoke(project, "status", "--json"))}


def test_stamp_follows_the_guard_and_says_what_it_records(project: Project) -> None:
    guarded_chain(project)
    dry = ok(invoke(project, "stamp", "c3", "--dry-run")).stdout.splitlines()
    assert dry == [
        f"stamp a1: would record success ({STAMPED_UP})",
        f"stamp b2: would record skipped ({GUARD})",
        f"stamp c3: would record success ({STAMPED_UP})",
        "stamp: 2 success, 1 skipped; nothing written (dry run), target c3",
    ]
    planned = as_json(invoke(project, "stamp", "c3", "--dry-run", "--json"))["planned"]
    assert [(p["revision"], p["action"], p["records"]) for p in planned] == [
        ("a1", "record", "success"),
        ("b2", "skip", "skipped"),
        ("c3", "record", "success"),
    ]
    assert set(states(project).values()) == {"not_run"}  # the dry runs wrote nothing

    # The staging-only revision that never ran is not recorded applied in production.
    out = ok(invoke(project, "stamp", "c3")).stdout
    assert f"stamp b2: recorded skipped ({GUARD})" in out
    assert rows(project) == [
        ("a1", "upgrade", "success", "stamped"),
        ("b2", "upgrade", "skipped", f"stamped; {GUARD}"),
        ("c3", "upgrade", "success", "stamped"),
    ]
    assert states(project) == {"a1": "applied", "b2": "skipped", "c3": "applied"}

    # Stamping below the head says which way it went.
    out = ok(invoke(project, "stamp", "base")).stdout.splitlines()
    assert out == [
        f"stamp c3: recorded rolled_back ({STAMPED_DOWN})",
        "stamp b2: recorded rolled_back (its upgrade was skipped; nothing to undo)",
        f"stamp a1: recorded rolled_back ({STAMPED_DOWN})",
        "stamp: 3 rolled_back; done, target base",
    ]
    assert set(states(project).values()) == {"rolled_back"}


def test_stamp_refuses_what_the_guard_refuses_unless_overridden(project: Project) -> None:
    guarded_chain(project)
    ok(invoke(project, "upgrade", DM_ENVIRONMENT="development"))
    before = rows(project)
    line = error_line(invoke(project, "stamp", "a1"), 2)
    assert f"cannot stamp b2 as not applied: {GUARD}" in line and "--ignore-environment" in line
    assert rows(project) == before  # all or nothing: c3 was not recorded either

    out = ok(invoke(project, "stamp", "a1", "--ignore-environment")).stdout
    overridden = f"environment guard overridden (--ignore-environment): {GUARD}"
    assert f"stamp b2: recorded rolled_back ({overridden})" in out
    assert rows(project)[-2:] == [
        ("c3", "downgrade", "rolled_back", "stamped"),
        ("b2", "downgrade", "rolled_back", f"stamped; {overridden}"),
    ]
    ok(invoke(project, "stamp", "c3", "--ignore-environment"))
    assert rows(project)[-2][:3] == ("b2", "upgrade", "success")
    assert states(project) == {"a1": "applied", "b2": "applied", "c3": "applied"}
    assert count_t(project) == 1  # stamps ran no hook


# -- 4. a backfill that does not block the deploy ----------------------------------------------

BACKFILL = "d0d0d0000001"
AFTER = "d0d0d0000002"
FINAL = "d0d0d0000003"
ROWS = 60

BACKFILL_LOOP = """
async for batch in batched(session, sa.select(items.c.id), key=items.c.id, size=5):
    await session.execute(items.update().where(batch.where()).values(n=items.c.n + 1))
    await asyncio.sleep(0.1)
"""
BACKFILL_ATTRIBUTES = """
import asyncio
from dm import batched

transactional = False
blocks_deploy = False
max_runtime = 0.3  # 12 batches of at least 0.1s: every attempt stops part-way
items = sa.table("items", sa.column("id"), sa.column("n"))
"""


def backfill_project(project: Project) -> None:
    """``BACKFILL`` (deferrable, time-boxed per attempt), then ``AFTER``, which needs only
    the backfill's schema, not its data."""
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
    project.db.query("CREATE TABLE ran (rev VARCHAR(20))")
    values = ", ".join(f"({i}, 0)" for i in range(1, ROWS + 1))
    project.db.query(f"INSERT INTO items VALUES {values}")
    project.write(BACKFILL, None, BACKFILL_LOOP, extra=BACKFILL_ATTRIBUTES)
    project.write(
        AFTER, BACKFILL, f"await session.execute(sa.text(\"INSERT INTO ran VALUES ('{AFTER}')\"))"
    )


def insert_ran(rev: str) -> str:
    return f"await session.execute(sa.text(\"INSERT INTO ran VALUES ('{rev}')\"))"


def ran(project: Project) -> list[str]:
    return [row.rev for row in project.db.query("SELECT rev FROM ran ORDER BY rev")]


def check_json(project: Project) -> tuple[int, dict[str, object]]:
    result = invoke(project, "check", "--json")
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.process
@pytest.mark.parametrize(
    "db",
    [
        pytest.param("sqlite", marks=pytest.mark.slow),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ],
    indirect=True,
)
def test_a_deferred_backfill_lets_the_plan_and_the_deploy_go_on(project: Project) -> None:
    backfill_project(project)
    first = run_dm(project, "upgrade")
    # The backfill stopped at its time box; the revision after it ran; the deploy may go on.
    assert first.returncode == 0, first.stderr
    assert f"deferred {BACKFILL}: stopped part-way" in first.stdout
    assert "does not block the deploy" in first.stderr
    assert ran(project) == [AFTER]
    code, found = check_json(project)
    assert (code, found["ok"], found["deferred"], found["pending"]) == (0, True, [BACKFILL], [])
    assert states(project) == {BACKFILL: "incomplete", AFTER: "applied"}

    # A later deploy brings the revision that needs the backfill complete (GitLab's
    # "finalize"): it waits, and so does the deploy, while each run goes on with the backfill.
    project.write(
        FINAL,
        AFTER,
        insert_ran(FINAL),
        extra=f"requires_complete = ({BACKFILL!r},)\n",
    )
    waiting = run_dm(project, "upgrade")
    assert waiting.returncode == 5, waiting.stderr
    assert f"upgrade {FINAL} waits for {BACKFILL} to complete" in waiting.stderr
    assert ran(project) == [AFTER]
    code, found = check_json(project)
    assert (code, found["pending"], found["deferred"]) == (4, [FINAL], [BACKFILL])
    refused = invoke(project, "run", FINAL)
    assert refused.exit_code == 2 and f"it requires {BACKFILL} complete" in refused.stderr

    runs = [first, waiting]
    while runs[-1].returncode != 0:  # each run resumes the backfill for its time box
        assert len(runs) < 30, runs[-1].stderr
        runs.append(run_dm(project, "upgrade"))
        assert runs[-1].returncode in (0, 5), runs[-1].stderr
    assert len(runs) > 3  # the backfill took several runs
    assert ran(project) == [AFTER, FINAL]
    counts = project.db.query("SELECT n, count(*) AS c FROM items GROUP BY n")
    assert {row.n: row.c for row in counts} == {1: ROWS}  # every row once, none twice
    assert states(project) == {BACKFILL: "applied", AFTER: "applied", FINAL: "applied"}
    code, found = check_json(project)
    assert (code, found["ok"], found["deferred"]) == (0, True, [])


def test_requires_complete_must_name_an_ancestor(project: Project) -> None:
    project.write("a1", None, "pass")
    project.write("b2", None, "pass", extra="requires_complete = ('a1',)\n")
    result = invoke(project, "upgrade")
    assert result.exit_code == 2
    assert "requires_complete 'a1' names no ancestor of this revision" in result.stderr
