"""The dm command line end to end, on SQLite and PostgreSQL.

Revisions here record their work in the ``log_entries`` table (created by the test, not by
a revision), so every test can check exactly which hooks ran and which writes survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from conftest import PG_HOST
from conftest import PG_PORT
from conftest import Database
from conftest import Project
from conftest import as_json
from conftest import cli_runner
from conftest import invoke
from conftest import ok
from conftest import pg_user
from conftest import run_dm
from conftest import status_of
from dm.cli import main
from support.revisions import BAD_REVISION_FILES
from support.revisions import BadFiles
from support.revisions import current_lines
from support.revisions import error_line
from support.revisions import insert_log
from support.revisions import logged
from support.revisions import logged_rev
from support.revisions import make_log
from support.revisions import rows
from support.revisions import write_bad_files

A, B, C = "aaaa1111", "bbbb2222", "cccc3333"
ALEMBIC = Path(sys.executable).parent / "alembic"
SQLITE_ONLY = pytest.mark.parametrize("db", ["sqlite"], indirect=True)


@pytest.fixture(autouse=True)
def _no_bytecode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Revision files are rewritten within one second; never reuse their cached bytecode."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


# -- helpers ----------------------------------------------------------------------------


def chain(project: Project, *, middle_reversible: bool = True) -> None:
    """The log table and the chain aaaa1111 -> bbbb2222 -> cccc3333."""
    make_log(project)
    logged_rev(project, A, None, doc="Create the first thing")
    logged_rev(project, B, A, reversible=middle_reversible, doc="Second step")
    logged_rev(project, C, B, doc="Third step")


def table_exists(db: Database, name: str) -> bool:
    if db.kind == "postgresql":
        return db.query("SELECT to_regclass(:n) AS reg", n=name)[0].reg is not None
    return bool(db.query("SELECT name FROM sqlite_master WHERE name = :n", n=name))


def test_chain_up_and_down(project: Project) -> None:
    chain(project)

    result = ok(invoke(project, "upgrade", "aaaa"))  # partial id
    assert "upgrade: 1 revision(s) done" in result.stdout
    assert logged(project) == [A]
    assert current_lines(project) == [A]

    ok(invoke(project, "upgrade", "+1"))
    assert logged(project) == [A, B]
    assert current_lines(project) == [B]

    ok(invoke(project, "upgrade", "heads"))
    assert logged(project) == [A, B, C]
    assert current_lines(project) == [f"{C} (head)"]
    again = ok(invoke(project, "upgrade", "heads"))
    assert "nothing to upgrade" in again.stdout

    ok(invoke(project, "downgrade", "-1"))
    assert logged(project) == [A, B]
    assert current_lines(project) == [B]

    ok(invoke(project, "downgrade", "base"))
    assert logged(project) == []
    empty = ok(invoke(project, "current"))
    assert empty.stdout == ""
    assert "(nothing applied)" in empty.stderr
    assert as_json(invoke(project, "current", "--json")) == {"heads": []}

    ok(invoke(project, "upgrade", B))  # full id
    assert logged(project) == [A, B]
    ok(invoke(project, "upgrade", "cccc"))
    assert as_json(invoke(project, "current", "--json")) == {"heads": [C]}

    assert rows(project) == [
        (A, "upgrade", "success", 1),
        (B, "upgrade", "success", 1),
        (C, "upgrade", "success", 1),
        (C, "downgrade", "rolled_back", 2),
        (B, "downgrade", "rolled_back", 2),
        (A, "downgrade", "rolled_back", 2),
        (A, "upgrade", "success", 3),
        (B, "upgrade", "success", 3),
        (C, "upgrade", "success", 3),
    ]
    tracker = project.db.tracker()
    assert all(r.finished_at is not None and r.error_message is None for r in tracker)
    assert [r.description for r in tracker[:3]] == [
        "Create the first thing",
        "Second step",
        "Third step",
    ]
    assert len({r.run_id for r in tracker}) == 7  # one run id per dm invocation
    assert all(r.checksum and len(r.checksum) == 64 for r in tracker)


def test_dry_run_changes_nothing(project: Project) -> None:
    chain(project)
    result = ok(invoke(project, "upgrade", "heads", "--dry-run"))
    assert result.stdout.splitlines() == [
        f"upgrade {A}  Create the first thing",
        f"upgrade {B}  Second step",
        f"upgrade {C}  Third step",
    ]
    assert logged(project) == []
    assert not table_exists(project.db, "script_run_tracker")


# -- branches, merges, labels, dependencies --------------------------------------------------


def test_branches_and_merge(project: Project) -> None:
    make_log(project)
    logged_rev(project, "root0001", None)
    logged_rev(project, "left0001", "root0001")
    logged_rev(project, "righ0001", "root0001")

    heads = ok(invoke(project, "heads")).stdout
    assert "left0001" in heads and "righ0001" in heads
    assert sorted(h["revision"] for h in as_json(invoke(project, "heads", "--json"))) == [
        "left0001",
        "righ0001",
    ]
    branches = as_json(invoke(project, "branches", "--json"))
    assert [b["revision"] for b in branches] == ["root0001"]

    line = error_line(invoke(project, "upgrade", "head"))
    assert "multiple head" in line.lower()
    assert not table_exists(project.db, "script_run_tracker")
    assert logged(project) == []

    ok(invoke(project, "upgrade", "heads"))
    assert logged(project) == ["left0001", "righ0001", "root0001"]
    assert sorted(current_lines(project)) == ["left0001 (head)", "righ0001 (head)"]

    merged = as_json(invoke(project, "merge", "-m", "join the branches", "--json"))
    assert sorted(merged["down_revisions"]) == ["left0001", "righ0001"]
    assert merged["description"] == "join the branches"
    assert merged["is_merge_point"] is True
    assert [h["revision"] for h in as_json(invoke(project, "heads", "--json"))] == [
        merged["revision"]
    ]

    ok(invoke(project, "upgrade", "head"))  # one head again
    assert rows(project)[-1] == (merged["revision"], "upgrade", "success", 1)
    assert current_lines(project) == [f"{merged['revision']} (head)"]
    assert as_json(invoke(project, "check", "--json"))["ok"] is True


def test_branch_label_target(project: Project) -> None:
    make_log(project)
    logged_rev(project, "root0001", None)
    logged_rev(project, "left0001", "root0001", branch_labels=("left",))
    logged_rev(project, "left0002", "left0001")
    logged_rev(project, "righ0001", "root0001", branch_labels=("right",))

    ok(invoke(project, "upgrade", "left@head"))
    assert logged(project) == ["left0001", "left0002", "root0001"]
    assert [r[0] for r in rows(project)] == ["root0001", "left0001", "left0002"]

    ok(invoke(project, "upgrade", "right@head"))
    assert logged(project) == ["left0001", "left0002", "righ0001", "root0001"]

    ok(invoke(project, "downgrade", "left@-1"))
    assert logged(project) == ["left0001", "righ0001", "root0001"]
    assert rows(project)[-1] == ("left0002", "downgrade", "rolled_back", 2)


def test_depends_on_pulls_in_the_dependency(project: Project) -> None:
    make_log(project)
    logged_rev(project, "main0001", None)
    logged_rev(project, "other001", None, branch_labels=("other",))
    logged_rev(project, "main0002", "main0001", depends_on="other001")

    ok(invoke(project, "upgrade", "main0002"))
    assert logged(project) == ["main0001", "main0002", "other001"]
    order = [r[0] for r in rows(project)]
    assert order.index("other001") < order.index("main0002")
    assert order.index("main0001") < order.index("main0002")
    shown = as_json(invoke(project, "show", "main0002", "--json"))
    assert shown["depends_on"] == ["other001"]


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verify", "why"),
    [
        ("return False", "verify() returned False"),
        ("return 1", "verify() returned 1"),
        ("raise ValueError('rows are missing')", "ValueError: rows are missing"),
    ],
    ids=["returns-false", "returns-non-bool", "raises"],
)
def test_verify_failure_rolls_back(project: Project, verify: str, why: str) -> None:
    make_log(project)
    logged_rev(project, A, None)
    logged_rev(project, B, A, verify=verify)
    logged_rev(project, C, B)

    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"dm: error: revision {B} failed: " in result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.stderr

    assert logged(project) == [A]  # bbbb2222's insert was rolled back, cccc3333 never ran
    assert rows(project) == [(A, "upgrade", "success", 1), (B, "upgrade", "failed", 1)]
    failed = project.db.tracker()[-1]
    assert why in failed.error_message
    assert "verify" in failed.error_traceback
    assert failed.finished_at is not None
    assert current_lines(project) == [A]


def test_error_message_names_verify_when_it_raises(project: Project) -> None:
    project.write(A, None, verify="raise ValueError('rows are missing')")
    assert invoke(project, "upgrade", "heads").exit_code == 1
    assert "verify" in project.db.tracker()[-1].error_message


def test_upgrade_failure_then_fix_and_rerun(project: Project) -> None:
    chain(project)
    broken = logged_rev(project, B, A, fail="boom", doc="Second step")

    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "dm: error: revision bbbb2222 failed: RuntimeError: boom" in result.stderr
    assert logged(project) == [A]
    assert rows(project) == [(A, "upgrade", "success", 1), (B, "upgrade", "failed", 1)]
    assert project.db.tracker()[-1].error_message == "RuntimeError: boom"

    fixed = logged_rev(project, B, A, doc="Second step, fixed")
    assert fixed == broken
    ok(invoke(project, "upgrade", "heads"))
    assert logged(project) == [A, B, C]
    assert rows(project) == [
        (A, "upgrade", "success", 1),
        (B, "upgrade", "failed", 1),
        (B, "upgrade", "success", 2),
        (C, "upgrade", "success", 1),
    ]
    tracker = project.db.tracker()
    assert tracker[1].error_message == "RuntimeError: boom"
    assert tracker[2].description == "Second step, fixed"
    assert tracker[1].checksum != tracker[2].checksum


def test_irreversible_revision_refuses_plan_up_front(project: Project) -> None:
    chain(project, middle_reversible=False)
    ok(invoke(project, "upgrade", "heads"))
    before = project.db.tracker()

    line = error_line(invoke(project, "downgrade", "base"))
    assert B in line
    assert f"{B}_{B}.py" in line
    assert "nothing was run" in line
    assert project.db.tracker() == before
    assert logged(project) == [A, B, C]

    ok(invoke(project, "downgrade", "-1"))  # cccc3333 alone is reversible
    assert logged(project) == [A, B]
    error_line(invoke(project, "downgrade", "base"))
    assert logged(project) == [A, B]
    assert len(project.db.tracker()) == len(before) + 1


def test_rolled_back_revision_upgrades_again(project: Project) -> None:
    chain(project)
    ok(invoke(project, "upgrade", "heads"))
    ok(invoke(project, "downgrade", "-1"))
    assert logged(project) == [A, B]
    ok(invoke(project, "upgrade", "heads"))
    assert logged(project) == [A, B, C]
    assert [r for r in rows(project) if r[0] == C] == [
        (C, "upgrade", "success", 1),
        (C, "downgrade", "rolled_back", 2),
        (C, "upgrade", "success", 3),
    ]
    status = {s["revision"]: s for s in as_json(invoke(project, "status", "--json"))}
    assert status[C]["attempts"] == 3
    assert status[C]["status"] == "success"


def test_failed_downgrade_keeps_revision_applied(project: Project) -> None:
    make_log(project)
    project.write(A, None, insert_log(A), downgrade="raise RuntimeError('cannot undo')")
    ok(invoke(project, "upgrade", "heads"))
    result = invoke(project, "downgrade", "base")
    assert result.exit_code == 1
    assert "RuntimeError: cannot undo" in result.stderr
    assert rows(project)[-1] == (A, "downgrade", "failed", 2)
    assert logged(project) == [A]
    assert current_lines(project) == [f"{A} (head)"]
    status = ok(invoke(project, "status")).stdout
    assert "failed (downgrade)" in status


# -- stamp ---------------------------------------------------------------------------------------


def test_stamp_records_without_running(project: Project) -> None:
    chain(project)
    result = ok(invoke(project, "stamp", B))
    assert f"stamp {A}: recorded success (stamped as applied; upgrade() not run)" in result.stdout
    assert "stamp: 2 success; done" in result.stdout
    assert logged(project) == []  # no upgrade() ran
    tracker = project.db.tracker()
    assert [(r.revision, r.direction, r.status, r.reason) for r in tracker] == [
        (A, "upgrade", "success", "stamped"),
        (B, "upgrade", "success", "stamped"),
    ]
    assert current_lines(project) == [B]

    ok(invoke(project, "upgrade", "heads"))
    assert logged(project) == [C]  # only the revision above the stamp ran

    ok(invoke(project, "stamp", "base"))
    assert logged(project) == [C]  # no downgrade() ran either
    tail = project.db.tracker()[-3:]
    assert [(r.revision, r.direction, r.status, r.reason) for r in tail] == [
        (C, "downgrade", "rolled_back", "stamped"),
        (B, "downgrade", "rolled_back", "stamped"),
        (A, "downgrade", "rolled_back", "stamped"),
    ]
    assert [r.attempt for r in tail] == [2, 2, 2]
    assert as_json(invoke(project, "current", "--json")) == {"heads": []}


# -- check, status, JSON ---------------------------------------------------------------------------


def _insert_pending(project: Project, rev: str) -> None:
    project.db.query(
        "INSERT INTO script_run_tracker (run_id, revision, direction, status, attempt, "
        "started_at) VALUES ('other-run', :rev, 'upgrade', 'pending', 1, CURRENT_TIMESTAMP)",
        rev=rev,
    )


@contextlib.contextmanager
def holding_the_lock(project: Project) -> Iterator[None]:
    """Hold the project's migration lock (in a thread of its own) for the block."""
    from dm.engine.execution import tracker_for
    from dm.engine.lock import migration_lock

    settings = project.settings()
    taken, done = threading.Event(), threading.Event()

    async def hold() -> None:
        async with migration_lock(settings.lock_url(), tracker_for(settings), 5, "dm-test:holder"):
            taken.set()
            await asyncio.to_thread(done.wait)

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    try:
        assert taken.wait(10)
        yield
    finally:
        done.set()
        thread.join(10)


