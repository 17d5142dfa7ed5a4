"""Ensure every model has its default properties

Revision ID: d27b95f3e6a4
Revises: 8c41e7a0b5d2
Create Date: 2026-01-20 10:15:00

Adds the properties a model is missing and never overwrites a value someone changed.
The downgrade removes only properties that still hold their default value.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

revision: str = "d27b95f3e6a4"
down_revision: str | Sequence[str] | None = "8c41e7a0b5d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
idempotent: bool = True  # a second run changes nothing (pytest --dm checks it)

model_properties = sa.table(
    "model_properties",
    sa.column("model", sa.String),
    sa.column("name", sa.String),
    sa.column("value", sa.String),
)

DEFAULTS = {
    "invoice": {"currency": "EUR", "payment_terms_days": "30"},
    "user": {"locale": "en", "timezone": "UTC"},
}


def _defaults() -> list[dict[str, str]]:
    return [
        {"model": model, "name": name, "value": value}
        for model, properties in DEFAULTS.items()
        for name, value in properties.items()
    ]


async def upgrade(session: AsyncSession) -> None:
    """Insert each default property that does not exist yet."""
    rows = await session.execute(sa.select(model_properties.c.model, model_properties.c.name))
    present = {(row.model, row.name) for row in rows}
    missing = [p for p in _defaults() if (p["model"], p["name"]) not in present]
    if missing:
        await session.execute(model_properties.insert(), missing)


async def downgrade(session: AsyncSession) -> None:
    """Delete default properties that still hold their default value."""
    for p in _defaults():
        await session.execute(
            model_properties.delete().where(
                model_properties.c.model == p["model"],
                model_properties.c.name == p["name"],
                model_properties.c.value == p["value"],
            )
        )


async def verify(session: AsyncSession) -> bool:
    """Every model has every default property."""
    rows = await session.execute(sa.select(model_properties.c.model, model_properties.c.name))
    present = {(row.model, row.name) for row in rows}
    return all((p["model"], p["name"]) in present for p in _defaults())
