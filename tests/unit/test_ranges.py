"""Choosing the range a worker with nothing left to claim splits (``RangeStore.steal``)."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa

from dm.backfill.ranges import Range
from dm.backfill.ranges import RangeStore
from dm.backfill.ranges import _Span
from dm.backfill.ranges import ranges_table


def span(number: int, lower: int, upper: int, last: int | None, rows_done: int) -> _Span:
    return _Span.of(Range("loop", number, lower, upper, last, rows_done, 0), None, None)


def test_a_range_counted_short_is_counted_again_only_once_its_checkpoint_moved() -> None:
    store = RangeStore(
        ranges_table(sa.MetaData(), "tracker"), sa.table("tracker"), owner="w", lease_seconds=60
    )
    counted: list[tuple[Any, Any, int]] = []
    rows = {10_000: 10, 10_500: 10}

    async def count(lower: Any, upper: Any, limit: int) -> int:
        counted.append((lower, upper, limit))
        return min(rows[upper], limit)

    def choose(*spans: _Span) -> _Span | None:
        return asyncio.run(store._counted("loop", list(spans), 100, count))

    wide, narrow = span(1, 0, 10_000, 100, 50), span(2, 10_000, 10_500, None, 0)
    assert choose(narrow, wide) is None
    assert counted == [(100, 10_000, 400), (10_000, 10_500, 400)]  # the widest first
    counted.clear()
    assert choose(narrow, wide) is None  # a worker looking again, nothing moved
    assert counted == []
    moved = span(1, 0, 10_000, 200, 60)
    rows[10_000] = 1_000  # its worker now pages through rows behind a gap
    assert choose(narrow, moved) is moved
    assert counted == [(200, 10_000, 400)]