CHECK_KEYS = ("ok", "pending", "failed", "running", "missing")


def check_shape(result: Result) -> dict[str, Any]:
    """The documented keys of ``dm check --json`` (later versions may add more)."""
    payload = json.loads(result.stdout)
    assert set(CHECK_KEYS) <= set(payload)
    return {key: payload[key] for key in CHECK_KEYS}


def test_check(project: Project) -> None:
    chain(project)
    fresh = invoke(project, "check", "--json")
    assert fresh.exit_code == 4
    assert check_shape(fresh) == {
        "ok": False,
        "pending": [A, B, C],
        "failed": [],
        "running": [],
        "missing": [],
    }
    text = invoke(project, "check")
    assert text.exit_code == 4
    assert f"pending: {A}, {B}, {C}" in text.stdout

    ok(invoke(project, "upgrade", "heads"))
    assert check_shape(ok(invoke(project, "check", "--json"))) == {
        "ok": True,
        "pending": [],
        "failed": [],
        "running": [],
        "missing": [],
    }
    assert "ok: every revision is applied" in ok(invoke(project, "check")).stdout

    logged_rev(project, "dddd4444", C, fail="no")
    assert invoke(project, "upgrade", "heads").exit_code == 1
    failed = invoke(project, "check", "--json")
    assert failed.exit_code == 4
    assert check_shape(failed) == {
        "ok": False,
        "pending": [],
        "failed": ["dddd4444"],
        "running": [],
        "missing": [],
    }

    # A pending attempt while no run holds the lock: its run died.
    _insert_pending(project, "dddd4444")
    died = invoke(project, "check", "--json")
    assert died.exit_code == 4
    assert check_shape(died) == {
        "ok": False,
        "pending": [],
        "failed": [],
        "running": [],
        "missing": [],
    }
    assert json.loads(died.stdout)["died"] == ["dddd4444"]
    assert "run died (the next run retries): dddd4444" in invoke(project, "check").stdout
    assert status_of(project)["dddd4444"]["state"] == "died"

    with holding_the_lock(project):  # another run is working on it right now
        running = invoke(project, "check", "--json")
        assert running.exit_code == 4
        assert check_shape(running) == {
            "ok": False,
            "pending": [],
            "failed": [],
            "running": ["dddd4444"],
            "missing": [],
        }
        assert json.loads(running.stdout)["died"] == []
        assert "running: dddd4444" in invoke(project, "check").stdout
        assert status_of(project)["dddd4444"]["state"] == "running"


