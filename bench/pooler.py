"""Measure what the pooler-safe route costs on a direct PostgreSQL connection.

A database URL with ``statement_cache_size=0`` is used the pooled way (``dm.config.engines``): every
statement is prepared unnamed and cached nowhere (one more round trip per statement, and
a new plan each time), each transaction begins with one ``set_config(..., true)``
statement instead of the session ``SET``s, and the pending row is inserted in a
transaction instead of in autocommit. This script runs, in one process and on a direct
connection to the same server, each workload both ways in rotated order, and reports the
medians and the ratio pooled / direct:

(a) **transactions**: ``--transactions`` (default 2,000) transactions on a dm engine, each
    a keyed SELECT, an UPDATE and an INSERT, as a batch with its checkpoint does;
(b) **dm.batched**: ``dm upgrade heads`` (in process, ``dm.upgrade``) of a
    ``transactional = False`` revision that backfills ``--rows`` (default 100,000) rows
    in batches of ``--size`` (default 1,000), a commit and a checkpoint per batch;
(c) **revisions**: ``dm upgrade heads`` of ``--revisions`` (default 40) transactional
    revisions, each one small UPDATE (the tracker's rows per revision dominate).

Usage: ``python bench/pooler.py [--server postgresql://postgres@127.0.0.1:5432]``. The
benchmark database ``dm_bench_pooler`` is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reporting import load_average  # noqa: E402
from reporting import print_table  # noqa: E402

DATABASE = "dm_bench_pooler"
POOLED = "?statement_cache_size=0"

BATCHED = '''"""Backfill in batches."""
import sqlalchemy as sa

from dm import batched

revision = "b0"
down_revision = None
branch_labels = None
depends_on = None
transactional = False


async def upgrade(session):
    t = sa.table("items", sa.column("id"), sa.column("n"), sa.column("done"))
    query = sa.select(t.c.id).where(t.c.done.is_(None))
    async for batch in batched(session, query, key=t.c.id, size={size}):
        await session.execute(t.update().where(batch.where()).values(done=t.c.n + 1))
'''

SMALL = '''"""Revision {i}."""
import sqlalchemy as sa

revision = "s{i:03d}"
down_revision = {down!r}
branch_labels = None
depends_on = None


async def upgrade(session):
    await session.execute(sa.text("UPDATE items SET n = n + 1 WHERE id = {i} + 1"))
'''


async def admin(server: str, sql: str) -> None:
    url = sa.make_url(server)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database="postgres"
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def reset(url: str, rows: int) -> None:
    """Empty the database (dm's tables too), then build ``items`` with ``rows`` rows."""
    parsed = sa.make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, database=DATABASE
    )
    try:
        await conn.execute(
            "DROP SCHEMA public CASCADE; CREATE SCHEMA public; "
            "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, done int); "
            "CREATE TABLE marks (k bigint); "
            f"INSERT INTO items SELECT g, g, NULL FROM generate_series(1, {rows}) g"
        )
        await conn.execute("VACUUM ANALYZE items")
    finally:
        await conn.close()


async def transactions(url: str, count: int) -> None:
    """(a) ``count`` transactions of three statements on a dm engine, settings as dm's."""
    from dm.config.engines import create_engine
    from dm.config.engines import transaction_settings
    from dm.config.urls import normalise_url
    from dm.config.urls import through_pooler

    parsed = normalise_url(url, "url")
    engine = create_engine(parsed)
    settings = {"lock_timeout": "5000", "client_connection_check_interval": "1000"}
    try:
        async with engine.connect() as conn:
            if through_pooler(parsed):
                transaction_settings(conn, settings)
            else:
                for name, value in settings.items():
                    await conn.execute(sa.text(f"SET {name} = {value}"))
                await conn.commit()
            for i in range(count):
                key = i % 1000 + 1
                async with conn.begin():
                    await conn.execute(sa.text("SELECT n FROM items WHERE id = :k"), {"k": key})
                    await conn.execute(
                        sa.text("UPDATE items SET n = n + 1 WHERE id = :k"), {"k": key}
                    )
                    await conn.execute(sa.text("INSERT INTO marks (k) VALUES (:k)"), {"k": key})
    finally:
        await engine.dispose()


async def dm_upgrade(project: Path, url: str) -> None:
    import dm

    os.environ["DM_DATABASE_URL"] = url
    await dm.upgrade("heads", config=project / "alembic.ini")


def make_project(root: Path, name: str, files: dict[str, str]) -> Path:
    from dm import verbs

    directory = root / name
    verbs.init(directory)
    for filename, text in files.items():
        (directory / "data_migrations" / "versions" / filename).write_text(text)
    return directory


async def bench(args: argparse.Namespace) -> int:
    server = args.server.rstrip("/")
    direct = f"{server}/{DATABASE}"
    routes = {"direct": direct, "pooled": direct + POOLED}
    await admin(server, f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await admin(server, f'CREATE DATABASE "{DATABASE}"')
    root = Path(tempfile.mkdtemp(prefix="dm-bench-pooler-"))
    batched_project = make_project(
        root, "batched", {"b0_backfill.py": BATCHED.format(size=args.size)}
    )
    small = {
        f"s{i:03d}_small.py": SMALL.format(i=i, down=f"s{i - 1:03d}" if i else None)
        for i in range(args.revisions)
    }
    small_project = make_project(root, "small", small)

    async def run_a(url: str) -> None:
        await transactions(url, args.transactions)

    async def run_b(url: str) -> None:
        await dm_upgrade(batched_project, url)

    async def run_c(url: str) -> None:
        await dm_upgrade(small_project, url)

    workloads: dict[str, tuple[str, Callable[[str], Awaitable[None]], int]] = {
        "a": (f"(a) {args.transactions} transactions", run_a, 1000),
        "b": (f"(b) dm.batched, {args.rows} rows / {args.size}", run_b, args.rows),
        "c": (f"(c) {args.revisions} revisions", run_c, 1000),
    }
    times: dict[tuple[str, str], list[float]] = {}
    try:
        for rep in range(args.reps + 1):  # the first repetition warms up, untimed
            order = list(routes.items())
            if rep % 2:
                order.reverse()
            for key, (_label, work, rows) in workloads.items():
                for route, url in order:
                    await reset(direct, rows)
                    started = time.perf_counter()
                    await work(url)
                    elapsed = time.perf_counter() - started
                    if rep:
                        times.setdefault((key, route), []).append(elapsed)
    finally:
        await admin(server, f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    print(f"load average before the report: {load_average()}; reps: {args.reps}")
    table = [["workload", "direct (s)", "pooled route (s)", "pooled / direct"]]
    for key, (label, _work, _rows) in workloads.items():
        plain = statistics.median(times[(key, "direct")])
        pooled = statistics.median(times[(key, "pooled")])
        table.append([label, f"{plain:.3f}", f"{pooled:.3f}", f"{pooled / plain:.2f}"])
    print_table(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--revisions", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    return asyncio.run(bench(args))


if __name__ == "__main__":
    raise SystemExit(main())
