"""How results are printed: tables, run summaries and JSON."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from dm.cli.app import emit_json
from dm.cli.app import write_line

if TYPE_CHECKING:
    from dm.engine.execution import RunResult
    from dm.verbs import AttemptRecord
    from dm.verbs import ControlResult
    from dm.verbs import RevisionInfo


_STOPPED = ("stopped", "paused", "cancelled", "abandoned")


def render_run(result: RunResult, verb: str, as_json: bool) -> None:
    if as_json:
        emit_json(
            {
                "target": result.target,
                "dry_run": result.dry_run,
                "planned": result.planned,
                "steps": result.steps,
                "interrupted": result.interrupted,
            }
        )
        return
    if result.dry_run:
        if not result.planned:
            write_line(f"nothing to {verb}: already at {result.target}")
        for step in result.planned:
            reversible = "" if step.reversible else "  (irreversible)"
            action = "" if step.reason is None else f"  [{step.action}: {step.reason}]"
            write_line(f"{step.direction} {step.revision}  {step.description}{reversible}{action}")
        return
    if result.nothing_to_do:
        write_line(f"nothing to {verb}: already at {result.target}")
    else:
        skipped = [s.revision for s in result.steps if s.status.value == "skipped"]
        # Undoing a skipped upgrade runs nothing: it is recorded, not done (stamp records all).
        recorded = [p for p in result.planned if p.action == "record" and verb != "stamp"]
        # A blocks_deploy = False backfill that stopped part-way: the run went on without it.
        deferred = [s for s in result.steps if s.status.value in _STOPPED]
        ran = len(result.steps) - len(skipped) - len(recorded) - len(deferred)
        also = f", {len(skipped)} skipped" if skipped else ""
        if recorded:
            also += f", {len(recorded)} recorded only (skipped here: nothing to undo)"
        if deferred:
            also += f", {len(deferred)} deferred"
        write_line(f"{verb}: {ran} revision(s) done{also}, target {result.target}")
        reasons = {p.revision: p.reason for p in result.planned}
        for revision in skipped:
            write_line(f"skipped {revision}: {reasons.get(revision)}")
        for stopped in deferred:
            write_line(
                f"deferred {stopped.revision}: {stopped.status.value} part-way "
                "(blocks_deploy = False); the run went on without it"
            )


# What happens next to a revision whose latest attempt stopped at a batch boundary.
STOPPED_NOTES = {
    "stopped": "; the next {direction} resumes it",
    "paused": "; dm resume {revision} or the next {direction} resumes it",
    "cancelled": "; the next {direction} starts it over",
    "abandoned": "; not run again",
}

REQUESTED_NOTES = {
    "pause": "pause requested",
    "cancel": "cancel requested",
    "abandon": "cancel --skip requested",
    "stop": "stop requested (its run's time is up)",
}


def describe_checkpoint(checkpoint: Mapping[str, Any]) -> str:
    rows = f"{checkpoint.get('rows_done', 0):,}"
    total = checkpoint.get("rows_total")
    if total:
        rows += f"/{total:,}"
    loop = checkpoint.get("loop", 0)
    where = f"loop {loop + 1}, " if loop else ""
    if checkpoint.get("ranges") and not checkpoint.get("finished"):
        return f"{where}{rows} rows done in key ranges ({checkpoint.get('workers')} workers)"
    return f"{where}{rows} rows done, last key {checkpoint.get('last_key')!r}"


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        write_line("  ".join([*cells, row[-1]]).rstrip())


def render_revisions(infos: list[RevisionInfo], detailed: bool, as_json: bool) -> None:
    if as_json:
        emit_json(infos)
        return
    for info in infos:
        parents = ", ".join(info.down_revisions) or "<base>"
        marks = "".join(
            f" ({mark})"
            for mark, on in (
                ("head", info.is_head),
                ("branchpoint", info.is_branch_point),
                ("mergepoint", info.is_merge_point),
            )
            if on
        )
        labels = f" ({', '.join(info.branch_labels)})" if info.branch_labels else ""
        if not detailed:
            write_line(f"{parents} -> {info.revision}{labels}{marks}, {info.description}")
            continue
        write_line(f"Rev: {info.revision}{labels}{marks}")
        write_line(f"Parent: {parents}")
        if info.depends_on:
            write_line(f"Also depends on: {', '.join(info.depends_on)}")
        write_line(f"Reversible: {'yes' if info.reversible else 'no'}")
        write_line(f"Path: {info.path}")
        for name, value in info.attributes.items():
            write_line(f"{name}: {_attribute(name, value)}")
        write_line("")
        for line in (info.doc or info.description).splitlines():
            write_line(f"    {line}".rstrip())
        write_line("")


def _attribute(name: str, value: Any) -> str:
    """Show a revision attribute as the file would set it, with what its default means."""
    if value is None:
        return {"environments": "None (every environment)", "timeout": "None (DM_TIMEOUT)"}.get(
            name, "None"
        )
    if isinstance(value, list) and not value:
        return "None"
    if isinstance(value, list):
        return f"({', '.join(repr(v) for v in value)}{',' if len(value) == 1 else ''})"
    return repr(value)


def render_control(result: ControlResult, as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    why = f" ({result.reason})" if result.reason else ""
    verb = {"pause": "pause", "cancel": "cancel", "abandon": "cancel --skip"}[result.action]
    if result.outcome == "requested":
        write_line(
            f"{result.revision}: {verb} requested by {result.by}{why}; its run stops at the "
            "next batch boundary (dm status shows it)"
        )
    elif result.outcome == "recorded":
        write_line(f"{result.revision}: recorded {result.state} by {result.by}{why}")
    elif result.outcome == "honoured":
        write_line(f"{result.revision}: its run stopped as asked ({result.state})")
    elif result.outcome == "settled":
        write_line(
            f"{result.revision}: its run did not answer: recorded {result.state} by "
            f"{result.by}{why}; that run can commit nothing more, but it holds the migration "
            "lock until its process ends: stop it so that the next run can start"
        )
    else:
        write_line(f"{result.revision}: already {result.state}; nothing changed")


def render_attempt(record: AttemptRecord, *, traceback: bool) -> None:
    when = record.started_at.strftime("%Y-%m-%d %H:%M:%S") if record.started_at else "-"
    took = f", {record.duration_ms} ms" if record.duration_ms is not None else ""
    who = record.pod_name or record.run_by or "-"
    write_line(
        f"attempt {record.attempt}: {record.direction} {record.status} "
        f"at {when} UTC{took}, by {who} (run {record.run_id})"
    )
    for label, value in (("reason", record.reason), ("error", record.error_message)):
        if value:
            write_line(f"  {label}: {value}")
    if record.checkpoint:
        write_line(f"  checkpoint: {describe_checkpoint(record.checkpoint)}")
    if traceback and record.error_traceback:
        write_line("  traceback:")
        for line in record.error_traceback.rstrip().splitlines():
            write_line(f"    {line}".rstrip())
