"""A cache of what the revision files declare, so read-only commands need not import them.

``dm.core.graph`` imports every revision file to read its edges, settings and hooks. At
thousands of files that import dominates ``dm current``, ``dm status``, ``dm check`` and a
no-op ``dm upgrade``. After a load that imported every file, the cache records, per file,
its size, mtime, content hash, checksum and the module attributes dm reads (the hooks as
their kind only), in ``__pycache__/dm-graph.json`` of the first revision directory.

A later load uses it only when it is sure it says what an import would: the same files in
the same directories, each with the recorded size and mtime (or, when those differ, the
recorded content hash), and each file *static*: every attribute dm reads is a literal
assigned at module level and every hook a plain ``def`` at module level, so that nothing
outside the file can change them. Otherwise the graph is loaded by import, as without a
cache. The revisions built from the cache carry stand-in hooks that refuse to run: a
command that runs hooks loads the graph by import first (``Graph.ensure_imported``).
Writing the cache is best effort: a directory that cannot be written is not an error.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any
from typing import Literal

from alembic.script import Script
from alembic.script import ScriptDirectory

log = logging.getLogger("dm.graph_cache")

FORMAT = 1
"""Bumped whenever what the cache records, or how dm reads a revision file, changes."""
CACHE_NAME = "dm-graph.json"
RACY_NS = 2_000_000_000
"""A file changed less than this long before the import that read it is not cached: its
timestamp could hide a later same-size write (coarse file system clocks)."""
HOOK_NAMES = ("upgrade", "downgrade", "verify")
ATTRIBUTES = (
    "revision",
    "down_revision",
    "branch_labels",
    "depends_on",
    "environments",
    "transactional",
    "idempotent",
    "timeout",
    "requires_schema",
    "max_runtime",
    "blocks_deploy",
    "requires_complete",
)
"""The module attributes dm and Alembic read from a revision file (``dm.core.graph``)."""
_CONTRACT = frozenset((*ATTRIBUTES, *HOOK_NAMES, "__doc__", "__getattr__"))
"""The names a revision module binds that decide what dm reads from it (a module-level
``__getattr__`` could answer for any attribute it lacks)."""
_DYNAMIC_CALLS = frozenset(("globals", "vars", "setattr", "exec", "eval", "__import__"))


class CachedScript(Script):
    """A revision file's script built from the cache: its module holds the attributes and
    stand-in hooks, and its checksum is the one recorded."""

    def __init__(
        self, module: ModuleType, rev_id: str, path: str, checksum: str, sha256: str
    ) -> None:
        super().__init__(module, rev_id, path)
        self.checksum = checksum
        self.sha256 = sha256


class HookNotLoaded(RuntimeError):
    """A hook of a revision loaded from the graph cache was called (a dm bug)."""


async def _async_hook(session: Any) -> None:
    raise HookNotLoaded("a revision loaded from the graph cache cannot run its hooks")


def _op_hook() -> None:
    raise HookNotLoaded("a revision loaded from the graph cache cannot run its hooks")


def _session_hook(session: Any) -> None:
    raise HookNotLoaded("a revision loaded from the graph cache cannot run its hooks")


_STAND_INS: dict[str, Callable[..., Any]] = {
    "async": _async_hook,
    "op": _op_hook,
    "session": _session_hook,
}


def stand_in_kind(hook: object) -> Literal["async", "op", "session"] | None:
    """Return the kind (``dm.core.graph.HookKind``) of a stand-in hook; None for any other object
    (compared by identity: a revision's hook may be unhashable)."""
    if hook is _async_hook:
        return "async"
    if hook is _op_hook:
        return "op"
    if hook is _session_hook:
        return "session"
    return None


def cache_path(script_dir: ScriptDirectory) -> Path | None:
    """Return where the cache of ``script_dir`` lives, or None when it keeps none."""
    if script_dir.sourceless:
        return None
    locations = list(script_dir._version_locations)
    if not locations:
        return None
    return Path(locations[0]) / "__pycache__" / CACHE_NAME


def _key(script_dir: ScriptDirectory) -> dict[str, Any]:
    import alembic

    return {
        "format": FORMAT,
        "alembic": alembic.__version__,
        "locations": [str(Path(p).resolve()) for p in script_dir._version_locations],
        "recursive": bool(script_dir.recursive_version_locations),
    }


def load(script_dir: ScriptDirectory) -> dict[str, Script]:
    """Return the scripts the cache of ``script_dir`` is sure of, by resolved file path:
    static files whose size and mtime (or else content hash) are those recorded. A file
    missing here is imported; a deleted file is simply not listed by Alembic."""
    path = cache_path(script_dir)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_bytes())
        if data.get("key") != _key(script_dir):
            return {}
        return {
            entry["path"]: _script(entry)
            for entry in data["files"]
            if entry["static"] and _unchanged(entry, Path(entry["path"]))
        }
    except Exception as exc:  # noqa: BLE001 - any doubt means: import the files
        log.debug("graph cache %s not used: %s: %s", path, type(exc).__name__, exc)
        return {}


def _unchanged(entry: Mapping[str, Any], file: Path) -> bool:
    try:
        stat = file.stat()
    except OSError:  # deleted
        return False
    if stat.st_size != entry["size"]:
        return False
    if stat.st_mtime_ns == entry["mtime_ns"]:
        return True
    # Same size, other mtime (a checkout, a copy into an image): compare the content.
    return bool(hashlib.sha256(file.read_bytes()).hexdigest() == entry["sha256"])