def test_check_reports_applied_revision_whose_file_is_gone(project: Project) -> None:
    chain(project)
    ok(invoke(project, "upgrade", "heads"))
    (project.versions / f"{C}_{C}.py").unlink()
    result = invoke(project, "check", "--json")
    assert result.exit_code == 4
    assert json.loads(result.stdout)["missing"] == [C]
    status = ok(invoke(project, "status")).stdout
    assert "(file missing)" in status


def test_status_text_shows_state_attempts_and_error(project: Project) -> None:
    chain(project)
    logged_rev(project, B, A, fail="disk full")
    assert invoke(project, "upgrade", "heads").exit_code == 1
    assert invoke(project, "upgrade", "heads").exit_code == 1

    lines = ok(invoke(project, "status")).stdout.splitlines()
    assert lines[0].split() == [
        "REVISION",
        "STATE",
        "LAST",
        "ATTEMPT",
        "ATTEMPTS",
        "LAST",
        "RUN",
        "(UTC)",
        "DURATION",
        "BY",
        "DESCRIPTION",
    ]
    by_rev = {line.split()[0]: line for line in lines[1:]}
    assert set(by_rev) == {A, B, C}
    assert by_rev[A].split()[1:4] == ["applied", "success", "1"]
    assert by_rev[B].split()[1:4] == ["failed", "failed", "2"]
    assert "[error: RuntimeError: disk full]" in by_rev[B]
    assert " ms " in by_rev[B]
    assert by_rev[C].split()[1:4] == ["not_run", "-", "0"]
    assert by_rev[C].rstrip().endswith("Third step")


