"""The migration lock: waiting, timing out with the holder named, freed on every exit path.

Process scenarios use real ``python -m dm`` runs (helpers from ``test_process``); the last
tests drive ``dm.engine.lock.migration_lock`` directly against the same databases.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from conftest import Database
from conftest import Project
from conftest import run_dm
from conftest import wait_for
from dm.config.urls import normalise_url
from dm.core.errors import LockTimeout
from dm.engine.lock import lock_key
from dm.engine.lock import migration_lock
from dm.engine.tracker import Tracker
from support.processes import Spawn
from support.processes import advisory_locks
from support.processes import assert_lock_free
from support.processes import block_in
from support.processes import write_chain

WAITING = "waiting for the migration lock, held by"


@pytest.mark.process
@pytest.mark.slow
def test_second_run_waits_for_the_first_then_finds_the_work_done(
    project: Project, spawn: Spawn
) -> None:
    """Two pods: the second logs who holds the lock, waits, then exits 0 having run nothing."""
    chain = write_chain(project, 4)
    first = block_in(chain, spawn, "r02", DM_POD_NAME="pod-a")
    second = spawn(project, "upgrade", "heads", env={"DM_POD_NAME": "pod-b"})

    wait_for(lambda: WAITING in second.stderr() or not second.running(), timeout=30)
    assert second.running(), second.stderr()
    holder = "dm on pod-a" if project.db.kind == "postgresql" else f"pid {first.pid}"
    assert holder in second.stderr()

    chain.release()
    assert first.wait(60) == 0, first.stderr()
    assert second.wait(60) == 0, second.stderr()
    assert "another run finished this work while dm waited for the lock" in second.stderr()
    chain.assert_exactly_once()
    assert {r.pod_name for r in project.db.tracker()} == {"pod-a"}


@pytest.mark.process
def test_lock_timeout_exits_3_and_names_the_holder(project: Project, spawn: Spawn) -> None:
    chain = write_chain(project, 3)
    first = block_in(chain, spawn, "r01", DM_POD_NAME="pod-a")

    started = time.monotonic()
    result = run_dm(
        project, "upgrade", "heads", "--lock-timeout", "2", env={"DM_POD_NAME": "pod-b"}
    )

    assert result.returncode == 3, result.stderr
    assert 2 <= time.monotonic() - started < 15
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("dm: error: migration lock")
    assert "not acquired within 2s" in error
    if project.db.kind == "postgresql":
        assert "(dm on pod-a, " in error  # the holder's pod (DM_POD_NAME) or host
        assert f"backend pid {advisory_locks(project)[0]} " in error  # the holder's backend
    else:
        assert f"pid {first.pid} on " in error
    assert {r.pod_name for r in project.db.tracker()} == {"pod-a"}  # pod-b wrote nothing
    chain.release()
    assert first.wait(60) == 0, first.stderr()
    chain.assert_exactly_once()


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.process
@pytest.mark.slow
def test_lock_held_by_another_session_times_out_naming_it(project: Project) -> None:
    """Any session holding dm's key (here a raw asyncpg one) blocks dm, named in the error."""
    import asyncpg

    write_chain(project, 2)
    url = sa.make_url(project.db.url)

    async def scenario() -> tuple[int, str, int]:
        holder = await asyncpg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            database=url.database,
            server_settings={"application_name": "maintenance-script"},
        )
        try:
            tracker = Tracker()  # dm's key: the tracker as the server resolves it
            tracker.relation = f"{url.database}.public.script_run_tracker"
            await holder.execute("SELECT pg_advisory_lock($1)", lock_key(tracker))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "dm", "upgrade", "heads", "--lock-timeout", "2"),
                cwd=project.root,
                env={**_environ(), **project.env()},
                stderr=asyncio.subprocess.PIPE,
            )
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode is not None
            return proc.returncode, stderr.decode(), holder.get_server_pid()
        finally:
            await holder.close()

    code, stderr, holder_pid = asyncio.run(scenario())

    assert code == 3, stderr
    assert f"held by backend pid {holder_pid} (maintenance-script" in stderr
    assert "upgrade r00" not in stderr  # nothing ran
    # The holder's session ended, so the lock is free and the next run applies everything.
    assert_lock_free(project)


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_claiming_the_fence_is_bounded_by_the_lock_timeout(project: Project) -> None:
    """A session that lost the migration lock but keeps a fenced write's transaction open
    holds the fence row (``FOR SHARE``): the next run's claim waits at most --lock-timeout,
    then exits 75 (the session ends on its own) naming that session: its pid,
    application_name, state and since when, instead of waiting forever."""
    import asyncpg

    chain = write_chain(project, 2)
    assert run_dm(project, "upgrade", "r00").returncode == 0  # the tracker and its fence
    url = sa.make_url(project.db.url)

    async def scenario() -> tuple[int | None, str, int, float]:
        holder = await asyncpg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            database=url.database,
            server_settings={"application_name": "stuck-run"},
        )
        try:
            transaction = holder.transaction()
            await transaction.start()
            # What a fenced tracker write of a run still in flight holds.
            await holder.execute(
                "SELECT key FROM script_run_tracker_meta WHERE key = 'fence' FOR SHARE"
            )
            began = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "dm", "upgrade", "heads", "--lock-timeout", "2"),
                cwd=project.root,
                env={**_environ(), **project.env()},
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, stderr = await asyncio.wait_for(proc.communicate(), 30)
            except TimeoutError:  # waiting for the fence row for ever
                proc.kill()
                _, stderr = await proc.communicate()
            seconds = time.monotonic() - began
            return proc.returncode, stderr.decode(), holder.get_server_pid(), seconds
        finally:
            await holder.close()

    code, stderr, holder_pid, seconds = asyncio.run(scenario())

    assert code == 75, f"exit {code} after {seconds:.1f}s: {stderr}"
    assert seconds < 20
    [line] = [line for line in stderr.splitlines() if line.startswith("dm: error:")]
    assert "fence" in line and "not claimed within 2s" in line
    assert f"backend {holder_pid} (application_name 'stuck-run', idle in transaction" in line
    assert "idle in transaction since 20" in line
    assert "Traceback" not in stderr
    assert "upgrade r01" not in stderr  # nothing ran
    assert chain.rows() == Counter({"r00": 3})
    assert_lock_free(project)  # the holder's session ended; the next run applies r01
    assert chain.rows() == Counter({"r00": 3, "r01": 3})


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.process
@pytest.mark.slow
def test_run_stops_when_its_lock_connection_dies(project: Project, spawn: Spawn) -> None:
    """If the lock session is killed (e.g. by an idle-session reaper) the lock is gone:
    dm rolls the revision back and exits 3 instead of going on unprotected."""
    chain = write_chain(project, 3)
    proc = block_in(chain, spawn, "r01")
    (holder,) = advisory_locks(project)
    project.db.query("SELECT pg_terminate_backend(:pid)", pid=holder)

    assert proc.wait(30) == 3, proc.stderr()
    assert "lost the migration lock" in proc.stderr()
    last = project.db.tracker()[-1]
    assert (last.revision, last.status, last.reason) == ("r01", "failed", "interrupted")
    assert chain.rows() == Counter({"r00": 3})

    # A second run gets the lock at once, retries r01 and finishes: each revision's rows
    # exist once, and r01's interrupted attempt stays on record before its success.
    chain.release()
    second = run_dm(project, "upgrade", "heads", "--lock-timeout", "0")
    assert second.returncode == 0, second.stderr
    assert chain.rows() == Counter(dict.fromkeys(chain.revisions, 3))
    assert [(rev, status) for rev, status in chain.statuses() if rev == "r01"] == [
        ("r01", "failed"),
        ("r01", "success"),
    ]
    assert advisory_locks(project) == []


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.process
@pytest.mark.slow
def test_revision_waiting_for_a_row_lock_fails_after_pg_lock_timeout(project: Project) -> None:
    """``DM_PG_LOCK_TIMEOUT`` bounds how long a revision queues behind another session's
    locks (here an open transaction holding the table), instead of hanging the deploy; the
    failure is transient (exit 75), so the Job may retry. (Retries in place are off here;
    ``test_lock_retries`` covers them.)"""
    import asyncpg

    write_chain(project, 3)
    assert run_dm(project, "upgrade", "r00").returncode == 0
    url = sa.make_url(project.db.url)

    async def scenario() -> subprocess.CompletedProcess[bytes]:
        blocker = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, database=url.database
        )
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE hits IN ACCESS EXCLUSIVE MODE")
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "dm", "upgrade", "heads"),
                    cwd=project.root,
                    env={
                        **_environ(),
                        **project.env(),
                        **{"DM_PG_LOCK_TIMEOUT": "1", "DM_LOCK_RETRIES": "0"},
                    },
                    stderr=asyncio.subprocess.PIPE,
                )
                _, stderr = await asyncio.wait_for(proc.communicate(), 60)
                assert proc.returncode is not None
                return subprocess.CompletedProcess([], proc.returncode, b"", stderr)
        finally:
            await blocker.close()

    started = time.monotonic()
    result = asyncio.run(scenario())
    stderr = result.stderr.decode()

    assert result.returncode == 75, stderr  # transient: the next run may get the lock
    assert time.monotonic() - started < 15
    assert "revision r01 failed: transient" in stderr and "lock timeout" in stderr
    last = project.db.tracker()[-1]
    assert (last.revision, last.status) == ("r01", "failed")
    assert last.error_message.startswith("transient (a retry may succeed): ")
    assert "lock timeout" in last.error_message
    assert "DM_PG_LOCK_TIMEOUT=1s" in last.error_message


