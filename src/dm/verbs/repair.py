"""``dm repair``: accept an edit of an applied revision's file without running it again.

A comment fixed or code reformatted after a revision was applied changes its file's
checksum, and ``dm check`` then fails with "modified since applied". Like Flyway's
``repair``, ``dm repair REV --reason TEXT`` records, under the lock, an attempt saying the
edit was accepted: status ``success`` (the revision stays applied), the new checksum, who,
when and why. No hook runs. The row is written in one fenced transaction, as every tracker
write of a run holding the lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from dm.core.errors import UnknownTarget
from dm.core.errors import UsageError
from dm.core.graph import checksum
from dm.core.graph import display_path
from dm.core.planning import Step
from dm.core.state import State
from dm.engine.execution import load_graph
from dm.engine.execution import open_database
from dm.engine.tracker import Status
from dm.engine.tracker import utcnow

if TYPE_CHECKING:
    from dm.config.settings import Settings

log = logging.getLogger("dm.repair")


@dataclass(frozen=True)
class RepairResult:
    """The attempt ``repair`` recorded."""

    revision: str
    old_checksum: str
    new_checksum: str
    reason: str
    run_by: str
    at: datetime


async def repair(settings: Settings, revision: str, *, reason: str) -> RepairResult:
    """Record that the applied revision ``revision``'s edited file is accepted as it is.

    :raises UsageError: no reason, the revision is not applied, or its file is unchanged.
    :raises UnknownTarget: ``revision`` names no revision file, or several.
    """
    if not reason.strip():
        raise UsageError("repair needs a --reason saying why the edit is safe to accept")
    graph = load_graph(settings)
    found = graph.resolve(revision)
    if len(found) != 1:
        names = ", ".join(s.revision for s in found)
        what = f"names several revisions ({names}); name one" if found else "matches no revision"
        raise UnknownTarget(f"cannot repair {revision!r}: it {what}")
    rev = graph.revision(found[0].revision)
    new = checksum(rev.script)
    text = f"repaired: file edit accepted without running it: {reason.strip()}"
    async with open_database(settings) as db, db.locked() as (recorder, _interrupted):
        attempt = recorder.latest.get(rev.id)
        state = State.NOT_RUN if attempt is None else attempt.state
        if attempt is None or state is not State.APPLIED:
            raise UsageError(
                f"cannot repair {rev.id}: it is {state.value}, not applied; repair accepts "
                "an edit of an applied revision (to run it, use dm upgrade or dm run)"
            )
        old = attempt.in_effect_checksum
        if old is None or old == new:
            raise UsageError(
                f"nothing to repair: {rev.id}'s file ({display_path(rev.path)}) is unchanged "
                "since it was applied"
            )
        async with recorder.conn.begin():
            await recorder.record_step(Step(rev, True), Status.SUCCESS, reason=text)
        run_by = recorder.run.run_by
    log.debug("%s: edit accepted (checksum %s -> %s) by %s", rev.id, old[:12], new[:12], run_by)
    return RepairResult(rev.id, old, new, text, run_by, utcnow())
