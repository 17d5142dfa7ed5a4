"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Describe what this revision changes and why. Its first line is the description shown by
`dm history`, `dm list` and `dm status`. Say whether it is safe to run twice and what
downgrade() undoes: the operator reading `dm show` at 3 a.m. has only this text.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# Environments this revision may run in (DM_ENVIRONMENT, then ENVIRONMENT; default
# "production"). Anywhere else it does not run: it is recorded `skipped`, and runs when the
# database is later upgraded in an allowed environment. None: every environment.
# Guard destructive clean-ups, e.g. environments = ("development", "staging").
environments: Sequence[str] | None = None
# Reserved for batched revisions (must be True or False); today every revision runs
# upgrade() and verify() in one transaction.
transactional: bool = True

# Keep module level light: every revision file is imported whenever dm loads the graph.


async def upgrade(session: AsyncSession) -> None:
    """Apply the change. It runs in one transaction with verify(); make it idempotent."""
    # e.g. await session.execute(sqlalchemy.text("UPDATE users SET plan = 'free' WHERE plan IS NULL"))


async def downgrade(session: AsyncSession) -> None:
    """Undo upgrade(). Delete this function if the change cannot be undone."""


async def verify(session: AsyncSession) -> bool:
    """Return True when the data is as upgrade() leaves it (False fails the revision)."""
    return True
