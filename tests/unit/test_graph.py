"""The revision graph on its own: loading, validation, targets and plans. No database."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Project
from conftest import applied
from conftest import make_sqlite
from dm import verbs
from dm.config.settings import Settings
from dm.core import planning
from dm.core.errors import IrreversiblePlan
from dm.core.errors import RevisionFileError
from dm.core.errors import UnknownTarget
from dm.core.graph import Graph
from dm.core.graph import checksum
from support.revisions import BAD_REVISION_FILES
from support.revisions import BadFiles
from support.revisions import write_bad_files


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A ``dm init`` project used only for its revision files (no database is opened)."""
    root = tmp_path / "proj"
    verbs.init(root)
    monkeypatch.chdir(root)
    return Project(root, make_sqlite(tmp_path))


def load(project: Project) -> Graph:
    settings = Settings.load(config_file=project.config)
    return Graph.from_config(settings.alembic_config())


def revs(steps: list) -> list[str]:  # type: ignore[type-arg]
    return [getattr(step, "id", None) or step.revision for step in steps]


@pytest.fixture
def chain(proj: Project) -> Project:
    """base aaaa1111 -> bbbb2222 -> cccc3333; bbbb2222 has no downgrade()."""
    proj.write("aaaa1111", None, doc="First revision\n\nLonger text.")
    proj.write("bbbb2222", "aaaa1111", downgrade=None)
    proj.write("cccc3333", "bbbb2222")
    return proj


@pytest.fixture
def forked(proj: Project) -> Project:
    """root0001 with two labelled branches (left: left0001 -> left0002, right: righ0001)."""
    proj.write("root0001", None)
    proj.write("left0001", "root0001", branch_labels=("left",))
    proj.write("left0002", "left0001")
    proj.write("righ0001", "root0001", branch_labels=("right",))
    return proj


def test_walk_orders_parents_first_and_describes(chain: Project) -> None:
    graph = load(chain)
    assert [s.revision for s in graph.walk()] == ["aaaa1111", "bbbb2222", "cccc3333"]
    assert graph.heads == ("cccc3333",)
    assert graph.known("bbbb2222") and not graph.known("bbbb")
    first = graph.revision("aaaa1111")
    assert verbs.RevisionInfo.of(first).description == "First revision"
    assert len(checksum(first.script)) == 64


def test_plan_upgrade_from_nothing_and_from_the_middle(chain: Project) -> None:
    graph = load(chain)
    assert revs(graph.upgrade_path("heads", set())) == ["aaaa1111", "bbbb2222", "cccc3333"]
    assert revs(graph.upgrade_path("heads", {"aaaa1111"})) == ["bbbb2222", "cccc3333"]
    assert revs(graph.upgrade_path("heads", {"aaaa1111", "bbbb2222", "cccc3333"})) == []
    steps = planning.plan_upgrade(graph, "bbbb", {}, "production")
    assert revs(steps) == ["aaaa1111", "bbbb2222"]
    assert all(step.is_upgrade and step.direction == "upgrade" for step in steps)
    assert revs(graph.upgrade_path("+1", {"aaaa1111"})) == ["bbbb2222"]
    assert revs(graph.upgrade_path("+2", set())) == ["aaaa1111", "bbbb2222"]


def test_plan_downgrade_runs_newest_first(chain: Project) -> None:
    graph = load(chain)
    latest = applied("aaaa1111", "bbbb2222", "cccc3333")
    steps = planning.plan_downgrade(graph, "-1", latest, "production")
    assert revs(steps) == ["cccc3333"]
    assert steps[0].direction == "downgrade"
    assert revs(graph.downgrade_path("bbbb2222", set(latest))) == ["cccc3333"]


def test_plan_downgrade_refuses_irreversible_revision(chain: Project) -> None:
    graph = load(chain)
    latest = applied("aaaa1111", "bbbb2222", "cccc3333")
    with pytest.raises(IrreversiblePlan) as caught:
        planning.plan_downgrade(graph, "base", latest, "production")
    message = str(caught.value)
    assert "bbbb2222" in message
    assert "bbbb2222_bbbb2222.py" in message
    assert "aaaa1111" not in message and "cccc3333" not in message


def test_applied_heads_keeps_only_tips(forked: Project) -> None:
    graph = load(forked)
    applied = {"root0001", "left0001", "left0002", "righ0001", "gone0001"}
    assert graph.applied_heads(applied) == ("left0002", "righ0001")
    assert graph.applied_heads({"root0001"}) == ("root0001",)


def test_branches_head_is_ambiguous_heads_is_not(forked: Project) -> None:
    graph = load(forked)
    assert sorted(graph.heads) == ["left0002", "righ0001"]
    with pytest.raises(UnknownTarget, match="(?i)multiple head"):
        graph.upgrade_path("head", set())
    all_steps = revs(graph.upgrade_path("heads", set()))
    assert sorted(all_steps) == ["left0001", "left0002", "righ0001", "root0001"]
    assert all_steps[0] == "root0001"
    assert all_steps.index("left0001") < all_steps.index("left0002")


