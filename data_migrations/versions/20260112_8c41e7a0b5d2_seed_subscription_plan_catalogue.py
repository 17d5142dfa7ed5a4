"""Seed the subscription plan catalogue (free, pro, team)

Revision ID: 8c41e7a0b5d2
Revises: 3f9a1c2b7d10
Create Date: 2026-01-12 14:30:00

An idempotent upsert: running it again, or after someone edited a plan by hand, leaves
exactly the catalogue below. The downgrade removes these plans.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncSession

revision: str = "8c41e7a0b5d2"
down_revision: str | Sequence[str] | None = "3f9a1c2b7d10"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

plans = sa.table(
    "plans",
    sa.column("code", sa.String),
    sa.column("name", sa.String),
    sa.column("monthly_price_cents", sa.Integer),
    sa.column("active", sa.Boolean),
)

CATALOGUE = [
    {"code": "free", "name": "Free", "monthly_price_cents": 0, "active": True},
    {"code": "pro", "name": "Pro", "monthly_price_cents": 1900, "active": True},
    {"code": "team", "name": "Team", "monthly_price_cents": 4900, "active": True},
]


async def upgrade(session: AsyncSession) -> None:
    """Insert the plans, or bring existing rows back to the catalogue's values."""
    dialect = (await session.connection()).dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(plans).values(CATALOGUE)
    statement = statement.on_conflict_do_update(
        index_elements=[plans.c.code],
        set_={
            "name": statement.excluded.name,
            "monthly_price_cents": statement.excluded.monthly_price_cents,
            "active": statement.excluded.active,
        },
    )
    await session.execute(statement)


async def downgrade(session: AsyncSession) -> None:
    """Remove the catalogue's plans."""
    codes = [plan["code"] for plan in CATALOGUE]
    await session.execute(plans.delete().where(plans.c.code.in_(codes)))


async def verify(session: AsyncSession) -> bool:
    """Every catalogue plan exists with the catalogue's price."""
    rows = await session.execute(sa.select(plans.c.code, plans.c.monthly_price_cents))
    found = {row.code: row.monthly_price_cents for row in rows}
    return all(found.get(p["code"]) == p["monthly_price_cents"] for p in CATALOGUE)
