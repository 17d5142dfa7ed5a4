"""Measure what ``dm.batched`` costs on a 1M-row backfill on PostgreSQL.

The table is ``users(id bigint primary key, email text not null, display_name text)`` with
``--rows`` (default 1,000,000) rows, ``display_name`` NULL and ``email`` like
``user{i}@example.com``. The backfill sets ``display_name = split_part(email, '@', 1)``
where it is NULL. Four variants run in one process, each on a freshly built table (built
with ``CREATE TABLE ... AS`` over ``generate_series``, then a primary key, ``VACUUM
ANALYZE`` and a ``CHECKPOINT``, all outside the timed section; autovacuum is off on the
table so that it does not start in the middle of one variant and not another):

(a) **one UPDATE**: ``UPDATE users SET display_name = ... WHERE display_name IS NULL``, the
    physical limit;
(b) **SQLAlchemy bounds loop**, the hand-written loop to beat: per batch of ``--size``
    (default 10,000) rows, in one transaction run by an ``AsyncSession``
    (``postgresql+asyncpg``, SQLAlchemy 2 Core on ``sa.table()``), only the page's upper
    bound is fetched, ``SELECT max(id) FROM (SELECT id FROM users WHERE display_name IS
    NULL AND id > :last ORDER BY id LIMIT :n) s``, then ``UPDATE ... WHERE id > :last AND
    id <= :upper AND display_name IS NULL``, ``session.commit()``;
(c) **asyncpg loop**: a keyset loop on a raw asyncpg connection; per batch, in one
    transaction, ``SELECT id ... WHERE display_name IS NULL AND id > $1 ORDER BY id LIMIT
    n`` (every key of the page), then ``UPDATE ... WHERE id BETWEEN $first AND $last AND
    display_name IS NULL``, commit;
(d) **SQLAlchemy rows loop**: (c) with SQLAlchemy Core statements run by an
    ``AsyncSession``, ``session.commit()`` per batch;
(e) **dm.batched**: a revision with ``transactional = False`` whose ``upgrade()`` runs the
    same backfill through ``dm.batched`` in its documented default form (the key range
    only, the write bounded by ``batch.where()``; a commit and a checkpoint per batch), in a
    temporary ``dm init`` project. The timed section is one in-process ``await
    dm.upgrade("heads", config=...)`` call, so it includes dm's planning, lock and tracker
    rows, but not interpreter start-up or imports. Between repetitions the tracker rows are
    deleted so that the revision runs again;
(f) **the dm CLI**: the same revision run by ``python -m dm upgrade heads`` in its own
    process, as a Kubernetes Job runs it; the time is the revision's ``duration_ms`` in the
    tracker (start-up and imports excluded), the CPU seconds include the whole process. The
    CLI freezes the objects it loaded at start (``gc.freeze()``), so the collector's full
    passes during the run do not rescan them; (d) and (e) run in this process without it;
(g) **the dm CLI, rows fetched**: (f) with ``batched(..., rows=True)``, which also fetches
    each page's rows (here its keys) for the revision's code.

Each timed section opens its own connection(s). Before the timed repetitions every variant
runs once, untimed, on a small table (imports, caches, dm's tracker tables). A repetition
runs every variant once, in an order rotated by one each repetition so that drift on the
machine is shared; the report shows medians over ``--reps`` (default 3) and, beside the
wall time, the CPU seconds this process spent in the timed section (the client side:
asyncpg, SQLAlchemy, dm), which other work on the machine disturbs less. After every run
the table must have no NULL ``display_name`` and every row (and a sample checked in Python)
must equal ``split_part(email, '@', 1)``; otherwise the script prints FAIL and exits 1.

Targets (rows/s, medians):

* (e) >= 0.95x (b) and (f) >= 0.95x (b): dm's documented default form, with its checkpoint
  per batch, costs at most 5% over the same loop written by hand;
* (e) and (f) >= 0.85x (a): a batched backfill stays close to one UPDATE;
* constant memory (``--memory``, the default): the peak RSS of a ``dm upgrade heads`` of
  the (e) revision, each in a fresh process (``dm.upgrade_sync``), over each of
  ``--memory-rows`` (default: a tenth of ``--rows``, and ``--rows``) differ by at most 10%
  (the peak with dm imported, before the run, is printed too: a batch stays below the
  import-time peak). ``--only-memory`` skips the timed variants.

Usage (PostgreSQL at 127.0.0.1:5432 as postgres by default; the database
``dm_bench_batched`` is dropped and created by the script)::

    .venv/bin/python bench/batched.py                     # 1M rows, 3 repetitions
    .venv/bin/python bench/batched.py --reps 1 --no-memory
    .venv/bin/python bench/batched.py --rows 200000 --size 5000
    .venv/bin/python bench/batched.py --only-memory --memory-rows 100000,10000000

Exit status: 1 when a variant left the table wrong or a run failed (or, with ``--strict``,
when a target failed); 0 otherwise. ``--transactional`` runs (e) with ``transactional =
True`` instead (one transaction, no checkpoints), to see what the checkpoints cost.
``--variants`` runs some of the variants only (e.g. ``--variants abf``). (h) and (i) are
(e) and (f) with dm on psycopg 3 (``postgresql+psycopg://``) instead of asyncpg, to compare
the drivers in the same run. ``--database`` names another database to use (a shared server).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import sqlalchemy as sa
from reporting import load_average
from reporting import print_table
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import create_async_engine

from dm import DmError

DATABASE = "dm_bench_batched"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432"
TRACKER_TABLE = "script_run_tracker"
VARIANTS = ("a", "b", "c", "d", "e", "f", "g", "h", "i")
LABELS = {
    "a": "(a) one UPDATE",
    "b": "(b) SQLAlchemy loop, upper bound only",
    "c": "(c) asyncpg loop, every key",
    "d": "(d) SQLAlchemy loop, every key",
    "e": "(e) dm.batched, transactional = False",
    "f": "(f) the same, as the dm CLI process",
    "g": "(g) (f) with batched(rows=True)",
    "h": "(h) (e) on psycopg 3",
    "i": "(i) (f) on psycopg 3",
}
MIN_KEY = -(2**63)

REVISION = '''"""Backfill users.display_name from the local part of the e-mail address.