def test_json_outputs(project: Project) -> None:
    chain(project)
    ok(invoke(project, "upgrade", A))

    status = as_json(invoke(project, "status", "--json"))
    assert [s["revision"] for s in status] == [A, B, C]
    for entry in status:
        assert {"revision", "status", "description", "started_at", "finished_at", "error"} <= set(
            entry
        )
    assert status[0]["status"] == "success"
    assert status[0]["description"] == "Create the first thing"
    assert status[0]["started_at"] and status[0]["finished_at"]
    assert status[0]["error"] is None
    assert status[1]["status"] is None
    assert status[1]["started_at"] is None and status[1]["finished_at"] is None
    assert status[1]["attempts"] == 0

    assert as_json(invoke(project, "current", "--json")) == {"heads": [A]}

    history = as_json(invoke(project, "history", "--json"))
    assert [(h["revision"], h["down_revisions"], h["description"]) for h in history] == [
        (C, [B], "Third step"),
        (B, [A], "Second step"),
        (A, [], "Create the first thing"),
    ]
    ranged = as_json(invoke(project, "history", "-r", f"{A}:{B}", "--json"))
    assert [h["revision"] for h in ranged] == [B, A]

    heads = as_json(invoke(project, "heads", "--json"))
    assert [(h["revision"], h["is_head"]) for h in heads] == [(C, True)]

    shown = as_json(invoke(project, "show", "bbbb", "--json"))
    assert shown["revision"] == B
    assert shown["down_revisions"] == [A]
    assert shown["reversible"] is True
    assert shown["path"].endswith(f"{B}_{B}.py")

    run = invoke(project, "upgrade", "heads", "--json")
    payload = as_json(run)  # stdout holds only the JSON document
    assert [s["revision"] for s in payload["steps"]] == [B, C]
    assert [s["status"] for s in payload["steps"]] == ["success", "success"]
    assert f"upgrade {B}" in run.stderr and "running" in run.stderr  # logs go to stderr


