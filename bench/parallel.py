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
3. **remote database** (``--remote-rows``, default 200,000, batches of ``--remote-size``):
   the update of (1) through a TCP proxy of this script that delays every chunk by
   ``--delay-ms`` (default 1) each way, 2 ms per round trip: ``workers=1`` vs ``workers=4``.
   Target: 4 workers >= 3x 1 worker.
4. **memory** (``--memory-rows``, default 100,000 and 1,000,000): the peak RSS of the run
   (``workers=2``: two workers in one process) and of one ``dm work`` beside it, over the
   update of (1). Target: each within 10% from the smallest to the largest table.

Each configuration runs once untimed on a small table first (imports, caches), then
``--reps`` times (default 3), the configurations of a scenario alternating in an order
rotated each repetition. The tables show medians, min-max, rows/s, the ratio to the
scenario's baseline, the CPU seconds of all its processes and their peak RSS. After every
run the table is checked (every row backfilled, rightly); otherwise FAIL and exit 1.

``--trace`` runs ``workers=1`` and ``workers=2`` of (1) once more on a small table through
the proxy without delay, which decodes the PostgreSQL protocol, and prints the statements
and round trips per batch: where a batch's time goes besides the update.

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
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import asyncpg
import sqlalchemy as sa
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
    """What one process used: peak RSS (KiB) and CPU seconds."""

    max_rss: int
    cpu: float


def child_main(command: Sequence[str]) -> int:
    """Run ``command``, then print its peak RSS and CPU seconds as JSON on stdout."""
    proc = subprocess.run(list(command), check=False, stdout=subprocess.DEVNULL)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "rc": proc.returncode,
                "max_rss": usage.ru_maxrss,
                "cpu": usage.ru_utime + usage.ru_stime,
            }
        )
    )
    return 0


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
    return Usage(int(report["max_rss"]), float(report["cpu"]))


@dataclass(frozen=True)
class Sample:
    """One measurement: wall seconds and what each process used (the run first)."""

    seconds: float
    usages: tuple[Usage, ...]

    @property
    def cpu(self) -> float:
        return sum(u.cpu for u in self.usages)


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


# -- the delaying proxy ------------------------------------------------------------------------


@dataclass
class Traffic:
    """What went through the proxy, client to server: statements executed, round trips."""

    executed: collections.Counter[str] = field(default_factory=collections.Counter)
    round_trips: int = 0
    connections: int = 0