Revision ID: {rev}
Revises:
"""

import sqlalchemy as sa

from dm import batched

revision = {rev!r}
down_revision = None
branch_labels = None
depends_on = None

transactional = {transactional!r}


async def upgrade(session):
    users = sa.table("users", sa.column("id"), sa.column("email"), sa.column("display_name"))
    query = sa.select(users.c.id).where(users.c.display_name.is_(None))
    async for batch in batched(session, query, key=users.c.id, size={size}{rows}):
        await session.execute(
            users.update()
            .where(batch.where())
            .where(users.c.display_name.is_(None))
            .values(display_name=sa.func.split_part(users.c.email, "@", 1))
        )
'''
REVISION_ID = "b4c4f111ed01"

USERS = sa.table("users", sa.column("id"), sa.column("email"), sa.column("display_name"))


class BenchError(RuntimeError):
    """A variant failed or left the table wrong."""


@dataclass(frozen=True)
class Target:
    """Where the benchmark database lives."""

    server: str
    database: str

    @property
    def url(self) -> str:
        """Return the plain ``postgresql://`` URL of the benchmark database (dm's form)."""
        return f"{self.server.rstrip('/')}/{self.database}"

    @property
    def psycopg_url(self) -> str:
        """Return the URL that runs dm on psycopg 3 instead of asyncpg."""
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)

    @property
    def async_url(self) -> str:
        """Return the SQLAlchemy URL of the benchmark database."""
        return self.url.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def connect(self, database: str | None = None) -> asyncpg.Connection:
        """Open an asyncpg connection to ``database`` (default: the benchmark database)."""
        url = sa.make_url(self.url)
        return await asyncpg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            database=database or url.database,
            timeout=10,
        )

    async def recreate(self) -> None:
        """Drop (forcibly) and create the benchmark database."""
        conn = await self.connect("postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    async def drop(self) -> None:
        """Drop the benchmark database."""
        conn = await self.connect("postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()


# -- the table ---------------------------------------------------------------------------------


async def build_table(target: Target, rows: int) -> None:
    """(Re)build ``users`` with ``rows`` rows, ready to be backfilled, and reset dm's tracker."""
    conn = await target.connect()
    try:
        await conn.execute("DROP TABLE IF EXISTS users")
        await conn.execute(
            "CREATE TABLE users AS SELECT i::bigint AS id, 'user' || i || '@example.com' AS email,"
            f" NULL::text AS display_name FROM generate_series(1, {int(rows)}) AS i"
        )
        await conn.execute("ALTER TABLE users ADD PRIMARY KEY (id)")
        await conn.execute("ALTER TABLE users ALTER COLUMN email SET NOT NULL")
        await conn.execute("ALTER TABLE users SET (autovacuum_enabled = false)")
        if await conn.fetchval("SELECT to_regclass($1)", TRACKER_TABLE):
            await conn.execute(f"DELETE FROM {TRACKER_TABLE}")
        await conn.execute("VACUUM ANALYZE users")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def check_table(target: Target, rows: int) -> str | None:
    """Return what is wrong with the backfilled table, or None when it is right."""
    conn = await target.connect()
    try:
        total = await conn.fetchval("SELECT count(*) FROM users")
        if total != rows:
            return f"{total} rows instead of {rows}"
        nulls = await conn.fetchval("SELECT count(*) FROM users WHERE display_name IS NULL")
        if nulls:
            return f"{nulls} rows still have display_name NULL"
        wrong = await conn.fetchval(
            "SELECT count(*) FROM users "
            "WHERE display_name IS DISTINCT FROM split_part(email, '@', 1)"
        )
        if wrong:
            return f"{wrong} rows have a display_name other than split_part(email, '@', 1)"
        sample = sorted({1, rows, *random.sample(range(1, rows + 1), min(rows, 20))})
        for row in await conn.fetch(
            "SELECT id, email, display_name FROM users WHERE id = ANY($1::bigint[])", sample
        ):
            if row["display_name"] != row["email"].split("@", 1)[0]:
                return f"row {row['id']}: display_name {row['display_name']!r} for {row['email']}"
        return None
    finally:
        await conn.close()


# -- the variants ------------------------------------------------------------------------------


async def one_update(target: Target, size: int, project: Path) -> None:
    """(a) One UPDATE statement over the whole table."""
    conn = await target.connect()
    try:
        await conn.execute(
            "UPDATE users SET display_name = split_part(email, '@', 1) WHERE display_name IS NULL"
        )
    finally:
        await conn.close()


async def sqlalchemy_bounds_loop(target: Target, size: int, project: Path) -> None:
    """(b) The hand-written loop to beat: only each page's upper bound is fetched, the
    write is bounded by ``id > last AND id <= upper``, one transaction per batch."""
    engine = create_async_engine(target.async_url)
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            last = MIN_KEY
            while True:
                page = (
                    sa.select(USERS.c.id)
                    .where(USERS.c.display_name.is_(None), USERS.c.id > last)
                    .order_by(USERS.c.id)
                    .limit(size)
                    .subquery()
                )
                upper = (await session.execute(sa.select(sa.func.max(page.c.id)))).scalar()
                if upper is None:
                    await session.commit()
                    break
                await session.execute(
                    USERS.update()
                    .where(USERS.c.id > last, USERS.c.id <= upper)
                    .where(USERS.c.display_name.is_(None))
                    .values(display_name=sa.func.split_part(USERS.c.email, "@", 1))
                )
                await session.commit()
                last = upper
    finally:
        await engine.dispose()


async def asyncpg_loop(target: Target, size: int, project: Path) -> None:
    """(c) A keyset loop on a raw asyncpg connection, one transaction per batch."""
    select = "SELECT id FROM users WHERE display_name IS NULL AND id > $1 ORDER BY id LIMIT $2"
    update = (
        "UPDATE users SET display_name = split_part(email, '@', 1) "
        "WHERE id BETWEEN $1 AND $2 AND display_name IS NULL"
    )
    conn = await target.connect()
    try:
        last = MIN_KEY
        while True:
            async with conn.transaction():
                ids = await conn.fetch(select, last, size)
                if ids:
                    last = ids[-1][0]
                    await conn.execute(update, ids[0][0], last)
            if len(ids) < size:
                break
    finally:
        await conn.close()


async def sqlalchemy_loop(target: Target, size: int, project: Path) -> None:
    """(d) (c) with Core statements run by an AsyncSession, a commit per batch."""
    # The default pool: the session gives its connection back at every commit and gets the
    # same one again for the next batch (NullPool would reconnect per batch).
    engine = create_async_engine(target.async_url)
    try:
        async with AsyncSession(engine, expire_on_commit=False) as session:
            last = MIN_KEY
            while True:
                query = (
                    sa.select(USERS.c.id)
                    .where(USERS.c.display_name.is_(None), USERS.c.id > last)
                    .order_by(USERS.c.id)
                    .limit(size)
                )
                ids = (await session.execute(query)).all()
                if ids:
                    first, last = ids[0][0], ids[-1][0]
                    await session.execute(
                        USERS.update()
                        .where(USERS.c.id.between(first, last))
                        .where(USERS.c.display_name.is_(None))
                        .values(display_name=sa.func.split_part(USERS.c.email, "@", 1))
                    )
                await session.commit()
                if len(ids) < size:
                    break
    finally:
        await engine.dispose()


async def dm_batched(target: Target, size: int, project: Path) -> None:
    """(e) ``dm upgrade heads`` of the ``dm.batched`` revision, in process."""
    import dm

    result = await dm.upgrade("heads", config=project / "alembic.ini")
    ran = [step.revision for step in result.steps]
    if ran != [REVISION_ID]:
        raise BenchError(f"dm upgrade heads ran {ran}, expected [{REVISION_ID!r}]")


async def dm_cli(
    target: Target, size: int, project: Path, env: dict[str, str] | None = None
) -> float:
    """(f) ``dm upgrade heads`` as its own process, as a Kubernetes Job runs it; return the
    revision's duration as the tracker recorded it (start-up and imports excluded)."""
    env = env or {}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dm",
        "upgrade",
        "heads",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DM_CONFIG": str(project / "alembic.ini"), **env},
    )
    _, stderr = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"dm upgrade heads exited {proc.returncode}: {stderr.decode()[-2000:]}")
    conn = await target.connect()
    try:
        duration_ms = await conn.fetchval(
            f"SELECT duration_ms FROM {TRACKER_TABLE} WHERE status = 'success' "
            "ORDER BY id DESC LIMIT 1"
        )
    finally:
        await conn.close()
    return int(duration_ms) / 1000