@pytest.mark.process
@pytest.mark.slow
def test_sigterm_while_waiting_for_the_lock(project: Project, spawn: Spawn) -> None:
    """A pod stopped while it waits exits 143 at once, having written nothing."""
    chain = write_chain(project, 3)
    first = block_in(chain, spawn, "r01", DM_POD_NAME="pod-a")
    second = spawn(project, "upgrade", "heads", env={"DM_POD_NAME": "pod-b"})
    wait_for(lambda: WAITING in second.stderr() or not second.running(), timeout=30)

    code, seconds = second.signal_and_time(signal.SIGTERM)

    assert code == 143, second.stderr()
    assert seconds < 5
    assert first.running()
    assert {r.pod_name for r in project.db.tracker()} == {"pod-a"}
    chain.release()
    assert first.wait(60) == 0
    chain.assert_exactly_once()


# -- the lock itself, in-process -------------------------------------------------------------


def test_lock_key_is_stable_and_differs_per_tracker() -> None:
    key = lock_key(Tracker())
    assert key == lock_key(Tracker("script_run_tracker"))
    assert -(2**63) <= key < 2**63
    assert len({key, lock_key(Tracker("other")), lock_key(Tracker(schema="ops"))}) == 3


def _lock_url(db: Database) -> sa.URL:
    return normalise_url(db.url, "test database")


