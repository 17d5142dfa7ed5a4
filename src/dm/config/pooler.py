"""Connection poolers (PgBouncer and the like): what their failures mean to the user.

A URL marked ``statement_cache_size=0`` (``dm.config.urls.through_pooler``) is used the
pooled way (see ``dm.config.engines``). An unmarked URL that goes through a transaction
pooler fails in ways that look like bugs: a named prepared statement of one client is found
by another ("already exists", "does not exist"). :func:`pooler_problem` turns those, and the
pooler's own refusals, into one line naming the cause and the fix.
"""

from __future__ import annotations

from dm.core.errors import DmError
from dm.core.errors import PoolerMisconfigured
from dm.core.errors import PoolExhausted
from dm.core.transient import exception_chain

GUIDE = "see 'Behind a connection pooler' in docs/operations.md"
_PREPARED_SQLSTATES = frozenset({"42P05", "26000"})
"""``duplicate_prepared_statement`` and ``invalid_sql_statement_name``."""
_EXHAUSTED = ("query_wait_timeout", "no more connections allowed", "too many clients")


def pooler_problem(exc: BaseException) -> DmError | None:
    """Return the error to report for ``exc`` when a pooler caused it, else None.

    :returns: :class:`PoolerMisconfigured` (exit 2) for a prepared statement met across
        pooled sessions or a startup parameter the pooler refuses; :class:`PoolExhausted`
        (exit 75: a later run may find a free server connection) when the pool had none.
    """
    for link in exception_chain(exc):
        sqlstate = getattr(link, "sqlstate", None) or getattr(link, "pgcode", None)
        text = " ".join(str(link).split())
        if sqlstate in _PREPARED_SQLSTATES and "prepared statement" in text:
            return PoolerMisconfigured(
                f"{text}: the database URL goes through a transaction pooler (PgBouncer) "
                "that hands dm's prepared statements to other sessions; add "
                "?statement_cache_size=0 to DM_DATABASE_URL (and to DM_LOCK_DATABASE_URL if "
                f"it is pooled too) ({GUIDE})"
            )
        if "unsupported startup parameter" in text:
            return PoolerMisconfigured(
                f"the connection pooler refused a setting dm sent at connect ({text}): remove "
                "options= from the database URL, or list the parameter in the pooler's "
                f"ignore_startup_parameters ({GUIDE})"
            )
        if any(marker in text for marker in _EXHAUSTED):
            return PoolExhausted(
                f"the connection pool is exhausted ({text}): no server connection was free "
                "in time; a dm run needs up to 2 server connections while it works and 1 "
                f"while it waits for the lock: raise the pool size or retry later ({GUIDE})"
            )
    return None
