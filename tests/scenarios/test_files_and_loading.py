"""Files and code loading (issue #22, section 4): dm imports code only from the project,
writes its own files without following links or overwriting, keeps them private, and
prints stored text without the terminal acting on it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project
from conftest import invoke
from conftest import make_sqlite
from conftest import ok
from conftest import run_in_process
from dm import verbs

SQLITE_ONLY = pytest.mark.parametrize("db", ["sqlite"], indirect=True)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dm: error: "), stderr
    return lines[0]


@pytest.mark.process
@SQLITE_ONLY
def test_a_module_planted_in_the_working_directory_is_not_imported(
    project: Project, tmp_path: Path
) -> None:
    """`prepend_sys_path` is the project directory, not wherever dm is started from."""
    project.write("a1", None, "await session.execute(sa.text('SELECT 1'))")
    planted = tmp_path / "planted"
    planted.mkdir()
    marker = tmp_path / "planted-module-ran"
    for name in ("aiosqlite", "asyncpg", "sqlalchemy_utils"):
        (planted / f"{name}.py").write_text(
            f"open({str(marker)!r}, 'a').write({name!r})\nraise ImportError('planted')\n"
        )
    script = Path(sys.executable).with_name("dm")  # not `python -m`, which adds the cwd itself
    ran = subprocess.run(
        [str(script), "upgrade", "heads"],
        cwd=planted,
        env={**os.environ, **project.env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not marker.exists(), marker.read_text()
    assert ran.returncode == 0, ran.stderr
    assert project.db.query("SELECT count(*) FROM script_run_tracker")[0][0] == 1


@SQLITE_ONLY
def test_an_older_project_importing_from_the_working_directory_is_warned(
    project: Project,
) -> None:
    text = project.config.read_text()
    project.config.write_text(text.replace("prepend_sys_path = %(here)s", "prepend_sys_path = ."))
    ran = run_in_process(project, "history")
    assert ran.returncode == 0
    assert "prepend_sys_path = . imports modules from the working directory" in ran.stderr
    project.config.write_text(text)
    assert "prepend_sys_path" not in run_in_process(project, "history").stderr


@SQLITE_ONLY
def test_a_revision_message_cannot_inject_code_into_the_template(project: Project) -> None:
    """A template without `from __future__` (where a closed docstring would let the rest
    run) still gets a docstring holding the message, quotes and all."""
    template = project.root / "data_migrations" / "script.py.mako"
    template.write_text(
        '"""${message}\n\nRevision ID: ${up_revision}\n"""\n'
        "revision = ${repr(up_revision)}\ndown_revision = ${repr(down_revision)}\n"
        "branch_labels = None\ndepends_on = None\n\n\n"
        "async def upgrade(session):\n    pass\n"
    )
    message = 'x"""; import pathlib; pathlib.Path("pwned").touch(); """'
    ok(invoke(project, "revision", "-m", message))
    ok(invoke(project, "history"))
    ok(invoke(project, "upgrade", "heads"))
    assert not (project.root / "pwned").exists()
    shown = ok(invoke(project, "status", "--json")).stdout
    assert 'pathlib.Path(\\"pwned\\").touch()' in shown  # the description is the message


@SQLITE_ONLY
def test_a_revision_message_with_control_characters_is_refused(project: Project) -> None:
    ran = run_in_process(project, "revision", "-m", "fix users\x1b[2K\rall good")
    assert ran.returncode == 2
    assert "printable" in _one_error_line(ran.stderr)
    assert list(project.versions.glob("*.py")) == []


@SQLITE_ONLY
def test_a_symlink_at_the_sqlite_lock_path_is_refused_and_its_target_kept(
    project: Project, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock = Path(f"{project.db.url.removeprefix('sqlite:///')}.script_run_tracker.lock")
    lock.symlink_to(victim)
    project.write("a1", None)
    ran = run_in_process(project, "upgrade", "heads")
    assert ran.returncode == 2, ran.stderr
    line = _one_error_line(ran.stderr)
    assert str(lock) in line and "symbolic link" in line
    assert victim.read_text() == "precious\n"


@SQLITE_ONLY
def test_a_fifo_at_the_sqlite_lock_path_is_refused(project: Project) -> None:
    lock = Path(f"{project.db.url.removeprefix('sqlite:///')}.script_run_tracker.lock")
    os.mkfifo(lock)
    project.write("a1", None)
    ran = run_in_process(project, "upgrade", "heads")
    assert ran.returncode == 2, ran.stderr
    assert "not a regular file" in _one_error_line(ran.stderr)


def test_init_never_overwrites_nor_follows_links(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    scripts = root / "data_migrations"
    scripts.mkdir(parents=True)
    custom = "## our own revision template\n"
    (scripts / "script.py.mako").write_text(custom)
    with pytest.raises(Exception, match="script.py.mako already exists"):
        verbs.init(root)
    assert (scripts / "script.py.mako").read_text() == custom
    assert not (root / "alembic.ini").exists() and not (scripts / "env.py").exists()

    other = tmp_path / "other"
    victim = tmp_path / "victim.ini"
    victim.write_text("[app]\nkey = 1\n")
    other.mkdir()
    (other / "alembic.ini").symlink_to(victim)
    with pytest.raises(Exception, match="not a regular file"):
        verbs.init(other)
    assert victim.read_text() == "[app]\nkey = 1\n"

    dangling = tmp_path / "dangling"
    (dangling / "data_migrations").mkdir(parents=True)
    (dangling / "data_migrations" / "README").symlink_to(tmp_path / "nowhere")
    with pytest.raises(Exception, match="README already exists"):
        verbs.init(dangling)
    assert not (tmp_path / "nowhere").exists()


@SQLITE_ONLY
def test_embedded_database_and_lock_file_are_private(
    project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = os.umask(0o022)
    try:
        project.write("a1", None)
        ok(invoke(project, "upgrade", "heads"))
        embedded = project.root / "dm.sqlite3"
        ok(invoke(project, "upgrade", "heads", DM_DATABASE_URL=""))  # the embedded default
    finally:
        os.umask(old)
    database = Path(project.db.url.removeprefix("sqlite:///"))
    for path in (
        database,
        Path(f"{database}.script_run_tracker.lock"),
        embedded,
        Path(f"{embedded}.script_run_tracker.lock"),
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@SQLITE_ONLY
def test_an_existing_database_keeps_its_mode(project: Project, tmp_path: Path) -> None:
    shared = make_sqlite(tmp_path / "shared")
    path = Path(shared.url.removeprefix("sqlite:///"))
    path.parent.mkdir()
    path.touch()
    path.chmod(0o640)
    project.write("a1", None)
    ok(invoke(project, "upgrade", "heads", DM_DATABASE_URL=shared.url))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@SQLITE_ONLY
def test_stored_control_characters_are_escaped_when_printed(project: Project) -> None:
    """A reason, a pod name and `$USER` holding terminal escapes and a bidi override reach
    the terminal escaped, in dm's output and in its log lines."""
    project.write("a1", None)
    evil_user = "ops\x1b]0;owned\x07"
    evil_pod = "pod\x1b[2K\u202etxt.exe"
    ok(invoke(project, "upgrade", "heads", USER=evil_user, LOGNAME=evil_user, DM_POD_NAME=evil_pod))
    reason = "done\x1b[1A\x1b[2K\rall clear"
    resolved = ok(invoke(project, "run", "a1", "--force", "--reason", reason))
    outputs = []
    for args in (("log", "a1"), ("status",), ("show", "a1")):
        result = ok(invoke(project, *args))
        outputs.append(result.stdout + result.stderr)
    outputs.append(resolved.stdout + resolved.stderr)
    text = "\n".join(outputs)
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text and "\r" not in text
    assert "\\x1b[2K" in text  # shown, escaped
    stored = project.db.tracker()
    assert any(reason in (row.reason or "") for row in stored)  # stored as given
    assert stored[0].pod_name == evil_pod and stored[0].run_by.startswith(evil_user)


def test_printable_keeps_newlines_and_tabs() -> None:
    from dm.core.printable import printable

    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("a\x1b[31m\u202e\r") == "a\\x1b[31m\\u202e\\x0d"