def test_text_outputs(project: Project) -> None:
    chain(project)
    history = ok(invoke(project, "history")).stdout.splitlines()
    assert history == [
        f"{B} -> {C} (head), Third step",
        f"{A} -> {B}, Second step",
        f"<base> -> {A}, Create the first thing",
    ]
    shown = ok(invoke(project, "show", C)).stdout
    assert f"Rev: {C} (head)" in shown
    assert f"Parent: {B}" in shown
    assert "Reversible: yes" in shown


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", BAD_REVISION_FILES, ids=lambda case: case.id)
def test_bad_revision_file(project: Project, case: BadFiles) -> None:
    write_bad_files(project, case)
    line = error_line(invoke(project, "upgrade", "heads"))
    for needle in case.expected:
        assert needle in line
    verbose = invoke(project, "--verbose", "upgrade", "heads")
    assert verbose.exit_code == 2
    assert "Traceback" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1] == line
    error_line(invoke(project, "history"))
    assert not table_exists(project.db, "script_run_tracker")


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (("upgrade", "nosuch99"), {}, ("'nosuch99'",)),
        (("downgrade", "nosuch99"), {}, ("'nosuch99'",)),
        (("show", "nosuch99"), {}, ("'nosuch99'",)),
        (("stamp", "nosuch99"), {}, ("'nosuch99'",)),
        (("history", "-r", "nonsense"), {}, ("'nonsense'", "START:END")),
        (("-c", "missing.ini", "upgrade"), {}, ("missing.ini", "config file not found")),
        (("upgrade",), {"DM_CONFIG": "elsewhere.ini"}, ("elsewhere.ini",)),
        (("-n", "nosection", "upgrade"), {}, ("alembic.ini", "[nosection]")),
        (("upgrade",), {"DM_LOCK_TIMEOUT": "forever123"}, ("DM_LOCK_TIMEOUT",)),
        (("upgrade",), {"DM_LOCK_TIMEOUT": "-5"}, ("DM_LOCK_TIMEOUT",)),
        (("upgrade",), {"DM_CONNECT_RETRY_SECONDS": "-1"}, ("DM_CONNECT_RETRY_SECONDS",)),
        (("upgrade",), {"DM_CONNECT_RETRY_SECONDS": "601"}, ("DM_CONNECT_RETRY_SECONDS",)),
        (
            ("upgrade",),
            {"DM_DATABASE_URL": None, "KUBERNETES_SERVICE_HOST": "10.0.0.1"},
            ("DM_DATABASE_URL", "Kubernetes"),
        ),
    ],
    ids=[
        "upgrade-unknown",
        "downgrade-unknown",
        "show-unknown",
        "stamp-unknown",
        "history-range",
        "missing-config-option",
        "missing-config-env",
        "missing-section",
        "lock-timeout-text",
        "lock-timeout-negative",
        "connect-retry-negative",
        "connect-retry-too-long",
        "kubernetes-without-url",
    ],
)
def test_bad_invocation(
    project: Project, args: tuple[str, ...], env: dict[str, Any], needles: tuple[str, ...]
) -> None:
    chain(project)
    line = error_line(invoke(project, *args, **env))
    for needle in needles:
        assert needle in line
    for value in env.values():
        if value and value.startswith("forever"):
            assert value not in line
    verbose = invoke(project, "--verbose", *args, **env)
    assert verbose.exit_code == 2
    assert "Traceback" in verbose.stderr
    assert logged(project) == []
    assert not table_exists(project.db, "script_run_tracker")


