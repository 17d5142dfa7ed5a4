"""dm: data migrations and maintenance scripts, run the way Alembic runs schema revisions.

The programmatic API (``dm.api``): ``upgrade``, ``downgrade``, ``current``, ``status``,
``check``, ``run``, ``rollback``, ``resolve``, ``verify``, ``info``, ``pause``, ``resume`` and
``cancel`` are coroutines; each has a blocking ``*_sync`` twin. See ``dm.api`` for the details.
"""

from __future__ import annotations

import typing as _typing

from dm.core.errors import DmError
from dm.core.version import __version__

if _typing.TYPE_CHECKING:
    from dm.api import cancel
    from dm.api import cancel_sync
    from dm.api import check
    from dm.api import check_sync
    from dm.api import current
    from dm.api import current_sync
    from dm.api import downgrade
    from dm.api import downgrade_sync
    from dm.api import info
    from dm.api import info_sync
    from dm.api import pause
    from dm.api import pause_sync
    from dm.api import resolve
    from dm.api import resolve_sync
    from dm.api import resume
    from dm.api import resume_sync
    from dm.api import rollback
    from dm.api import rollback_sync
    from dm.api import run
    from dm.api import run_sync
    from dm.api import status
    from dm.api import status_sync
    from dm.api import upgrade
    from dm.api import upgrade_sync
    from dm.api import verify
    from dm.api import verify_sync
    from dm.backfill.batching import batched
    from dm.engine.hooks import autocommit
    from dm.engine.hooks import execute_script


__all__ = [
    "DmError",
    "__version__",
    "autocommit",
    "batched",
    "cancel",
    "cancel_sync",
    "check",
    "check_sync",
    "current",
    "current_sync",
    "downgrade",
    "downgrade_sync",
    "execute_script",
    "info",
    "info_sync",
    "pause",
    "pause_sync",
    "resolve",
    "resolve_sync",
    "resume",
    "resume_sync",
    "rollback",
    "rollback_sync",
    "run",
    "run_sync",
    "status",
    "status_sync",
    "upgrade",
    "upgrade_sync",
    "verify",
    "verify_sync",
]


def __getattr__(name: str) -> _typing.Any:
    """Import the programmatic API on first use, so ``import dm`` stays light."""
    if name == "batched":
        from dm.backfill.batching import batched

        return batched
    if name in ("autocommit", "execute_script"):
        from dm.engine import hooks

        return getattr(hooks, name)
    if name in __all__ and name not in ("DmError", "__version__"):
        from dm import api

        return getattr(api, name)
    raise AttributeError(f"module 'dm' has no attribute {name!r}")
