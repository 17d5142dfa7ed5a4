"""The planners on their own (``dm.core.planning``): graph + latest attempts + environment in,
steps with decisions out. No database."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import applied
from conftest import attempt_of
from dm.core import planning
from dm.core.environments import Action
from dm.core.errors import IrreversiblePlan
from dm.core.errors import UsageError
from dm.engine.tracker import Status
from support.revisions import GUARDED
from support.revisions import graph_of


def test_skipped_counts_as_applied_for_planning_only() -> None:
    skipped = attempt_of("b2", Status.SKIPPED)
    assert skipped.is_skipped and not skipped.is_applied and skipped.counts_as_applied
    undone = attempt_of("b2", Status.ROLLED_BACK, direction="downgrade")  # went down past it
    assert not undone.is_skipped and not undone.counts_as_applied
    latest = {"b2": skipped, "c3": attempt_of("c3", Status.FAILED)}
    assert planning.applied_revisions(latest) == {"b2"}


def test_upgrade_retries_skipped_revisions_first_within_the_target(tmp_path: Path) -> None:
    graph = graph_of(
        tmp_path,
        {"a1": (None, ""), "b2": ("a1", GUARDED), "c3": ("b2", ""), "d4": ("c3", GUARDED)},
    )
    latest = {**applied("a1", "c3"), "b2": attempt_of("b2", Status.SKIPPED)}

    def plan(target: str, environment: str) -> list[tuple[str, Action]]:
        steps = planning.plan_upgrade(graph, target, latest, environment)
        return [(s.revision, s.decision.action) for s in steps]

    assert plan("heads", "production") == [("d4", Action.SKIP)]
    assert plan("heads", "development") == [("b2", Action.RUN), ("d4", Action.RUN)]
    assert plan("a1", "development") == []
    assert plan("c3", "development") == [("b2", Action.RUN)]


def test_downgrade_records_skipped_revisions_and_needs_no_downgrade_for_them(
    tmp_path: Path,
) -> None:
    graph = graph_of(tmp_path, {"a1": (None, ""), "b2": ("a1", GUARDED)})  # no downgrade()s
    latest = {**applied("a1"), "b2": attempt_of("b2", Status.SKIPPED)}
    steps = planning.plan_downgrade(graph, "a1", latest, "production")
    assert [(s.revision, s.decision.action, s.runs) for s in steps] == [
        ("b2", Action.RECORD, False)
    ]
    with pytest.raises(IrreversiblePlan, match="no downgrade\\(\\) in a1"):
        planning.plan_downgrade(graph, "base", latest, "production")


def test_run_needs_applied_ancestors_and_force_to_repeat(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, {"a1": (None, ""), "b2": ("a1", "")})
    b2 = graph.revision("b2")
    with pytest.raises(UsageError, match="not applied yet: a1"):
        planning.plan_run(graph, b2, {}, "production", None)
    assert [s.revision for s in planning.plan_run(graph, b2, applied("a1"), "production", None)]
    assert planning.plan_run(graph, b2, applied("a1", "b2"), "production", None) == []
    (forced,) = planning.plan_run(graph, b2, applied("a1", "b2"), "production", "forced: x")
    assert forced.reason == "forced: x"


def test_stamp_goes_up_or_down_and_only_records(tmp_path: Path) -> None:
    graph = graph_of(tmp_path, {"a1": (None, ""), "b2": ("a1", "")})
    up = planning.plan_stamp(graph, "b2", {}, "production")
    assert [(s.revision, s.is_upgrade, s.runs, s.reason) for s in up] == [
        ("a1", True, False, "stamped"),
        ("b2", True, False, "stamped"),
    ]
    down = planning.plan_stamp(graph, "a1", applied("a1", "b2"), "production")
    assert [(s.revision, s.is_upgrade, s.runs) for s in down] == [("b2", False, False)]
