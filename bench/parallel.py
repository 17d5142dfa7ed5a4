"""Measure parallel backfills (``dm.batched(..., workers=N)`` and ``dm work``) on PostgreSQL.

Every measurement runs whole processes, as a Kubernetes Job runs them: ``python -m dm
upgrade heads`` (and ``python -m dm work REV --wait 60``, started at the same moment)
against a database dropped and created for it, with its table built outside the timed
section. The time is the wall time from the processes' start until the last one exited
(start-up and imports included); each process runs under a small wrapper of this script
that reports its peak RSS and CPU seconds. Four scenarios, each against a baseline
measured in the same run:

1. **database-bound** (``--rows``, default 1,000,000): bench/batched.py's table and update
   (``users.display_name = split_part(email, '@', 1)``, batches of ``--size``): one plain
   ``UPDATE`` statement (the baseline, on one asyncpg connection), ``workers=1`` and
   ``workers=2``. Target: ``workers=2`` >= 1.4x ``workers=1``.
2. **Python-bound** (``--py-rows``, default 200,000): ``docs(id, payload text)``, a JSON
   document per row; the revision fetches each page (``rows=True``), parses every
   document, rewrites it in Python (``--py-rounds`` rewrites per row, like a re-encryption)
   and writes the batch back with one ``UPDATE ... FROM unnest(...)``. ``workers=1`` alone;
   ``workers=2`` alone (two tasks in one process: one core, the GIL); ``workers=2`` plus one
   ``dm work`` process (two processes). Target: two processes >= 1.7x the run alone
   (``workers=2``, one process).
3. **remote database** (``--remote-rows``, default 1,000,000, batches of ``--remote-size``):
   the update of (1) through a TCP proxy of this script that delays every chunk by
   ``--delay-ms`` (default 1) each way, 2 ms per round trip: ``workers=1`` vs ``workers=4``
   (four tasks of one process), and ``workers=2`` plus two ``dm work`` (four workers in
   three processes: whether one process's event loop is what holds four workers back).
   Target: 4 workers >= 3x 1 worker. Beside them, this machine's ceiling: the same
   statements per batch written by hand on bare asyncpg (no dm, no SQLAlchemy), in a
   process of its own, over 1 and 4 connections; the database's backends share this
   machine's cores with the clients and the proxy, as a database in another zone would
   not. A million rows by default, so that the start-up of a process (in both sides of the
   ratio) weighs little beside the loop.
4. **memory** (``--memory-rows``, default 100,000 and 1,000,000): the peak RSS of the run
   (``workers=2``: two workers in one process) and of one ``dm work`` beside it, over the
   update of (1) in batches of ``--memory-size`` (default 1,000, so that the loop lasts long
   enough for ``dm work`` to join; the table says whether it did). Target: each within 10%
   from the smallest to the largest table.

Each configuration runs once untimed on a small table first (imports, caches), then
``--reps`` times (default 3), the configurations of a scenario alternating in an order
rotated each repetition. The tables show medians, min-max, rows/s, the ratio to the
scenario's baseline, the revision's own seconds in the tracker (without start-up), the CPU
seconds of all its processes, the seconds they waited for a CPU while runnable (their run
queue: other work on the machine), the share of the machine's CPU time (every core, every
process: the server and the proxy too) used while it ran, and their peak RSS. A
configuration whose machine is near 100% busy is bound by this machine's cores, not by dm.
After every run the table is checked (every row backfilled, rightly); otherwise FAIL and
exit 1.

``--scenarios trace`` (not run by default) looks for where the time goes: it runs
``workers=1`` and ``workers=2`` of (1) and ``workers=1`` and ``workers=4`` of (3) over
``--trace-rows``, and (2) (the run alone, then with one ``dm work``) over a fifth of them,
once each, through the proxy (delaying for (3) only), which decodes the PostgreSQL
protocol: the statements executed per batch, the round trips and the seconds from each
request to the server's answer (by statement), beside what the server's backends were
doing (``pg_stat_activity`` sampled every 20 ms: on the CPU, waiting for a lock or I/O,
or idle, the client's turn).

Usage (PostgreSQL at 127.0.0.1:5432 as postgres; the database ``dm_bench_parallel`` is
dropped and created by the script)::

    .venv/bin/python bench/parallel.py                       # everything, 3 repetitions
    .venv/bin/python bench/parallel.py --scenarios db,py --reps 5
    .venv/bin/python bench/parallel.py --rows 200000 --py-rows 50000 --memory-rows 10000,100000
    .venv/bin/python bench/parallel.py --scenarios trace

Exit status: 1 when a run failed or left a table wrong (or, with ``--strict``, when a
target failed); 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import queue
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path

import asyncpg
import sqlalchemy as sa
from batched import TRACKER_TABLE
from batched import Target
from batched import build_table
from batched import check_table
from reporting import load_average
from reporting import print_table

DATABASE = "dm_bench_parallel"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432"
SCENARIOS = ("db", "py", "remote", "memory", "trace")
WORK_WAIT_SECONDS = 60

USERS_REVISION = '''"""Backfill users.display_name from the local part of the e-mail address."""

import sqlalchemy as sa

from dm import batched

revision = {rev!r}
down_revision = None
branch_labels = None
depends_on = None

transactional = False


async def upgrade(session):
    users = sa.table("users", sa.column("id"), sa.column("email"), sa.column("display_name"))
    query = sa.select(users.c.id).where(users.c.display_name.is_(None))
    batches = batched(session, query, key=users.c.id, size={size}, workers={workers})
    async for batch in batches:
        await session.execute(
            users.update()
            .where(batch.where())
            .where(users.c.display_name.is_(None))
            .values(display_name=sa.func.split_part(users.c.email, "@", 1))
        )
'''

DOCS_REVISION = '''"""Rewrite every document of docs.payload (version 1 to version 2) in Python."""

import hashlib
import json

import sqlalchemy as sa

from dm import batched

revision = {rev!r}
down_revision = None
branch_labels = None
depends_on = None

transactional = False

ROUNDS = {rounds}
WRITE = sa.text(
    "UPDATE docs SET payload = v.payload "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:payloads AS text[])) AS v(id, payload) "
    "WHERE docs.id = v.id"
)


def rewrite(text):
    """Version 2 of a document: names title-cased, tags normalised, a total, a digest."""
    for _ in range(ROUNDS):
        doc = json.loads(text)
        items = doc["items"]
        doc["name"] = doc["name"].title()
        doc["tags"] = sorted({{tag.strip().lower() for tag in doc["tags"]}})
        doc["total"] = round(sum(item["price"] * item["qty"] for item in items), 2)
        doc["items"] = [{{**item, "sku": item["sku"].upper()}} for item in items]
        doc["digest"] = hashlib.sha256(text.encode()).hexdigest()
        doc["version"] = 2
        text = json.dumps(doc, sort_keys=True)
    return text


async def upgrade(session):
    docs = sa.table("docs", sa.column("id"), sa.column("payload"))
    query = sa.select(docs.c.id, docs.c.payload)
    batches = batched(session, query, key=docs.c.id, size={size}, rows=True, workers={workers})
    async for batch in batches:
        ids = [row.id for row in batch]
        payloads = [rewrite(row.payload) for row in batch]
        await session.execute(WRITE, {{"ids": ids, "payloads": payloads}})
'''


class BenchError(RuntimeError):
    """A run failed or left its table wrong."""


# -- projects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Project:
    """A ``dm init`` project holding one backfill revision."""

    directory: Path
    revision: str

    @property
    def config(self) -> Path:
        return self.directory / "alembic.ini"


def make_project(root: Path, name: str, text: str) -> Project:
    """``dm init`` a project ``root/name`` holding the one revision ``text``."""
    from dm import verbs

    directory = root / name
    revision = hashlib.sha1(name.encode()).hexdigest()[:12]
    if directory.exists():  # made by an earlier scenario
        return Project(directory, revision)
    verbs.init(directory)
    versions = directory / "data_migrations" / "versions"
    (versions / f"{revision}_backfill.py").write_text(text.replace("{REV}", revision), "utf-8")
    return Project(directory, revision)


def users_project(root: Path, workers: int, size: int) -> Project:
    text = USERS_REVISION.format(rev="{REV}", size=size, workers=workers)
    return make_project(root, f"users-w{workers}-s{size}", text)


def docs_project(root: Path, workers: int, size: int, rounds: int) -> Project:
    text = DOCS_REVISION.format(rev="{REV}", size=size, workers=workers, rounds=rounds)
    return make_project(root, f"docs-w{workers}-r{rounds}", text)


# -- tables ------------------------------------------------------------------------------------


async def build_docs(target: Target, rows: int) -> None:
    """Build ``docs`` with ``rows`` JSON documents of version 1 (about 1.3 KB each)."""
    conn = await target.connect()
    try:
        await conn.execute("DROP TABLE IF EXISTS docs")
        await conn.execute(
            "CREATE TABLE docs AS SELECT i::bigint AS id, json_build_object("
            "'id', i, 'version', 1, 'name', 'customer number ' || i,"
            "'tags', json_build_array(' Alpha', 'beta ', 'GAMMA', 'alpha', 'delta' || (i % 7)),"
            "'items', (SELECT json_agg(json_build_object('sku', 'sku-' || i || '-' || j,"
            " 'price', (j * 1.25)::numeric(8, 2), 'qty', 1 + (i + j) % 5,"
            " 'note', 'item ' || j || ' of order ' || i)) FROM generate_series(1, 12) AS j)"
            f")::text AS payload FROM generate_series(1, {int(rows)}) AS i"
        )
        await conn.execute("ALTER TABLE docs ADD PRIMARY KEY (id)")
        await conn.execute("ALTER TABLE docs SET (autovacuum_enabled = false)")
        await conn.execute("VACUUM ANALYZE docs")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def check_docs(target: Target, rows: int) -> str | None:
    """Return what is wrong with the rewritten documents, or None when they are right."""
    conn = await target.connect()
    try:
        total, rewritten, right = await conn.fetchrow(
            "SELECT count(*), count(*) FILTER (WHERE payload::jsonb ->> 'version' = '2'),"
            " count(*) FILTER (WHERE (payload::jsonb ->> 'total')::numeric"
            " = (SELECT sum((e ->> 'price')::numeric * (e ->> 'qty')::int)"
            "    FROM jsonb_array_elements(payload::jsonb -> 'items') AS e)"
            " AND payload::jsonb ->> 'name' LIKE 'Customer Number %') FROM docs"
        )
        if total != rows:
            return f"{total} documents instead of {rows}"
        if rewritten != rows:
            return f"{rows - rewritten} documents not rewritten"
        if right != rows:
            return f"{rows - right} documents rewritten wrongly"
        return None
    finally:
        await conn.close()


# -- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What one process used: peak RSS (KiB), CPU seconds, seconds it waited for a CPU
    while runnable (the run queue: other work on the machine), and its last line."""

    max_rss: int
    cpu: float
    waited: float
    said: str


