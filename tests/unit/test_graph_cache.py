"""The graph cache: read-only commands read the revision files' declarations from it, and a
stale or doubtful cache never changes what dm sees."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Project
from conftest import invoke
from conftest import make_sqlite
from conftest import ok
from conftest import status_of
from dm import verbs
from dm.config.settings import Settings
from dm.core.graph import Graph
from dm.core.graph import checksum
from dm.core.graph_cache import CACHE_NAME
from dm.core.graph_cache import is_static


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A ``dm init`` project used only for its revision files (no database is opened)."""
    root = tmp_path / "proj"
    verbs.init(root)
    monkeypatch.chdir(root)
    return Project(root, make_sqlite(tmp_path))


def load(project: Project, *, cached: bool = True) -> Graph:
    settings = Settings.load(config_file=project.config)
    return Graph.from_config(settings.alembic_config(), cached=cached)


def settle(project: Project) -> None:
    """Date every revision file a minute back: older than the import that caches it."""
    past = time.time() - 60
    for path in project.versions.glob("*.py"):
        os.utime(path, (past, past))


def cache_file(project: Project) -> Path:
    return project.versions / "__pycache__" / CACHE_NAME


def seen(graph: Graph) -> list[tuple[Any, ...]]:
    """Everything a command reads from the graph, per revision, in walk order."""
    return [
        (
            rev.id,
            rev.script.down_revision,
            rev.script.branch_labels,
            rev.script.dependencies,
            rev.path,
            rev.description,
            rev.doc,
            rev.environments,
            rev.transactional,
            rev.idempotent,
            rev.timeout,
            rev.requires_schema,
            rev.max_runtime,
            rev.blocks_deploy,
            rev.requires_complete,
            rev.upgrade.kind,
            None if rev.downgrade is None else rev.downgrade.kind,
            None if rev.verify is None else rev.verify.kind,
            checksum(rev.script),
        )
        for rev in (graph.revision(s.revision) for s in graph.walk())
    ] + [graph.heads]


@pytest.fixture
def varied(proj: Project) -> Project:
    """Revisions using every attribute dm reads, settled so that the cache takes them."""
    proj.write("aaaa1111", None, doc="First revision\n\nLonger text.", verify="return True")
    proj.write(
        "bbbb2222",
        "aaaa1111",
        downgrade=None,
        branch_labels=("left",),
        extra="""
        environments = ("development", "staging")
        timeout = 30
        idempotent = True
        transactional = False
        max_runtime = 5.5
        blocks_deploy = False
        requires_schema = "ae1027a6acf"
        """,
    )
    proj.write("cccc3333", "bbbb2222", extra="requires_complete = ('bbbb2222',)")
    proj.write("dddd4444", "aaaa1111", depends_on="left")
    (proj.versions / "eeee5555_alembic_style.py").write_text(
        '"""Alembic style"""\nrevision = "eeee5555"\ndown_revision = ("cccc3333", "dddd4444")\n'
        "def upgrade():\n    pass\n\ndef downgrade(session):\n    pass\n"
    )
    settle(proj)
    return proj


def test_a_second_load_reads_the_cache_and_sees_what_an_import_sees(varied: Project) -> None:
    imported = load(varied, cached=False)
    assert not cache_file(varied).exists()  # only a cached load writes it
    first = load(varied)
    assert not first.from_cache and cache_file(varied).is_file()
    second = load(varied)
    assert second.from_cache
    assert seen(second) == seen(first) == seen(imported)


def test_history_and_heads_print_the_same_from_the_cache(varied: Project) -> None:
    env = {"DM_CONFIG": str(varied.config)}
    before = [ok(invoke(varied, cmd, "--verbose", **env)).stdout for cmd in ("history", "heads")]
    assert load(varied).from_cache
    after = [ok(invoke(varied, cmd, "--verbose", **env)).stdout for cmd in ("history", "heads")]
    assert after == before


