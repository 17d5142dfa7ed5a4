"""The tracker never records what did not happen (#19), on SQLite and PostgreSQL: hooks
hidden by decorators are awaited, forced runs and stamps respect environment guards, and
a backfill that does not block deploys lets the rest of the plan run."""

from __future__ import annotations

import textwrap

from click.testing import Result

from conftest import Project
from conftest import as_json
from conftest import invoke
from conftest import ok

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