async def dm_cli_rows(target: Target, size: int, project: Path) -> float:
    """(g) (f) with ``batched(..., rows=True)``: the page's rows come back too."""
    return await dm_cli(target, size, project.parent / "project-rows")


async def dm_batched_psycopg(target: Target, size: int, project: Path) -> None:
    """(h) (e) with dm on psycopg 3: ``postgresql+psycopg://``."""
    plain = os.environ["DM_DATABASE_URL"]
    os.environ["DM_DATABASE_URL"] = target.psycopg_url
    try:
        await dm_batched(target, size, project)
    finally:
        os.environ["DM_DATABASE_URL"] = plain


async def dm_cli_psycopg(target: Target, size: int, project: Path) -> float:
    """(i) (f) with dm on psycopg 3."""
    return await dm_cli(target, size, project, {"DM_DATABASE_URL": target.psycopg_url})


Variant = Callable[[Target, int, Path], Awaitable[float | None]]
RUNNERS: dict[str, Variant] = {
    "a": one_update,
    "b": sqlalchemy_bounds_loop,
    "c": asyncpg_loop,
    "d": sqlalchemy_loop,
    "e": dm_batched,
    "f": dm_cli,
    "g": dm_cli_rows,
    "h": dm_batched_psycopg,
    "i": dm_cli_psycopg,
}


