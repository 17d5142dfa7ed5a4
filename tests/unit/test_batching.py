"""dm.batched on both databases: paging, per-batch checkpoints, resuming, progress."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC
from datetime import date
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest

from conftest import Project
from conftest import invoke

A = "a1b2c3d4e5f6"

SETUP = """
items = sa.table("items", sa.column("id"), sa.column("hits"))
"""

LOOP = """
from dm import batched
seen = []
query = sa.select(items.c.id).where(items.c.hits == 0)
async for batch in batched(session, query, key=items.c.id, size=7):
    assert batch.lower == (seen and sum(seen) or None), (batch.lower, seen)
    assert batch.upper == batch.lower + batch.row_count if batch.lower else batch.row_count
    seen.append(len(batch))
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
"""


def make_items(project: Project, n: int) -> None:
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, hits INTEGER NOT NULL)")
    values = ", ".join(f"({i}, 0)" for i in range(1, n + 1))
    project.db.query(f"INSERT INTO items (id, hits) VALUES {values}")


@pytest.mark.matrix
def test_batched_visits_every_row_once(project: Project) -> None:
    make_items(project, 50)
    project.write(A, None, LOOP + "assert seen == [7] * 7 + [1], seen", extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    assert [(r.hits, r.n) for r in rows] == [(1, 50)]


def test_the_rows_form_hands_the_rows_to_the_loop(project: Project) -> None:
    make_items(project, 20)
    project.db.query("UPDATE items SET hits = 5 WHERE id IN (3, 4)")  # not selected
    body = """
    from dm import batched
    seen = []
    query = sa.select(items.c.id, items.c.hits).where(items.c.hits == 0)
    async for batch in batched(session, query, key=items.c.id, size=6, rows=True):
        assert batch.first_key == batch[0].id and batch.last_key == batch[-1].id == batch.upper
        seen.append([row.id for row in batch])
        await session.execute(
            items.update()
            .where(items.c.id.in_([row.id for row in batch.rows]))
            .values(hits=items.c.hits + 1)
        )
    assert seen == [[1, 2, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20]], seen
    """
    project.write(A, None, body, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    assert hits(project) == [(1, 18), (5, 2)]


def test_a_key_range_bounds_another_tables_columns(project: Project) -> None:
    make_items(project, 20)
    project.db.query("CREATE TABLE mirror (id INTEGER PRIMARY KEY, hits INTEGER NOT NULL)")
    project.db.query("INSERT INTO mirror SELECT id, 0 FROM items")
    body = """
    from dm import batched
    mirror = sa.table("mirror", sa.column("id"), sa.column("hits"))
    query = sa.select(items.c.id).where(items.c.id % 2 == 0)
    async for batch in batched(session, query, key=items.c.id, size=3):
        await session.execute(
            mirror.update().where(batch.where(mirror.c.id)).values(hits=mirror.c.hits + 1)
        )
    """
    project.write(A, None, body, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    rows = project.db.query("SELECT hits, count(*) AS n FROM mirror GROUP BY hits")
    assert [(r.hits, r.n) for r in rows] == [(1, 20)]  # (0, 6], (6, 12], (12, 18], (18, 20]


def test_the_rows_of_a_key_range_batch_are_refused_with_a_hint(project: Project) -> None:
    make_items(project, 3)
    body = """
    from dm import batched
    async for batch in batched(session, sa.select(items.c.id), key=items.c.id):
        print([row.id for row in batch])
    """
    project.write(A, None, body, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "fetches only the key range by default; pass rows=True" in result.stderr


def test_a_loop_written_for_first_key_is_told_how_to_move(project: Project) -> None:
    make_items(project, 3)
    body = """
    from dm import batched
    async for batch in batched(session, sa.select(items.c.id), key=items.c.id):
        await session.execute(
            items.update()
            .where(items.c.id.between(batch.first_key, batch.last_key))
            .values(hits=1)
        )
    """
    project.write(A, None, body, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "batch.first_key needs batched(..., rows=True); bound the batch's" in result.stderr
    assert hits(project) == [(0, 3)]


def test_batched_in_a_transactional_revision_rolls_back_on_failure(project: Project) -> None:
    make_items(project, 20)
    project.write(A, None, LOOP + "raise RuntimeError('late failure')", extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "late failure" in result.stderr
    rows = project.db.query("SELECT count(*) AS n FROM items WHERE hits <> 0")
    assert rows[0].n == 0


# A non-transactional revision whose loop fails after DM_TEST_FAIL_AFTER batches (once
# their writes are made but before the next batch is asked for).
NON_TRANSACTIONAL = (
    SETUP
    + """
