"""The module layers stay as designed: each module imports only the dm modules allowed here."""

from __future__ import annotations

import ast
import types

import dm
from conftest import REPO

PACKAGE = REPO / "src" / "dm"

# module -> dm modules it may import (type-only imports included)
ALLOWED: dict[str, set[str]] = {
    "runtime": {
        "__init__",
        "alembic_context",  # the Alembic environment around hooks
        "db",
        "environments",
        "errors",
        "fence",
        "graph",
        "liveness",
        "lock",
        "planning",
        "recording",
        "runner",
        "schema",
        "settings",
        "state",
        "tracker",
        "urls",  # the start-up line shows the database URL, password hidden
    },
    "__init__": {"api", "batching", "errors", "hooks"},
    "hooks": {"alembic_context", "batching", "errors", "fence", "graph"},
    "validate": {"graph", "schema", "settings"},
    "alembic_context": {"_alembic_compat", "graph", "planning", "settings", "tracker"},
    "batching": {"progress"},
    "backoff": set(),
    "progress": set(),
    "api": {"command", "operations", "settings", "errors"},
    "__main__": {"cli"},
    "cli_args": set(),  # click only: global options after the command, one-line usage errors
    "repair": {"errors", "graph", "planning", "runtime", "settings", "state", "tracker"},
    "cli": {
        "__init__",
        "alembic_context",  # dm -x
        "validate",  # dm check --offline
        "printable",
        "cli_args",
        "repair",
        "command",
        "operations",
        "settings",
        "errors",
        "log",
        "progress",
        "pooler",
        "privileges",
        "redaction",
        "signals",
        "transient",
        "urls",
        "watchdog",
    },
    "command": {
        "errors",
        "graph",
        "planning",
        "runner",
        "runtime",
        "schema",
        "settings",
        "slugs",
        "state",
        "templates",
        "files",
        "tracker",
        "transient",  # check --wait: a transient failure during a poll means "not yet"
    },
    "environments": {"graph", "tracker", "errors"},
    "planning": {
        *("_alembic_compat", "environments", "errors", "graph", "schema", "state", "tracker"),
    },
    "schema": {"errors", "graph", "settings"},
    "slugs": {"errors"},
    "operations": {
        "__init__",
        "errors",
        "files",
        "graph",
        "lock",
        "planning",
        "runner",
        "runtime",
        "schema",
        "settings",
        "state",
        "tracker",
        "recording",  # the wording of a settled request (Request.describe)
        "unit",  # dm verify runs check_verify
        "redaction",  # stored error text is scrubbed again before it is shown
    },
    "alembic_env": {
        "_alembic_compat",
        "environments",
        "errors",
        "graph",
        "log",
        "planning",
        "runtime",
        "schema",  # requires_schema, checked as dm upgrade checks it
        "settings",
        "shared",
        "signals",
        "tracker",
        "urls",
        "redaction",  # one redaction rule for dm's log lines and Alembic's FAILED line
    },
    "shared": {"alembic_context", "errors", "lock", "recording", "runner", "runtime", "settings"},
    "runner": {
        *("errors", "graph", "lock_retries", "planning", "recording", "stops", "tracker"),
        *("transient", "unit", "watchdog"),
        *("db", "pooler", "urls"),  # a connection that may be pooled (#29)
        "liveness",  # the session's guards against a dead client
    },
    "unit": {"batching", "errors", "graph", "hooks", "planning", "recording", "stops"},
    "stops": {"errors", "planning", "recording", "tracker"},
    "lock_retries": {"planning"},
    "recording": {"errors", "fence", "graph", "planning", "redaction", "tracker"},
    "fence": {"errors", "tracker"},
    "watchdog": {"db", "errors", "recording", "tracker", "transient", "urls"},
    "graph": {"_alembic_compat", "errors", "graph_cache"},
    "graph_cache": set(),
    "_alembic_compat": set(),
    "tracker": {"errors", "redaction", "state"},
    "state": set(),
    "lock": {"db", "files", "pooler", "tracker", "errors"},
    "files": {"errors"},
    "db": {"files", "pooler", "urls", "errors", "transient", "liveness"},
    "liveness": {"errors", "transient"},
    "pooler": {"errors", "transient"},
    "transient": set(),
    "settings": {"redaction", "urls", "errors", "environments"},
    "urls": {"errors"},
    "redaction": {"urls"},
    "privileges": {"errors", "transient"},
    "signals": {"errors", "watchdog"},
    "log": {"printable"},
    "printable": set(),
    "testing": {
        *("_alembic_compat", "api", "batching", "command", "db", "errors", "graph", "hooks"),
        *("operations", "runtime", "settings", "urls"),
    },
    "pytest_plugin": {"pytest_builtins", "redaction", "testing", "urls"},
    "pytest_builtins": {"batching", "environments", "errors", "graph", "pytest_plugin", "testing"},
    "errors": set(),
    "templates": {"errors", "files"},
}


def _dm_imports(path: str) -> set[str]:
    tree = ast.parse((PACKAGE / path).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:
                found.update("__init__" if a.name == "__version__" else a.name for a in node.names)
            elif node.level >= 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.split(".")[0] == "dm":
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dm":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def _modules() -> dict[str, str]:
    modules = {p.stem: p.name for p in PACKAGE.glob("*.py")}
    modules["templates"] = "templates/__init__.py"
    return modules


def test_every_module_has_a_rule() -> None:
    assert set(_modules()) == set(ALLOWED)


def test_modules_import_only_their_allowed_layers() -> None:
    forbidden = {
        name: sorted(_dm_imports(path) - ALLOWED[name] - {name})
        for name, path in _modules().items()
    }
    assert {k: v for k, v in forbidden.items() if v} == {}


def test_only_the_cli_imports_click() -> None:
    """Only the command line (cli and its argument handling, cli_args) knows click."""
    importers = []
    for name, path in _modules().items():
        tree = ast.parse((PACKAGE / path).read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n.split(".")[0] == "click" for n in names):
                importers.append(name)
    assert sorted(set(importers)) == ["cli", "cli_args"]


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
        assert getattr(dm, f"{name}_sync") is getattr(api, f"{name}_sync")
