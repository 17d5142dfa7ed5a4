"""The revision graph: load and validate revision files, resolve targets, build plans.

Everything here is pure: no database, no event loop. Alembic owns the graph walking;
this module validates what Alembic only warns about and turns plans into ``Step``\\ s.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import traceback
import warnings
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from typing import Any

from alembic.script import Script
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from . import _alembic_compat as compat
from .errors import IrreversiblePlan
from .errors import RevisionFileError
from .errors import UnknownTarget

if TYPE_CHECKING:
    from alembic.config import Config

HOOKS = ("upgrade", "downgrade", "verify")


@dataclass(frozen=True)
class Step:
    """One revision to run in one direction."""

    script: Script
    is_upgrade: bool
    reason: str | None = None
    """Why this step runs, recorded with its attempt (e.g. ``forced: <why>``)."""

    @property
    def revision(self) -> str:
        """Return the revision id."""
        return self.script.revision

    @property
    def direction(self) -> str:
        """Return ``"upgrade"`` or ``"downgrade"``."""
        return "upgrade" if self.is_upgrade else "downgrade"

    @property
    def module(self) -> ModuleType:
        """Return the imported revision module."""
        return self.script.module

    @property
    def description(self) -> str:
        """Return the first line of the revision's docstring."""
        return describe(self.script)

    @property
    def timeout(self) -> float | None:
        """Return the revision's own ``timeout`` in seconds, if it sets one."""
        value = getattr(self.module, "timeout", None)
        return None if value is None else float(value)

    @property
    def transactional(self) -> bool:
        """Return False when the revision commits per batch (``transactional = False``)."""
        return getattr(self.module, "transactional", True) is not False

    @property
    def reversible(self) -> bool:
        """Return whether the revision defines ``downgrade()``."""
        return getattr(self.module, "downgrade", None) is not None