import json
import os
transactional = False
"""
)

FAILING_LOOP = """
from dm import batched
fail_after = int(os.environ.get("DM_TEST_FAIL_AFTER", "0"))
query = sa.select(items.c.id).where(items.c.hits == 0)
async for n, batch in aenumerate(batched(session, query, key=items.c.id, size=7)):
    await session.execute(items.update().where(batch.where()).values(hits=items.c.hits + 1))
    if n + 1 == fail_after:
        raise RuntimeError(f"failing after batch {n + 1}")
"""

AENUMERATE = """
async def aenumerate(iterable):
    n = 0
    async for item in iterable:
        yield n, item
        n += 1
"""


def hits(project: Project) -> list[tuple[int, int]]:
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits ORDER BY hits")
    return [(r.hits, r.n) for r in rows]


def attempts(project: Project) -> list[tuple[str, Any]]:
    rows = project.db.tracker()
    return [(r.status, _json(r.checkpoint)) for r in rows]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.matrix
def test_non_transactional_failure_keeps_committed_batches_and_resumes(project: Project) -> None:
    make_items(project, 50)
    project.write(A, None, FAILING_LOOP, extra=NON_TRANSACTIONAL + AENUMERATE)

    failed = invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="3")
    assert failed.exit_code == 1
    assert "failing after batch 3" in failed.stderr
    # Batches 1 and 2 were committed with their checkpoint; batch 3 was rolled back.
    assert hits(project) == [(0, 36), (1, 14)]
    checkpoint = {"loop": 0, "last_key": 14, "rows_done": 14, "rows_total": None}
    assert attempts(project) == [("failed", {**checkpoint, "finished": False})]

    status = invoke(project, "status", "--json")
    (row,) = json.loads(status.stdout)
    assert row["status"] == "failed" and row["checkpoint"]["last_key"] == 14

    resumed = invoke(project, "upgrade", "heads")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming after key 14, 14 rows already done" in resumed.stderr
    assert hits(project) == [(1, 50)]
    final = attempts(project)[-1]
    assert final[0] == "success"
    assert final[1] == {
        "loop": 0,
        "last_key": 50,
        "rows_done": 50,
        "rows_total": None,
        "finished": True,
    }


def test_a_finished_loop_is_not_run_again_by_the_next_attempt(project: Project) -> None:
    make_items(project, 20)
    body = """
    from dm import batched
    query = sa.select(items.c.id)
    async for batch in batched(session, query, key=items.c.id, size=6):
        await session.execute(
            items.update().where(batch.where()).values(hits=items.c.hits + 1)
        )
    async for batch in batched(session, query, key=items.c.id, size=6):
        await session.execute(
            items.update().where(batch.where()).values(hits=items.c.hits + 10)
        )
        if os.environ.get("DM_TEST_FAIL_AFTER") and batch.upper >= 12:
            raise RuntimeError("second loop fails")
    """
    project.write(A, None, body, extra=NON_TRANSACTIONAL)
    failed = invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="1")
    assert failed.exit_code == 1
    assert hits(project) == [(1, 14), (11, 6)]

    resumed = invoke(project, "upgrade", "heads")
    assert resumed.exit_code == 0, resumed.stderr
    assert "finished by an earlier attempt; skipped" in resumed.stderr
    assert hits(project) == [(11, 20)]


def test_a_non_transactional_downgrade_resumes_its_own_checkpoint(project: Project) -> None:
    make_items(project, 30)
    loop = """
    from dm import batched
    query = sa.select(items.c.id).where(items.c.hits == {before})
    async for batch in batched(session, query, key=items.c.id, size=4):
        await session.execute(items.update().where(batch.where()).values(hits={after}))
        if os.environ.get("DM_TEST_FAIL_AFTER") and batch.upper >= 8:
            raise RuntimeError("downgrade fails")
    """
    project.write(
        A,
        None,
        loop.format(before=0, after=1),
        downgrade=loop.format(before=1, after=0),
        extra=NON_TRANSACTIONAL,
    )
    assert invoke(project, "upgrade", "heads").exit_code == 0
    failed = invoke(project, "downgrade", "base", DM_TEST_FAIL_AFTER="1")
    assert failed.exit_code == 1
    assert hits(project) == [(0, 4), (1, 26)]
    resumed = invoke(project, "downgrade", "base")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming after key 4" in resumed.stderr
    assert hits(project) == [(0, 30)]
    assert [status for status, _ in attempts(project)] == ["success", "failed", "rolled_back"]


def test_status_names_the_checkpoint_a_failed_revision_resumes_from(project: Project) -> None:
    make_items(project, 20)
    project.write(A, None, FAILING_LOOP, extra=NON_TRANSACTIONAL + AENUMERATE)
    assert invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="2").exit_code == 1
    status = invoke(project, "status")
    assert status.exit_code == 0, status.stderr
    expected = "[checkpoint: 7 rows done, last key 7; the next upgrade resumes there]"
    assert expected in status.stdout


def test_a_changed_file_resumes_with_a_warning(project: Project) -> None:
    make_items(project, 20)
    project.write(A, None, FAILING_LOOP, extra=NON_TRANSACTIONAL + AENUMERATE)
    assert invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="2").exit_code == 1
    project.write(A, None, FAILING_LOOP + "# fixed", extra=NON_TRANSACTIONAL + AENUMERATE)
    resumed = invoke(project, "upgrade", "heads")
    assert resumed.exit_code == 0, resumed.stderr
    assert "the file changed since attempt 1; resuming from its checkpoint" in resumed.stderr
    assert hits(project) == [(1, 20)]


def test_resolving_the_failed_attempt_starts_the_next_run_over(project: Project) -> None:
    make_items(project, 20)
    project.write(A, None, FAILING_LOOP, extra=NON_TRANSACTIONAL + AENUMERATE)
    assert invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="2").exit_code == 1
    project.db.query("UPDATE items SET hits = 0")  # the operator undid the batches by hand
    resolved = invoke(project, "resolve", A, "--as", "rolled_back", "--reason", "start over")
    assert resolved.exit_code == 0, resolved.stderr
    again = invoke(project, "upgrade", "heads")
    assert again.exit_code == 0, again.stderr
    assert "resuming" not in again.stderr
    assert hits(project) == [(1, 20)]


def test_a_timed_out_non_transactional_revision_keeps_its_batches(project: Project) -> None:
    make_items(project, 40)
    loop = FAILING_LOOP.replace("size=7)", "size=4, throttle=0.2)")
    project.write(A, None, loop, extra=NON_TRANSACTIONAL + AENUMERATE + "timeout = 0.5\n")
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "timed out after 0.5s" in result.stderr
    ((status, checkpoint),) = attempts(project)
    done = checkpoint["rows_done"]
    assert status == "failed" and 0 < done < 40
    assert hits(project) == [(0, 40 - done), (1, done)]


@pytest.mark.matrix
def test_key_range_batches_skip_unselected_rows_and_resume(project: Project) -> None:
    make_items(project, 50)
    project.db.query("UPDATE items SET hits = 5 WHERE id IN (3, 4, 30)")  # not selected
    loop = FAILING_LOOP.replace(
        "    await session.execute(",
        "    assert len(batch) == batch.row_count in (7, 5), batch.row_count\n"
        "    assert batch.lower in ((None, 9) if n == 0 else (9, batch.lower)), batch\n"
        "    await session.execute(",
        1,
    )
    loop = loop.replace(
        ".where(batch.where())",
        ".where(batch.where(), items.c.hits == 0)",
    )
    project.write(A, None, loop, extra=NON_TRANSACTIONAL + AENUMERATE)
    failed = invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="2")
    assert failed.exit_code == 1
    # The first page of 7 selected rows (ids 1-2 and 5-9) was committed; the second not.
    assert hits(project) == [(0, 40), (1, 7), (5, 3)]
    resumed = invoke(project, "upgrade", "heads")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming after key 9, 7 rows already done" in resumed.stderr
    assert hits(project) == [(1, 47), (5, 3)]


BIG = 3_000_000_000

COMPOSITE = """
import os
transactional = False
members = sa.table("members", sa.column("tenant"), sa.column("id"), sa.column("hits"))
"""

COMPOSITE_LOOP = """
from dm import batched
key = (members.c.tenant, members.c.id)
query = sa.select(members.c.tenant, members.c.id)
n = 0
async for batch in batched(session, query, key=key, size=4, rows=ROWS):
    if ROWS:
        assert batch.first_key == tuple(batch[0]) and batch.upper == tuple(batch[-1])
    assert batch.row_count == 4 or batch.upper == (BIG + 3, 10), batch
    await session.execute(
        members.update().where(batch.where()).values(hits=members.c.hits + 1)
    )
    n += 1
    if os.environ.get("DM_TEST_FAIL_AFTER") and n == 3:
        raise RuntimeError("third batch fails")
