"""A walk of bad inputs through ``dm``, in-process and as a real process (issue #9).

Each case is one mistake a person makes: a URL, a setting, a config file, a revision file,
a target. For every one dm must print exactly one ``dm: error:`` line naming what is wrong,
exit with the documented code, show no traceback and no secret, and leave the database as
it was. Add a case by appending a ``Bad`` to ``CASES``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest

from conftest import Project
from conftest import invoke
from conftest import run_dm
from conftest import run_in_process

POSTGRES = pytest.mark.postgres
SECRET = "Zq7Secret"
"""Every password in the cases below contains this; it must never be printed."""


@dataclass(frozen=True)
class Bad:
    """One bad input and what dm must answer."""

    id: str
    args: tuple[str, ...] = ("upgrade",)
    env: Mapping[str, str] = field(default_factory=dict)
    setup: Callable[[Project], Any] | None = None
    says: str = ""
    """A part of the error line (what it names)."""
    code: int = 2

    @property
    def on_postgresql(self) -> bool:
        """Return whether the case runs on PostgreSQL too: not for input refused before
        any database is involved (URLs, settings, config files), which SQLite covers."""
        return not self.id.startswith(_BEFORE_ANY_DATABASE)


_BEFORE_ANY_DATABASE = (
    "url-",
    "timeout-",
    "lock-timeout-",
    "pg-lock-timeout-",
    "connect-retry-",
    "tracker-table-",
    "pod-name-",
    "environment-",
    "ini-",
    "config-",
    "section-",
    "dotenv-",
)


def _ini(old: str, new: str) -> Callable[[Project], None]:
    def edit(project: Project) -> None:
        text = project.config.read_text()
        assert old in text, old
        project.config.write_text(text.replace(old, new, 1))

    return edit


def _ini_bytes(project: Project) -> None:
    data = project.config.read_bytes()
    project.config.write_bytes(data.replace(b"# dm.timeout =", b"# dm.timeout \xfe\xff =", 1))


def _dotenv(data: bytes) -> Callable[[Project], None]:
    def write(project: Project) -> None:
        (project.root / ".env").write_bytes(data)

    return write


def _revision(
    rev: str, down: str | None, body: str = "pass", **kwargs: Any
) -> Callable[[Project], None]:
    def write(project: Project) -> None:
        project.write(rev, down, body, **kwargs)

    return write


def _raw_revision(name: str, text: str) -> Callable[[Project], None]:
    def write(project: Project) -> None:
        (project.versions / name).write_text(text)

    return write


def _many(*steps: Callable[[Project], Any]) -> Callable[[Project], None]:
    def run(project: Project) -> None:
        for step in steps:
            step(project)

    return run


def _move_versions(project: Project) -> None:
    project.versions.rename(project.root / "versions_moved")


PG = "postgresql://app:{password}@127.0.0.1:1/app"
CASES = [
    # -- database URLs ----------------------------------------------------------------------
    Bad("url-mysql", env={"DM_DATABASE_URL": f"mysql://u:{SECRET}@h/x"}, says="mysql"),
    Bad("url-garbage", env={"DM_DATABASE_URL": f"::{SECRET}::"}, says="not a valid URL"),
    Bad("url-memory", env={"DM_DATABASE_URL": "sqlite:///:memory:"}, says="in-memory"),
    Bad("url-no-db", env={"DM_DATABASE_URL": f"postgresql://u:{SECRET}@h"}, says="database name"),
    Bad(
        "url-bad-port",
        env={"DM_DATABASE_URL": f"postgresql://u:{SECRET}@h:port/x"},
        says="valid URL (expected e.g. postgresql://user@host/db); it comes from DM_DATABASE_URL",
    ),
    Bad(
        "url-sslmode",
        env={"DM_DATABASE_URL": PG.format(password=SECRET) + "?sslmode=maybe"},
        says="sslmode",
    ),
    Bad(
        "url-ssl-twice",
        env={"DM_DATABASE_URL": PG.format(password=SECRET) + "?ssl=require&sslmode=require"},
        says="sslmode",
    ),
    Bad(
        "url-unknown-param",
        env={"DM_DATABASE_URL": PG.format(password=SECRET) + "?keepalives=1"},
        says="'keepalives'",
    ),
    Bad(
        "url-connect-timeout",
        env={"DM_DATABASE_URL": PG.format(password=SECRET) + "?connect_timeout=soon"},
        says="connect_timeout",
    ),
    Bad(
        "url-options",
        env={"DM_DATABASE_URL": PG.format(password=SECRET) + "?options=-x"},
        says="options",
    ),
    Bad(
        "url-session-attrs",
        env={"DM_DATABASE_URL": PG.format(password=SECRET) + "?target_session_attrs=any-old"},
        says="target_session_attrs",
    ),
    Bad(
        "url-query-password-unreachable",
        env={
            "DM_DATABASE_URL": f"postgresql://app@127.0.0.1:1/app?password={SECRET}",
            "DM_CONNECT_RETRY_SECONDS": "0",
        },
        says="cannot connect to PostgreSQL at 127.0.0.1:1/app",
        code=75,  # transient: a retry may succeed
    ),
    Bad(
        "url-unencoded-at-unreachable",
        env={
            "DM_DATABASE_URL": PG.format(password=f"p@{SECRET}@x"),
            "DM_CONNECT_RETRY_SECONDS": "0",
        },
        says="cannot connect to PostgreSQL at 127.0.0.1:1/app as app",
        code=75,
    ),
    Bad(
        "lock-url-mysql",
        env={"DM_LOCK_DATABASE_URL": f"mysql://u:{SECRET}@h/x"},
        says="DM_LOCK_DATABASE_URL",
    ),
    # -- settings -----------------------------------------------------------------------------
    Bad("timeout-overflow", env={"DM_TIMEOUT": "1e999"}, says="DM_TIMEOUT"),
    Bad("timeout-too-long", env={"DM_TIMEOUT": "3000000"}, says="DM_TIMEOUT"),
    Bad("timeout-zero", env={"DM_TIMEOUT": "0"}, says="DM_TIMEOUT"),
    Bad("timeout-word", env={"DM_TIMEOUT": "soon"}, says="DM_TIMEOUT"),
    Bad("timeout-option-inf", args=("upgrade", "--timeout", "inf"), says="DM_TIMEOUT"),
    Bad("lock-timeout-negative", env={"DM_LOCK_TIMEOUT": "-1"}, says="DM_LOCK_TIMEOUT"),
    Bad(
        "lock-timeout-option",
        args=("upgrade", "--lock-timeout", "1e999"),
        says="DM_LOCK_TIMEOUT",
    ),
    Bad("pg-lock-timeout-huge", env={"DM_PG_LOCK_TIMEOUT": "1e308"}, says="DM_PG_LOCK_TIMEOUT"),
    Bad("pg-lock-timeout-nan", env={"DM_PG_LOCK_TIMEOUT": "nan"}, says="DM_PG_LOCK_TIMEOUT"),
    Bad("tracker-table-long", env={"DM_TRACKER_TABLE": "t" * 50}, says="DM_TRACKER_TABLE"),
    Bad("tracker-table-sql", env={"DM_TRACKER_TABLE": "runs; DROP"}, says="DM_TRACKER_TABLE"),
    Bad("tracker-schema-pg", env={"DM_TRACKER_SCHEMA": "pg_catalog"}, says="DM_TRACKER_SCHEMA"),
    Bad(
        "tracker-schema-info",
        env={"DM_TRACKER_SCHEMA": "information_schema"},
        says="DM_TRACKER_SCHEMA",
    ),
    Bad(
        "connect-retry-huge",
        env={"DM_CONNECT_RETRY_SECONDS": "1e999"},
        says="DM_CONNECT_RETRY_SECONDS",
    ),
    Bad("pod-name-long", env={"DM_POD_NAME": "pod-" * 80}, says="DM_POD_NAME"),
    Bad("environment-long", env={"DM_ENVIRONMENT": "e" * 65}, says="DM_ENVIRONMENT"),
    Bad(
        "ini-timeout",
        setup=_ini("# dm.timeout =", "dm.timeout = 1e999"),
        says="DM_TIMEOUT",
    ),
    # -- config files --------------------------------------------------------------------------
    Bad("config-missing", args=("-c", "nope.ini", "upgrade"), says="nope.ini"),
    Bad("section-missing", args=("-n", "other", "upgrade"), says="[other]"),
    Bad("ini-not-utf8", setup=_ini_bytes, says="alembic.ini: config file is not valid UTF-8"),
    Bad("dotenv-not-utf8", setup=_dotenv(b"DM_ENVIRONMENT=caf\xe9\n"), says=".env"),
    Bad(
        "dotenv-bad-timeout",
        setup=_dotenv(b"DM_TIMEOUT=-3\n"),
        says="DM_TIMEOUT",
    ),
    Bad(
        "dotenv-bad-url",
        setup=_dotenv(f"DM_DATABASE_URL=mysql://u:{SECRET}@h/x\n".encode()),
        env={"DM_DATABASE_URL": ""},
        says="DM_DATABASE_URL in ",
    ),
    Bad(
        "ini-bad-url",
        setup=_ini("sqlalchemy.url =\n", f"sqlalchemy.url = mysql://u:{SECRET}@h/x\n"),
        env={"DM_DATABASE_URL": ""},
        says="sqlalchemy.url in ",
    ),
    Bad(
        "ini-unparsable",
        setup=lambda p: p.config.write_text("not an ini\n"),
        says="cannot parse",
    ),
    Bad(
        "ini-no-script-location",
        setup=lambda p: p.config.write_text("[data_migrations]\nsqlalchemy.url =\n"),
        says="script_location",
    ),
    Bad(
        "script-location-missing",
        setup=_ini("/data_migrations\n", "/nowhere\n"),
        says="nowhere does not exist",
    ),
    Bad("versions-missing", setup=_move_versions, says="versions does not exist"),
    Bad(
        "versions-missing-current",
        args=("current",),
        setup=_move_versions,
        says="versions does not exist",
    ),
    # -- revision files -------------------------------------------------------------------------
    Bad(
        "rev-syntax",
        setup=_raw_revision("b2_bad.py", "revision = 'b2'\ndown_revision = 'a1'\nasync def (\n"),
        says="b2_bad.py",
    ),
    Bad(
        "rev-import-error",
        setup=_revision("b2", "a1", extra="import no_such_module_anywhere"),
        says="b2_b2.py",
    ),
    Bad(
        "rev-no-upgrade",
        setup=_raw_revision("b2_x.py", "revision = 'b2'\ndown_revision = 'a1'\n"),
        says="upgrade",
    ),
    Bad(
        "rev-upgrade-wrong-signature",
        setup=_raw_revision(
            "b2_x.py", "revision = 'b2'\ndown_revision = 'a1'\ndef upgrade(a, b): pass\n"
        ),
        says="takes 2 arguments",
    ),
    Bad("rev-timeout", setup=_revision("b2", "a1", extra="timeout = 1e999"), says="timeout"),
    Bad("rev-id-long", setup=_revision("r" * 70, "a1"), says="at most 64"),
    Bad(
        "rev-duplicate",
        setup=_raw_revision(
            "zz_dup.py", "revision = 'a1'\ndown_revision = None\nasync def upgrade(s): pass\n"
        ),
        says="duplicate revision id 'a1'",
    ),
    Bad(
        "rev-cycle",
        setup=_many(_revision("c1", "c2"), _revision("c2", "c1")),
        says="c1_c1.py",
    ),
    Bad("rev-self-loop", setup=_revision("s1", "s1"), says="s1_s1.py"),
    Bad("rev-unknown-parent", setup=_revision("b2", "nope"), says="'nope'"),
    Bad(
        "rev-environments",
        setup=_revision("b2", "a1", extra="environments = 'staging'"),
        says="environments",
    ),
    # -- targets and commands ---------------------------------------------------------------------
    Bad("target-unknown", args=("upgrade", "nosuch"), says="'nosuch'"),
    Bad("target-relative", args=("upgrade", "+99"), says="'+99'"),
    Bad("downgrade-unknown", args=("downgrade", "nosuch"), says="'nosuch'"),
    Bad("stamp-unknown", args=("stamp", "nosuch"), says="'nosuch'"),
    Bad("run-unknown", args=("run", "nosuch"), says="'nosuch'"),
    Bad("history-range", args=("history", "-r", "bad"), says="START:END"),
    Bad("revision-rev-id-taken", args=("revision", "-m", "more work", "--rev-id", "a1"), says="a1"),
    Bad(
        "revision-rev-id-own-head",
        args=("revision", "-m", "more work", "--rev-id", "x9", "--head", "x9"),
        says="x9",
    ),
    Bad(
        "revision-rev-id-bad",
        args=("revision", "-m", "more work", "--rev-id", "a/b"),
        says="--rev-id",
    ),
    Bad("revision-empty-message", args=("revision", "-m", ""), says="slug"),
]


def _snapshot(project: Project) -> Any:
    """Return what the database holds: nothing may change on a refused command."""
    files = sorted(
        (p.name, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in project.root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    if project.db.kind == "sqlite":
        path = Path(project.db.url.removeprefix("sqlite:///"))
        return files, path.read_bytes() if path.exists() else None
    tables = project.db.query(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
    )
    rows = project.db.tracker() if ("public", "script_run_tracker") in tables else []
    marks = project.db.query("SELECT count(*) FROM applied_marks")
    return files, [tuple(t) for t in tables], [tuple(r) for r in rows], marks[0][0]


@pytest.fixture
def applied(project: Project) -> Project:
    """A project with revision ``a1`` applied (it adds a row to ``applied_marks``)."""
    project.write(
        "a1",
        None,
        """\
        await session.execute(sa.text("CREATE TABLE applied_marks (x int)"))
        await session.execute(sa.text("INSERT INTO applied_marks VALUES (1)"))
        """,
    )
    result = invoke(project, "upgrade")  # in-process: the walk starts ~60 processes already
    assert result.exit_code == 0, result.stderr
    return project


def test_the_walk_has_at_least_40_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


def _params() -> list[Any]:
    params = []
    for case in CASES:
        params.append(pytest.param("sqlite", case, id=f"sqlite-{case.id}"))
        if case.on_postgresql:
            params.append(
                pytest.param("postgresql", case, id=f"postgresql-{case.id}", marks=[POSTGRES])
            )
    return params


# The fast suite walks the cases in-process; the full suite walks them again through the real
# ``dm`` process (everything it writes, Python's own warnings included).
RUNNERS = ["in-process", pytest.param("process", marks=[pytest.mark.process, pytest.mark.slow])]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(("db", "case"), _params(), indirect=["db"])
def test_bad_input_gets_one_line_and_changes_nothing(
    applied: Project, case: Bad, runner: str
) -> None:
    project = applied
    # Pending work: a command that went ahead despite the bad input would change the data.
    project.write(
        "b9", "a1", "await session.execute(sa.text('INSERT INTO applied_marks VALUES (9)'))"
    )
    if case.setup is not None:
        case.setup(project)
    before = _snapshot(project)
    run = run_dm if runner == "process" else run_in_process
    result = run(project, *case.args, env=dict(case.env))
    after = _snapshot(project)

    shown = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == case.code, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith("dm: error: "), shown
    assert case.says in lines[0], shown
    assert "Traceback" not in shown
    assert SECRET not in shown
    assert before == after