def describe(script: Script) -> str:
    """Return the first line of ``script``'s docstring (its description)."""
    doc = (script.module.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def checksum(script: Script) -> str:
    """Return the sha256 of the revision file, line endings normalised."""
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

    def __init__(self, script_dir: ScriptDirectory, scripts: list[Script]) -> None:
        self.script_dir = script_dir
        self.scripts = scripts
        self._by_id = {script.revision: script for script in scripts}

    @classmethod
    def from_config(cls, config: Config) -> Graph:
        """Load every revision file and check it against dm's revision contract."""
        try:
            script_dir = ScriptDirectory.from_config(config)
        except CommandError as exc:
            raise RevisionFileError(f"{config.config_file_name}: {exc}") from None
        version_dirs = [Path(p).resolve() for p in script_dir._version_locations]
        scripts = _import_scripts(script_dir, version_dirs)
        _check_contract(scripts)
        compat.use_scripts(script_dir, scripts)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                script_dir.revision_map.heads  # noqa: B018 - builds and checks the map
        except Exception as exc:  # cycles and other graph errors
            raise RevisionFileError(f"{display_path(script_dir.versions)}: {exc}") from None
        return cls(script_dir, scripts)

    @property
    def heads(self) -> tuple[str, ...]:
        """Return the head revisions of the graph."""
        return tuple(self.script_dir.get_heads())

    def known(self, revision: str) -> bool:
        """Return whether ``revision`` is the id of a revision file."""
        return revision in self._by_id

    def script(self, revision: str) -> Script:
        """Return the script with this id."""
        return self._by_id[revision]

    def resolve(self, target: str) -> tuple[Script, ...]:
        """Resolve a symbolic target, partial id or branch label to scripts."""
        try:
            found = self.script_dir.get_revisions(target)
        except CommandError as exc:
            raise UnknownTarget(_one_line(exc)) from None
        except Exception as exc:  # RevisionError and friends
            raise UnknownTarget(_one_line(exc)) from None
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
            parents.update(compat.all_down_revisions(self._by_id[rev]))
        return tuple(sorted(known - parents))

    def plan_upgrade(self, target: str, applied: Iterable[str]) -> list[Step]:
        """Return the steps that take the applied set up to ``target``."""
        heads = self.applied_heads(applied)
        try:
            alembic_steps = compat.upgrade_steps(self.script_dir, target, heads)
        except Exception as exc:
            raise UnknownTarget(f"cannot upgrade to {target!r}: {_one_line(exc)}") from None
        return [Step(step.revision, True) for step in alembic_steps]

    def plan_downgrade(
        self,
        target: str,
        applied: Iterable[str],
        *,
        never_ran: Iterable[str] = (),
        run_hooks: bool = True,
    ) -> list[Step]:
        """Return the steps that take the applied set down to ``target``.

        :param never_ran: revisions whose upgrade never ran (skipped by the environment
            guard): undoing them runs nothing, so they need no ``downgrade()``.
        :param run_hooks: False when the plan is only recorded (stamp), so irreversible
            revisions are allowed.
        :raises IrreversiblePlan: a revision on the way has no ``downgrade()``.
        """
        heads = self.applied_heads(applied)
        try:
            scripts = compat.downgrade_steps(self.script_dir, target, heads)
        except Exception as exc:
            raise UnknownTarget(f"cannot downgrade to {target!r}: {_one_line(exc)}") from None
        steps = [Step(script, False) for script in scripts]
        if run_hooks:
            exempt = set(never_ran)
            require_reversible([s for s in steps if s.revision not in exempt], target)
        return steps


def require_reversible(steps: Iterable[Step], target: str) -> None:
    """Refuse a plan whose downgrade steps include a revision without ``downgrade()``.

    :raises IrreversiblePlan: naming every such revision and its file.
    """
    irreversible = [s for s in steps if not s.is_upgrade and not s.reversible]
    if irreversible:
        names = ", ".join(f"{s.revision} ({display_path(s.script.path)})" for s in irreversible)
        raise IrreversiblePlan(
            f"cannot downgrade to {target!r}: no downgrade() in {names}; nothing was run"
        )


def _import_scripts(script_dir: ScriptDirectory, version_dirs: list[Path]) -> list[Script]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compat.load_scripts(script_dir)
    except SyntaxError as exc:
        where = display_path(exc.filename) if exc.filename else "revision file"
        raise RevisionFileError(f"{where}:{exc.lineno}: syntax error: {exc.msg}") from None
    except CommandError as exc:
        raise RevisionFileError(_one_line(exc)) from None
    except Exception as exc:
        where = _failing_file(exc, version_dirs) or display_path(script_dir.versions)
        raise RevisionFileError(
            f"{where}: cannot import: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _failing_file(exc: BaseException, version_dirs: list[Path]) -> str | None:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename)
        if any(parent in version_dirs for parent in path.resolve().parents):
            return f"{display_path(path)}:{frame.lineno}"
    return None


class _Problem(Exception):
    """A revision file breaks the contract; the caller adds the file's path."""


def _check_contract(scripts: list[Script]) -> None:
    seen: dict[str, Script] = {}
    labels: set[str] = set()
    for script in scripts:
        try:
            if script.revision in seen:
                first = display_path(seen[script.revision].path)
                raise _Problem(f"duplicate revision id {script.revision!r} (also in {first})")
            seen[script.revision] = script
            labels.update(script.branch_labels)
            _check_hooks(script.module)
            _check_attributes(script.module)
        except _Problem as problem:
            raise RevisionFileError(f"{display_path(script.path)}: {problem}") from None
    for script in scripts:
        try:
            _check_references(script, seen, labels)
        except _Problem as problem:
            raise RevisionFileError(f"{display_path(script.path)}: {problem}") from None


def _check_references(script: Script, revisions: Mapping[str, Script], labels: set[str]) -> None:
    for parent in _as_tuple(script.down_revision):
        if parent not in revisions:
            raise _Problem(f"down_revision {parent!r} names no revision file")
    for dependency in _as_tuple(script.dependencies):
        if dependency not in revisions and dependency not in labels:
            raise _Problem(f"depends_on {dependency!r} names no revision or branch label")


def _check_hooks(module: ModuleType) -> None:
    if not hasattr(module, "upgrade"):
        raise _Problem("missing 'async def upgrade(session)'")
    for name in HOOKS:
        hook = getattr(module, name, None)
        if hook is not None and not inspect.iscoroutinefunction(hook):
            raise _Problem(f"{name}() must be a coroutine function: 'async def {name}(session)'")


def _check_attributes(module: ModuleType) -> None:
    timeout = getattr(module, "timeout", None)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise _Problem("timeout must be a positive number of seconds")
    environments = getattr(module, "environments", None)
    if environments is not None and (
        not isinstance(environments, tuple | list)
        or not environments
        or not all(isinstance(name, str) and name.strip() for name in environments)
    ):
        raise _Problem(
            "environments must be a tuple of environment names, "
            "e.g. ('development', 'staging'), or None for every environment"
        )
    transactional = getattr(module, "transactional", True)
    if not isinstance(transactional, bool):
        raise _Problem("transactional must be True or False")


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