"""


@pytest.mark.matrix
@pytest.mark.parametrize("rows", [False, True])
def test_a_composite_key_pages_by_row_value_and_resumes(project: Project, rows: bool) -> None:
    project.db.query(
        "CREATE TABLE members (tenant BIGINT NOT NULL, id INTEGER NOT NULL,"
        " hits INTEGER NOT NULL, PRIMARY KEY (tenant, id))"
    )
    tenants = (BIG + 1, BIG + 2, BIG + 3)  # beyond 32 bits: no INTEGER casts on the way
    values = ", ".join(f"({t}, {i}, 0)" for t in tenants for i in range(1, 11))
    project.db.query(f"INSERT INTO members (tenant, id, hits) VALUES {values}")
    project.write(A, None, COMPOSITE_LOOP, extra=COMPOSITE + f"ROWS = {rows}\nBIG = {BIG}\n")

    failed = invoke(project, "upgrade", "heads", DM_TEST_FAIL_AFTER="1")
    assert failed.exit_code == 1
    ((_, checkpoint),) = attempts(project)
    assert checkpoint["last_key"] == [BIG + 1, 8] and checkpoint["rows_done"] == 8

    resumed = invoke(project, "upgrade", "heads")
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming after key ({BIG + 1}, 8), 8 rows already done" in resumed.stderr
    rows = project.db.query("SELECT hits, count(*) AS n FROM members GROUP BY hits")
    assert [(r.hits, r.n) for r in rows] == [(1, 30)]


def test_a_successful_attempt_is_not_resumed(project: Project) -> None:
    make_items(project, 10)
    project.write(A, None, FAILING_LOOP, extra=NON_TRANSACTIONAL + AENUMERATE)
    assert invoke(project, "upgrade", "heads").exit_code == 0
    assert invoke(project, "downgrade", "base").exit_code == 0
    project.db.query("UPDATE items SET hits = 0")
    again = invoke(project, "upgrade", "heads")
    assert again.exit_code == 0, again.stderr
    assert "resuming" not in again.stderr
    assert hits(project) == [(1, 10)]


def test_verify_of_a_non_transactional_revision_sees_committed_work(project: Project) -> None:
    make_items(project, 10)
    verify = """
    count = await session.scalar(sa.select(sa.func.count()).where(items.c.hits != 1))
    return count == 0
    """
    project.write(A, None, FAILING_LOOP, verify=verify, extra=NON_TRANSACTIONAL + AENUMERATE)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    assert [status for status, _ in attempts(project)] == ["success"]


def test_progress_is_logged_with_the_total_and_as_json(project: Project) -> None:
    make_items(project, 30)
    loop = LOOP.replace("size=7)", "size=7, count=True, throttle=0.01)")
    project.write(A, None, loop, extra=SETUP)
    text = invoke(project, "upgrade", "heads")
    assert text.exit_code == 0, text.stderr
    assert f"upgrade {A}: 30/30 rows (100%)" in text.stderr

    assert invoke(project, "downgrade", "base").exit_code == 0
    project.db.query("UPDATE items SET hits = 0")
    as_json = invoke(project, "--log-format", "json", "upgrade", "heads")
    assert as_json.exit_code == 0, as_json.stderr
    entries = [json.loads(line) for line in as_json.stderr.splitlines()]
    (progress,) = [e["progress"] for e in entries if "progress" in e]
    assert progress["rows_done"] == 30 and progress["rows_total"] == 30
    assert progress["batch_size"] == 7


def test_a_progress_line_shows_the_batch_size_rate_and_eta() -> None:
    from dm.backfill.progress import Figures
    from dm.backfill.progress import describe

    figures = Figures(450_000, 1_000_000, 12_345.0, 45.0, batch_size=10_000)
    expected = "450,000/1,000,000 rows (45%), 12,345 rows/s, batch 10,000, ETA 0:00:45"
    assert describe(figures) == expected


@pytest.mark.matrix
@pytest.mark.parametrize(
    "value",
    [
        7,
        "user-7",
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        date(2026, 1, 2),
        Decimal("12.50"),
    ],
)
def test_checkpoint_keys_survive_json(value: Any) -> None:
    from dm.backfill.batching import decode_key
    from dm.backfill.batching import encode_key

    stored = json.loads(json.dumps(encode_key(value, A)))
    assert decode_key(stored) == value
    assert type(decode_key(stored)) is type(value)


def test_a_key_that_cannot_be_checkpointed_fails_before_any_write(project: Project) -> None:
    project.db.query(
        "CREATE TABLE blobs (id BLOB PRIMARY KEY)"
        if project.db.url.startswith("sqlite")
        else "CREATE TABLE blobs (id BYTEA PRIMARY KEY)"
    )
    project.db.query("INSERT INTO blobs (id) VALUES (:v)", v=b"\x01")
    body = """
    from dm import batched
    blobs = sa.table("blobs", sa.column("id"))
    async for batch in batched(session, sa.select(blobs.c.id), key=blobs.c.id):
        raise AssertionError("never reached")
    """
    project.write(A, None, body, extra=NON_TRANSACTIONAL)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "a key of type bytes cannot be stored in a checkpoint" in result.stderr


def test_batched_needs_the_key_in_the_query(project: Project) -> None:
    make_items(project, 3)
    loop = LOOP.replace("sa.select(items.c.id)", "sa.select(items.c.hits)")
    project.write(A, None, loop, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "key column must be selected" in result.stderr


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("size=0", "size must be at least 1"),
        ("min_size=5", "min_size and max_size need target_seconds"),
        ("target_seconds=0", "target_seconds must be positive"),
        ("size=10, target_seconds=1, max_size=5", "needs 1 <= min_size <= size <= max_size"),
        ("pause_poll=0", "pause_poll must be positive"),
        ("throttle=-1", "throttle must not be negative"),
    ],
)
def test_bad_batched_options_name_the_revision(
    project: Project, options: str, message: str
) -> None:
    make_items(project, 3)
    body = f"""
    from dm import batched
    async for batch in batched(session, sa.select(items.c.id), key=items.c.id, {options}):
        raise AssertionError("never reached")
    """
    project.write(A, None, body, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert f"revision {A}: batched() {message}" in result.stderr


def test_batched_outside_a_run_is_an_error() -> None:
    import sqlalchemy as sa

    from dm import batched
    from dm.backfill.batching import BatchingError

    items = sa.table("items", sa.column("id"))

    async def use() -> None:
        async for _ in batched(None, sa.select(items.c.id), key=items.c.id):  # type: ignore[arg-type]
            pass

    with pytest.raises(BatchingError, match="inside a revision run by dm"):
        asyncio.run(use())


@pytest.mark.parametrize(("size", "rows"), [(7, False), (7, True), (50, False), (1, False)])
@pytest.mark.parametrize("composite", [False, True])
def test_a_null_key_anywhere_fails_the_loop_before_any_batch(
    project: Project, size: int, rows: bool, composite: bool
) -> None:
    """SQLite sorts a NULL key first, PostgreSQL last, and ``key > last`` never selects it:
    whatever the batch size, the loop must refuse it rather than leave its row undone."""
    project.db.query(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, k INTEGER, hits INTEGER NOT NULL)"
    )
    values = ", ".join(f"({i}, {i}, 0)" for i in range(1, 21))
    project.db.query(f"INSERT INTO items (id, k, hits) VALUES {values}, (21, NULL, 0)")
    key = "(items.c.id, items.c.k)" if composite else "items.c.k"
    body = f"""
    from dm import batched
    items = sa.table("items", sa.column("id"), sa.column("k"), sa.column("hits"))
    query = sa.select(items.c.id, items.c.k)
    async for batch in batched(session, query, key={key}, size={size}, rows={rows}):
        await session.execute(items.update().where(batch.where()).values(hits=1))
    """
    project.write(A, None, body)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "is NULL in some rows of the query" in result.stderr
    assert hits(project) == [(0, 21)]


DECLARED_DATE = """
transactional = False
max_runtime = 20  # a loop that does not advance stops here (exit 5), not in CI's time limit
# The key is a timestamp column, declared a Date here: each bound compares as the value's
# type (a datetime), as `key > value` does; the loop must still advance page by page.
items = sa.table("items", sa.column("id"), sa.column("ts", sa.Date), sa.column("hits"))
"""


@pytest.mark.postgres
@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.parametrize("shape", ["rows", "key range", "workers=2"])
def test_a_key_declared_with_another_type_than_its_column_pages_through(
    project: Project, shape: str
) -> None:
    project.db.query(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, ts TIMESTAMP NOT NULL UNIQUE,"
        " hits INTEGER NOT NULL)"
    )
    project.db.query(
        "INSERT INTO items SELECT i, timestamp '2024-01-01' + i * interval '1 second', 0"
        " FROM generate_series(1, 60) AS i"
    )
    rows, workers = shape == "rows", 2 if shape == "workers=2" else 1
    body = f"""
    from dm import batched
    query = sa.select(items.c.id, items.c.ts)
    options = dict(key=items.c.ts, size=7, rows={rows}, workers={workers})
    async for batch in batched(session, query, **options):
        bound = items.c.id.in_([row.id for row in batch]) if options["rows"] else batch.where()
        await session.execute(items.update().where(bound).values(hits=items.c.hits + 1))
    """
    project.write(A, None, body, extra=DECLARED_DATE)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    assert hits(project) == [(1, 60)]


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("clause", [".limit(2)", ".offset(1)", ".limit(2).offset(1)"])
def test_a_query_with_its_own_limit_or_offset_is_refused(project: Project, clause: str) -> None:
    make_items(project, 5)
    body = f"""
    from dm import batched
    query = sa.select(items.c.id){clause}
    async for batch in batched(session, query, key=items.c.id, size=2):
        await session.execute(items.update().where(batch.where()).values(hits=1))
    """
    project.write(A, None, body, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert f"revision {A}: batched() pages the query itself" in result.stderr
    assert hits(project) == [(0, 5)]  # nothing written


ORM_ITEMS = """
from sqlalchemy.orm import declarative_base

Base = declarative_base()


class Item(Base):
    __tablename__ = "items"
    id = sa.Column(sa.Integer, primary_key=True)
    hits = sa.Column(sa.Integer, nullable=False)
"""


def test_an_orm_attribute_is_a_key(project: Project) -> None:
    make_items(project, 20)
    body = """
    from dm import batched
    query = sa.select(Item.id).where(Item.hits == 0)
    async for batch in batched(session, query, key=Item.id, size=6):
        await session.execute(sa.update(Item).where(batch.where()).values(hits=Item.hits + 1))
    """
    project.write(A, None, body, extra=ORM_ITEMS)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    assert hits(project) == [(1, 20)]