def test_an_edited_file_is_imported_again(varied: Project) -> None:
    load(varied)
    path = next(varied.versions.glob("bbbb2222_*.py"))
    path.write_text(path.read_text().replace('("development", "staging")', '("production",)'))
    graph = load(varied)
    assert graph.revision("bbbb2222").environments == ("production",)
    assert checksum(graph.script("bbbb2222")) == checksum(
        load(varied, cached=False).script("bbbb2222")
    )


def test_a_same_size_edit_with_another_mtime_is_imported_again(varied: Project) -> None:
    load(varied)
    path = next(varied.versions.glob("aaaa1111_*.py"))
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("First revision", "Frist revision"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert path.stat().st_size == stat.st_size
    assert load(varied).revision("aaaa1111").description == "Frist revision"


def test_an_unchanged_file_with_another_mtime_still_reads_the_cache(varied: Project) -> None:
    load(varied)
    path = next(varied.versions.glob("aaaa1111_*.py"))
    path.write_bytes(path.read_bytes())  # a checkout, a copy into an image: a new mtime
    graph = load(varied)
    assert graph.from_cache
    assert seen(graph) == seen(load(varied, cached=False))


def test_a_deleted_or_added_file_changes_the_graph(varied: Project) -> None:
    load(varied)
    next(varied.versions.glob("eeee5555_*.py")).unlink()
    graph = load(varied)
    assert not graph.known("eeee5555")
    assert set(graph.heads) == {"cccc3333", "dddd4444"}
    varied.write("ffff6666", "cccc3333")
    graph = load(varied)
    assert graph.known("ffff6666") and set(graph.heads) == {"ffff6666", "dddd4444"}


def test_a_file_written_just_before_the_import_is_not_taken_from_the_cache(
    proj: Project,
) -> None:
    """Its timestamp could hide a same-size write in the same clock tick."""
    proj.write("aaaa1111", None)
    load(proj)
    assert not load(proj).from_cache
    settle(proj)
    load(proj)
    assert load(proj).from_cache


def test_a_file_whose_declarations_depend_on_more_than_its_text_is_always_imported(
    proj: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj.write("aaaa1111", None, extra="import os\ntimeout = float(os.environ['T_SECONDS'])")
    settle(proj)
    monkeypatch.setenv("T_SECONDS", "10")
    load(proj)
    monkeypatch.setenv("T_SECONDS", "20")
    graph = load(proj)
    assert not graph.from_cache and graph.revision("aaaa1111").timeout == 20.0


def test_a_cache_that_cannot_be_written_is_not_an_error(proj: Project) -> None:
    proj.write("aaaa1111", None)
    settle(proj)
    (proj.versions / "__pycache__").write_text("not a directory")  # as root too
    assert load(proj).known("aaaa1111")
    assert not load(proj).from_cache


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to a read-only directory")
def test_a_read_only_directory_is_not_an_error(proj: Project) -> None:
    proj.write("aaaa1111", None)
    settle(proj)
    proj.versions.chmod(0o555)
    try:
        assert load(proj).known("aaaa1111")
        assert not cache_file(proj).exists()
    finally:
        proj.versions.chmod(0o755)


def test_a_corrupt_cache_is_ignored_and_rewritten(varied: Project) -> None:
    load(varied)
    cache_file(varied).write_text('{"key": ')
    assert not load(varied).from_cache
    graph = load(varied)
    assert graph.from_cache and seen(graph) == seen(load(varied, cached=False))


def test_an_upgrade_from_the_cache_runs_the_imported_hooks(project: Project) -> None:
    """A plan with work imports the files first; the tracker rows are those of any run."""
    marker = project.root / "ran.txt"
    project.write("aaaa1111", None, upgrade=f"open({str(marker)!r}, 'w').close()")
    project.write("bbbb2222", "aaaa1111")
    settle(project)
    ok(invoke(project, "history"))  # writes the cache
    assert load(project).from_cache
    ok(invoke(project, "upgrade"))
    assert marker.exists()
    rows = status_of(project)
    assert {rev: row["state"] for rev, row in rows.items()} == {
        "aaaa1111": "applied",
        "bbbb2222": "applied",
    }
    assert "nothing to upgrade" in ok(invoke(project, "upgrade")).stdout
    assert "every revision is applied" in ok(invoke(project, "check")).stdout
    assert status_of(project) == rows


def test_check_sees_a_file_edited_after_it_was_applied(project: Project) -> None:
    project.write("aaaa1111", None)
    settle(project)
    ok(invoke(project, "upgrade"))
    ok(invoke(project, "check"))
    path = next(project.versions.glob("aaaa1111_*.py"))
    path.write_text(path.read_text() + "# edited\n")
    result = invoke(project, "check")
    assert result.exit_code == 4 and "aaaa1111" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("source", "static"),
    [
        (
            '"""Doc"""\nimport sqlalchemy as sa\nrevision = "a"\ndown_revision = None\n'
            "timeout: float = 3\nasync def upgrade(session):\n    x = globals\n",
            False,
        ),
        (
            '"""Doc"""\nimport sqlalchemy as sa\nrevision = "a"\ndown_revision = ("b", "c")\n'
            "environments = ['dev']\nasync def upgrade(session):\n    revision = 1\n",
            True,
        ),
        ('revision = "a"\nif True:\n    timeout = 3\n', False),
        ('revision = "a"\nfrom helpers import upgrade\n', False),
        ('revision = "a"\nfrom helpers import *\n', False),
        ('revision = "a"\ntimeout = 60 * 5\n', False),
        ('revision = "a"\n@decorate\nasync def upgrade(session):\n    pass\n', False),
        ('revision = "a"\ndef timeout():\n    pass\n', False),
        ('revision = "a"\nfor revision in ():\n    pass\n', False),
        ('revision = "a"\nimport sys\nsys.modules[__name__].timeout = 3\n', False),
        ('revision = "a"\ndef helper():\n    global timeout\n', False),
        ('revision = "a"\ntimeout, idempotent = 3, True\n', False),
        ('revision = "a"\n__doc__ = "x"\n', True),
        ('revision = "a"\ntimeout = 3\ntimeout += 1\n', False),
        ('revision = "a"\ntry:\n    import x\nexcept ImportError:\n    x = None\n', True),
        ("revision = (\n", False),
        ('revision = "a"\ndef __getattr__(name):\n    return 3\n', False),
        (
            'revision = "a"\nimport inspect\ninspect.currentframe().f_globals["timeout"] = 3\n',
            False,
        ),
    ],
)
def test_is_static(source: str, static: bool) -> None:
    assert is_static(source.encode()) is static


def test_read_only_commands_do_not_import_the_revision_files(project: Project) -> None:
    imports = project.root / "imports.txt"
    count = f"open({str(imports)!r}, 'a').write('.')"
    project.write("aaaa1111", None, extra=count)
    project.write("bbbb2222", "aaaa1111", extra=count)
    settle(project)
    ok(invoke(project, "upgrade"))
    before = imports.read_text()
    for args in (("current",), ("status",), ("check",), ("history",), ("upgrade",)):
        ok(invoke(project, *args))
    ok(invoke(project, "check", "--wait", "--timeout", "5"))
    assert imports.read_text() == before


def test_dm_revision_writes_the_cache(proj: Project) -> None:
    proj.write("aaaa1111", None)
    settle(proj)
    ok(invoke(proj, "revision", "-m", "add the plans", DM_CONFIG=str(proj.config)))
    assert cache_file(proj).is_file()
    graph = load(proj)
    assert graph.from_cache and len(graph.revisions) == 2


def test_a_hook_that_is_an_unhashable_callable_still_loads(proj: Project) -> None:
    proj.write(
        "aaaa1111",
        None,
        extra="class Hook:\n    __hash__ = None\n    def __call__(self, session):\n"
        "        pass\nverify = Hook()",
    )
    settle(proj)
    for _ in range(2):
        graph = load(proj)
        assert graph.revision("aaaa1111").verify is not None
        assert not graph.from_cache  # a hook bound to an instance: not static