def test_lock_is_exclusive_and_released_on_exit(db: Database) -> None:
    """While one holder has the lock a second attempt times out; after it, the lock is free."""
    url = _lock_url(db)
    tracker = Tracker()

    async def scenario() -> None:
        async with migration_lock(url, tracker, 0, "dm-test:first"):
            started = time.monotonic()
            with pytest.raises(LockTimeout) as excinfo:
                async with migration_lock(url, tracker, 0.3, "dm-test:second"):
                    pass  # pragma: no cover
            assert time.monotonic() - started < 3
            holder = "dm-test:first" if db.kind == "postgresql" else "pid "
            assert holder in str(excinfo.value)
        async with migration_lock(url, tracker, 0, "dm-test:third"):
            pass
        with pytest.raises(RuntimeError):  # released when the block raises, too
            async with migration_lock(url, tracker, 0, "dm-test:fourth"):
                raise RuntimeError("boom")
        async with migration_lock(url, tracker, 0, "dm-test:fifth"):
            pass

    asyncio.run(scenario())


def test_different_trackers_do_not_block_each_other(db: Database) -> None:
    url = _lock_url(db)

    async def scenario() -> None:
        async with migration_lock(url, Tracker("tracker_a"), 0, "dm-test:a"):
            async with migration_lock(url, Tracker("tracker_b"), 0, "dm-test:b"):
                pass

    asyncio.run(scenario())


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_lock_url_in_another_database_is_refused(project: Project) -> None:
    """An advisory lock excludes only sessions of its own database: a lock URL pointing at
    another one would let two runs in at once."""
    from conftest import run_in_process

    other = project.db.url.rsplit("/", 1)[0] + "/postgres"
    project.write("a1", None)
    ran = run_in_process(project, "upgrade", env={"DM_LOCK_DATABASE_URL": other})
    assert ran.returncode == 2, ran.stderr
    assert "DM_LOCK_DATABASE_URL connects to database 'postgres', but the tracker" in ran.stderr
    tables = "SELECT count(*) AS n FROM pg_tables WHERE tablename LIKE 'script_run_tracker%'"
    assert project.db.query(tables)[0].n == 0  # refused before anything was written
