"""Behind a connection pooler: real ``python -m dm`` processes through a real PgBouncer.

PgBouncer (``support.pgbouncer``) runs in transaction or session mode with a pool of 2
server connections in front of the test PostgreSQL. Five runs start at once; each hook
notes its start and end in a file outside the database, sleeps 0.3 s and writes one
ledger row. What is checked is what an operator cares about: exit codes, each revision
once, no two hooks at the same time, no advisory lock left behind, and no setting of dm's
reaching the pool's next client.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PG_DRIVER
from conftest import PG_HOST
from conftest import PG_PORT
from conftest import Database
from conftest import Project
from conftest import run_dm
from conftest import wait_for
from dm import verbs
from dm.engine.lock import lock_key
from dm.engine.tracker import Tracker
from support.pgbouncer import PgBouncer
from support.pgbouncer import running_pgbouncer
from support.processes import Spawn
from support.processes import advisory_locks
from support.processes import block_in
from support.processes import write_chain

pytestmark = [pytest.mark.postgres, pytest.mark.process]

RUNS = 5
WAITING = "waiting for the migration lock, held by"
HOOK_SECONDS = 0.3
POOLED = {"statement_cache_size": "0"}
# Every setting dm sets on a connection of its own: none may reach the pool's next client.
TOUCHED = (
    "lock_timeout",
    "statement_timeout",
    "client_connection_check_interval",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
)

_HOOK = """\
with open(NOTES, "a") as f:
    f.write(f"start {{revision}} {{os.getpid()}} {{time.time()}}\\n")
await asyncio.sleep({seconds})
{create}await session.execute(sa.text("INSERT INTO ledger (rev) VALUES (:r)"), {{"r": revision}})
with open(NOTES, "a") as f:
    f.write(f"end {{revision}} {{os.getpid()}} {{time.time()}}\\n")
"""

STRESS_ROUNDS = int(os.environ.get("DM_STRESS_ROUNDS", "10"))


@pytest.fixture
def pg_project(tmp_path: Path, postgres_db: Database, monkeypatch: pytest.MonkeyPatch) -> Project:
    """An empty dm project on a fresh PostgreSQL database."""
    for name in ("DM_DATABASE_URL", "DATABASE_URL", "DM_LOCK_DATABASE_URL", "DM_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "proj"
    verbs.init(root)
    monkeypatch.chdir(root)
    return Project(root, postgres_db)


@pytest.fixture
def transaction_pool() -> Iterator[PgBouncer]:
    yield from running_pgbouncer("transaction", pool_size=2)


@pytest.fixture
def session_pool() -> Iterator[PgBouncer]:
    yield from running_pgbouncer("session", pool_size=2)


@pytest.fixture
def impatient_session_pool() -> Iterator[PgBouncer]:
    """A session pool of two whose clients wait 10 s at most for a server connection: runs
    that deadlock on the pool fail within seconds instead of PgBouncer's 120."""
    yield from running_pgbouncer("session", pool_size=2, query_wait_timeout="10")


class Rounds:
    """Revisions written round after round, each round's runs started together."""

    def __init__(self, project: Project) -> None:
        self.project = project
        self.notes = project.root.parent / "notes.log"
        self.revisions: list[str] = []

    def add(self, count: int) -> list[str]:
        """Write ``count`` more revisions after the last one; return their ids."""
        new = []
        for _ in range(count):
            rev = f"p{len(self.revisions):02d}"
            first = not self.revisions
            create = "await session.execute(sa.text('CREATE TABLE ledger (rev TEXT)'))\n"
            body = _HOOK.format(seconds=HOOK_SECONDS, create=create if first else "")
            extra = f"import asyncio\nimport os\nimport time\nNOTES = {str(self.notes)!r}\n"
            self.project.write(
                rev, self.revisions[-1] if self.revisions else None, body, extra=extra
            )
            self.revisions.append(rev)
            new.append(rev)
        return new

    def run(self, spawn: Spawn, env: dict[str, str], runs: int = RUNS) -> list[int]:
        """Start ``runs`` ``dm upgrade heads`` at once; return their exit codes."""
        procs = [spawn(self.project, "upgrade", "heads", env=env) for _ in range(runs)]
        codes = [proc.wait(timeout=120) for proc in procs]
        assert codes == [0] * runs, [proc.stderr()[-2000:] for proc in procs]
        return codes

    def assert_once_and_apart(self) -> None:
        """Each revision's hook ran once, wrote its row once, and no two hooks overlapped."""
        ledger = Counter(r.rev for r in self.project.db.query("SELECT rev FROM ledger"))
        assert ledger == Counter(dict.fromkeys(self.revisions, 1))
        tracker = [(r.revision, r.status) for r in self.project.db.tracker()]
        assert sorted(tracker) == sorted((rev, "success") for rev in self.revisions)
        spans: dict[tuple[str, str], list[float]] = {}
        for line in self.notes.read_text().split("\n"):
            if line:
                event, rev, pid, at = line.split()
                spans.setdefault((rev, pid), []).append(float(at))
        assert Counter(rev for rev, _pid in spans) == Counter(dict.fromkeys(self.revisions, 1))
        ordered = sorted(spans.values())
        for (_, end), (start, _) in zip(ordered, ordered[1:], strict=False):
            assert end <= start, f"two hooks ran at the same time: {ordered}"