def _script(entry: Mapping[str, Any]) -> Script:
    module = ModuleType(f"dm_graph_cache_{entry['attributes']['revision']}")
    module.__doc__ = entry["doc"]
    module.__file__ = entry["path"]
    for name, value in entry["attributes"].items():
        setattr(module, name, _decode(value))
    for name, kind in entry["hooks"].items():
        if kind is not None:
            setattr(module, name, _STAND_INS[kind])
    return CachedScript(module, module.revision, entry["path"], entry["checksum"], entry["sha256"])


def save(
    script_dir: ScriptDirectory,
    scripts: Sequence[Script],
    hook_kinds: Mapping[str, Mapping[str, str | None]],
    checksums: Mapping[str, str],
    imported_at_ns: int,
) -> None:
    """Record ``scripts`` (just imported and validated) as the cache of ``script_dir``.

    :param hook_kinds: per revision id, each hook's kind (None: not defined).
    :param checksums: per revision id, ``dm.core.graph.checksum`` of its file.
    :param imported_at_ns: ``time.time_ns()`` before the import began; a file changed
        since (or just before) is recorded as not static, so never read from the cache.
    """
    path = cache_path(script_dir)
    if path is None:
        return
    try:
        entries = [
            _entry(
                script,
                Path(script.path),
                hook_kinds[script.revision],
                checksums[script.revision],
                imported_at_ns - RACY_NS,
            )
            for script in scripts
        ]
        payload = json.dumps({"key": _key(script_dir), "files": entries}, separators=(",", ":"))
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{CACHE_NAME}.{os.getpid()}.{uuid.uuid4().hex}")
        # os.open honours the umask (readable by the user a built image runs as).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(payload)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (OSError, ValueError, TypeError, KeyError) as exc:  # read-only root, odd values
        log.debug("graph cache %s not written: %s: %s", path, type(exc).__name__, exc)


def _entry(
    script: Script, file: Path, hooks: Mapping[str, str | None], checksum: str, settled_ns: int
) -> dict[str, Any]:
    stat_before = file.stat()
    data = file.read_bytes()
    stat = file.stat()
    module = script.module
    sha256 = hashlib.sha256(data).hexdigest()
    static = (
        # read from the cache: the file must still hold what the entry was made from
        (not isinstance(script, CachedScript) or script.sha256 == sha256)
        and stat.st_mtime_ns < settled_ns  # unchanged since well before the import
        and stat_before.st_mtime_ns == stat.st_mtime_ns
        and stat.st_size == len(data)
        and isinstance(getattr(module, "revision", None), str)
        and is_static(data)
    )
    attributes = {}
    for name in ATTRIBUTES:
        if hasattr(module, name):
            value = getattr(module, name)
            static = static and _encodable(value)
            attributes[name] = _encode(value) if static else None
    doc = module.__doc__
    return {
        "path": str(file),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
        "checksum": checksum,
        "static": static and (doc is None or isinstance(doc, str)),
        "doc": doc if isinstance(doc, str) else None,
        "attributes": attributes,
        "hooks": dict(hooks),
    }


def _encodable(value: object) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, tuple | list) and all(isinstance(v, str) for v in value)


def _encode(value: object) -> Any:
    if isinstance(value, tuple):
        return {"tuple": list(value)}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(value["tuple"])
    return value


# -- is a revision file static? -------------------------------------------------------------


def is_static(source: bytes) -> bool:
    """Return whether everything dm reads from this revision file is fixed by its text.

    Static: each attribute dm reads is bound only by module-level assignments of literals,
    each hook only by an undecorated module-level ``def``, and nothing else at module level
    (an import, a loop, a condition, ``globals()``, a ``global`` statement) may bind them.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name in _CONTRACT and (
                node.name not in HOOK_NAMES or node.decorator_list or isinstance(node, ast.ClassDef)
            ):
                return False
            if _escapes(node):
                return False
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound = {t.id for t in targets if isinstance(t, ast.Name)} & _CONTRACT
            if bound and (node.value is None or not _is_literal(node.value)):
                return False
            other = [t for t in targets if not isinstance(t, ast.Name)]
            if _binds_contract(other) or _escapes(node):
                return False
        elif _binds_contract([node]) or _escapes(node):
            return False
    return True


def _is_literal(node: ast.expr) -> bool:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return _encodable(value)


def _binds_contract(nodes: Iterable[ast.AST]) -> bool:
    """Return whether anything in ``nodes`` binds a name dm reads from the module."""
    for root in nodes:
        for node in ast.walk(root):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                if node.id in _CONTRACT:
                    return True
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name in _CONTRACT:
                    return True
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    if alias.name == "*" or bound in _CONTRACT:
                        return True
            elif isinstance(node, ast.MatchAs | ast.MatchStar) and node.name in _CONTRACT:
                return True
            elif isinstance(node, ast.MatchMapping) and node.rest in _CONTRACT:
                return True
    return False


def _escapes(root: ast.AST) -> bool:
    """Return whether ``root`` could rebind module attributes without naming them:
    a ``global`` statement, ``globals()``/``setattr``/``exec``..., ``sys.modules``."""
    for node in ast.walk(root):
        if isinstance(node, ast.Global):
            return True
        if isinstance(node, ast.Name) and node.id in _DYNAMIC_CALLS:
            return True
        if isinstance(node, ast.Attribute) and node.attr in ("modules", "__dict__", "f_globals"):
            return True
    return False
