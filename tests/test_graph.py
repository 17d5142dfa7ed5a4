"""The revision graph on its own: loading, validation, targets and plans. No database."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Project
from conftest import applied
from conftest import make_sqlite
from dm import command
from dm import planning
from dm.errors import IrreversiblePlan
from dm.errors import RevisionFileError
from dm.errors import UnknownTarget
from dm.graph import Graph
from dm.graph import checksum
from dm.settings import Settings


@dataclass(frozen=True)
class BadFiles:
    """Revision files that break the revision contract, and what the error must name."""

    id: str
    files: dict[str, str]
    expected: tuple[str, ...]


def _source(rev: str, down: str | None, body: str = "", *, depends_on: str | None = None) -> str:
    head = f"revision = {rev!r}\ndown_revision = {down!r}\ndepends_on = {depends_on!r}\n"
    return head + textwrap.dedent(body)


_ASYNC_UPGRADE = "async def upgrade(session):\n    pass\n"

# Each case is added to a project that already holds the valid revision ``base0001``.
BAD_REVISION_FILES = [
    BadFiles(
        "down-revision-not-an-id",
        {"int_down.py": "revision = 'bad10001'\ndown_revision = 5\n" + _ASYNC_UPGRADE},
        ("int_down.py", "down_revision must be None, a revision id or a tuple of them, not 5"),
    ),
    BadFiles(
        "depends-on-not-an-id",
        {
            "int_dep.py": "revision = 'bad10001'\ndown_revision = 'base0001'\ndepends_on = 7\n"
            + _ASYNC_UPGRADE
        },
        ("int_dep.py", "depends_on must be None"),
    ),
    BadFiles(
        "syntax-error",
        {"bad_syntax.py": _source("bad10001", "base0001", "async def upgrade(session)\n  pass\n")},
        ("bad_syntax.py:4", "syntax error"),
    ),
    BadFiles(
        "missing-upgrade",
        {"no_upgrade.py": _source("bad10001", "base0001", "async def downgrade(s):\n  pass\n")},
        ("no_upgrade.py", "missing 'async def upgrade(session)'"),
    ),
    BadFiles(
        "sync-upgrade-two-args",
        {"sync_up.py": _source("bad10001", "base0001", "def upgrade(session, x):\n    pass\n")},
        ("sync_up.py", "upgrade() must be 'async def upgrade(session)'", "takes 2 arguments"),
    ),
    BadFiles(
        "sync-downgrade",
        {
            "sync_down.py": _source(
                "bad10001", "base0001", _ASYNC_UPGRADE + "async def downgrade(a, b):\n    pass\n"
            )
        },
        ("sync_down.py", "downgrade() must be 'async def downgrade(session)'", "takes 2"),
    ),
    BadFiles(
        "sync-verify",
        {"sync_verify.py": _source("bad10001", "base0001", _ASYNC_UPGRADE + "verify = 3\n")},
        ("sync_verify.py", "verify() must be", "'def verify()' using op", "not int"),
    ),
    BadFiles(
        "import-error",
        {
            "imports.py": "import dm_no_such_module_xyz\n"
            + _source("bad10001", "base0001", _ASYNC_UPGRADE)
        },
        ("imports.py:1", "cannot import", "ModuleNotFoundError", "dm_no_such_module_xyz"),
    ),
    BadFiles(
        "duplicate-id",
        {
            "dup_one.py": _source("dup00001", "base0001", _ASYNC_UPGRADE),
            "dup_two.py": _source("dup00001", "base0001", _ASYNC_UPGRADE),
        },
        ("duplicate revision id 'dup00001'", "dup_one.py", "dup_two.py"),
    ),
    BadFiles(
        "unknown-down-revision",
        {"orphan.py": _source("bad10001", "nowhere1", _ASYNC_UPGRADE)},
        ("orphan.py", "down_revision 'nowhere1' names no revision file"),
    ),
    BadFiles(
        "unknown-depends-on",
        {"depends.py": _source("bad10001", "base0001", _ASYNC_UPGRADE, depends_on="nothing1")},
        ("depends.py", "depends_on 'nothing1' names no revision or branch label"),
    ),
    BadFiles(
        "cycle",
        {
            "cycle_one.py": _source("cyc00001", "cyc00002", _ASYNC_UPGRADE),
            "cycle_two.py": _source("cyc00002", "cyc00001", _ASYNC_UPGRADE),
        },
        ("Cycle is detected", "cyc00001", "cyc00002"),
    ),
    BadFiles(
        "bad-timeout",
        {"timeout.py": _source("bad10001", "base0001", "timeout = -3\n" + _ASYNC_UPGRADE)},
        ("timeout.py", "timeout must be a number of seconds above 0"),
    ),
]


def write_bad_files(project: Project, case: BadFiles) -> None:
    """Add the valid base revision and ``case``'s files to ``project``."""
    project.write("base0001", None)
    for name, text in case.files.items():
        (project.versions / name).write_text(text)


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A ``dm init`` project used only for its revision files (no database is opened)."""
    root = tmp_path / "proj"
    command.init(root)
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
    assert command.RevisionInfo.of(first).description == "First revision"
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