def test_branch_label_targets(forked: Project) -> None:
    graph = load(forked)
    assert revs(graph.upgrade_path("left@head", set())) == ["root0001", "left0001", "left0002"]
    assert revs(graph.upgrade_path("right@head", set())) == ["root0001", "righ0001"]
    assert [s.revision for s in graph.resolve("left")] == ["left0001"]
    applied = {"root0001", "left0001", "left0002", "righ0001"}
    assert revs(graph.downgrade_path("left@-1", applied)) == ["left0002"]


def test_depends_on_pulls_in_the_dependency(proj: Project) -> None:
    proj.write("main0001", None)
    proj.write("other001", None, branch_labels=("other",))
    proj.write("main0002", "main0001", depends_on="other001")
    graph = load(proj)
    assert sorted(revs(graph.upgrade_path("main0002", set()))) == [
        "main0001",
        "main0002",
        "other001",
    ]
    assert revs(graph.upgrade_path("main0002", {"main0001", "other001"})) == ["main0002"]
    assert graph.applied_heads({"main0001", "other001", "main0002"}) == ("main0002",)


def test_depends_on_a_branch_label_is_accepted(proj: Project) -> None:
    proj.write("main0001", None)
    proj.write("other001", None, branch_labels=("other",))
    proj.write("main0002", "main0001", depends_on="other")
    graph = load(proj)
    assert "other001" in revs(graph.upgrade_path("main0002", set()))


def test_merge_revision_joins_heads(forked: Project) -> None:
    forked.write("merg0001", ("left0002", "righ0001"))
    graph = load(forked)
    assert graph.heads == ("merg0001",)
    applied = {"root0001", "left0001", "left0002", "righ0001"}
    assert revs(graph.upgrade_path("head", applied)) == ["merg0001"]
    assert revs(graph.upgrade_path("heads", {"root0001", "left0001"}))[-1] == "merg0001"


@pytest.mark.parametrize("target", ["nosuch99", "zzzz", "left@nosuch"])
def test_unknown_targets(forked: Project, target: str) -> None:
    graph = load(forked)
    with pytest.raises(UnknownTarget) as caught:
        graph.upgrade_path(target, set())
    assert "\n" not in str(caught.value)
    with pytest.raises(UnknownTarget):
        graph.resolve(target)


def test_partial_id_must_be_unambiguous(proj: Project) -> None:
    proj.write("abcd0001", None)
    proj.write("abcd0002", "abcd0001")
    graph = load(proj)
    assert [s.revision for s in graph.resolve("abcd0002")] == ["abcd0002"]
    with pytest.raises(UnknownTarget, match="abcd"):
        graph.resolve("abcd")


def test_empty_project_has_no_heads(proj: Project) -> None:
    graph = load(proj)
    assert graph.heads == ()
    assert graph.walk() == []
    assert graph.upgrade_path("heads", set()) == []


@pytest.mark.parametrize("case", BAD_REVISION_FILES, ids=lambda case: case.id)
def test_bad_revision_files_are_refused(proj: Project, case: BadFiles) -> None:
    write_bad_files(proj, case)
    with pytest.raises(RevisionFileError) as caught:
        load(proj)
    message = str(caught.value)
    assert "\n" not in message
    for needle in case.expected:
        assert needle in message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("extra", "meant"),
    [
        ("enviroments = ('development', 'staging')", "environments"),
        ("environment = ('development',)", "environments"),
        ("transactionl = False", "transactional"),
        ("async def verfy(session):\n    return False", "verify"),
        ("async def dowgrade(session):\n    pass", "downgrade"),
    ],
)
def test_a_near_miss_of_a_name_dm_reads_is_refused_naming_the_file(
    proj: Project, extra: str, meant: str
) -> None:
    """A misspelled guard or hook would be ignored: the revision would run everywhere, or
    without its verify(). The file is refused, in one line naming it and the right name."""
    downgrade = None if meant == "downgrade" else "pass"
    path = proj.write("aaaa1111", None, extra=extra, downgrade=downgrade)
    with pytest.raises(RevisionFileError) as refused:
        load(proj)
    message = str(refused.value)
    assert path.name in message and "\n" not in message
    assert f"did you mean {meant!r}?" in message


@pytest.mark.parametrize(
    "extra",
    [
        "from sqlalchemy.orm import Session as transaction",  # imported: not the file's own
        "def upgrade_rows(session):\n    pass",  # a helper beside upgrade()
        "_enviroments = ('x',)",  # private to the file
        "BATCH = 500",
    ],
)
def test_the_files_own_names_are_left_alone(proj: Project, extra: str) -> None:
    proj.write("aaaa1111", None, extra=extra)
    assert [rev.id for rev in load(proj).revisions] == ["aaaa1111"]