def _pg(user: str, database: str, port: int = PG_PORT) -> str:
    return f"postgresql://{user}:s3cretpw@{PG_HOST}:{port}/{database}"


# (url factory, what the error line must contain); factories run inside the test so that
# the PostgreSQL ones skip cleanly without a server.
BAD_URLS = {
    "not-a-url": (lambda: "notaurl://", ("database URL", "notaurl")),
    "garbage": (lambda: "::not a url::", ("database URL", "not a valid URL")),
    "mysql": (lambda: "mysql://u:s3cretpw@db.example/x", ("database URL", "mysql")),
    "sqlite-memory": (lambda: "sqlite://", ("database URL", "in-memory")),
    "no-database-name": (lambda: "postgresql://u:s3cretpw@127.0.0.1:5432", ("no database name",)),
    "bad-sslmode": (lambda: _pg("u", "x") + "?sslmode=sometimes", ("sslmode",)),
    "unreachable": (lambda: _pg("u", "x", port=1), (f"{PG_HOST}:1",)),
    "unknown-database": (
        lambda: _pg(pg_user(), "dm_no_such_database"),
        ("cannot connect", f"{PG_HOST}:{PG_PORT}", "dm_no_such_database"),
    ),
    "login-refused": (
        lambda: _pg("dm_no_such_role", "postgres"),
        ("cannot connect", "dm_no_such_role"),
    ),
}


