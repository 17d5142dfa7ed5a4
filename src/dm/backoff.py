"""``pause_when`` predicates for ``dm.batched`` (defined in ``dm.backfill.backoff``)."""

from __future__ import annotations

from dm.backfill.backoff import any_of
from dm.backfill.backoff import lock_waits_above
from dm.backfill.backoff import long_transactions_above
from dm.backfill.backoff import replica_lag_above

__all__ = [
    "any_of",
    "lock_waits_above",
    "long_transactions_above",
    "replica_lag_above",
]
