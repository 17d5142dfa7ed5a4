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
# True: upgrade() and verify() run in one transaction; a failure leaves nothing behind.
# False: for large backfills with dm.batched: each batch commits with a checkpoint, and
# after a failure or a kill the next run resumes after the last committed batch. Code
# outside the batched() loops then runs again on resume: keep it idempotent.
transactional: bool = True
# With transactional = False: seconds an attempt may run before its batched loop stops at a
# batch boundary (exit 5; the next run resumes). None: no limit of its own.
max_runtime: float | None = None
# False: dm check (an application's gate) passes while this revision is unfinished, and
# when it stops part-way (its max_runtime, dm pause) the run goes on with later revisions.
blocks_deploy: bool = True
# Ancestor backfills (blocks_deploy = False) whose upgrade must be complete before this one
# runs, e.g. ("c0ffee000001",): until then it waits, and so does dm check. None: none.
requires_complete: Sequence[str] | None = None

# Keep module level light: every revision file is imported whenever dm loads the graph.


async def upgrade(session: AsyncSession) -> None:
    """Apply the change. It runs in one transaction with verify(); make it idempotent."""
    # e.g. await session.execute(sqlalchemy.text("UPDATE users SET plan = 'free' WHERE plan IS NULL"))
    #
    # A large table: walk it in batches (with transactional = False, resumably). Bound each
    # write by the batch's key range, batch.where(), and repeat the query's condition;
    # rows=True hands the rows to the loop too; target_seconds= tunes the size, and
    # pause_when= (see dm.backoff) holds the loop while the database is busy.
    #   from dm import batched
    #   query = sa.select(users.c.id).where(users.c.display_name.is_(None))
    #   async for batch in batched(session, query, key=users.c.id, size=1000):
    #       await session.execute(
    #           users.update()
    #           .where(batch.where())
    #           .where(users.c.display_name.is_(None))
    #           .values(display_name=sa.func.split_part(users.c.email, "@", 1))
    #       )


async def downgrade(session: AsyncSession) -> None:
    """Undo upgrade(). Delete this function if the change cannot be undone."""


async def verify(session: AsyncSession) -> bool:
    """Return True when the data is as upgrade() leaves it (False fails the revision)."""
    return True