@SQLITE_ONLY
@pytest.mark.parametrize("via", ["env", "option"])
@pytest.mark.parametrize("name", list(BAD_URLS))
def test_bad_database_url(project: Project, name: str, via: str) -> None:
    make_url, needles = BAD_URLS[name]
    url = make_url()
    project.write(A, None)

    def run(*extra: str) -> Result:
        no_retry = {"DM_CONNECT_RETRY_SECONDS": "0"}
        if via == "env":
            return invoke(project, *extra, "upgrade", "heads", DM_DATABASE_URL=url, **no_retry)
        return invoke(project, *extra, "--database-url", url, "upgrade", "heads", **no_retry)

    result = run()
    code = 75 if name == "unreachable" else 2  # a retry may succeed; the rest need a person
    line = error_line(result, code)
    for needle in needles:
        assert needle in line
    verbose = run("--verbose")
    assert verbose.exit_code == code
    assert "Traceback" in verbose.stderr
    for output in (result.stdout, result.stderr, verbose.stdout, verbose.stderr):
        assert "s3cretpw" not in output


# -- project files: revision, init -----------------------------------------------------------------


def test_generated_revision_runs_as_is(project: Project) -> None:
    created = as_json(invoke(project, "revision", "-m", "add plans", "--json"))
    path = Path(created["path"])
    assert path.is_file()
    assert path.name.endswith(f"_{created['revision']}_add_plans.py")
    assert created["description"] == "add plans"
    assert created["reversible"] is True
    assert "async def verify(session: AsyncSession) -> bool:" in path.read_text()

    second = ok(invoke(project, "revision", "-m", "second one", "--rev-id", "feed0002"))
    assert second.stdout.startswith("created feed0002: ")
    history = as_json(invoke(project, "history", "--json"))
    assert [h["revision"] for h in history] == ["feed0002", created["revision"]]

    ok(invoke(project, "upgrade", "heads"))
    assert rows(project) == [
        (created["revision"], "upgrade", "success", 1),
        ("feed0002", "upgrade", "success", 1),
    ]
    assert project.db.tracker()[0].description == "add plans"
    ok(invoke(project, "downgrade", "base"))
    assert as_json(invoke(project, "current", "--json")) == {"heads": []}