def make_project(root: Path, size: int, transactional: bool, rows: bool = False) -> Path:
    """``dm init`` a project under ``root`` holding the one backfill revision."""
    from dm import verbs

    directory = root / ("project-rows" if rows else "project")
    verbs.init(directory)
    text = REVISION.format(
        rev=REVISION_ID,
        size=size,
        transactional=transactional,
        rows=", rows=True" if rows else "",
    )
    versions = directory / "data_migrations" / "versions"
    (versions / f"{REVISION_ID}_backfill_display_name.py").write_text(text, encoding="utf-8")
    return directory


@dataclass(frozen=True)
class Sample:
    """One timed run: wall seconds, and CPU seconds of this (the client) process."""

    seconds: float
    cpu: float


async def run_variant(variant: str, target: Target, rows: int, size: int, project: Path) -> Sample:
    """Build the table, run ``variant`` once and check the table; return the timings."""
    await build_table(target, rows)
    gc.collect()  # every variant starts with the same garbage collector state
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    try:
        own_time = await RUNNERS[variant](target, size, project)
    except (asyncpg.PostgresError, sa.exc.SQLAlchemyError, DmError) as exc:
        text = " ".join(str(exc).split())
        raise BenchError(f"{LABELS[variant]}: {type(exc).__name__}: {text}") from exc
    elapsed = time.perf_counter() - started if own_time is None else own_time
    cpu = _cpu_seconds() - cpu_started
    problem = await check_table(target, rows)
    if problem:
        raise BenchError(f"{LABELS[variant]}: {problem}")
    return Sample(elapsed, cpu)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of the children it waited for ((e) counts dm's)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# -- memory ------------------------------------------------------------------------------------


def child_rss(project: Path) -> tuple[int, int]:
    """Run ``dm upgrade heads`` in this (fresh) process; return its peak RSS in KiB before
    the run (dm's modules imported) and after it."""
    import alembic.script  # noqa: F401 - imported by the run anyway; counted in "before"

    import dm
    import dm.verbs  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = dm.upgrade_sync("heads", config=project / "alembic.ini")
    ran = [step.revision for step in result.steps]
    if ran != [REVISION_ID]:
        raise BenchError(f"dm upgrade heads ran {ran}, expected [{REVISION_ID!r}]")
    return before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_rss(target: Target, rows: int, project: Path) -> tuple[int, int]:
    """Build ``rows`` rows; return the peak RSS (KiB) of a fresh process running (e), before
    and after the run."""
    asyncio.run(build_table(target, rows))
    env = {**os.environ, "DM_DATABASE_URL": target.url, "DM_CONFIG": str(project / "alembic.ini")}
    proc = subprocess.run(
        [sys.executable, __file__, "--child-rss", str(project)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"the memory run over {rows} rows failed:\n{proc.stderr[-2000:]}")
    problem = asyncio.run(check_table(target, rows))
    if problem:
        raise BenchError(f"the memory run over {rows} rows: {problem}")
    before, after = proc.stdout.split()[-2:]
    return int(before), int(after)


# -- reporting ---------------------------------------------------------------------------------


def verdict(passed: bool, text: str) -> bool:
    """Print one target's PASS/FAIL line; return ``passed``."""
    print(f"{'PASS' if passed else 'FAIL'}  {text}")
    return passed


def report(samples: dict[str, list[Sample]], rows: int, reps: int) -> bool:
    """Print the table of medians and the throughput targets; return whether all passed."""
    ran = [v for v in VARIANTS if samples.get(v)]
    seconds = {v: statistics.median(s.seconds for s in samples[v]) for v in ran}
    cpu = {v: statistics.median(s.cpu for s in samples[v]) for v in ran}
    rate = {v: rows / seconds[v] for v in ran}

    def ratio(v: str, base: str) -> str:
        return f"{rate[v] / rate[base]:.3f}x" if base in rate else ""

    print(f"\n== Backfill of {rows:,} rows (median of {reps}) ==")
    table = [("variant", "seconds", "rows/s", "vs (a)", "vs (b)", "client CPU s", "all runs (s)")]
    for v in ran:
        table.append(
            (
                LABELS[v],
                f"{seconds[v]:.3f}",
                f"{rate[v]:,.0f}",
                ratio(v, "a"),
                ratio(v, "b"),
                f"{cpu[v]:.2f}",
                " ".join(f"{s.seconds:.2f}" for s in samples[v]),
            )
        )
    print_table(table)
    print("\n== Targets (rows/s ratios) ==")
    checks = [
        (v, base, floor)
        for v in ("e", "f")
        for base, floor in (("b", 0.95), ("a", 0.85))
        if v in rate and base in rate
    ]
    return all(
        [
            verdict(
                rate[v] >= floor * rate[base],
                f"({v}) >= {floor}x ({base}): {rate[v] / rate[base]:.3f}x",
            )
            for v, base, floor in checks
        ]
    )


# -- main --------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, target: Target, project: Path) -> dict[str, list[Sample]]:
    """Warm every variant up, then time ``--reps`` rotated rounds; return the samples."""
    warm_rows = 2 * args.size + 1
    variants = tuple(args.variants)
    for variant in variants:
        await run_variant(variant, target, warm_rows, args.size, project)
    samples: dict[str, list[Sample]] = {v: [] for v in variants}
    for rep in range(args.reps):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for variant in order:
            sample = await run_variant(variant, target, args.rows, args.size, project)
            samples[variant].append(sample)
            print(
                f"  repetition {rep + 1}/{args.reps}: {LABELS[variant]}: {sample.seconds:.3f} s",
                file=sys.stderr,
                flush=True,
            )
    return samples


def _psycopg_version() -> str:
    try:
        import psycopg
    except ImportError:
        return "not installed ((h) and (i) fail)"
    return psycopg.__version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="table rows (1000000)")
    parser.add_argument("--size", type=int, default=10_000, help="rows per batch (10000)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (3)")
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"PostgreSQL server, without a database ({DEFAULT_URL})"
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare the peak RSS of (e) over --memory-rows (default: on)",
    )
    parser.add_argument(
        "--memory-rows",
        help="comma-separated table sizes for --memory (default: --rows/10,--rows)",
    )
    parser.add_argument(
        "--only-memory", action="store_true", help="measure the memory only (no timed variants)"
    )
    parser.add_argument(
        "--variants", default="".join(VARIANTS), help="the variants to time (default: all)"
    )
    parser.add_argument(
        "--transactional",
        action="store_true",
        help="run (e) with transactional = True (one transaction, no checkpoints)",
    )
    parser.add_argument(
        "--database", default=DATABASE, help=f"the database to drop and create ({DATABASE})"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--child-rss", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_rss is not None:
        print(*child_rss(args.child_rss))
        return 0
    if args.rows < 10 or args.size < 1 or args.reps < 1:
        parser.error("--rows must be at least 10, --size and --reps at least 1")
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"--variants takes letters among {''.join(VARIANTS)}")
    try:
        memory_rows = sorted(
            int(n)
            for n in (args.memory_rows or f"{max(args.rows // 10, 10)},{args.rows}").split(",")
        )
    except ValueError:
        parser.error("--memory-rows takes comma-separated integers")
    if args.transactional:
        LABELS["e"] = "(e) dm.batched, transactional = True"
    target = Target(args.url, args.database)
    os.environ["DM_DATABASE_URL"] = target.url
    versions = (
        f"python {sys.version.split()[0]}, sqlalchemy {sa.__version__}, "
        f"asyncpg {asyncpg.__version__}, psycopg {_psycopg_version()}"
    )
    print(f"{versions}; database {target.url}; {os.cpu_count()} CPUs")
    print(
        f"{args.rows:,} rows, batches of {args.size:,}, {args.reps} repetition(s); "
        f"load average at start {load_average()}"
    )
    failed = False
    passed = True
    with tempfile.TemporaryDirectory(prefix="dm-bench-batched-") as tmp:
        project = make_project(Path(tmp), args.size, transactional=args.transactional)
        make_project(Path(tmp), args.size, transactional=args.transactional, rows=True)
        os.environ["DM_CONFIG"] = str(project / "alembic.ini")
        asyncio.run(target.recreate())
        try:
            if not args.only_memory:
                samples = asyncio.run(bench(args, target, project))
                passed = report(samples, args.rows, args.reps)
            if args.memory or args.only_memory:
                measured = [(rows, *measure_rss(target, rows, project)) for rows in memory_rows]
                print("\n== Memory: peak RSS of a fresh process running (e) ==")
                for rows, before, after in measured:
                    print(
                        f"{rows:>11,} rows: {after:,} KiB "
                        f"({before:,} KiB with dm imported, before the run)"
                    )
                (small_rows, _, small), (large_rows, _, large) = measured[0], measured[-1]
                passed &= verdict(
                    abs(large - small) <= 0.1 * small,
                    f"peak RSS over {large_rows:,} rows within 10% of {small_rows:,} rows: "
                    f"{large / small:.3f}x",
                )
        except BenchError as exc:
            print(f"FAIL  {exc}")
            failed = True
        finally:
            asyncio.run(target.drop())
    print(f"load average at end {load_average()}")
    return 1 if failed or (args.strict and not passed) else 0


if __name__ == "__main__":
    sys.exit(main())
