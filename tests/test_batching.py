"""dm.batched: keyset-paginated batches inside a transactional revision, on both databases."""

from __future__ import annotations

import asyncio

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
    assert batch.first_key == batch[0].id and batch.last_key == batch[-1].id
    seen.append(len(batch))
    await session.execute(
        items.update()
        .where(items.c.id.between(batch.first_key, batch.last_key))
        .values(hits=items.c.hits + 1)
    )
"""


def make_items(project: Project, n: int) -> None:
    project.db.query("CREATE TABLE items (id INTEGER PRIMARY KEY, hits INTEGER NOT NULL)")
    values = ", ".join(f"({i}, 0)" for i in range(1, n + 1))
    project.db.query(f"INSERT INTO items (id, hits) VALUES {values}")


def test_batched_visits_every_row_once(project: Project) -> None:
    make_items(project, 50)
    project.write(A, None, LOOP + "assert seen == [7] * 7 + [1], seen", extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 0, result.stderr
    rows = project.db.query("SELECT hits, count(*) AS n FROM items GROUP BY hits")
    assert [(r.hits, r.n) for r in rows] == [(1, 50)]


def test_batched_in_a_transactional_revision_rolls_back_on_failure(project: Project) -> None:
    make_items(project, 20)
    project.write(A, None, LOOP + "raise RuntimeError('late failure')", extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "late failure" in result.stderr
    rows = project.db.query("SELECT count(*) AS n FROM items WHERE hits <> 0")
    assert rows[0].n == 0


def test_batched_in_a_non_transactional_revision_is_refused_for_now(project: Project) -> None:
    make_items(project, 3)
    project.write(A, None, LOOP, extra=SETUP + "\ntransactional = False\n")
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "transactional = False is not supported yet" in result.stderr


def test_batched_needs_the_key_in_the_query(project: Project) -> None:
    make_items(project, 3)
    loop = LOOP.replace("sa.select(items.c.id)", "sa.select(items.c.hits)")
    project.write(A, None, loop, extra=SETUP)
    result = invoke(project, "upgrade", "heads")
    assert result.exit_code == 1
    assert "key column must be selected" in result.stderr


def test_batched_outside_a_run_is_an_error() -> None:
    import sqlalchemy as sa

    from dm import batched
    from dm.batching import BatchingError

    items = sa.table("items", sa.column("id"))

    async def use() -> None:
        async for _ in batched(None, sa.select(items.c.id), key=items.c.id):  # type: ignore[arg-type]
            pass

    with pytest.raises(BatchingError, match="inside a revision run by dm"):
        asyncio.run(use())
