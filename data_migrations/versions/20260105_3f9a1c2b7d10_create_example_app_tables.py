"""Create the example application's tables (plans, model_properties)

Revision ID: 3f9a1c2b7d10
Revises:
Create Date: 2026-01-05 09:00:00

In a real project these tables belong to the application's schema migrations; the example
creates them so that it runs on an empty database.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

revision: str = "3f9a1c2b7d10"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

metadata = sa.MetaData()
plans = sa.Table(
    "plans",
    metadata,
    sa.Column("code", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("monthly_price_cents", sa.Integer(), nullable=False),
    sa.Column("active", sa.Boolean(), nullable=False),
)
model_properties = sa.Table(
    "model_properties",
    metadata,
    sa.Column("model", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)


async def upgrade(session: AsyncSession) -> None:
    """Create the tables unless they exist."""
    conn = await session.connection()
    await conn.run_sync(metadata.create_all)


async def downgrade(session: AsyncSession) -> None:
    """Drop the tables."""
    conn = await session.connection()
    await conn.run_sync(metadata.drop_all)


async def verify(session: AsyncSession) -> bool:
    """Both tables exist."""
    conn = await session.connection()
    names = await conn.run_sync(lambda sync: set(sa.inspect(sync).get_table_names()))
    return {"plans", "model_properties"} <= names