def child_main(command: Sequence[str]) -> int:
    """Run ``command``; print its peak RSS, CPU seconds, run-queue wait and last output
    line as JSON on stdout."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(list(command), stdout=out)
        waited = 0.0
        while proc.poll() is None:
            waited = _run_queue_seconds(proc.pid, waited)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)
        out.seek(0)
        lines = out.read().strip().splitlines()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report = {
        "rc": proc.returncode,
        "max_rss": usage.ru_maxrss,
        "cpu": usage.ru_utime + usage.ru_stime,
        "waited": waited,
        "said": lines[-1] if lines else "",
    }
    print(json.dumps(report))
    return 0


def _run_queue_seconds(pid: int, last: float) -> float:
    """Seconds the threads of ``pid`` waited on a run queue so far (``last`` once gone)."""
    total = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return last
    return max(total, last)


async def start(args: Sequence[str], project: Project, url: str) -> asyncio.subprocess.Process:
    """Start ``python -m dm ARGS`` under the measuring wrapper."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        "--",
        sys.executable,
        "-m",
        "dm",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DM_CONFIG": str(project.config), "DM_DATABASE_URL": url},
    )


async def finish(proc: asyncio.subprocess.Process, what: str) -> Usage:
    """Wait for a wrapped process; return what it used; raise when it failed."""
    stdout, stderr = await proc.communicate()
    try:
        report = json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"{what}: no report ({stderr.decode()[-2000:]})") from None
    if report["rc"] != 0:
        raise BenchError(f"{what} exited {report['rc']}: {stderr.decode()[-2000:]}")
    return Usage(
        int(report["max_rss"]), float(report["cpu"]), float(report["waited"]), report["said"]
    )


