"""Put dm through the database's bad days on a private PostgreSQL cluster, and check that
nothing is written twice or lost, no lock stays held, and each fault ends with its code.

The harness starts its own cluster (``initdb`` + ``pg_ctl`` as the ``postgres`` OS user when
run as root, on a free port; never the shared server) and, per round, a fresh database owned
by a non-superuser role (so connection limits apply), a ``dm init`` project, and two TCP
proxies: one for the working connection (``DM_DATABASE_URL``), one for the lock connection
(``DM_LOCK_DATABASE_URL``). The revisions are a chain: each writes a unique marker row and adds
1 to its own range of counter rows, a statement at a time with short pauses; one is a
``transactional = False`` batched revision (counters only). A round starts ``dm upgrade
heads``, injects one fault while a revision runs (or before the run, for settings that only
new sessions see), waits for the exit (``HANG_SECONDS`` at most: "hung"), heals, then runs
dm again until it exits 0 and checks:

* every counter row is exactly 1 (``duplicates`` above, ``lost`` below);
* one marker per transactional revision (``duplicates``/``lost``);
* no advisory lock held on the database afterwards (``stuck``);
* every revision's latest tracker attempt is ``success`` (``unsettled``);
* the first run's exit code is one the docs give for the fault (``bad codes``).

It prints one table (one line per fault: rounds, exit codes seen, the longest time from the
fault to the exit, duplicates, lost, stuck, hung, unsettled, bad codes) and exits 1 on any
anomaly.

Usage::

    .venv/bin/python bench/chaos.py                     # 3 rounds of every fault
    .venv/bin/python bench/chaos.py --rounds 10
    .venv/bin/python bench/chaos.py --rounds 1 --faults terminate-work,freeze-work
    .venv/bin/python bench/chaos.py --quick             # CI: one round of each fault

PostgreSQL's binaries are looked up in ``--pg-bin`` (default: the newest
``/usr/lib/postgresql/*/bin``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import print_table  # noqa: E402

ROLE = "dm_chaos"
TEMPLATE = "chaos_template"
REVISIONS = 4
ROWS = 8
"""Counter rows per revision."""
BATCHED = 2
"""The index of the ``transactional = False`` batched revision."""
HANG_SECONDS = 90.0
"""A run still going this long after the fault counts as hung (and is killed)."""
RERUNS = 6
"""How many further runs may be needed until one exits 0."""

# fault -> the exit codes the docs give for it (README "Exit codes", docs/operations.md)
EXPECTED: dict[str, set[int]] = {
    "restart-fast": {3, 75},  # the connections end: transient, or the lock is gone
    "restart-immediate": {3, 75},
    "terminate-work": {75},
    "terminate-lock": {0, 3},  # 0: the run ended before its lock ping noticed (fenced)
    "drop": {3, 75},
    "latency": {0},
    "freeze-work": {75},
    "freeze-at-commit": {75},
    "freeze-lock": {0, 3},  # 0: the run ended before its lock ping (30 s bound) noticed
    "lock-table": {0, 75},  # lock_timeout, retried; 75 when the retries run out
    "statement-timeout": {1},  # 57014 is the revision's own failure
    "read-only": {0, 75},  # 0: the last transaction had begun before the switch
    "connection-limit": {75},
    "sigkill": {-signal.SIGKILL},
    "sigterm": {143},
}


# -- the private cluster -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """A PostgreSQL cluster of the harness's own, on a free port, trust authentication."""

    def __init__(self, pg_bin: Path) -> None:
        self.bin = pg_bin
        self.root = Path(tempfile.mkdtemp(prefix="dm-chaos-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.superuser = "postgres"

    def run(self, *args: str) -> None:
        subprocess.run(
            [*self.as_postgres, *args], check=True, capture_output=True, text=True, timeout=120
        )

    def start(self) -> None:
        self.run(
            str(self.bin / "initdb"),
            *("-D", str(self.data), "-U", self.superuser, "--auth=trust", "--no-sync"),
        )
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=60 -c full_page_writes=off"
        )
        self.run(
            str(self.bin / "pg_ctl"),
            *("-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start"),
        )
        self.sql(f"CREATE ROLE {ROLE} LOGIN")
        # Each round's database is a copy of this one; the project is shared by the rounds.
        self.sql(f"CREATE DATABASE {TEMPLATE} OWNER {ROLE}")
        self.sql(
            f"CREATE TABLE counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);"
            f"INSERT INTO counters SELECT g, 0 FROM generate_series(1, {REVISIONS * ROWS}) g;"
            f"CREATE TABLE markers (rev TEXT NOT NULL);"
            f"ALTER TABLE counters OWNER TO {ROLE}; ALTER TABLE markers OWNER TO {ROLE}",
            TEMPLATE,
        )
        self.project = self.root / "proj"
        write_project(self.project)

    def restart(self, mode: str) -> None:
        self.run(
            str(self.bin / "pg_ctl"),
            *("-D", str(self.data), "-l", str(self.root / "log"), "-m", mode, "-w", "restart"),
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str, port: int | None = None, user: str = ROLE) -> str:
        return f"postgresql://{user}@127.0.0.1:{port or self.port}/{database}"

    def sql(self, query: str, database: str = "postgres", *args: Any) -> list[Any]:
        """Run ``query`` as the superuser on ``database``, directly (no proxy)."""
        import asyncpg

        async def run() -> list[Any]:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=self.port, user=self.superuser, database=database, timeout=10
            )
            try:
                if ";" in query and not args:  # several statements: no result
                    await conn.execute(query)
                    return []
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return asyncio.run(run())


