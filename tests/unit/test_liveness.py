"""``dm.config.liveness``: the working session's guards against a dead client, the TCP options of
every connection, and the watch that drops a frozen working connection (exit 75)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import Project
from conftest import run_dm
from conftest import run_in_process
from conftest import spawn_dm
from conftest import wait_for
from support.network import tcp_proxy
from support.network import through

PG = pytest.mark.parametrize("db", ["postgresql"], indirect=True)
REV = "a1b2c3d4e5f6"

SETTINGS = (
    "idle_in_transaction_session_timeout",
    "tcp_user_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_count",
)


@pytest.mark.postgres
@PG
def test_the_working_session_is_guarded_against_a_dead_client(project: Project) -> None:
    """A dead pod's backend, idle in its transaction, ends on its own (the setting, hooks
    included), and the server drops a silent client within about half a minute."""
    project.db.query("CREATE TABLE seen (name TEXT, value TEXT)")
    body = "".join(
        f"await session.execute(sa.text(\"INSERT INTO seen VALUES ('{name}', "
        f"current_setting('{name}'))\"))\n"
        for name in SETTINGS
    )
    project.write(REV, None, body)

    ran = run_in_process(project, "upgrade", "heads", env={"DM_IDLE_IN_TRANSACTION_TIMEOUT": "7"})

    assert ran.returncode == 0, ran.stderr
    seen = {row.name: row.value for row in project.db.query("SELECT * FROM seen")}
    assert seen == {
        "idle_in_transaction_session_timeout": "7s",
        "tcp_user_timeout": "20000",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_count": "3",
    }


@pytest.mark.postgres
@PG
def test_every_connection_has_client_keepalives_and_a_user_timeout(project: Project) -> None:
    from dm.config.engines import create_engine
    from dm.config.liveness import driver_transport

    async def options() -> tuple[int, int, int]:
        engine = create_engine(sa.make_url(project.db.async_url))
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                sock = driver_transport(raw.driver_connection).get_extra_info("socket")
                return (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )
        finally:
            await engine.dispose()

    assert asyncio.run(options()) == (1, 10, 20_000)


# The revision writes its marker, then waits for the test's go-ahead before its next
# statement: the test freezes the network in between.
FROZEN_REVISION = """
await session.execute(sa.text("INSERT INTO markers VALUES ('{rev}')"))
Path(STARTED).touch()
while not Path(GO).exists():
    await asyncio.sleep(0.05)
await session.execute(sa.text("SELECT 1"))
"""


FENCE_FOR_SHARE = """
await session.execute(
    sa.text("SELECT 1 FROM script_run_tracker_meta WHERE key = 'fence' FOR SHARE")
)
"""


def _write_frozen(
    project: Project, files: Path, *, timeout: float | None = None, hold_fence: bool = False
) -> None:
    extra = f"""
import asyncio
from pathlib import Path
STARTED = {str(files / "started")!r}
GO = {str(files / "go")!r}
"""
    if timeout is not None:
        extra += f"timeout = {timeout}\n"
    project.db.query("CREATE TABLE markers (rev TEXT)")
    body = FROZEN_REVISION.format(rev=REV)
    if hold_fence:  # what a fenced tracker write holds until its commit
        body = FENCE_FOR_SHARE + body
    project.write(REV, None, body, extra=extra)


def _run_frozen(project: Project, files: Path) -> tuple[int, str, float]:
    """Run ``dm upgrade`` with its working connection through a proxy that freezes
    mid-revision (the lock connection goes direct); return exit code, stderr, seconds
    from the freeze to the exit."""
    with tcp_proxy() as proxy:
        env = {
            "DM_DATABASE_URL": through(project.db.url, proxy.port),
            "DM_LOCK_DATABASE_URL": project.db.url,
        }
        proc = spawn_dm(project, "upgrade", "heads", env=env)
        try:
            wait_for(lambda: (files / "started").exists() or proc.poll() is not None, 60)
            assert proc.poll() is None, proc.communicate()
            proxy.freeze()
            frozen = time.monotonic()
            (files / "go").touch()
            _, stderr = proc.communicate(timeout=60)
            return proc.returncode, stderr, time.monotonic() - frozen
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.postgres
@pytest.mark.process
@pytest.mark.slow
@PG
def test_a_frozen_working_connection_exits_75_in_bounded_time(
    project: Project, tmp_path: Path
) -> None:
    _write_frozen(project, tmp_path)

    code, stderr, seconds = _run_frozen(project, tmp_path)

    assert code == 75, stderr
    assert seconds < 20, f"{seconds:.1f}s: {stderr}"
    [line] = [line for line in stderr.splitlines() if line.startswith("dm: error:")]
    assert "the network froze" in line, line
    assert "Traceback" not in stderr
    assert project.db.query("SELECT * FROM markers") == []  # rolled back on the server
    again = run_dm(project, "upgrade", "heads")
    assert again.returncode == 0, again.stderr
    assert [row.rev for row in project.db.query("SELECT * FROM markers")] == [REV]


@pytest.mark.postgres
@pytest.mark.process
@pytest.mark.slow
@PG
def test_a_revision_timeout_during_a_network_freeze_exits_75(
    project: Project, tmp_path: Path
) -> None:
    """The revision's time limit runs out while its statement waits on a frozen network:
    the network is at fault, not the revision (75, not 1)."""
    _write_frozen(project, tmp_path, timeout=2)

    code, stderr, seconds = _run_frozen(project, tmp_path)

    assert code == 75, stderr
    assert seconds < 20, f"{seconds:.1f}s"
    assert "Traceback" not in stderr
    again = run_dm(project, "upgrade", "heads")
    assert again.returncode == 0, again.stderr
    assert [row.rev for row in project.db.query("SELECT * FROM markers")] == [REV]


@pytest.mark.postgres
@pytest.mark.process
@pytest.mark.slow
@PG
def test_a_dead_pods_frozen_session_ends_on_its_own_and_the_next_run_goes_on(
    project: Project, tmp_path: Path
) -> None:
    """The pod dies while its working connection is frozen mid-revision: the server keeps
    its backend, idle in its transaction and holding the fence row, until TCP gives up. The
    session's ``idle_in_transaction_session_timeout`` ends it, so the next run claims the
    fence and applies the revision once, instead of waiting out its lock timeout."""
    _write_frozen(project, tmp_path, hold_fence=True)
    with tcp_proxy() as proxy:
        env = {
            "DM_DATABASE_URL": through(project.db.url, proxy.port),
            "DM_LOCK_DATABASE_URL": project.db.url,
            "DM_IDLE_IN_TRANSACTION_TIMEOUT": "3",
        }
        proc = spawn_dm(project, "upgrade", "heads", env=env)
        try:
            wait_for(lambda: (tmp_path / "started").exists() or proc.poll() is not None, 60)
            assert proc.poll() is None, proc.communicate()
            proxy.freeze()
            proc.kill()  # the pod is gone; the proxy keeps the server's side open
            proc.communicate()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        (tmp_path / "go").touch()
        began = time.monotonic()
        again = run_dm(
            project,
            "upgrade",
            "heads",
            "--lock-timeout",
            "15",
            env={"DM_CONNECT_RETRY_SECONDS": "0"},
        )
        seconds = time.monotonic() - began

    assert again.returncode == 0, again.stderr
    assert seconds < 15
    assert [row.rev for row in project.db.query("SELECT * FROM markers")] == [REV]