class _Decoder:
    """Decode the frontend messages of one connection (the PostgreSQL protocol, v3)."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.buffer = b""
        self.started = False
        self.statements: dict[bytes, str] = {}

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:  # SSLRequest/GSSENCRequest, then the startup message
                if len(self.buffer) < 8:
                    return
                length, code = struct.unpack("!ii", self.buffer[:8])
                if len(self.buffer) < length:
                    return
                self.buffer = self.buffer[length:]
                self.started = code not in (80877103, 80877104)
                continue
            if len(self.buffer) < 5:
                return
            kind = self.buffer[:1]
            (length,) = struct.unpack("!i", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return
            body, self.buffer = self.buffer[5 : 1 + length], self.buffer[1 + length :]
            self._message(kind, body)

    def _message(self, kind: bytes, body: bytes) -> None:
        if kind == b"P":  # Parse: name, query
            name, rest = body.split(b"\0", 1)
            self.statements[name] = rest.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == b"B":  # Bind: portal, statement
            statement = body.split(b"\0", 2)[1]
            self.traffic.executed[_shape(self.statements.get(statement, "?"))] += 1
        elif kind == b"Q":  # a simple query (BEGIN, COMMIT)
            self.traffic.executed[_shape(body.split(b"\0", 1)[0].decode(errors="replace"))] += 1
            self.traffic.round_trips += 1
        elif kind == b"S":  # Sync: the client waits for ReadyForQuery
            self.traffic.round_trips += 1


def _shape(sql: str) -> str:
    """A statement's first words, enough to tell dm's statements apart."""
    words = " ".join(sql.split())
    return words if len(words) <= 90 else words[:87] + "..."


class DelayProxy:
    """Relay connections on ``port`` to the server, each chunk delayed ``delay`` seconds
    each way (in order); optionally decode what the clients send."""

    def __init__(self, upstream: tuple[str, int], delay: float, decode: bool = False) -> None:
        self.upstream = upstream
        self.delay = delay
        self.decode = decode
        self.traffic = Traffic()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, target: Target) -> str:
        return (
            sa.make_url(target.url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.traffic.connections += 1
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        decoder = _Decoder(self.traffic) if self.decode else None
        pumps = [
            asyncio.create_task(self._pump(client_r, server_w, decoder)),
            asyncio.create_task(self._pump(server_r, client_w, None)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, decoder: _Decoder | None
    ) -> None:
        """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if decoder is not None and data:
                    decoder.feed(data)
                await queue.put((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(OSError, ConnectionError):
                writer.write_eof()


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


async def measure(target: Target, scenario: Scenario, config: Config, rows: int) -> Sample:
    """A fresh database and table, one run of ``config``, the table checked."""
    await target.recreate()
    await scenario.build(rows)
    sample = await config.run()
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
            print(
                f"  {scenario.title}: repetition {rep + 1}/{reps}: {config.label}: "
                f"{sample.seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )


def median_rate(scenario: Scenario, label: str) -> float:
    return scenario.rows / statistics.median(s.seconds for s in scenario.samples[label])


def report(scenario: Scenario, reps: int) -> None:
    """Print a scenario's table: medians and min-max, rows/s, the ratio to the baseline."""
    base = median_rate(scenario, scenario.configs[0].label)
    print(f"\n== {scenario.title}: {scenario.rows:,} rows (median of {reps}) ==")
    table = [("configuration", "seconds", "min-max", "rows/s", "ratio", "CPU s", "peak RSS MiB")]
    for config in scenario.configs:
        samples = scenario.samples[config.label]
        seconds = [s.seconds for s in samples]
        rate = median_rate(scenario, config.label)
        rss = [max((u.max_rss for u in s.usages), default=0) for s in samples]
        table.append(
            (
                config.label,
                f"{statistics.median(seconds):.2f}",
                f"{min(seconds):.2f}-{max(seconds):.2f}",
                f"{rate:,.0f}",
                f"{rate / base:.2f}x",
                f"{statistics.median(s.cpu for s in samples):.1f}" if samples[0].usages else "",
                f"{max(rss) / 1024:.0f}" if max(rss) else "",
            )
        )
    print_table(table)


def verdict(passed: bool, text: str) -> bool:
    """Print one target's PASS/FAIL line; return ``passed``."""
    print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return passed


def target_ratio(scenario: Scenario, label: str, base: str, floor: float) -> bool:
    """Check ``label`` >= ``floor`` x ``base`` (median rows/s), with the min-max ratios."""
    ratio = median_rate(scenario, label) / median_rate(scenario, base)
    fastest = min(s.seconds for s in scenario.samples[base]) / min(
        s.seconds for s in scenario.samples[label]
    )
    return verdict(
        ratio >= floor,
        f"{scenario.title}: {label} >= {floor}x {base}: {ratio:.2f}x (best runs: {fastest:.2f}x)",
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
    table = [("rows", "seconds", "run (2 workers) MiB", "dm work (1 worker) MiB")]
    for rows, sample in measured:
        run, work = sample.usages
        table.append(
            (
                f"{rows:,}",
                f"{sample.seconds:.2f}",
                f"{run.max_rss / 1024:.1f}",
                f"{work.max_rss / 1024:.1f}",
            )
        )
    print_table(table)
    (small_rows, small), (large_rows, large) = measured[0], measured[-1]
    return all(
        verdict(
            abs(b.max_rss - a.max_rss) <= 0.1 * a.max_rss,
            f"memory: peak RSS of {who} over {large_rows:,} rows within 10% of "
            f"{small_rows:,} rows: {b.max_rss / a.max_rss:.3f}x",
        )
        for who, a, b in zip(("the run", "dm work"), small.usages, large.usages, strict=True)
    )


# -- tracing -----------------------------------------------------------------------------------


async def trace(target: Target, root: Path, rows: int, size: int) -> None:
    """Run (1) with 1 and 2 workers once through a decoding proxy; print the statements."""
    upstream = sa.make_url(target.url)
    address = (upstream.host or "127.0.0.1", upstream.port or 5432)
    batches = -(-rows // size)
    for workers in (1, 2):
        project = users_project(root, workers, size)
        await target.recreate()
        await build_table(target, rows)
        async with DelayProxy(address, 0.0, decode=True) as proxy:
            sample = await run_dm(project, proxy.url(target))
        problem = await check_table(target, rows)
        if problem:
            raise BenchError(f"trace, workers={workers}: {problem}")
        traffic = proxy.traffic
        print(
            f"\n== Trace: update of (1), {rows:,} rows, {batches} batches of {size:,}, "
            f"workers={workers}: {sample.seconds:.2f} s, {traffic.connections} connections, "
            f"{traffic.round_trips} round trips ({traffic.round_trips / batches:.1f} per batch) =="
        )
        table = [("statement", "executed", "per batch")]
        for statement, count in traffic.executed.most_common(25):
            table.append((statement, str(count), f"{count / batches:.2f}"))
        print_table(table)


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
                ],
            )
            await run_scenario(target, remote, args.reps, 2 * args.remote_size + 1)
        report(remote, args.reps)
        passed &= target_ratio(remote, "workers=4", "workers=1", 3.0)
    if "memory" in chosen:
        passed &= await measure_memory(target, users_project(root, 2, args.size), args.memory_rows)
    if "trace" in chosen:
        await trace(target, root, args.trace_rows, args.size)
    return passed, []


def _sizes(text: str) -> list[int]:
    return sorted(int(n) for n in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["--child", "--"]:
        return child_main(argv[2:])
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
    parser.add_argument("--remote-rows", type=int, default=200_000, help="(3): rows (200000)")
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
    parser.add_argument("--trace-rows", type=int, default=100_000, help="trace: rows (100000)")
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
    if min(args.size, args.py_size, args.remote_size, args.reps, args.py_rounds) < 1:
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
