"""${message}

Revision ID: ${up_revision}
Revises: ${revises}
Create Date: ${create_date}

Describe what this revision changes and why. Its first line is the description shown by
`dm history`, `dm list` and `dm status`. Say whether it is safe to run twice and what
downgrade() undoes: the operator reading `dm show` at 3 a.m. has only this text.

Alembic-style: upgrade() and downgrade() are plain functions run with Alembic's `op` bound
to dm's connection, inside the revision's transaction (op.execute, op.get_bind(),
op.bulk_insert, op.add_column, op.batch_alter_table, ...). ORM code: Session(bind=op.get_bind()).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}

# Environments this revision may run in (None: every environment); see `dm revision` without
# --sync for the details. transactional = True: upgrade() and verify() run in one transaction.
environments: Sequence[str] | None = None
transactional: bool = True


def upgrade() -> None:
    """Apply the change. It runs in one transaction with verify(); make it idempotent."""
    # e.g. op.execute("UPDATE users SET plan = 'free' WHERE plan IS NULL")
    # Outside the transaction (CREATE INDEX CONCURRENTLY): commits the work before it.
    #   with op.get_context().autocommit_block():
    #       op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_users_plan ON users (plan)")


def downgrade() -> None:
    """Undo upgrade(). Delete this function if the change cannot be undone."""


def verify() -> bool:
    """Return True when the data is as upgrade() leaves it (False fails the revision)."""
    return True