def plain_settings(bouncer: PgBouncer, db: Database) -> list[dict[str, str]]:
    """Every setting of ``TOUCHED`` as each server connection of the pool shows it to a
    plain client: ``pool_size`` clients hold a transaction each, so each gets its own."""
    import asyncpg

    async def run() -> list[dict[str, str]]:
        name = db.url.rsplit("/", 1)[1]
        conns = [
            await asyncpg.connect(
                host="127.0.0.1",
                port=bouncer.port,
                user="postgres",
                database=name,
                statement_cache_size=0,
            )
            for _ in range(bouncer.pool_size)
        ]
        seen = []
        try:
            transactions = [conn.transaction() for conn in conns]
            for transaction in transactions:
                await transaction.start()
            for conn in conns:
                values = {}
                for setting in TOUCHED:
                    values[setting] = str(await conn.fetchval(f"SHOW {setting}"))
                seen.append(values)
            for transaction in transactions:
                await transaction.rollback()
        finally:
            for conn in conns:
                await conn.close()
        return seen

    return asyncio.run(run())


def server_defaults(db: Database) -> dict[str, str]:
    """``TOUCHED`` as a fresh direct connection shows them (PostgreSQL's own settings)."""
    import asyncpg

    async def run() -> dict[str, str]:
        conn = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", database=db.url.rsplit("/", 1)[1]
        )
        try:
            return {s: str(await conn.fetchval(f"SHOW {s}")) for s in TOUCHED}
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.mark.slow  # the pooled way is also checked by the fast tests above and below
def test_documented_setup_through_transaction_pooling(
    pg_project: Project, transaction_pool: PgBouncer, spawn: Spawn
) -> None:
    """Work URL through PgBouncer (statement_cache_size=0), lock URL direct: two rounds of
    five runs all exit 0, each revision once, no hooks overlap, no lock and no setting left."""
    rounds = Rounds(pg_project)
    env = {
        "DM_DATABASE_URL": transaction_pool.url(pg_project.db.url, **POOLED),
        "DM_LOCK_DATABASE_URL": pg_project.db.url,
    }
    for _ in range(2):
        rounds.add(2)
        rounds.run(spawn, env)
        rounds.assert_once_and_apart()
        assert advisory_locks(pg_project) == []
    defaults = server_defaults(pg_project.db)
    assert plain_settings(transaction_pool, pg_project.db) == [defaults, defaults]


@pytest.mark.slow
def test_no_lock_url_still_one_run_at_a_time(
    pg_project: Project, transaction_pool: PgBouncer, spawn: Spawn
) -> None:
    """The newcomer's set-up: everything through transaction pooling, no lock URL. Five
    runs take turns (no hooks overlap), all exit 0, and no advisory lock stays on a
    pooled server connection."""
    rounds = Rounds(pg_project)
    rounds.add(2)
    rounds.run(spawn, {"DM_DATABASE_URL": transaction_pool.url(pg_project.db.url, **POOLED)})
    rounds.assert_once_and_apart()
    assert advisory_locks(pg_project) == []
    defaults = server_defaults(pg_project.db)
    assert plain_settings(transaction_pool, pg_project.db) == [defaults, defaults]


@pytest.mark.slow
def test_session_pooling_with_a_pool_of_two(
    pg_project: Project, impatient_session_pool: PgBouncer, spawn: Spawn
) -> None:
    """Session pooling, two server connections, no lock URL, five runs that all see work to
    do while another session holds the lock: each waits its turn holding no server
    connection between tries, so none is stuck without the second one it needs once the
    lock is free (before, two waiting runs each held one for their work connection and
    queued for another: all timed out). All five exit 0, each revision once."""
    import asyncpg

    pool = impatient_session_pool
    chain = write_chain(pg_project, 2)
    env = {"DM_DATABASE_URL": pool.url(pg_project.db.url)}

    async def scenario() -> list[int]:
        holder = await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user="postgres", database=pg_project.db.url.rsplit("/")[-1]
        )
        try:
            await holder.execute("BEGIN")
            tracker = Tracker()  # dm's key: the tracker as the server resolves it
            tracker.relation = f"{pg_project.db.url.rsplit('/')[-1]}.public.script_run_tracker"
            await holder.execute(f"SELECT pg_advisory_xact_lock({lock_key(tracker)})")
            procs = [spawn(pg_project, "upgrade", "heads", env=env) for _ in range(RUNS)]
            await asyncio.to_thread(
                wait_for,
                lambda: all(WAITING in p.stderr() or not p.running() for p in procs),
                60,
            )
            assert all(p.running() for p in procs), [p.stderr() for p in procs]
        finally:
            await holder.close()  # ends the transaction: the lock is free
        codes = [await asyncio.to_thread(p.wait, 120) for p in procs]
        assert codes == [0] * RUNS, [p.stderr()[-1500:] for p in procs]
        return codes

    asyncio.run(scenario())
    chain.assert_exactly_once()
    assert advisory_locks(pg_project) == []


