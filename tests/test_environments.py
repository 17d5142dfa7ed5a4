"""The environment guard's decisions and the slug rules on their own: no database."""

from __future__ import annotations

import textwrap
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest

from dm import command
from dm.environments import Action
from dm.environments import decide
from dm.environments import plan_upgrade
from dm.errors import UsageError
from dm.graph import Graph
from dm.graph import Step
from dm.settings import Settings
from dm.slugs import check_message
from dm.slugs import slugify
from dm.tracker import Attempt
from dm.tracker import Status
from dm.tracker import applied_revisions


def _graph(tmp_path: Path, revisions: dict[str, tuple[str | None, str]]) -> Graph:
    command.init(tmp_path)
    for rev, (down, extra) in revisions.items():
        body = f"""
            revision = {rev!r}
            down_revision = {down!r}
            {extra}
            async def upgrade(session):
                pass
        """
        (tmp_path / "data_migrations" / "versions" / f"{rev}.py").write_text(textwrap.dedent(body))
    settings = Settings.load(config_file=tmp_path / "alembic.ini")
    return Graph.from_config(settings.alembic_config())


def _attempt(rev: str, status: Status, direction: str = "upgrade") -> Attempt:
    now = datetime.now(UTC)
    in_effect = None if status is Status.FAILED else status  # a failed one rolled back whole
    return Attempt(
        1,
        rev,
        None,
        direction,
        status,
        1,
        now,
        now,
        0,
        None,
        None,
        None,
        None,
        None,
        1,
        in_effect=in_effect,
    )


GUARDED = 'environments = ("development",)'


def test_decisions(tmp_path: Path) -> None:
    graph = _graph(tmp_path, {"a1": (None, ""), "b2": ("a1", GUARDED)})
    a1, b2 = Step(graph.script("a1"), True), Step(graph.script("b2"), True)
    assert decide(a1, "production", None).action is Action.RUN
    assert decide(a1, "production", None).reason is None
    skip = decide(b2, "production", None)
    assert (skip.action, skip.reason) == (
        Action.SKIP,
        "environment 'production' not in ('development',)",
    )
    run = decide(b2, "development", None)
    assert (run.action, run.label) == (
        Action.RUN,
        "run: environment 'development' in ('development',)",
    )
    down = Step(graph.script("b2"), False)
    record = decide(down, "production", _attempt("b2", Status.SKIPPED))
    assert record.action is Action.RECORD
    with pytest.raises(UsageError, match="cannot downgrade b2"):
        decide(down, "production", _attempt("b2", Status.SUCCESS))
    assert decide(down, "development", _attempt("b2", Status.SUCCESS)).action is Action.RUN


def test_skipped_counts_as_applied_for_planning_only() -> None:
    skipped = _attempt("b2", Status.SKIPPED)
    assert skipped.is_skipped and not skipped.is_applied and skipped.counts_as_applied
    undone = _attempt("b2", Status.ROLLED_BACK, direction="downgrade")  # going down past it
    assert not undone.is_skipped and not undone.counts_as_applied
    assert applied_revisions({"b2": skipped, "c3": _attempt("c3", Status.FAILED)}) == {"b2"}


def test_plans_retry_skipped_revisions_first_within_the_target(tmp_path: Path) -> None:
    graph = _graph(
        tmp_path,
        {"a1": (None, ""), "b2": ("a1", GUARDED), "c3": ("b2", ""), "d4": ("c3", GUARDED)},
    )
    latest = {
        "a1": _attempt("a1", Status.SUCCESS),
        "b2": _attempt("b2", Status.SKIPPED),
        "c3": _attempt("c3", Status.SUCCESS),
    }
    assert [s.revision for s in plan_upgrade(graph, "heads", latest, "production")] == ["d4"]
    assert [s.revision for s in plan_upgrade(graph, "heads", latest, "development")] == [
        "b2",
        "d4",
    ]
    assert [s.revision for s in plan_upgrade(graph, "a1", latest, "development")] == []
    assert [s.revision for s in plan_upgrade(graph, "c3", latest, "development")] == ["b2"]


@pytest.mark.parametrize(
    ("message", "slug"),
    [
        ("Backfill display names", "backfill_display_names"),
        ("Don't delete users!", "don_t_delete_users"),
        ("2fa backfill", "2fa_backfill"),
    ],
)
def test_slugs_follow_alembic(message: str, slug: str) -> None:
    assert slugify(message) == slug
    assert check_message(message) == slug


def test_long_messages_are_truncated_like_alembic() -> None:
    assert slugify("a" * 10 + " " + "b" * 40, limit=20) == "aaaaaaaaaa_"


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("ab", "too short"),
        ("a b", "too short"),
        ("import", "Python keyword"),
        ("a/b/c", "path separator"),
        ("..\\evil", "path separator"),
        ("!!!", "at least one letter"),
        ("café crème", "ASCII"),
    ],
)
def test_bad_messages_are_refused(message: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        check_message(message)


def test_duplicate_slugs_are_refused_unless_allowed() -> None:
    with pytest.raises(UsageError, match="same slug"):
        check_message("Sync plans", ["sync   PLANS"])
    assert check_message("Sync plans", ["sync plans"], allow_duplicate=True) == "sync_plans"
