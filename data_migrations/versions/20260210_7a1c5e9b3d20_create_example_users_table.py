"""Create the example application's users table with demo and test accounts

Revision ID: 7a1c5e9b3d20
Revises: 4e8d2a6c1f93
Create Date: 2026-02-10 09:30:00

In a real project this table belongs to the application's schema migrations and its test
accounts to a fixture loader; the example creates both so that the next revision, which
deletes test users, has something to work on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

revision: str = "7a1c5e9b3d20"
down_revision: str | Sequence[str] | None = "4e8d2a6c1f93"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

metadata = sa.MetaData()
users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("email", sa.String(255), nullable=False, unique=True),
    sa.Column("is_test", sa.Boolean(), nullable=False),
)

ACCOUNTS = [
    {"id": 1, "email": "alice@example.com", "is_test": False},
    {"id": 2, "email": "bob@example.com", "is_test": False},
    {"id": 3, "email": "qa-1@test.example", "is_test": True},
    {"id": 4, "email": "qa-2@test.example", "is_test": True},
]


async def upgrade(session: AsyncSession) -> None:
    """Create the table (unless it exists) and add the accounts it lacks."""
    conn = await session.connection()
    await conn.run_sync(metadata.create_all)
    present = set((await session.scalars(sa.select(users.c.id))).all())
    missing = [account for account in ACCOUNTS if account["id"] not in present]
    if missing:
        await session.execute(users.insert(), missing)


async def downgrade(session: AsyncSession) -> None:
    """Drop the table."""
    conn = await session.connection()
    await conn.run_sync(metadata.drop_all)


async def verify(session: AsyncSession) -> bool:
    """The real accounts exist."""
    count = await session.scalar(
        sa.select(sa.func.count()).select_from(users).where(users.c.is_test.is_(False))
    )
    return bool(count and count >= 2)
