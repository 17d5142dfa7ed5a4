"""The package's layers stay in order: each module imports only its own layer and the ones below.

The layers, bottom to top, are the subpackages of ``src/dm`` (``docs/development.md``,
"Layout"). A module may import any module of a lower layer and of its own layer, never
one above, and the import graph has no cycle. Type-only imports count too: a layer that needs
a type from above has the type in the wrong place.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

import dm
from conftest import REPO

PACKAGE = REPO / "src" / "dm"

# bottom to top
LAYERS = [
    "core",  # graph, planning, states, environments, errors: no database, no event loop
    "config",  # settings, URLs, engines, logging set-up
    "backfill",  # dm.batched, its tuning and back-off predicates, progress
    "engine",  # plan execution: attempts, unit of work, tracker, fence, lock, signals
    "alembic",  # env.py's entry point, the caller's-connection adapter
    "templates",  # the project template dm init and dm revision write
    "verbs",  # one function per command, result objects out
    "api",  # the public coroutines and their blocking twins
    "testing",  # the pytest plugin and its runner
    "cli",  # click: options, printing, exit codes
    "face",  # dm/__init__, __main__ and the old import paths kept for users' files
]
# modules at the top of the package that are not a layer of their own
FACE = {"__init__", "__main__", "alembic_env", "backoff", "pytest_plugin", "settings"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "templates/dm" not in str(p)}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FACE:
        return "face"
    return parts[1]


def _imports(path: Path) -> set[str]:
    """Return the dm modules ``path`` imports (type-only and function-level ones included)."""
    found: set[str] = set()
    modules = _modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dm":
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dm")
    return found


def test_every_module_is_in_a_layer() -> None:
    unknown = {m for m in _modules() if _layer(m) not in LAYERS}
    assert unknown == set()


def test_modules_import_only_their_layer_and_the_ones_below() -> None:
    upward = {}
    for module, path in _modules().items():
        rank = LAYERS.index(_layer(module))
        above = sorted(i for i in _imports(path) if LAYERS.index(_layer(i)) > rank)
        if above:
            upward[module] = above
    assert upward == {}


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: _imports(p) - {m} for m, p in _modules().items()}
    # a package's __init__ re-exporting its own modules is not a cycle of behaviour
    graph = {
        m: {i for i in deps if not (m.startswith(i + ".") and i != "dm")}
        for m, deps in graph.items()
    }
    seen: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt])
            elif nxt not in seen:
                visit(nxt, [*stack, nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])
    assert cycles == []


def test_only_the_cli_imports_click() -> None:
    importers = set()
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "click" for n in names):
                importers.add(_layer(module))
    assert importers == {"cli"}


def test_the_core_never_touches_a_database_driver_or_the_event_loop() -> None:
    for module, path in _modules().items():
        if _layer(module) != "core":
            continue
        text = path.read_text()
        for banned in ("sqlalchemy.ext.asyncio", "asyncpg", "aiosqlite", "import asyncio"):
            assert banned not in text, f"{module} uses {banned}"


def test_public_api_is_exactly_all() -> None:
    import inspect

    from dm import api

    # Every coroutine of dm.api, read from the module itself: a new one that is not on
    # ``import dm`` fails here rather than being pinned out by a hand-kept list.
    coroutines = sorted(
        name
        for name, value in vars(api).items()
        if not name.startswith("_")
        and inspect.iscoroutinefunction(value)
        and value.__module__ == api.__name__
    )
    assert {"pause", "resume", "cancel"} <= set(coroutines)
    expected = [
        *("DmError", "__version__", "autocommit", "batched", "execute_script"),
        *coroutines,
        *(f"{name}_sync" for name in coroutines),
    ]
    assert sorted(dm.__all__) == sorted(expected)
    assert len(dm.__all__) == len(set(dm.__all__))
    public = {
        name
        for name, value in vars(dm).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public - {"annotations"} <= set(dm.__all__)
    for name in dm.__all__:
        assert getattr(dm, name) is not None
    for name in coroutines:
        assert getattr(dm, name) is getattr(api, name)
        twin = getattr(dm, f"{name}_sync")
        assert twin is getattr(api, f"{name}_sync")
        assert twin.__name__ == f"{name}_sync"
        assert inspect.signature(twin) == inspect.signature(getattr(api, name))


def test_the_old_import_paths_users_name_still_work() -> None:
    from dm.alembic_env import run
    from dm.backoff import any_of
    from dm.backoff import lock_waits_above
    from dm.backoff import long_transactions_above
    from dm.backoff import replica_lag_above
    from dm.pytest_plugin import DmTestConfig
    from dm.settings import Settings
    from dm.testing import DmRunner
    from dm.testing import ProjectConfig

    assert callable(run) and callable(any_of) and callable(lock_waits_above)
    assert callable(long_transactions_above) and callable(replica_lag_above)
    assert DmTestConfig.__module__ == "dm.testing"
    assert Settings.__module__ == "dm.config.settings"
    assert DmRunner.__module__ == "dm.testing" and ProjectConfig.__module__ == "dm.testing"
