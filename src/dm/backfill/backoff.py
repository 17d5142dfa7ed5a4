"""Ready-made ``pause_when`` predicates for ``dm.batched``: wait while the database is busy.

Each function returns an async predicate ``f(session)`` giving why the loop should wait
(a string) or None. They read PostgreSQL's statistics views; on any other database they
never ask to wait. Combine several with :func:`any_of`::

    from dm.backfill.backoff import any_of, long_transactions_above, replica_lag_above

    async for batch in batched(
        session, query, key=users.c.id,
        pause_when=any_of(replica_lag_above(10), long_transactions_above(0, older_than=300)),
    ):
        ...
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger("dm.batched")

Predicate = Callable[[AsyncSession], Awaitable[str | bool | None]]

# On a standby: how long ago the last replayed transaction committed on the primary. On a
# primary: the largest replay lag its standbys report (NULL when none is connected, or when
# they are caught up and idle).
_REPLICA_LAG = sa.text(
    "SELECT CASE WHEN pg_is_in_recovery() "
    "THEN EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) "
    "ELSE (SELECT EXTRACT(EPOCH FROM max(replay_lag)) FROM pg_stat_replication) END"
)
# pg_stat_replication shows the lag columns only to superusers and members of pg_monitor.
_CAN_SEE_LAG = sa.text(
    "SELECT pg_is_in_recovery() OR rolsuper OR pg_has_role(current_user, 'pg_monitor', 'USAGE')"
    " FROM pg_roles WHERE rolname = current_user"
)
# pg_stat_activity is read once per transaction; a revision's own transaction would keep
# seeing the first reading without this.
_FRESH_STATS = sa.text("SELECT pg_stat_clear_snapshot()")
_LONG_TRANSACTIONS = sa.text(
    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
    "AND datname = current_database() AND backend_type = 'client backend' "
    "AND xact_start < now() - make_interval(secs => :older_than)"
)
_LOCK_WAITS = sa.text(
    "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
    "AND datname = current_database() AND wait_event_type = 'Lock'"
)


async def _is_postgresql(session: AsyncSession) -> bool:
    return (await session.connection()).dialect.name == "postgresql"


def replica_lag_above(seconds: float) -> Predicate:
    """Wait while a standby's replay lag is above ``seconds``.

    On the primary (where backfills run) the lag is the largest ``replay_lag`` in
    ``pg_stat_replication``, visible to superusers and members of ``pg_monitor`` only (a
    warning says so once otherwise, and the predicate never waits); on a standby it is the
    age of ``pg_last_xact_replay_timestamp()``.
    """
    checked: list[bool] = []

    async def replica_lag(session: AsyncSession) -> str | None:
        if not await _is_postgresql(session):
            return None
        if not checked:
            checked.append(bool(await session.scalar(_CAN_SEE_LAG)))
            if not checked[0]:
                log.warning(
                    "replica_lag_above(): this database user cannot see the standbys' lag "
                    "(it needs the pg_monitor role); the loop will not wait for them"
                )
        lag = await session.scalar(_REPLICA_LAG)
        if lag is not None and float(lag) > seconds:
            return f"replica lag {float(lag):.1f}s is above {seconds:g}s"
        return None

    return replica_lag


def long_transactions_above(count: int = 0, *, older_than: float = 60.0) -> Predicate:
    """Wait while more than ``count`` other transactions in this database have been open for
    ``older_than`` seconds (they hold back vacuum, and the backfill's dead rows pile up)."""

    async def long_transactions(session: AsyncSession) -> str | None:
        if not await _is_postgresql(session):
            return None
        await session.execute(_FRESH_STATS)
        found = int(await session.scalar(_LONG_TRANSACTIONS, {"older_than": older_than}) or 0)
        if found > count:
            return (
                f"{found} transaction(s) open for more than {older_than:g}s "
                f"(more than {count} allowed)"
            )
        return None

    return long_transactions


def lock_waits_above(count: int = 0) -> Predicate:
    """Wait while more than ``count`` other sessions of this database wait for a lock."""

    async def lock_waits(session: AsyncSession) -> str | None:
        if not await _is_postgresql(session):
            return None
        await session.execute(_FRESH_STATS)
        found = int(await session.scalar(_LOCK_WAITS) or 0)
        if found > count:
            return f"{found} session(s) waiting for a lock (more than {count} allowed)"
        return None

    return lock_waits


def any_of(*predicates: Predicate) -> Predicate:
    """Wait while any of ``predicates`` gives a reason (the first one's reason is logged)."""

    async def first_reason(session: AsyncSession) -> str | None:
        for predicate in predicates:
            answer = await predicate(session)
            if answer:
                name = getattr(predicate, "__name__", "pause_when")
                return answer if isinstance(answer, str) else f"{name} returned {answer!r}"
        return None

    return first_reason
