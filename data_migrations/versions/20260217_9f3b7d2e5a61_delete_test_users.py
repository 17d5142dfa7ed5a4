"""Delete test users (development and staging only)

Revision ID: 9f3b7d2e5a61
Revises: 7a1c5e9b3d20
Create Date: 2026-02-17 16:45:00

Ported from the old framework's `delete_test_users` script, which refused to run outside
test environments. Here the refusal is declared: in any environment not listed below
(production is the default) dm does not run it and records it `skipped`; it runs if the
same database is later upgraded with DM_ENVIRONMENT=development or staging. No flag
overrides this.

Deleted accounts cannot be brought back, so there is no downgrade(). Safe to run twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

revision: str = "9f3b7d2e5a61"
down_revision: str | Sequence[str] | None = "7a1c5e9b3d20"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

environments: Sequence[str] | None = ("development", "staging")
transactional: bool = True
idempotent: bool = True  # a second run changes nothing (pytest --dm checks it)

users = sa.table("users", sa.column("id", sa.Integer), sa.column("is_test", sa.Boolean))


async def upgrade(session: AsyncSession) -> None:
    """Delete every account flagged as a test account."""
    await session.execute(users.delete().where(users.c.is_test.is_(True)))


async def verify(session: AsyncSession) -> bool:
    """No test account is left."""
    left = await session.scalar(
        sa.select(sa.func.count()).select_from(users).where(users.c.is_test.is_(True))
    )
    return left == 0