def _bare_invoke(*args: str) -> Result:
    env = {name: None for name in ("DM_CONFIG", "DM_DATABASE_URL", "DATABASE_URL")}
    return cli_runner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_init_appends_to_existing_alembic_ini(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    existing = "[alembic]\nscript_location = migrations\nsqlalchemy.url = sqlite:///app.db\n"
    (tmp_path / "alembic.ini").write_text(existing)

    result = ok(_bare_invoke("init", "."))
    assert result.stdout.startswith("added a section to alembic.ini")
    text = (tmp_path / "alembic.ini").read_text()
    assert text.startswith(existing)
    assert "\n[data_migrations]\n" in text
    assert (tmp_path / "data_migrations" / "env.py").is_file()
    assert (tmp_path / "data_migrations" / "versions").is_dir()
    assert ok(_bare_invoke("heads")).stdout == ""

    line = error_line(_bare_invoke("init", "."))
    assert "data_migrations" in line and "already exists" in line
    assert (tmp_path / "alembic.ini").read_text() == text


def test_init_twice_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = ok(_bare_invoke("init", "proj"))
    assert result.stdout.startswith("wrote proj/alembic.ini")
    config = (tmp_path / "proj" / "alembic.ini").read_text()
    line = error_line(_bare_invoke("init", "proj"))
    assert "already exists" in line
    assert (tmp_path / "proj" / "alembic.ini").read_text() == config


def test_init_refuses_section_already_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alembic.ini").write_text("[data_migrations]\nscript_location = x\n")
    line = error_line(_bare_invoke("init", "."))
    assert "[data_migrations]" in line
    assert not (tmp_path / "data_migrations").exists()


# -- Alembic's own command line, python -m dm, --help ------------------------------------------


def _alembic(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ALEMBIC), "-c", "alembic.ini", "-n", "data_migrations", *args],
        cwd=project.root,
        env={**os.environ, **project.env(), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.process
@pytest.mark.slow
def test_alembic_cli_shares_graph_and_tracker(project: Project) -> None:
    chain(project)
    ok(invoke(project, "upgrade", A))

    history = _alembic(project, "history")
    assert history.returncode == 0, history.stderr
    assert f"{B} -> {C} (head), Third step" in history.stdout
    assert f"<base> -> {A}, Create the first thing" in history.stdout

    heads = _alembic(project, "heads")
    assert heads.returncode == 0, heads.stderr
    assert heads.stdout.split() == [C, "(head)"]

    upgrade = _alembic(project, "upgrade", "heads")
    assert upgrade.returncode == 0, upgrade.stderr
    assert logged(project) == [A, B, C]
    assert rows(project) == [
        (A, "upgrade", "success", 1),
        (B, "upgrade", "success", 1),
        (C, "upgrade", "success", 1),
    ]
    assert current_lines(project) == [f"{C} (head)"]


@pytest.mark.process
def test_python_m_dm(project: Project) -> None:
    chain(project)
    result = run_dm(project, "upgrade", "heads")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "upgrade: 3 revision(s) done, target heads"
    assert f"upgrade {A}" in result.stderr
    assert logged(project) == [A, B, C]
    assert [r[2] for r in rows(project)] == ["success"] * 3
    version = run_dm(project, "--version")
    assert version.returncode == 0 and version.stdout.startswith("dm, version ")


@pytest.mark.matrix
@pytest.mark.parametrize("name", [None, *sorted(main.commands)])
def test_help(name: str | None) -> None:
    args = ["--help"] if name is None else [name, "--help"]
    result = cli_runner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    if name is not None:
        assert f" {name} " in result.stdout.splitlines()[0]


def test_init_ignores_the_embedded_database_and_names_files_by_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`git status` stays clean after a first run, and `ls` lists revisions in creation order."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".gitignore").write_text("*.pyc")
    result = ok(_bare_invoke("init", "."))
    assert "ignored the embedded database dm.sqlite3 in .gitignore" in result.stdout
    assert (tmp_path / ".gitignore").read_text().splitlines() == [
        "*.pyc",
        "# dm's embedded database (dm init)",
        "/dm.sqlite3*",
    ]
    ok(_bare_invoke("revision", "-m", "first change"))
    (name,) = (p.name for p in (tmp_path / "data_migrations" / "versions").glob("*.py"))
    assert re.fullmatch(r"\d{8}_\d{6}_[0-9a-f]{12}_first_change\.py", name), name
    ok(_bare_invoke("upgrade"))
    assert (tmp_path / "dm.sqlite3").exists()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dm.sqlite3" not in status and "alembic.ini" in status


def test_show_lists_the_attributes_dm_reads(project: Project) -> None:
    project.write(
        "a1b2c3",
        None,
        extra="""
        transactional = False
        environments = ("staging",)
        max_runtime = 60
        blocks_deploy = False
        idempotent = True
        """,
    )
    lines = ok(invoke(project, "show", "a1b")).stdout.splitlines()
    for line in (
        "transactional: False",
        "environments: ('staging',)",
        "timeout: None (DM_TIMEOUT)",
        "max_runtime: 60.0",
        "blocks_deploy: False",
        "requires_schema: None",
        "requires_complete: None",
        "idempotent: True",
    ):
        assert line in lines, (line, lines)
    shown = as_json(invoke(project, "show", "a1b", "--json"))
    assert shown["attributes"]["environments"] == ["staging"]


def test_status_of_one_revision_shows_its_attempts(project: Project) -> None:
    project.write("a1", None)
    project.write("b2", "a1", "raise RuntimeError('boom')")
    invoke(project, "upgrade")
    invoke(project, "upgrade")
    result = ok(invoke(project, "status", "b2"))
    table, attempts = result.stdout.split("\n\n", 1)
    assert [line.split()[0] for line in table.splitlines()] == ["REVISION", "b2"]
    assert attempts.count("upgrade failed") == 2 and "error: RuntimeError: boom" in attempts
    assert "Traceback" not in attempts and "dm log b2 shows the tracebacks" in attempts
    found = as_json(invoke(project, "status", "a1", "--json"))
    assert found["status"]["state"] == "applied" and len(found["attempts"]) == 1
