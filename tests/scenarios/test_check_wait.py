"""``dm check --wait``: real processes poll while another process upgrades (an initContainer
gating an application on a pre-deploy Job), give up after the timeout, and ride out a
database that is unreachable for a moment."""

from __future__ import annotations

import json

import pytest

from conftest import Project
from conftest import invoke
from conftest import wait_for
from support.network import TcpProxy
from support.network import through
from support.processes import Spawn
from support.processes import block_in
from support.processes import write_chain


def poll_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " poll " in line]


@pytest.mark.process
@pytest.mark.slow
def test_wait_passes_once_an_upgrade_in_another_process_finishes(
    project: Project, spawn: Spawn
) -> None:
    """While a revision runs in another process, the waiter logs one line per poll naming
    it; once that run finishes the waiter exits 0 and prints the final state."""
    chain = write_chain(project, 2)
    upgrade = block_in(chain, spawn, "r00")
    waiter = spawn(project, "check", "--wait", "--timeout", "60", "--interval", "0.2", "--json")
    wait_for(lambda: len(poll_lines(waiter.stderr())) >= 2 or not waiter.running())
    assert waiter.running(), waiter.stderr()
    chain.release()

    assert upgrade.wait(60) == 0, upgrade.stderr()
    assert waiter.wait(60) == 0, waiter.stderr()
    final = json.loads(waiter.stdout())
    assert final["ok"] is True
    assert final["pending"] == final["running"] == final["failed"] == []
    lines = poll_lines(waiter.stderr())
    assert "waiting for pending r01; running r00" in lines[0]
    assert all("waiting for" in line and "next poll in 0.2s" in line for line in lines)
    assert "check passed after" in waiter.stderr()
    chain.assert_exactly_once()


@pytest.mark.process
def test_wait_gives_up_after_the_timeout_with_exit_4(project: Project, spawn: Spawn) -> None:
    """Nothing runs the pending revision: the waiter exits 4 after the timeout, with the
    last state on stdout."""
    write_chain(project, 1)
    waiter = spawn(project, "check", "--wait", "--timeout", "0.5", "--interval", "0.1", "--json")
    assert waiter.wait(60) == 4, waiter.stderr()
    assert json.loads(waiter.stdout())["pending"] == ["r00"]
    assert "gave up waiting after 0.5s" in waiter.stderr()
    assert "Traceback" not in waiter.stderr()


def test_wait_passes_at_once_when_nothing_is_pending(project: Project) -> None:
    write_chain(project, 1)
    assert invoke(project, "upgrade", "heads").exit_code == 0
    result = invoke(project, "check", "--wait", "--timeout", "5")
    assert result.exit_code == 0, result.stderr
    assert "ok: every revision is applied" in result.stdout
    assert "poll 1:" not in result.stderr


def test_timeout_without_wait_is_refused(project: Project) -> None:
    result = invoke(project, "check", "--timeout", "5")
    assert result.exit_code == 2
    assert "--timeout and --interval go with --wait" in result.stderr


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
def test_wait_rides_out_a_database_that_is_briefly_unreachable(
    project: Project, spawn: Spawn, proxy: TcpProxy
) -> None:
    """The database refuses connections when the waiter starts: each failed poll is logged
    as a warning and counts as "not yet"; once it answers, the check passes."""
    chain = write_chain(project, 1)
    assert invoke(project, "upgrade", "heads").exit_code == 0
    url = through(project.db.url, proxy.port)
    waiter = spawn(
        project,
        "check",
        "--wait",
        "--timeout",
        "60",
        "--interval",
        "0.2",
        env={"DM_DATABASE_URL": url},
    )
    wait_for(lambda: len(poll_lines(waiter.stderr())) >= 2 or not waiter.running())
    assert waiter.running(), waiter.stderr()
    proxy.listen()

    assert waiter.wait(60) == 0, waiter.stderr()
    failed_poll = poll_lines(waiter.stderr())[0]
    assert "WARNING" in failed_poll
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{proxy.port}/" in failed_poll
    assert "ok: every revision is applied" in waiter.stdout()
    chain.assert_exactly_once()


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.postgres
def test_wait_on_an_unreachable_database_ends_with_exit_75(
    project: Project, spawn: Spawn, proxy: TcpProxy
) -> None:
    write_chain(project, 1)
    url = through(project.db.url, proxy.port)
    waiter = spawn(
        project,
        "check",
        "--wait",
        "--timeout",
        "0.5",
        "--interval",
        "0.1",
        env={"DM_DATABASE_URL": url},
    )
    assert waiter.wait(60) == 75, waiter.stderr()
    last = waiter.stderr().strip().splitlines()[-1]
    assert last.startswith("dm: error: cannot connect to PostgreSQL"), last
    assert "gave up waiting after 0.5s" in last
