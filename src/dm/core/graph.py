"""The revision graph: load revision files, validate each into a :class:`Revision`, resolve
targets, and walk the paths between revisions (``dm.core.planning`` turns paths into plans).

Everything here is pure: no database, no event loop. Alembic owns the graph walking; this
module validates what Alembic only warns about. A revision module's attributes are read
here, once, when the graph loads, and nowhere else.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
import traceback
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from typing import Any
from typing import Literal

from alembic.script import Script
from alembic.script import ScriptDirectory
from alembic.script.revision import CycleDetected
from alembic.script.revision import RevisionError
from alembic.util import CommandError

from dm.core import alembic_compat as compat
from dm.core import graph_cache
from dm.core.errors import RevisionFileError
from dm.core.errors import UnknownTarget
from dm.core.errors import one_line

if TYPE_CHECKING:
    from alembic.config import Config

HOOKS = ("upgrade", "downgrade", "verify")
DECLARATIONS = (
    *("revision", "down_revision", "branch_labels", "depends_on", "environments"),
    *("transactional", "idempotent", "timeout", "max_runtime", "blocks_deploy"),
    *("requires_schema", "requires_complete"),
)
"""The module-level names dm reads from a revision file, besides its hooks."""
MAX_REVISION_ID = 64
"""The tracker's ``revision`` column holds at most this many characters."""
MAX_TIMEOUT = 2_147_483.0
"""A revision's ``timeout`` must fit PostgreSQL's ``statement_timeout`` (in ms, an int4)."""


HookKind = Literal["async", "op", "session"]
"""``async def f(session)``; Alembic-style ``def f()`` using ``op``; ``def f(session)``
taking a sync ``Session``. Both sync kinds run with Alembic's ``op`` bound to dm's
connection (``dm.engine.hooks``)."""


@dataclass(frozen=True)
class Hook:
    """One hook function of a revision and how it is called."""

    fn: Callable[..., Any]
    kind: HookKind

    @property
    def is_async(self) -> bool:
        """Return whether the hook is a coroutine function taking an ``AsyncSession``."""
        return self.kind == "async"


@dataclass(frozen=True)
class Revision:
    """A revision file as dm runs it: its hooks and settings, validated when the graph loads."""

    script: Script
    upgrade: Hook
    downgrade: Hook | None
    verify: Hook | None
    environments: tuple[str, ...] | None
    """Where it may run (None: everywhere); see ``dm.core.environments``."""
    transactional: bool
    """False: ``dm.batched`` commits per batch, and a failed attempt resumes."""
    idempotent: bool
    """True: running it again leaves the same data (dm's pytest plugin checks it)."""
    timeout: float | None
    """Its own time limit in seconds, overriding ``--timeout``."""
    description: str
    """The first line of its docstring."""
    doc: str
    requires_schema: tuple[str, ...] = ()
    """The application's Alembic schema revisions its upgrade needs (``dm.engine.app_schema``)."""
    max_runtime: float | None = None
    """Seconds an attempt may run before its batched loop stops at a batch boundary
    (``transactional = False`` only); the next run resumes it."""
    blocks_deploy: bool = True
    """False: ``dm check`` passes while it is unfinished (not run, running, stopped, paused
    or cancelled), and when it stops at a batch boundary the run goes on with the revisions
    after it; a failure still fails the check."""
    requires_complete: tuple[str, ...] = ()
    """Ancestors (``blocks_deploy = False`` backfills) whose upgrade must be complete
    before this revision's upgrade runs: until then it waits, and so does ``dm check``."""

    @property
    def id(self) -> str:
        """Return the revision id."""
        return self.script.revision

    @property
    def path(self) -> str:
        """Return the revision file's path."""
        return str(self.script.path)

    @property
    def reversible(self) -> bool:
        """Return whether the revision defines ``downgrade()``."""
        return self.downgrade is not None

    @classmethod
    def from_script(cls, script: Script) -> Revision:
        """Validate ``script``'s module against dm's revision contract.

        :raises RevisionFileError: naming the file and what is wrong.
        """
        try:
            return cls._from_module(script, script.module)
        except _Problem as problem:
            raise RevisionFileError(f"{display_path(script.path)}: {problem}") from None

    @classmethod
    def _from_module(cls, script: Script, module: ModuleType) -> Revision:
        _refuse_misspellings(module)
        hooks = [_hook(module, name) for name in HOOKS]
        upgrade, downgrade, verify = hooks
        if upgrade is None:
            if hasattr(module, "upgrade"):
                raise _Problem("upgrade is None; it must be 'async def upgrade(session)'")
            raise _Problem(
                "missing 'async def upgrade(session)' (or Alembic-style 'def upgrade()')"
            )
        doc = (module.__doc__ or "").strip()
        transactional = _flag(module, "transactional", default=True)
        return cls(
            script=script,
            upgrade=upgrade,
            downgrade=downgrade,
            verify=verify,
            environments=_environments(module),
            transactional=transactional,
            idempotent=_flag(module, "idempotent", default=False),
            timeout=_timeout(module),
            description=doc.splitlines()[0].strip() if doc else "",
            doc=doc,
            requires_schema=_requires_schema(module),
            max_runtime=_max_runtime(module, transactional),
            blocks_deploy=_blocks_deploy(module),
            requires_complete=_revision_ids(module, "requires_complete"),
        )