@pytest.mark.slow  # each read-only command through PgBouncer; the fast suite keeps one pooled run
def test_read_only_commands_through_transaction_pooling(
    pg_project: Project, transaction_pool: PgBouncer
) -> None:
    """check --wait, current, status and history exit 0 through the pool, run after run."""
    Rounds(pg_project).add(1)
    env = {"DM_DATABASE_URL": transaction_pool.url(pg_project.db.url, **POOLED)}
    assert run_dm(pg_project, "upgrade", "heads", env=env).returncode == 0
    for args in (
        ("check", "--wait", "--timeout", "20", "--interval", "1"),
        ("current",),
        ("status",),
        ("history",),
        ("current", "--json"),
    ):
        result = run_dm(pg_project, *args, env=env)
        assert result.returncode == 0, (args, result.stderr)


@pytest.fixture
def one_server_pool() -> Iterator[PgBouncer]:
    yield from running_pgbouncer("transaction", pool_size=1)


@pytest.mark.skipif(
    PG_DRIVER == "psycopg",
    reason="psycopg binds client-side and prepares nothing: no statement to collide",
)
def test_unmarked_pooled_url_names_the_setting(
    pg_project: Project, one_server_pool: PgBouncer
) -> None:
    """Through transaction pooling without statement_cache_size=0, the next run meets
    the prepared statements an earlier one left on the server connection: one line naming
    the fix, exit 2, never "a bug in dm"."""
    env = {"DM_DATABASE_URL": one_server_pool.url(pg_project.db.url)}
    first = run_dm(pg_project, "current", env=env)  # leaves __asyncpg_stmt_1__ and more
    assert first.returncode == 0, first.stderr
    result = run_dm(pg_project, "current", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "statement_cache_size=0" in lines[0]
    assert "already exists" in lines[0]
    assert "bug in dm" not in result.stderr
    marked = run_dm(
        pg_project,
        "current",
        env={"DM_DATABASE_URL": one_server_pool.url(pg_project.db.url, **POOLED)},
    )
    assert marked.returncode == 0, marked.stderr


@pytest.fixture
def impatient_one_server_pool() -> Iterator[PgBouncer]:
    yield from running_pgbouncer("transaction", pool_size=1, query_wait_timeout="2")


@pytest.mark.slow
def test_pool_too_small_is_named(pg_project: Project, impatient_one_server_pool: PgBouncer) -> None:
    """One server connection, and the lock through the pool: the run's lock transaction
    takes it, its work waits past the pooler's query_wait_timeout. One line names the
    exhausted pool and the budget; never "a bug in dm"."""
    Rounds(pg_project).add(1)
    env = {
        "DM_DATABASE_URL": impatient_one_server_pool.url(pg_project.db.url, **POOLED),
        "DM_CONNECT_RETRY_SECONDS": "0",
    }
    result = run_dm(pg_project, "upgrade", "heads", env=env)
    assert result.returncode == 75, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "the connection pool is exhausted" in lines[-1], result.stderr
    assert "2 server connections" in lines[-1]
    assert "bug in dm" not in result.stderr
    assert advisory_locks(pg_project) == []


def test_killed_holder_leaves_no_lock_on_the_pool(
    pg_project: Project, transaction_pool: PgBouncer, spawn: Spawn
) -> None:
    """A run SIGKILLed while it holds the lock through the pool: the pooler ends its
    transaction, so the next run takes the lock at once and finishes the work."""
    rounds = Rounds(pg_project)
    rounds.add(1)
    env = {"DM_DATABASE_URL": transaction_pool.url(pg_project.db.url, **POOLED)}
    slow = spawn(pg_project, "upgrade", "heads", env=env)
    wait_for(lambda: rounds.notes.exists() or not slow.running(), timeout=60)
    os.kill(slow.pid, signal.SIGKILL)
    slow.wait(10)
    wait_for(lambda: advisory_locks(pg_project) == [], timeout=10)
    result = run_dm(pg_project, "upgrade", "heads", "--lock-timeout", "5", env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.stress
@pytest.mark.parametrize("lock_url", ["direct", "missing"])
def test_stress_rounds_through_transaction_pooling(
    pg_project: Project, transaction_pool: PgBouncer, spawn: Spawn, lock_url: str
) -> None:
    """Rounds of five runs each (four; at most ``DM_STRESS_ROUNDS``), with and without a
    direct lock URL."""
    rounds = Rounds(pg_project)
    env = {"DM_DATABASE_URL": transaction_pool.url(pg_project.db.url, **POOLED)}
    if lock_url == "direct":
        env["DM_LOCK_DATABASE_URL"] = pg_project.db.url
    for _ in range(min(4, STRESS_ROUNDS)):
        rounds.add(3)
        rounds.run(spawn, env)
        rounds.assert_once_and_apart()
        assert advisory_locks(pg_project) == []
    defaults = server_defaults(pg_project.db)
    assert plain_settings(transaction_pool, pg_project.db) == [defaults, defaults]


@pytest.mark.stress
def test_stress_rounds_through_session_pooling(
    pg_project: Project, session_pool: PgBouncer, spawn: Spawn
) -> None:
    """Rounds of five runs (three; at most ``DM_STRESS_ROUNDS``) through a session pool of
    two."""
    rounds = Rounds(pg_project)
    for _ in range(min(3, STRESS_ROUNDS)):
        rounds.add(2)
        rounds.run(spawn, {"DM_DATABASE_URL": session_pool.url(pg_project.db.url)})
        rounds.assert_once_and_apart()
        assert advisory_locks(pg_project) == []


def test_lock_transaction_holds_no_snapshot(pg_project: Project, spawn: Spawn) -> None:
    """While a run works, its lock transaction is idle in transaction with no snapshot and
    no transaction id: it holds back neither VACUUM nor CREATE INDEX CONCURRENTLY."""
    chain = write_chain(pg_project, 1)
    proc = block_in(chain, spawn, chain.revisions[0])
    rows = pg_project.db.query(
        "SELECT a.state, a.backend_xmin, a.backend_xid FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert [(r.state, r.backend_xmin, r.backend_xid) for r in rows] == [
        ("idle in transaction", None, None)
    ]
    chain.release()
    assert proc.wait() == 0, proc.stderr()
    assert advisory_locks(pg_project) == []


def test_autocommit_block_refused_on_a_pooled_url(pg_project: Project) -> None:
    """An autocommit block's statements would run outside a transaction, which a pooler
    may split: on a URL marked statement_cache_size=0 the revision fails with the reason."""
    pg_project.write("a1", None, "async with dm.autocommit(session):\n    pass", extra="import dm")
    url = pg_project.db.url + "?statement_cache_size=0"
    result = run_dm(pg_project, "upgrade", "heads", env={"DM_DATABASE_URL": url})
    assert result.returncode == 1, result.stderr
    assert "cannot run through a transaction pooler" in result.stderr
    assert "bug in dm" not in result.stderr


PARALLEL_REVISION = """
query = sa.select(items.c.id)
async for batch in batched(session, query, key=items.c.id, size=100, workers=2):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    await asyncio.sleep(0.005)
"""

PARALLEL_EXTRA = """
import asyncio
from dm import batched

transactional = False
items = sa.table("items", sa.column("id"), sa.column("hits"))
"""


@pytest.mark.slow
def test_parallel_backfill_through_transaction_pooling(
    pg_project: Project, transaction_pool: PgBouncer, spawn: Spawn
) -> None:
    """A loop with workers=2 and a dm work process, all through a transaction pool of two
    server connections: every row once, both exit 0, no setting left on the pool."""
    db = pg_project.db
    db.query("CREATE TABLE items (id BIGINT PRIMARY KEY, hits INTEGER NOT NULL)")
    db.query("INSERT INTO items SELECT g, 0 FROM generate_series(1, 10000) AS g")
    pg_project.write("fa11e1000001", None, PARALLEL_REVISION, extra=PARALLEL_EXTRA)
    env = {
        "DM_DATABASE_URL": transaction_pool.url(db.url, **POOLED),
        "DM_LOCK_DATABASE_URL": db.url,
    }
    run = spawn(pg_project, "upgrade", "heads", env=env)
    worker = spawn(pg_project, "work", "fa11e1000001", "--wait", "30", env=env)
    assert run.wait() == 0, run.stderr
    assert worker.wait() == 0, worker.stderr
    hits = db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    assert {r.hits: r.n for r in hits} == {1: 10000}
    defaults = server_defaults(db)
    assert plain_settings(transaction_pool, db) == [defaults, defaults]