@dataclass(frozen=True)
class Sample:
    """One measurement: wall seconds and what each process used (the run first)."""

    seconds: float
    usages: tuple[Usage, ...]
    revision: float = 0.0
    """The revision's own seconds as the tracker recorded them (no start-up)."""
    busy: float = 0.0
    """The share of the machine's CPU time (all cores) that something used during the run:
    the processes, the server's backends, the proxy and whatever else ran."""

    @property
    def cpu(self) -> float:
        return sum(u.cpu for u in self.usages)

    @property
    def waited(self) -> float:
        return sum(u.waited for u in self.usages)


async def run_dm(project: Project, url: str, joiners: int = 0) -> Sample:
    """Run ``dm upgrade heads`` and ``joiners`` ``dm work`` processes started beside it."""
    started = time.perf_counter()
    procs = [await start(("upgrade", "heads"), project, url)]
    work = ("work", project.revision, "--wait", str(WORK_WAIT_SECONDS))
    procs += [await start(work, project, url) for _ in range(joiners)]
    names = ["dm upgrade heads"] + [f"dm work {project.revision}"] * joiners
    try:
        usages = await asyncio.gather(*(finish(p, n) for p, n in zip(procs, names, strict=True)))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    return Sample(time.perf_counter() - started, tuple(usages))


