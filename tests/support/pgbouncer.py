"""A real PgBouncer in front of the test PostgreSQL, on a private loopback port.

``pgbouncer`` (Debian's package) must be on ``PATH`` or in ``/usr/sbin``; without it the
tests skip, and fail under ``CI=true``. Each instance gets its own directory, port and
pool mode, with ``default_pool_size`` server connections per database and user, and
forwards every database name to the test server (so the per-test databases need no
entry). Its admin console (``SHOW POOLS``) is read with ``psql``. It runs as the
``postgres`` system user when started by root (PgBouncer refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import IN_CI
from conftest import PG_HOST
from conftest import PG_PORT
from conftest import pg_user


def pgbouncer_binary() -> str:
    """Return the pgbouncer executable; skip (fail under CI=true) when there is none."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")
    if found is None:
        message = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if IN_CI:
            pytest.fail(message + " (CI=true: the pooler tests must run)")
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgBouncer:
    """A running PgBouncer: ``url(database_url)`` points a test URL through it."""

    port: int
    mode: str
    pool_size: int
    process: subprocess.Popen[bytes]
    log: Path
    user: str

    def url(self, database_url: str, **query: str) -> str:
        """Return ``database_url`` pointed at this PgBouncer, with ``query`` added."""
        url = sa.make_url(database_url).set(host="127.0.0.1", port=self.port)
        if query:
            url = url.update_query_dict(query)
        return url.render_as_string(hide_password=False)

    def waiting_clients(self) -> int:
        """Return how many clients wait for a server connection (``SHOW POOLS``, summed)."""
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "pgbouncer"]
            + ["-A", "-F", "|", "-c", "SHOW POOLS"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        lines = [line.split("|") for line in result.stdout.splitlines() if "|" in line]
        column = lines[0].index("cl_waiting")
        return sum(int(row[column]) for row in lines[1:] if row[0] != "pgbouncer")

    def stop(self) -> None:
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # immediate shutdown
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_pgbouncer(mode: str, pool_size: int = 2, **settings: str) -> PgBouncer:
    """Start a PgBouncer in ``mode`` (transaction or session) and wait until it listens;
    ``settings`` go into its ``[pgbouncer]`` section as they are."""
    binary = pgbouncer_binary()
    user = pg_user()
    work = Path(tempfile.mkdtemp(prefix=f"dm-pgbouncer-{mode}-"))
    port = _free_port()
    (work / "users.txt").write_text(f'"{user}" ""\n')
    config = work / "pgbouncer.ini"
    config.write_text(
        "\n".join(
            [
                "[databases]",
                f"* = host={PG_HOST} port={PG_PORT}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"admin_users = {user}",
                f"auth_file = {work / 'users.txt'}",
                f"pool_mode = {mode}",
                f"default_pool_size = {pool_size}",
                "min_pool_size = 0",
                "reserve_pool_size = 0",
                "max_client_conn = 200",
                "ignore_startup_parameters = extra_float_digits",
                "server_check_delay = 0",
                f"logfile = {work / 'pgbouncer.log'}",
                f"pidfile = {work / 'pgbouncer.pid'}",
                *(f"{name} = {value}" for name, value in settings.items()),
                "",
            ]
        )
    )
    command = [binary, str(config)]
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(work, account.pw_uid, account.pw_gid)
        for path in work.iterdir():
            os.chown(path, account.pw_uid, account.pw_gid)
        command = [binary, "-u", "postgres", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    bouncer = PgBouncer(port, mode, pool_size, process, work / "pgbouncer.log", user)
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            error = process.stderr.read().decode() if process.stderr else ""
            raise AssertionError(f"pgbouncer exited {process.returncode}: {error}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return bouncer
        except OSError:
            if time.monotonic() > deadline:
                bouncer.stop()
                raise AssertionError(f"pgbouncer did not listen on port {port}") from None
            time.sleep(0.05)


def running_pgbouncer(mode: str, pool_size: int = 2, **settings: str) -> Iterator[PgBouncer]:
    """Yield a running PgBouncer; stop it afterwards."""
    bouncer = start_pgbouncer(mode, pool_size, **settings)
    try:
        yield bouncer
    finally:
        bouncer.stop()