def checksum(script: Script) -> str:
    """Return the sha256 of the revision file, line endings normalised."""
    if isinstance(script, graph_cache.CachedScript):
        return script.checksum
    data = Path(script.path).read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(data).hexdigest()


def display_path(path: str | os.PathLike[str]) -> str:
    """Return ``path`` relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)


class Graph:
    """The validated revision graph of one script directory."""

    def __init__(self, script_dir: ScriptDirectory, revisions: list[Revision]) -> None:
        self.script_dir = script_dir
        self.revisions = revisions
        self.scripts = [revision.script for revision in revisions]
        self._by_id = {revision.id: revision for revision in revisions}
        self.from_cache = False
        """True: built from ``dm.core.graph_cache``, its hooks cannot run (``ensure_imported``)."""
        self._config: Config | None = None

    @classmethod
    def from_config(cls, config: Config, *, cached: bool = False) -> Graph:
        """Load every revision file and check it against dm's revision contract.

        :param cached: read the files' declarations from ``dm.core.graph_cache`` when it
            matches them (the revisions' hooks then cannot run until ``ensure_imported``),
            and refresh it after an import.
        """
        location = config.get_main_option("script_location") or ""
        if location and ":" not in location and not Path(location).is_dir():
            raise RevisionFileError(
                f"{config.config_file_name}: script_location {display_path(location)} "
                "does not exist (run 'dm init' or fix script_location)"
            )
        try:
            script_dir = ScriptDirectory.from_config(config)
        except CommandError as exc:
            raise RevisionFileError(f"{config.config_file_name}: {one_line(exc)}") from None
        version_dirs = [Path(p).resolve() for p in script_dir._version_locations]
        for version_dir in version_dirs:
            if not version_dir.is_dir():
                raise RevisionFileError(
                    f"{config.config_file_name}: revision directory "
                    f"{display_path(version_dir)} does not exist (create it, or fix "
                    "script_location / version_locations)"
                )
        reuse = graph_cache.load(script_dir) if cached else {}
        imported_at_ns = time.time_ns()
        scripts = _import_scripts(script_dir, version_dirs, reuse)
        from_cache = any(isinstance(s, graph_cache.CachedScript) for s in scripts)
        revisions = _check_contract(scripts)
        compat.use_scripts(script_dir, scripts)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                script_dir.revision_map.heads  # noqa: B018 - builds and checks the map
        except (RevisionError, CommandError, UserWarning) as exc:  # cycles, bad references
            files = _files_of(exc, scripts)
            raise RevisionFileError(
                f"{display_path(script_dir.versions)}: {one_line(exc)}{files}"
            ) from None
        _check_requires_complete(revisions)
        graph = cls(script_dir, revisions)
        graph.from_cache, graph._config = from_cache, config
        if cached and not all(isinstance(s, graph_cache.CachedScript) for s in scripts):
            graph_cache.save(
                script_dir,
                scripts,
                {r.id: {name: _kind(getattr(r, name)) for name in HOOKS} for r in revisions},
                {r.id: checksum(r.script) for r in revisions},
                imported_at_ns,
            )
        return graph

    def ensure_imported(self) -> None:
        """Make a graph built from the cache runnable: load it again by importing every
        revision file (any problem is raised as the import finds it)."""
        if not self.from_cache or self._config is None:
            return
        loaded = Graph.from_config(self._config)
        self.script_dir, self.revisions = loaded.script_dir, loaded.revisions
        self.scripts, self._by_id = loaded.scripts, loaded._by_id
        self.from_cache = False

    @property
    def version_dirs(self) -> list[Path]:
        """Return the directories revision files are read from."""
        return [Path(p) for p in self.script_dir._version_locations]

    @property
    def heads(self) -> tuple[str, ...]:
        """Return the head revisions of the graph."""
        return tuple(self.script_dir.get_heads())

    def known(self, revision: str) -> bool:
        """Return whether ``revision`` is the id of a revision file."""
        return revision in self._by_id

    def script(self, revision: str) -> Script:
        """Return the script with this id."""
        return self._by_id[revision].script

    def revision(self, revision: str) -> Revision:
        """Return the validated revision with this id."""
        return self._by_id[revision]

    def resolve(self, target: str) -> tuple[Script, ...]:
        """Resolve a symbolic target, partial id or branch label to scripts."""
        try:
            found = self.script_dir.get_revisions(target)
        except (CommandError, RevisionError) as exc:
            raise UnknownTarget(one_line(exc)) from None
        return tuple(s for s in found if isinstance(s, Script))

    def walk(self) -> list[Script]:
        """Return every script from the bases to the heads (parents before children)."""
        ordered = list(self.script_dir.walk_revisions(base="base", head="heads"))
        ordered.reverse()
        return ordered

    def applied_heads(self, applied: Iterable[str]) -> tuple[str, ...]:
        """Reduce a set of applied revisions to the heads Alembic plans from."""
        known = {rev for rev in applied if rev in self._by_id}
        parents: set[str] = set()
        for rev in known:
            parents.update(compat.all_down_revisions(self._by_id[rev].script))
        return tuple(sorted(known - parents))

    def upgrade_path(self, target: str, applied: Iterable[str]) -> list[Revision]:
        """Return the revisions between the applied set and ``target``, oldest first.

        :raises UnknownTarget: ``target`` does not resolve, or lies below the applied set.
        """
        heads = self.applied_heads(applied)
        try:
            steps = compat.upgrade_steps(self.script_dir, target, heads)
        except (CommandError, RevisionError) as exc:
            raise UnknownTarget(f"cannot upgrade to {target!r}: {one_line(exc)}") from None
        return [self._by_id[step.revision.revision] for step in steps]

    def downgrade_path(self, target: str, applied: Iterable[str]) -> list[Revision]:
        """Return the applied revisions above ``target``, newest first.

        :raises UnknownTarget: ``target`` does not resolve, or lies above the applied set.
        """
        heads = self.applied_heads(applied)
        try:
            scripts = compat.downgrade_steps(self.script_dir, target, heads)
        except (CommandError, RevisionError) as exc:
            raise UnknownTarget(f"cannot downgrade to {target!r}: {one_line(exc)}") from None
        return [self._by_id[script.revision] for script in scripts]


def _kind(hook: Hook | None) -> str | None:
    return None if hook is None else hook.kind


def _import_scripts(
    script_dir: ScriptDirectory,
    version_dirs: list[Path],
    reuse: Mapping[str, Script] | None = None,
) -> list[Script]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compat.load_scripts(script_dir, reuse)
    except SyntaxError as exc:
        if not exc.filename:  # e.g. a NUL byte: Python names no file
            where = _file_with_nul(version_dirs)
            if where is not None:
                raise RevisionFileError(
                    f"{where}: contains a NUL byte; a revision file must be Python source text"
                ) from None
            where = f"a revision file under {display_path(script_dir.versions)}"
            raise RevisionFileError(f"{where}: syntax error: {exc.msg}") from None
        where = f"{display_path(exc.filename)}:{exc.lineno}"
        raise RevisionFileError(f"{where}: syntax error: {exc.msg}") from None
    except CommandError as exc:
        raise RevisionFileError(_missing_attribute(version_dirs) or one_line(exc)) from None
    except CycleDetected as exc:  # a revision that names itself as its parent
        where = _loading_file(exc) or display_path(script_dir.versions)
        raise RevisionFileError(
            f"{where}: down_revision names the revision itself (a loop): {one_line(exc)}"
        ) from None
    except (Exception, SystemExit) as exc:  # sys.exit() in a module body too
        missing = _missing_attribute(version_dirs) if isinstance(exc, AttributeError) else None
        if missing is not None:
            raise RevisionFileError(missing) from None
        where = _failing_file(exc, version_dirs) or display_path(script_dir.versions)
        raise RevisionFileError(
            f"{where}: cannot import: {type(exc).__name__}: {one_line(exc)}"
        ) from None


def _missing_attribute(version_dirs: list[Path]) -> str | None:
    """Name the first revision file that assigns no ``revision`` or ``down_revision`` at
    module level (Alembic's own error names a mangled module or points to old docs)."""
    import ast

    for directory in version_dirs:
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith(("_", ".#")):
                continue
            try:
                tree = ast.parse(path.read_bytes(), str(path))
            except (OSError, SyntaxError, ValueError):
                continue
            assigned = set()
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else []
                if isinstance(node, ast.AnnAssign):
                    targets = [node.target]
                assigned |= {n.id for n in targets if isinstance(n, ast.Name)}
            for name in ("revision", "down_revision"):
                if name not in assigned:
                    example = '"1a2b3c4d5e6f"' if name == "revision" else "None"
                    return (
                        f"{display_path(path)}: no {name} at module level; every revision "
                        f"file sets revision and down_revision (e.g. {name} = {example})"
                    )
    return None


def _loading_file(exc: BaseException) -> str | None:
    """Return the revision file Alembic was loading when ``exc`` was raised, if known."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        path = (
            tb.tb_frame.f_locals.get("path") if tb.tb_frame.f_code.co_name == "_from_path" else None
        )
        if path is not None:
            found = display_path(path)
        tb = tb.tb_next
    return found


def _file_with_nul(version_dirs: list[Path]) -> str | None:
    for directory in version_dirs:
        for path in sorted(directory.rglob("*.py")):
            try:
                if b"\x00" in path.read_bytes():
                    return display_path(path)
            except OSError:
                continue
    return None


def _failing_file(exc: BaseException, version_dirs: list[Path]) -> str | None:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        if any(parent in version_dirs for parent in path.resolve().parents):
            return f"{display_path(path)}:{frame.lineno}"
    return None


class _Problem(Exception):
    """A revision file breaks the contract; the caller adds the file's path."""


def check_new_revision_id(graph: Graph, rev_id: str, parents: Iterable[str] = ()) -> None:
    """Refuse an id for a new revision that the graph or its tracker row could not hold.

    :raises RevisionFileError: the id is malformed, too long, already a revision's (the
        file is named), or one of the new revision's own ``parents``.
    """
    if not rev_id or not all(c.isascii() and (c.isalnum() or c == "_") for c in rev_id):
        raise RevisionFileError(f"--rev-id {rev_id!r}: use only letters, digits and underscores")
    if len(rev_id) > MAX_REVISION_ID:
        raise RevisionFileError(
            f"--rev-id is {len(rev_id)} characters long; the tracker holds at most "
            f"{MAX_REVISION_ID}"
        )
    if rev_id in ("head", "heads", "base", "current"):
        raise RevisionFileError(f"--rev-id {rev_id!r} is a reserved target name")
    if graph.known(rev_id):
        raise RevisionFileError(
            f"--rev-id {rev_id!r} already exists in {display_path(graph.script(rev_id).path)}"
        )
    if rev_id in parents:
        raise RevisionFileError(f"--rev-id {rev_id!r} cannot be its own parent (--head)")


def _files_of(exc: BaseException, scripts: list[Script]) -> str:
    """Return ``" (files: ...)"`` naming the files of the revisions a graph error names."""
    named = getattr(exc, "revisions", None) or [getattr(exc, "revision", None)]
    by_id = {script.revision: script for script in scripts}
    paths = [display_path(by_id[rev].path) for rev in named if rev in by_id]
    return f" (files: {', '.join(paths)})" if paths else ""


def _check_contract(scripts: list[Script]) -> list[Revision]:
    """Validate every script; return them as revisions, in the same order."""
    seen: dict[str, Script] = {}
    labels: set[str] = set()
    revisions = []
    for script in scripts:
        if len(script.revision) > MAX_REVISION_ID:
            raise RevisionFileError(
                f"{display_path(script.path)}: revision id is {len(script.revision)} "
                f"characters long; the tracker holds at most {MAX_REVISION_ID}"
            )
        if script.revision in seen:
            first = display_path(seen[script.revision].path)
            raise RevisionFileError(
                f"{display_path(script.path)}: duplicate revision id {script.revision!r} "
                f"(also in {first})"
            )
        seen[script.revision] = script
        labels.update(script.branch_labels)
        revisions.append(Revision.from_script(script))
    for script in scripts:
        try:
            _check_references(script, seen, labels)
        except _Problem as problem:
            raise RevisionFileError(f"{display_path(script.path)}: {problem}") from None
    return revisions


def _check_references(script: Script, revisions: Mapping[str, Script], labels: set[str]) -> None:
    for name, value in (
        ("down_revision", script.down_revision),
        ("depends_on", script.dependencies),
    ):
        if not _is_revision_list(value):
            raise _Problem(f"{name} must be None, a revision id or a tuple of them, not {value!r}")
    for parent in _as_tuple(script.down_revision):
        if parent == script.revision:
            raise _Problem(f"down_revision {parent!r} is the revision itself (a loop)")
        if parent not in revisions:
            raise _Problem(f"down_revision {parent!r} names no revision file")
    for dependency in _as_tuple(script.dependencies):
        if dependency not in revisions and dependency not in labels:
            raise _Problem(f"depends_on {dependency!r} names no revision or branch label")


# -- reading a revision module's attributes (only here) ------------------------------------


def _refuse_misspellings(module: ModuleType) -> None:
    """Refuse a module-level name that is a near miss of a hook or declaration the file
    lacks (``enviroments``, ``def verfy``): dm would silently ignore it, and a guard meant to
    keep a revision out of production would not hold."""
    import difflib

    known = (*HOOKS, *DECLARATIONS)
    for name, value in vars(module).items():
        if name.startswith("_") or name in known or inspect.ismodule(value):
            continue
        if inspect.isfunction(value) or inspect.isclass(value):
            if getattr(value, "__module__", None) != module.__name__:
                continue  # imported from elsewhere: not the file's own near miss
            candidates: tuple[str, ...] = HOOKS
        else:
            candidates = DECLARATIONS
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
        if close and not hasattr(module, close[0]):
            raise _Problem(
                f"{name!r} is not a name dm reads; did you mean {close[0]!r}? "
                "(rename it, or start it with '_' if it is the file's own)"
            )


def _hook(module: ModuleType, name: str) -> Hook | None:
    hook = getattr(module, name, None)
    if hook is None:
        return None
    stand_in = graph_cache.stand_in_kind(hook)
    if stand_in is not None:  # a revision built from the graph cache: the kind it recorded
        return Hook(hook, stand_in)
    expected = (
        f"{name}() must be 'async def {name}(session)', Alembic-style 'def {name}()' using "
        f"op, or 'def {name}(session)' taking a sync Session"
    )
    if not callable(hook):
        raise _Problem(f"{expected}, not {type(hook).__name__}")
    try:
        required = _required_positional(hook)
    except (TypeError, ValueError):
        raise _Problem(expected) from None
    if _is_coroutine_function(hook):
        if required > 1:
            raise _Problem(f"{expected}; it takes {required} arguments")
        return Hook(hook, "async")
    if inspect.isasyncgenfunction(hook) or inspect.isgeneratorfunction(hook):
        raise _Problem(f"{expected}, not a generator")
    if required == 0:
        return Hook(hook, "op")
    if required == 1:
        return Hook(hook, "session")
    raise _Problem(f"{expected}; it takes {required} arguments")


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """Return whether calling ``fn`` gives a coroutine: an ``async def``, or a plain
    function wrapping one with ``functools.wraps`` (an ordinary decorator)."""
    if inspect.iscoroutinefunction(fn):
        return True
    try:
        return inspect.iscoroutinefunction(inspect.unwrap(fn))
    except ValueError:  # a __wrapped__ loop
        return False


def _required_positional(fn: Callable[..., Any]) -> int:
    """Return how many positional arguments ``fn`` requires."""
    return sum(
        1
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    )


def _timeout(module: ModuleType, name: str = "timeout") -> float | None:
    timeout = getattr(module, name, None)
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise _Problem(
            f"{name} must be a number of seconds above 0 up to {MAX_TIMEOUT:.0f} (about 24 days)"
        )
    return float(timeout)


def _max_runtime(module: ModuleType, transactional: bool) -> float | None:
    max_runtime = _timeout(module, "max_runtime")
    if max_runtime is not None and transactional:
        raise _Problem(
            "max_runtime needs transactional = False: a transactional revision cannot stop "
            "midway (bound it with timeout instead)"
        )
    return max_runtime


def _blocks_deploy(module: ModuleType) -> bool:
    return _flag(module, "blocks_deploy", default=True)


def _environments(module: ModuleType) -> tuple[str, ...] | None:
    environments = getattr(module, "environments", None)
    if environments is None:
        return None
    if (
        not isinstance(environments, tuple | list)
        or not environments
        or not all(isinstance(name, str) and name.strip() for name in environments)
    ):
        raise _Problem(
            "environments must be a tuple of environment names, "
            "e.g. ('development', 'staging'), or None for every environment"
        )
    return tuple(environments)


def _revision_ids(module: ModuleType, name: str) -> tuple[str, ...]:
    value = getattr(module, name, None)
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, tuple | list) or not all(
        isinstance(rev, str) and rev.strip() == rev and rev for rev in value
    ):
        raise _Problem(
            f"{name} must be a revision id or a tuple of them, e.g. ('ae1027a6acf',), or None"
        )
    return tuple(value)


def _check_requires_complete(revisions: list[Revision]) -> None:
    """Refuse a ``requires_complete`` that names no ancestor of its revision (it would wait
    forever, or for something that runs after it)."""
    by_id = {rev.id: rev for rev in revisions}
    for rev in revisions:
        if not rev.requires_complete:
            continue
        ancestors: set[str] = set()
        todo = list(compat.all_down_revisions(rev.script))
        while todo:
            parent = todo.pop()
            if parent not in ancestors and parent in by_id:
                ancestors.add(parent)
                todo.extend(compat.all_down_revisions(by_id[parent].script))
        for required in rev.requires_complete:
            if required not in ancestors:
                raise RevisionFileError(
                    f"{display_path(rev.path)}: requires_complete {required!r} names no "
                    "ancestor of this revision (give the full id of a revision it comes after)"
                )


def _requires_schema(module: ModuleType) -> tuple[str, ...]:
    required = getattr(module, "requires_schema", None)
    if required is None:
        return ()
    if isinstance(required, str):
        required = (required,)
    if (
        not isinstance(required, tuple | list)
        or not required
        or not all(isinstance(rev, str) and rev.strip() == rev and rev for rev in required)
    ):
        raise _Problem(
            "requires_schema must be an Alembic schema revision id or a tuple of them, "
            "e.g. ('ae1027a6acf',), or None"
        )
    return tuple(required)


def _flag(module: ModuleType, name: str, *, default: bool) -> bool:
    value = getattr(module, name, default)
    if not isinstance(value, bool):
        raise _Problem(f"{name} must be True or False")
    return value


def _is_revision_list(value: object) -> bool:
    if value is None or isinstance(value, str):
        return True
    return isinstance(value, tuple | list) and all(isinstance(item, str) for item in value)


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)