async def run_hand(url: str, workers: int, size: int) -> Sample:
    """Run :func:`hand_loop` in a process of its own, under the measuring wrapper."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, __file__, "--child", "--"),
        *(sys.executable, __file__, "--hand-loop", url, str(workers), str(size)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    usage = await finish(proc, "the hand-written loop")
    seconds = time.perf_counter() - started
    return Sample(seconds, (usage,), revision=json.loads(usage.said)["loop_seconds"])


async def hand_loop(url: str, workers: int, size: int) -> float:
    """The update of (1) written by hand on bare asyncpg, ``workers`` connections each
    paging through a fixed key range, with dm's statements per batch (BEGIN, the page's
    keys, the update, a checkpoint row, COMMIT) and none of its work: what this machine and
    the proxy allow. Return the loop's seconds (connections included, imports not)."""
    started = time.perf_counter()
    setup = await asyncpg.connect(url)
    try:
        low, high = await setup.fetchrow("SELECT min(id), max(id) FROM users")
        await setup.execute(
            "CREATE TABLE IF NOT EXISTS hand_checkpoints (number int PRIMARY KEY, last bigint)"
        )
        bounds = [low - 1 + (high - low + 1) * n // workers for n in range(workers + 1)]
        await setup.execute("TRUNCATE hand_checkpoints")
        await setup.executemany(
            "INSERT INTO hand_checkpoints VALUES ($1, $2)",
            [(n, bounds[n]) for n in range(workers)],
        )
    finally:
        await setup.close()

    async def work(number: int) -> None:
        conn = await asyncpg.connect(url)
        last, upper = bounds[number], bounds[number + 1]
        try:
            while True:
                async with conn.transaction():
                    keys = await conn.fetch(
                        "SELECT id FROM users WHERE display_name IS NULL AND id > $1"
                        " AND id <= $2 ORDER BY id LIMIT $3",
                        last,
                        upper,
                        size,
                    )
                    if keys:
                        await conn.execute(
                            "UPDATE users SET display_name = split_part(email, '@', 1)"
                            " WHERE id > $1 AND id <= $2 AND display_name IS NULL",
                            last,
                            keys[-1]["id"],
                        )
                        last = keys[-1]["id"]
                    await conn.execute(
                        "UPDATE hand_checkpoints SET last = $1 WHERE number = $2", last, number
                    )
                if len(keys) < size:
                    return
        finally:
            await conn.close()

    await asyncio.gather(*(work(n) for n in range(workers)))
    return time.perf_counter() - started


# -- the delaying proxy ------------------------------------------------------------------------


@dataclass
class Traffic:
    """What went through the proxy: statements executed, round trips, and the seconds from
    each request to the server's ReadyForQuery, by statement (the server's time)."""

    executed: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    round_trips: int = 0
    connections: int = 0


class _Decoder:
    """Decode one connection's messages (the PostgreSQL protocol, v3): the client's
    requests, and the server's ReadyForQuery that ends each (each direction decoded on its
    own thread; ``lock`` guards what they share)."""

    def __init__(self, traffic: Traffic, lock: threading.Lock) -> None:
        self.traffic = traffic
        self.lock = lock
        self.client = b""
        self.server = b""
        self.started = False
        self.ssl_reply = False
        self.statements: dict[bytes, str] = {}
        self.bound: str | None = None
        self.pending: collections.deque[tuple[str, float]] = collections.deque()

    def from_client(self, data: bytes) -> None:
        with self.lock:
            self._from_client(data)

    def from_server(self, data: bytes) -> None:
        with self.lock:
            self._from_server(data)

    def _from_client(self, data: bytes) -> None:
        self.client += data
        while True:
            if not self.started:  # SSLRequest/GSSENCRequest, then the startup message
                if len(self.client) < 8:
                    return
                length, code = struct.unpack("!ii", self.client[:8])
                if len(self.client) < length:
                    return
                self.client = self.client[length:]
                self.ssl_reply = code in (80877103, 80877104)
                self.started = not self.ssl_reply
                continue
            message = _message(self.client)
            if message is None:
                return
            kind, body, self.client = message
            self._request(kind, body)

    def _from_server(self, data: bytes) -> None:
        self.server += data
        if self.ssl_reply and self.server:  # one byte: N (no SSL here)
            self.server, self.ssl_reply = self.server[1:], False
        while (message := _message(self.server)) is not None:
            kind, _, self.server = message
            if kind == b"Z" and self.pending:  # ReadyForQuery: a request done
                statement, sent = self.pending.popleft()
                self.traffic.seconds[statement] += time.monotonic() - sent

    def _request(self, kind: bytes, body: bytes) -> None:
        if kind == b"P":  # Parse: name, query
            name, rest = body.split(b"\0", 1)
            self.statements[name] = rest.split(b"\0", 1)[0].decode(errors="replace")
            self.bound = "(prepare) " + _shape(self.statements[name])
        elif kind == b"B":  # Bind: portal, statement
            statement = _shape(self.statements.get(body.split(b"\0", 2)[1], "?"))
            self.traffic.executed[statement] += 1
            self.bound = statement
        elif kind == b"Q":  # a simple query (BEGIN, COMMIT)
            statement = _shape(body.split(b"\0", 1)[0].decode(errors="replace"))
            self.traffic.executed[statement] += 1
            self.traffic.round_trips += 1
            self.pending.append((statement, time.monotonic()))
        elif kind == b"S":  # Sync: the client waits for ReadyForQuery
            self.traffic.round_trips += 1
            self.pending.append((self.bound or "?", time.monotonic()))
            self.bound = None


def _message(buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """Split one typed message off ``buffer``: its type, its body and the rest."""
    if len(buffer) < 5:
        return None
    (length,) = struct.unpack("!i", buffer[1:5])
    if len(buffer) < 1 + length:
        return None
    return buffer[:1], buffer[5 : 1 + length], buffer[1 + length :]


def _shape(sql: str) -> str:
    """A statement's first words, enough to tell dm's statements apart."""
    words = " ".join(sql.split())
    return words if len(words) <= 90 else words[:87] + "..."


class DelayProxy:
    """Relay connections on ``port`` to the server, each chunk delayed ``delay`` seconds
    each way (in order); optionally decode what the clients send.

    Threads, not this script's event loop: two per direction of each connection, one
    reading and one delivering each chunk when it is due (``time.sleep`` wakes within tens
    of microseconds; an event loop's timers wake at whole milliseconds, and one loop
    relaying every connection adds its own queue to each chunk's delay)."""

    def __init__(self, upstream: tuple[str, int], delay: float, decode: bool = False) -> None:
        self.upstream = upstream
        self.delay = delay
        self.decode = decode
        self.traffic = Traffic()
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    async def __aenter__(self) -> DelayProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._listener is not None
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def url(self, target: Target) -> str:
        return (
            sa.make_url(target.url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
                self.traffic.connections += 1
            decoder = _Decoder(self.traffic, self._lock) if self.decode else None
            self._pump(client, server, decoder.from_client if decoder else None)
            self._pump(server, client, decoder.from_server if decoder else None)

    def _pump(
        self, source: socket.socket, sink: socket.socket, decode: Callable[[bytes], None] | None
    ) -> None:
        """Copy ``source`` to ``sink``, each chunk ``delay`` seconds after it arrived."""
        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            data = b"x"
            while data:
                try:
                    data = source.recv(65536)
                except OSError:
                    data = b""
                if decode is not None and data:
                    decode(data)
                chunks.put((time.monotonic() + self.delay, data))

        def deliver() -> None:
            while True:
                due, data = chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=deliver, daemon=True).start()


# -- scenarios ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One configuration of a scenario: a label and how to run it on a built table."""

    label: str
    run: Callable[[], Awaitable[Sample]]


@dataclass
class Scenario:
    """Configurations run on the same table; the first is the baseline."""

    title: str
    rows: int
    build: Callable[[int], Awaitable[None]]
    check: Callable[[int], Awaitable[str | None]]
    configs: list[Config]
    samples: dict[str, list[Sample]] = field(default_factory=dict)


async def one_update(target: Target) -> Sample:
    """The baseline of (1): one UPDATE statement on one asyncpg connection."""
    started = time.perf_counter()
    conn = await target.connect()
    try:
        await conn.execute(
            "UPDATE users SET display_name = split_part(email, '@', 1) WHERE display_name IS NULL"
        )
    finally:
        await conn.close()
    return Sample(time.perf_counter() - started, ())


async def revision_seconds(target: Target) -> float | None:
    """The last successful revision's duration in the tracker, if there is one."""
    conn = await target.connect()
    try:
        if not await conn.fetchval("SELECT to_regclass($1)", TRACKER_TABLE):
            return None
        duration_ms = await conn.fetchval(
            f"SELECT duration_ms FROM {TRACKER_TABLE} WHERE status = 'success' "
            "ORDER BY id DESC LIMIT 1"
        )
    finally:
        await conn.close()
    return None if duration_ms is None else int(duration_ms) / 1000


def cpu_ticks() -> tuple[int, int]:
    """The machine's CPU time so far, all cores, in clock ticks: (busy, total)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])  # guest time is counted in user time already
    return total - idle, total


async def measure(target: Target, scenario: Scenario, config: Config, rows: int) -> Sample:
    """A fresh database and table, one run of ``config``, the table checked."""
    await target.recreate()
    await scenario.build(rows)
    busy_before, total_before = cpu_ticks()
    sample = await config.run()
    busy_after, total_after = cpu_ticks()
    busy = (busy_after - busy_before) / max(total_after - total_before, 1)
    revision = sample.revision or await revision_seconds(target) or sample.seconds
    sample = replace(sample, revision=revision, busy=busy)
    problem = await scenario.check(rows)
    if problem:
        raise BenchError(f"{scenario.title}, {config.label}: {problem}")
    return sample


async def run_scenario(target: Target, scenario: Scenario, reps: int, warm_rows: int) -> None:
    """Warm every configuration up, then run ``reps`` rotated rounds."""
    for config in scenario.configs:
        await measure(target, scenario, config, warm_rows)
        scenario.samples[config.label] = []
    configs = scenario.configs
    for rep in range(reps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for config in order:
            sample = await measure(target, scenario, config, scenario.rows)
            scenario.samples[config.label].append(sample)
            joined = [("no key range left" in u.said) for u in sample.usages[1:]]
            print(
                f"  {scenario.title}: repetition {rep + 1}/{reps}: {config.label}: "
                f"{sample.seconds:.2f} s (revision {sample.revision:.2f} s"
                f"{'' if all(joined) else '; a dm work process did not join'})",
                file=sys.stderr,
                flush=True,
            )


def median_rate(scenario: Scenario, label: str) -> float:
    return scenario.rows / statistics.median(s.seconds for s in scenario.samples[label])


def report(scenario: Scenario, reps: int) -> None:
    """Print a scenario's table: medians and min-max, rows/s, the ratio to the baseline;
    the revision's own seconds (no start-up), CPU and run-queue seconds of its processes,
    and how busy the machine's cores were (all of them, every process) meanwhile."""
    base = median_rate(scenario, scenario.configs[0].label)
    print(f"\n== {scenario.title}: {scenario.rows:,} rows (median of {reps}) ==")
    table = [
        (
            "configuration",
            "seconds",
            "min-max",
            "rows/s",
            "ratio",
            "revision s",
            "CPU s",
            "CPU wait s",
            "machine busy",
            "peak RSS MiB",
        )
    ]
    for config in scenario.configs:
        samples = scenario.samples[config.label]
        seconds = [s.seconds for s in samples]
        rate = median_rate(scenario, config.label)
        rss = max(max((u.max_rss for u in s.usages), default=0) for s in samples)
        processes = bool(samples[0].usages)
        table.append(
            (
                config.label,
                f"{statistics.median(seconds):.2f}",
                f"{min(seconds):.2f}-{max(seconds):.2f}",
                f"{rate:,.0f}",
                f"{rate / base:.2f}x",
                f"{statistics.median(s.revision for s in samples):.2f}",
                f"{statistics.median(s.cpu for s in samples):.1f}" if processes else "",
                f"{statistics.median(s.waited for s in samples):.1f}" if processes else "",
                f"{statistics.median(s.busy for s in samples):.0%}",
                f"{rss / 1024:.0f}" if rss else "",
            )
        )
    print_table(table)


def verdict(passed: bool, text: str) -> bool:
    """Print one target's PASS/FAIL line; return ``passed``."""
    print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return passed


def target_ratio(scenario: Scenario, label: str, base: str, floor: float) -> bool:
    """Check ``label`` >= ``floor`` x ``base`` (median wall seconds of the processes); the
    line also gives the ratio of the best runs and of the revisions' own seconds."""

    def median(which: str, revision: bool = False) -> float:
        return statistics.median(
            s.revision if revision else s.seconds for s in scenario.samples[which]
        )

    ratio = median(base) / median(label)
    best = min(s.seconds for s in scenario.samples[base]) / min(
        s.seconds for s in scenario.samples[label]
    )
    own = median(base, revision=True) / median(label, revision=True)
    return verdict(
        ratio >= floor,
        f"{scenario.title}: {label} >= {floor}x {base}: {ratio:.2f}x "
        f"(best runs {best:.2f}x; revision time alone {own:.2f}x)",
    )


def ceiling(scenario: Scenario, ours: tuple[str, str], by_hand: tuple[str, str]) -> None:
    """Print how far the hand-written loop gets from 1 to 4 connections on this machine (its
    loop's own seconds) beside dm's ratio of revision times: the share of it dm reaches."""

    def ratio(pair: tuple[str, str]) -> float:
        many, one = (
            statistics.median(s.revision for s in scenario.samples[label]) for label in pair
        )
        return one / many

    top, got = ratio(by_hand), ratio(ours)
    print(
        f"INFO  {scenario.title}: this machine's ceiling, the same statements by hand on bare "
        f"asyncpg, 4 connections against 1: {top:.2f}x (loop time); dm's workers=4 against "
        f"workers=1: {got:.2f}x (revision time), {got / top:.0%} of it"
    )


# -- memory ------------------------------------------------------------------------------------


async def measure_memory(target: Target, project: Project, sizes: list[int]) -> bool:
    """Peak RSS of the run (2 workers) and of one ``dm work`` over each table size."""
    measured: list[tuple[int, Sample]] = []
    for rows in sizes:
        await target.recreate()
        await build_table(target, rows)
        sample = await run_dm(project, target.url, joiners=1)
        problem = await check_table(target, rows)
        if problem:
            raise BenchError(f"memory over {rows:,} rows: {problem}")
        measured.append((rows, sample))
    print("\n== Memory: peak RSS per process, update of (1), workers=2 plus one dm work ==")
    table = [("rows", "seconds", "run (2 workers) MiB", "dm work (1 worker) MiB", "dm work")]
    for rows, sample in measured:
        run, work = sample.usages
        table.append(
            (
                f"{rows:,}",
                f"{sample.seconds:.2f}",
                f"{run.max_rss / 1024:.1f}",
                f"{work.max_rss / 1024:.1f}",
                "joined" if "no key range left" in work.said else "did not join",
            )
        )
    print_table(table)
    (small_rows, small), (large_rows, large) = measured[0], measured[-1]
    return all(
        [
            verdict(
                abs(b.max_rss - a.max_rss) <= 0.1 * a.max_rss,
                f"memory: peak RSS of {who} over {large_rows:,} rows within 10% of "
                f"{small_rows:,} rows: {b.max_rss / a.max_rss:.3f}x",
            )
            for who, a, b in zip(("the run", "dm work"), small.usages, large.usages, strict=True)
        ]
    )


# -- tracing -----------------------------------------------------------------------------------


async def sample_backends(target: Target, stop: asyncio.Event) -> collections.Counter[str]:
    """Sample what the benchmark database's backends do every 20 ms until ``stop``: on the
    CPU, waiting (for what), or idle (the client's turn); by statement."""
    seen: collections.Counter[str] = collections.Counter()
    conn = await target.connect("postgres")
    try:
        while not stop.is_set():
            for state, wait, query in await conn.fetch(
                "SELECT state, wait_event_type || ':' || wait_event, query FROM pg_stat_activity"
                " WHERE datname = $1 AND backend_type = 'client backend'",
                target.database,
            ):
                doing = (wait or "on CPU") if state == "active" else state
                seen[f"{doing:<28} {_shape(query or '')[:60]}"] += 1
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
    return seen


async def trace_run(
    target: Target,
    title: str,
    project: Project,
    rows: int,
    tables: tuple[Callable[[int], Awaitable[None]], Callable[[int], Awaitable[str | None]]],
    write: str,
    joiners: int = 0,
    delay: float = 0.0,
) -> None:
    """Run ``project`` once through a decoding proxy; print its statements per batch (a
    batch: one ``write`` statement) and what the server's backends were doing."""
    upstream = sa.make_url(target.url)
    address = (upstream.host or "127.0.0.1", upstream.port or 5432)
    build, check = tables
    await target.recreate()
    await build(rows)
    stop = asyncio.Event()
    async with DelayProxy(address, delay, decode=True) as proxy:
        sampler = asyncio.create_task(sample_backends(target, stop))
        try:
            sample = await run_dm(project, proxy.url(target), joiners)
        finally:
            stop.set()
            seen = await sampler
    problem = await check(rows)
    if problem:
        raise BenchError(f"trace, {title}: {problem}")
    traffic = proxy.traffic
    batches = max(sum(n for s, n in traffic.executed.items() if s.startswith(write)), 1)
    print(
        f"\n== Trace: {title}, {rows:,} rows: {sample.seconds:.2f} s, CPU "
        f"{' + '.join(f'{u.cpu:.1f}' for u in sample.usages)} s, {batches} batches, "
        f"{traffic.connections} connections, {traffic.round_trips} round trips "
        f"({traffic.round_trips / batches:.1f} per batch) =="
    )
    table = [("statement (by server seconds)", "executed", "per batch", "seconds", "ms each")]
    slowest = sorted(traffic.seconds.items(), key=lambda item: item[1], reverse=True)
    for statement, seconds in slowest[:14]:
        count = traffic.executed[statement]
        table.append(
            (
                statement,
                str(count),
                f"{count / batches:.2f}",
                f"{seconds:.2f}",
                f"{1000 * seconds / count:.2f}" if count else "",
            )
        )
    print_table(table)
    total = sum(seen.values()) or 1
    print_table(
        [("server backends (20 ms samples): doing, statement", "share")]
        + [(doing, f"{100 * count / total:.0f}%") for doing, count in seen.most_common(12)]
    )


async def trace(target: Target, root: Path, args: argparse.Namespace) -> None:
    """Trace (1) with 1 and 2 workers, (3) with 1 and 4, and (2) with one and two
    processes."""
    users = (lambda n: build_table(target, n), lambda n: check_table(target, n))
    docs = (lambda n: build_docs(target, n), lambda n: check_docs(target, n))
    for workers in (1, 2):
        project = users_project(root, workers, args.size)
        title = f"(1) update, workers={workers}, batches of {args.size:,}"
        await trace_run(target, title, project, args.trace_rows, users, "UPDATE users")
    for workers in (1, 4):
        project = users_project(root, workers, args.remote_size)
        title = (
            f"(3) update, workers={workers}, batches of {args.remote_size:,}, "
            f"{2 * args.delay_ms:g} ms per round trip"
        )
        delay = args.delay_ms / 1000
        await trace_run(target, title, project, args.trace_rows, users, "UPDATE users", 0, delay)
    project = docs_project(root, 2, args.py_size, args.py_rounds)
    rows = max(args.trace_rows // 5, 10)
    for joiners in (0, 1):
        title = f"(2) Python transform, workers=2, the run + {joiners} dm work"
        await trace_run(target, title, project, rows, docs, "UPDATE docs", joiners)


# -- main --------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, target: Target, root: Path) -> tuple[bool, list[str]]:
    """Run the chosen scenarios; return whether every target passed and the tables' text."""
    passed = True
    chosen = set(args.scenarios)
    url = target.url
    if "db" in chosen:
        w1, w2 = users_project(root, 1, args.size), users_project(root, 2, args.size)
        db = Scenario(
            "database-bound",
            args.rows,
            lambda n: build_table(target, n),
            lambda n: check_table(target, n),
            [
                Config("one UPDATE", lambda: one_update(target)),
                Config("workers=1", lambda: run_dm(w1, url)),
                Config("workers=2", lambda: run_dm(w2, url)),
            ],
        )
        await run_scenario(target, db, args.reps, 2 * args.size + 1)
        report(db, args.reps)
        passed &= target_ratio(db, "workers=2", "workers=1", 1.4)
    if "py" in chosen:
        p1 = docs_project(root, 1, args.py_size, args.py_rounds)
        p2 = docs_project(root, 2, args.py_size, args.py_rounds)
        py = Scenario(
            "Python-bound",
            args.py_rows,
            lambda n: build_docs(target, n),
            lambda n: check_docs(target, n),
            [
                Config("workers=2, the run alone", lambda: run_dm(p2, url)),
                Config("workers=1", lambda: run_dm(p1, url)),
                Config("workers=2, run + 1 dm work", lambda: run_dm(p2, url, joiners=1)),
            ],
        )
        await run_scenario(target, py, args.reps, 2 * args.py_size + 1)
        report(py, args.reps)
        passed &= target_ratio(py, "workers=2, run + 1 dm work", "workers=2, the run alone", 1.7)
        passed &= target_ratio(py, "workers=2, run + 1 dm work", "workers=1", 1.7)
    if "remote" in chosen:
        upstream = sa.make_url(target.url)
        address = (upstream.host or "127.0.0.1", upstream.port or 5432)
        r1 = users_project(root, 1, args.remote_size)
        r4 = users_project(root, 4, args.remote_size)
        r2 = users_project(root, 2, args.remote_size)
        size = args.remote_size
        async with DelayProxy(address, args.delay_ms / 1000) as proxy:
            remote_url = proxy.url(target)
            remote = Scenario(
                f"remote database ({2 * args.delay_ms:g} ms per round trip)",
                args.remote_rows,
                lambda n: build_table(target, n),
                lambda n: check_table(target, n),
                [
                    Config("workers=1", lambda: run_dm(r1, remote_url)),
                    Config("workers=4", lambda: run_dm(r4, remote_url)),
                    Config("workers=2, run + 2 dm work", lambda: run_dm(r2, remote_url, joiners=2)),
                    Config("by hand, 1 connection", lambda: run_hand(remote_url, 1, size)),
                    Config("by hand, 4 connections", lambda: run_hand(remote_url, 4, size)),
                ],
            )
            await run_scenario(target, remote, args.reps, 2 * args.remote_size + 1)
        report(remote, args.reps)
        passed &= target_ratio(remote, "workers=4", "workers=1", 3.0)
        ceiling(
            remote, ("workers=4", "workers=1"), ("by hand, 4 connections", "by hand, 1 connection")
        )
    if "memory" in chosen:
        project = users_project(root, 2, args.memory_size)
        passed &= await measure_memory(target, project, args.memory_rows)
    if "trace" in chosen:
        await trace(target, root, args)
    return passed, []


def _sizes(text: str) -> list[int]:
    return sorted(int(n) for n in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--child", "--"]:
        return child_main(argv[2:])
    if argv[:1] == ["--hand-loop"]:
        url, workers, size = argv[1], int(argv[2]), int(argv[3])
        print(json.dumps({"loop_seconds": asyncio.run(hand_loop(url, workers, size))}))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--scenarios",
        default="db,py,remote,memory",
        help=f"comma-separated, among {','.join(SCENARIOS)} (default: all but trace)",
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="(1): rows (1000000)")
    parser.add_argument("--size", type=int, default=10_000, help="(1), (4): batch rows (10000)")
    parser.add_argument("--py-rows", type=int, default=200_000, help="(2): documents (200000)")
    parser.add_argument("--py-size", type=int, default=1_000, help="(2): batch rows (1000)")
    parser.add_argument(
        "--py-rounds", type=int, default=3, help="(2): rewrites of each document (3)"
    )
    parser.add_argument("--remote-rows", type=int, default=1_000_000, help="(3): rows (1000000)")
    parser.add_argument("--remote-size", type=int, default=1_000, help="(3): batch rows (1000)")
    parser.add_argument(
        "--delay-ms", type=float, default=1.0, help="(3): delay per chunk each way, ms (1)"
    )
    parser.add_argument(
        "--memory-rows",
        type=_sizes,
        default=[100_000, 1_000_000],
        help="(4): comma-separated table sizes (100000,1000000)",
    )
    parser.add_argument("--memory-size", type=int, default=1_000, help="(4): batch rows (1000)")
    parser.add_argument(
        "--trace-rows", type=int, default=200_000, help="trace: rows of (1), a fifth for (2)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (3)")
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"PostgreSQL server, without a database ({DEFAULT_URL})"
    )
    parser.add_argument(
        "--database", default=DATABASE, help=f"the database to drop and create ({DATABASE})"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not args.scenarios or set(args.scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios takes names among {','.join(SCENARIOS)}")
    if min(args.rows, args.py_rows, args.remote_rows, *args.memory_rows) < 10:
        parser.error("table sizes must be at least 10 rows")
    if (
        min(args.size, args.py_size, args.remote_size, args.memory_size, args.reps, args.py_rounds)
        < 1
    ):
        parser.error("batch sizes, --py-rounds and --reps must be at least 1")
    target = Target(args.url, args.database)
    print(
        f"python {sys.version.split()[0]}, sqlalchemy {sa.__version__}, asyncpg "
        f"{asyncpg.__version__}; database {target.url}; {os.cpu_count()} CPUs; "
        f"{args.reps} repetition(s); load average at start {load_average()}"
    )
    failed = False
    passed = True
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dm-bench-parallel-") as tmp:
        try:
            passed, _ = asyncio.run(bench(args, target, Path(tmp)))
        except BenchError as exc:
            print(f"FAIL  {exc}")
            failed = True
        finally:
            asyncio.run(target.drop())
    print(f"load average at end {load_average()}; bench time {time.perf_counter() - started:.0f} s")
    return 1 if failed or (args.strict and not passed) else 0


if __name__ == "__main__":
    sys.exit(main())
