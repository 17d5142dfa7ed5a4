"""Sync the payment plan catalogue from the billing provider

Revision ID: 4e8d2a6c1f93
Revises: d27b95f3e6a4
Create Date: 2026-02-03 11:00:00

Ported from the old framework's `sync_payment_plans` script. The provider is the source of
truth: its plans are inserted or updated and marked active; plans it no longer offers are
kept (subscriptions point at them) but marked inactive. Safe to run twice.

The provider is reached through the small `PlanProvider` interface. The example uses
`OfflinePlanProvider`, a recorded copy of the provider's catalogue, so it runs without a
network; an application passes its real client from `provider()`.

downgrade() restores the catalogue exactly as it was before the sync, from the snapshot
table upgrade() leaves behind (`plans_before_4e8d2a6c1f93`), then drops the snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

revision: str = "4e8d2a6c1f93"
down_revision: str | Sequence[str] | None = "d27b95f3e6a4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

environments: Sequence[str] | None = None
transactional: bool = True

metadata = sa.MetaData()
plans = sa.Table(
    "plans",
    metadata,
    sa.Column("code", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("monthly_price_cents", sa.Integer(), nullable=False),
    sa.Column("active", sa.Boolean(), nullable=False),
)
snapshot = sa.Table(
    f"plans_before_{revision}",
    metadata,
    sa.Column("code", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("monthly_price_cents", sa.Integer(), nullable=False),
    sa.Column("active", sa.Boolean(), nullable=False),
)


class Plan(NamedTuple):
    """A plan as the billing provider describes it."""

    code: str
    name: str
    monthly_price_cents: int


class PlanProvider(Protocol):
    """The one call the sync needs from the billing provider's client."""

    async def fetch_plans(self) -> list[Plan]:
        """Return every plan the provider currently offers."""
        ...


class OfflinePlanProvider:
    """The provider's catalogue as recorded on 2026-02-03, for offline runs and tests."""

    CATALOGUE = (
        Plan("free", "Free", 0),
        Plan("pro", "Pro", 1900),
        Plan("business", "Business", 9900),
    )

    async def fetch_plans(self) -> list[Plan]:
        return list(self.CATALOGUE)


def provider() -> PlanProvider:
    """Return the provider client this revision syncs from."""
    return OfflinePlanProvider()


def _columns(table: sa.Table) -> list[sa.ColumnElement[object]]:
    return [table.c.code, table.c.name, table.c.monthly_price_cents, table.c.active]


async def upgrade(session: AsyncSession) -> None:
    """Snapshot the catalogue, then bring it in line with the provider's."""
    conn = await session.connection()
    await conn.run_sync(lambda sync: snapshot.drop(sync, checkfirst=True))
    await conn.run_sync(lambda sync: snapshot.create(sync))
    await session.execute(snapshot.insert().from_select(_columns(snapshot), sa.select(plans)))
    offered = await provider().fetch_plans()
    existing = set((await session.scalars(sa.select(plans.c.code))).all())
    for plan in offered:
        values = {"name": plan.name, "monthly_price_cents": plan.monthly_price_cents}
        if plan.code in existing:
            await session.execute(
                plans.update().where(plans.c.code == plan.code).values(active=True, **values)
            )
        else:
            await session.execute(plans.insert().values(code=plan.code, active=True, **values))
    codes = [plan.code for plan in offered]
    await session.execute(plans.update().where(plans.c.code.not_in(codes)).values(active=False))


async def downgrade(session: AsyncSession) -> None:
    """Restore the catalogue from the snapshot taken by upgrade()."""
    conn = await session.connection()
    await session.execute(plans.delete())
    await session.execute(plans.insert().from_select(_columns(plans), sa.select(snapshot)))
    await conn.run_sync(lambda sync: snapshot.drop(sync, checkfirst=True))


async def verify(session: AsyncSession) -> bool:
    """Active plans are exactly the provider's, with the provider's names and prices."""
    offered = {p.code: (p.name, p.monthly_price_cents) for p in await provider().fetch_plans()}
    rows = (await session.execute(sa.select(plans))).all()
    active = {row.code: (row.name, row.monthly_price_cents) for row in rows if row.active}
    return active == offered