# -- the proxy ---------------------------------------------------------------------------------


class Proxy:
    """Relays ``127.0.0.1:port`` to the cluster; can drop, freeze, slow down, or freeze at
    the next ``COMMIT`` a client sends."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.frozen = threading.Event()
        self.freeze_at_commit = threading.Event()
        self.latency = 0.0
        self._drop = threading.Event()
        self._stopped = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._thread = threading.Thread(target=self._serve, name="chaos-proxy", daemon=True)
        self._thread.start()

    def drop(self) -> None:
        """Reset every connection now (both sides see the connection end)."""
        self._drop.set()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        for pair in self._pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.close()
        self.listener.close()

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        while not self._stopped.is_set():
            if self._drop.is_set():
                self._drop.clear()
                for pair in self._pairs:
                    for end in pair:
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            selector.unregister(end)
                        with contextlib.suppress(OSError):
                            end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                            end.close()
                self._pairs.clear()
            if self.frozen.is_set():
                self._stopped.wait(0.05)
                continue
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data is None:
                    client, _ = sock.accept()
                    try:
                        upstream = socket.create_connection(self.target, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    self._pairs.append((client, upstream))
                    selector.register(client, selectors.EVENT_READ, (upstream, True))
                    selector.register(upstream, selectors.EVENT_READ, (client, False))
                    continue
                other, from_client = key.data
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for end in (sock, other):
                        with contextlib.suppress(KeyError, ValueError, OSError):
                            selector.unregister(end)
                        with contextlib.suppress(OSError):
                            end.shutdown(socket.SHUT_RDWR)
                    continue
                if from_client and self.freeze_at_commit.is_set() and b"COMMIT" in data.upper():
                    self.frozen.set()  # the COMMIT is never delivered
                    break
                if self.latency:
                    time.sleep(self.latency)
                with contextlib.suppress(OSError):
                    other.sendall(data)
        selector.close()


# -- a round's project -------------------------------------------------------------------------


def revision_id(index: int) -> str:
    return f"c{index:011d}"


def write_project(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "dm", "init", str(root)], check=True, capture_output=True)
    versions = root / "data_migrations" / "versions"
    for index in range(REVISIONS):
        rev = revision_id(index)
        down = revision_id(index - 1) if index else None
        low, high = index * ROWS + 1, (index + 1) * ROWS
        if index == BATCHED:
            body = f"""
            with open(NOTES, "a") as f:
                f.write("start {rev}\\n")
            counters = sa.table("counters", sa.column("id"), sa.column("n"))
            rows = sa.select(counters.c.id).where(counters.c.id.between({low}, {high}))
            async for batch in batched(session, rows, key=counters.c.id, size=3):
                await session.execute(
                    counters.update()
                    .where(batch.where(), counters.c.id.between({low}, {high}))
                    .values(n=counters.c.n + 1)
                )
                await asyncio.sleep(0.1)
            """
            head = "from dm import batched\ntransactional = False\n"
        else:
            body = f"""
            with open(NOTES, "a") as f:
                f.write("start {rev}\\n")
            await session.execute(sa.text("INSERT INTO markers VALUES ('{rev}')"))
            for key in range({low}, {high + 1}):
                await session.execute(
                    sa.text("UPDATE counters SET n = n + 1 WHERE id = :k"), {{"k": key}}
                )
                await asyncio.sleep(0.02)
            await session.execute(sa.text("SELECT pg_sleep(0.1)"))
            """
            head = ""
        source = (
            f'"""Chaos revision {index}."""\n'
            "import asyncio\nimport os\nimport sqlalchemy as sa\n"
            f"{head}"
            f"revision = {rev!r}\ndown_revision = {down!r}\n"
            "branch_labels = None\ndepends_on = None\n"
            "NOTES = os.environ['CHAOS_NOTES']\n\n"
            "async def upgrade(session):\n"
            + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    ")
        )
        (versions / f"{rev}_chaos.py").write_text(source)


@dataclass
class Round:
    """One database, project and pair of proxies."""

    cluster: Cluster
    number: int
    root: Path = field(init=False)
    database: str = field(init=False)
    work: Proxy = field(init=False)
    lock: Proxy = field(init=False)
    notes: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dm-chaos-round-"))
        self.notes = self.root / "notes"
        self.notes.touch()
        self.database = f"chaos_{self.number}"
        self.cluster.sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        self.cluster.sql(f'CREATE DATABASE "{self.database}" TEMPLATE {TEMPLATE} OWNER {ROLE}')
        self.work = Proxy(self.cluster.port)
        self.lock = Proxy(self.cluster.port)

    def env(self, *, direct: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DM_")}
        work = None if direct else self.work.port
        lock = None if direct else self.lock.port
        env.update(
            DM_CONFIG=str(self.cluster.project / "alembic.ini"),
            CHAOS_NOTES=str(self.notes),
            DM_DATABASE_URL=self.cluster.url(self.database, work),
            DM_LOCK_DATABASE_URL=self.cluster.url(self.database, lock),
            DM_POD_NAME=f"chaos-{self.number}",
            DM_CONNECT_RETRY_SECONDS="2",
            DM_LOCK_TIMEOUT="60",
        )
        return env

    def spawn(self, *, direct: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "dm", "upgrade", "heads"],
            cwd=self.cluster.project,
            env=self.env(direct=direct),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def started(self) -> list[str]:
        return [line.split()[1] for line in self.notes.read_text().splitlines()]

    def close(self) -> None:
        self.work.close()
        self.lock.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what the database holds --------------------------------------------------------

    def q(self, query: str) -> list[Any]:
        return self.cluster.sql(query, self.database)

    def backends(self, *, lock: bool) -> list[int]:
        """The pids of this round's dm backends: its lock connection's, or the others."""
        rows = self.q(
            "SELECT a.pid, EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND "
            "l.locktype = 'advisory' AND l.granted) AS holds FROM pg_stat_activity a "
            "WHERE a.datname = current_database() "
            f"AND a.application_name = 'dm:chaos-{self.number}'"
        )
        return [row["pid"] for row in rows if row["holds"] == lock]

    def advisory_held(self) -> int:
        rows = self.q(
            "SELECT count(*) AS c FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        )
        return int(rows[0]["c"])


# -- faults ------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def before(fault: str, rnd: Round) -> Callable[[], None]:
    """Apply a fault that only new sessions see; return how to heal it."""
    db = rnd.database
    if fault == "statement-timeout":
        rnd.cluster.sql(f"ALTER DATABASE \"{db}\" SET statement_timeout = '50ms'")
        return lambda: rnd.cluster.sql(f'ALTER DATABASE "{db}" RESET statement_timeout')
    if fault == "connection-limit":
        rnd.cluster.sql(f"ALTER ROLE {ROLE} CONNECTION LIMIT 1")
        return lambda: rnd.cluster.sql(f"ALTER ROLE {ROLE} CONNECTION LIMIT -1")
    if fault == "latency":
        rnd.work.latency = rnd.lock.latency = 0.01
    return lambda: None


def inject(fault: str, rnd: Round, proc: subprocess.Popen[str]) -> Callable[[], None]:
    """Inject ``fault`` now (a revision is running); return how to heal it."""
    cluster = rnd.cluster
    if fault in ("restart-fast", "restart-immediate"):
        cluster.restart(fault.split("-")[1])
    elif fault == "terminate-work":
        for pid in rnd.backends(lock=False):
            cluster.sql("SELECT pg_terminate_backend($1)", "postgres", pid)
    elif fault == "terminate-lock":
        for pid in rnd.backends(lock=True):
            cluster.sql("SELECT pg_terminate_backend($1)", "postgres", pid)
    elif fault == "drop":
        rnd.work.drop()
        rnd.lock.drop()
    elif fault == "freeze-work":
        rnd.work.frozen.set()
    elif fault == "freeze-at-commit":
        rnd.work.freeze_at_commit.set()
    elif fault == "freeze-lock":
        rnd.lock.frozen.set()
    elif fault == "lock-table":
        holder = threading.Thread(target=_hold_tracker_lock, args=(rnd, 8.0), daemon=True)
        holder.start()
        return lambda: holder.join(15)
    elif fault == "read-only":
        cluster.sql("ALTER SYSTEM SET default_transaction_read_only = on")
        cluster.sql("SELECT pg_reload_conf()")

        def heal() -> None:
            cluster.sql("ALTER SYSTEM RESET default_transaction_read_only")
            cluster.sql("SELECT pg_reload_conf()")

        return heal
    elif fault == "sigkill":
        proc.send_signal(signal.SIGKILL)
    elif fault == "sigterm":
        proc.send_signal(signal.SIGTERM)
    return lambda: None


def _hold_tracker_lock(rnd: Round, seconds: float) -> None:
    import asyncpg

    async def hold() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=rnd.cluster.port, user="postgres", database=rnd.database
        )
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE script_run_tracker IN ACCESS EXCLUSIVE MODE")
                await asyncio.sleep(seconds)
        finally:
            await conn.close()

    asyncio.run(hold())


# -- a round -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None
    seconds: float
    duplicates: int = 0
    lost: int = 0
    stuck: int = 0
    hung: int = 0
    unsettled: int = 0
    bad_code: int = 0
    notes: list[str] = field(default_factory=list)


def play(cluster: Cluster, fault: str, number: int, verbose: bool) -> Outcome:
    rnd = Round(cluster, number)
    heal_before = before(fault, rnd)
    heal: Callable[[], None] = lambda: None  # noqa: E731
    proc = rnd.spawn()
    try:
        mid = fault not in ("statement-timeout", "connection-limit", "latency")
        # A revision with another after it, so the fault lands before the run's last commit.
        target = revision_id(random.randint(1, REVISIONS - 2))
        if mid:
            if not wait_until(lambda: target in rnd.started() or proc.poll() is not None, 60):
                return Outcome(None, 0.0, hung=1, notes=["the run never reached the fault"])
            time.sleep(random.uniform(0.0, 0.2))  # somewhere inside the revision
            if proc.poll() is not None:
                _, err = proc.communicate()
                return Outcome(proc.returncode, 0.0, notes=["exited before the fault", err])
        faulted = time.monotonic()
        if mid:
            heal = inject(fault, rnd, proc)
        try:
            _, stderr = proc.communicate(timeout=HANG_SECONDS)
            outcome = Outcome(proc.returncode, time.monotonic() - faulted)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            outcome = Outcome(None, time.monotonic() - faulted, hung=1)
        if outcome.code not in EXPECTED[fault]:
            outcome.bad_code = 1
            outcome.notes.append(f"exit {outcome.code}: {stderr.strip()[-600:]}")
        if "Traceback" in stderr:
            outcome.notes.append("a traceback was printed")
            outcome.bad_code = 1
        heal()
        heal_before()
        rnd.work.frozen.clear()
        rnd.work.freeze_at_commit.clear()
        rnd.lock.frozen.clear()
        rnd.work.latency = rnd.lock.latency = 0.0
        settle(rnd, outcome)
        if verbose:
            print(f"  {fault} #{number}: exit {outcome.code} in {outcome.seconds:.1f}s", flush=True)
        return outcome
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        rnd.close()
        with contextlib.suppress(Exception):
            cluster.sql(f'DROP DATABASE IF EXISTS "{rnd.database}" WITH (FORCE)')


def settle(rnd: Round, outcome: Outcome) -> None:
    """Run dm (directly) until it exits 0, then check the database."""
    for _ in range(0 if outcome.code == 0 else RERUNS):
        again = rnd.spawn(direct=True)
        try:
            _, err = again.communicate(timeout=HANG_SECONDS)
        except subprocess.TimeoutExpired:
            again.kill()
            again.communicate()
            outcome.hung += 1
            outcome.notes.append("a rerun hung")
            continue
        if again.returncode == 0:
            break
        outcome.notes.append(f"rerun exit {again.returncode}: {err.strip()[-300:]}")
    else:
        if outcome.code != 0:
            outcome.notes.append("no rerun exited 0")
            outcome.unsettled += 1
    counters = Counter(row["n"] for row in rnd.q("SELECT n FROM counters"))
    outcome.duplicates += sum(c for n, c in counters.items() if n > 1)
    outcome.lost += counters.get(0, 0)
    markers = Counter(row["rev"] for row in rnd.q("SELECT rev FROM markers"))
    for index in range(REVISIONS):
        if index == BATCHED:
            continue
        seen = markers.get(revision_id(index), 0)
        outcome.duplicates += max(seen - 1, 0)
        outcome.lost += 1 if seen == 0 else 0
    if not wait_until(lambda: rnd.advisory_held() == 0, 15, 0.2):
        outcome.stuck += 1
    latest: dict[str, str] = {}
    for row in rnd.q("SELECT revision, status FROM script_run_tracker ORDER BY id"):
        latest[row["revision"]] = row["status"]
    outcome.unsettled += sum(
        1 for index in range(REVISIONS) if latest.get(revision_id(index)) != "success"
    )
    if outcome.duplicates or outcome.lost or outcome.stuck or outcome.unsettled:
        outcome.notes.append(f"counters {dict(counters)}, markers {dict(markers)}")


# -- the table ---------------------------------------------------------------------------------


def newest_pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not found:
        raise SystemExit("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (--pg-bin)")
    return Path(found[-1])


@contextlib.contextmanager
def running_cluster(pg_bin: Path) -> Iterator[Cluster]:
    cluster = Cluster(pg_bin)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each fault")
    parser.add_argument("--faults", help="comma-separated faults (default: all)")
    parser.add_argument("--quick", action="store_true", help="one round of each fault (CI)")
    parser.add_argument("--pg-bin", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    faults = list(EXPECTED) if not args.faults else args.faults.split(",")
    unknown = [f for f in faults if f not in EXPECTED]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(EXPECTED)}")
    rounds = args.rounds
    if args.quick:
        rounds = 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    random.seed(seed)
    began = time.monotonic()
    rows = [
        [
            "fault",
            "rounds",
            "codes",
            "max exit s",
            "dup",
            "lost",
            "stuck",
            "hung",
            "unsettled",
            "bad code",
        ]
    ]
    anomalies: list[str] = []
    number = 0
    with running_cluster(args.pg_bin or newest_pg_bin()) as cluster:
        for fault in faults:
            outcomes = []
            for _ in range(rounds):
                number += 1
                outcome = play(cluster, fault, number, args.verbose)
                outcomes.append(outcome)
                bad = (
                    outcome.duplicates
                    + outcome.lost
                    + outcome.stuck
                    + outcome.hung
                    + outcome.unsettled
                    + outcome.bad_code
                )
                if bad:
                    anomalies.append(f"{fault} round {number}: " + "; ".join(outcome.notes))
            codes = Counter(o.code for o in outcomes)
            rows.append(
                [
                    fault,
                    str(len(outcomes)),
                    " ".join(f"{code}x{count}" for code, count in sorted(codes.items(), key=str)),
                    f"{max(o.seconds for o in outcomes):.1f}",
                    *(
                        str(sum(getattr(o, name) for o in outcomes))
                        for name in ("duplicates", "lost", "stuck", "hung", "unsettled", "bad_code")
                    ),
                ]
            )
    print_table(rows)
    print(f"\n{number} rounds in {time.monotonic() - began:.0f}s (seed {seed})")
    for anomaly in anomalies:
        print(f"ANOMALY {anomaly}")
    return 1 if anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
