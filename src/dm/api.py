"""The programmatic API: the functions the CLI calls, for an application's start-up code.

::

    import dm

    await dm.upgrade("heads", config="alembic.ini")       # inside a running event loop
    dm.upgrade_sync("heads", config="alembic.ini")        # from synchronous code

Each coroutine takes the project's config file (``config``) or a ready
:class:`dm.config.settings.Settings` (``settings``); with neither, settings come from the
environment and ``./alembic.ini`` as for the CLI. Writing functions take the migration
lock and record every attempt, exactly like the CLI. They return the same result objects
(``dm.verbs.RunResult`` ...) and raise :class:`dm.DmError` subclasses instead of exiting.
No signal handler is installed: the application keeps its own.

Each coroutine has a ``*_sync`` twin. It runs the coroutine with ``asyncio.run``; called
from a thread whose event loop is running (a sync function called by async code), it runs
the coroutine in a worker thread with its own loop and blocks until it is done. In async
code prefer ``await dm.upgrade(...)``: the sync twin blocks the caller's loop meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import ParamSpec
from typing import TypeVar

if TYPE_CHECKING:
    from dm.config.settings import Settings
    from dm.engine.execution import RunResult
    from dm.verbs import CheckResult
    from dm.verbs import ControlResult
    from dm.verbs import CurrentResult
    from dm.verbs import InfoResult
    from dm.verbs import ResolveResult
    from dm.verbs import RevisionStatus
    from dm.verbs import VerifyResult

P = ParamSpec("P")
T = TypeVar("T")


def _settings(config: str | Path | None, settings: Settings | None) -> Settings:
    from dm.config.settings import Settings
    from dm.core.errors import UsageError

    if settings is not None:
        if config is not None:
            raise UsageError("pass either config= or settings=, not both")
        return settings
    return Settings.load(config_file=Path(config) if config is not None else None)


async def upgrade(
    target: str = "heads",
    *,
    config: str | Path | None = None,
    settings: Settings | None = None,
    dry_run: bool = False,
) -> RunResult:
    """Upgrade to ``target`` (default: every head), as ``dm upgrade``."""
    from dm import verbs

    return await verbs.upgrade(_settings(config, settings), target, dry_run=dry_run)


async def downgrade(
    target: str,
    *,
    config: str | Path | None = None,
    settings: Settings | None = None,
    dry_run: bool = False,
) -> RunResult:
    """Downgrade to ``target``, as ``dm downgrade``."""
    from dm import verbs

    return await verbs.downgrade(_settings(config, settings), target, dry_run=dry_run)


async def current(
    *, config: str | Path | None = None, settings: Settings | None = None
) -> CurrentResult:
    """Return the applied heads, as ``dm current``."""
    from dm import verbs

    return await verbs.current(_settings(config, settings))


async def status(
    *, config: str | Path | None = None, settings: Settings | None = None
) -> list[RevisionStatus]:
    """Return every revision's latest attempt, as ``dm status``."""
    from dm import verbs

    return await verbs.status(_settings(config, settings))


async def check(
    *,
    config: str | Path | None = None,
    settings: Settings | None = None,
    allow_modified: bool = False,
) -> CheckResult:
    """Return what is pending, failed, running, missing or modified, as ``dm check``."""
    from dm import verbs

    return await verbs.check(_settings(config, settings), allow_modified=allow_modified)


async def run(
    revision: str,
    *,
    config: str | Path | None = None,
    settings: Settings | None = None,
    force: bool = False,
    reason: str | None = None,
    dry_run: bool = False,
    ignore_environment: bool = False,
) -> RunResult:
    """Run one revision's upgrade, as ``dm run`` (the old ``script.run_script()``)."""
    from dm import verbs

    return await verbs.run(
        _settings(config, settings),
        revision,
        force=force,
        reason=reason,
        dry_run=dry_run,
        ignore_environment=ignore_environment,
    )


async def rollback(
    revision: str,
    *,
    config: str | Path | None = None,
    settings: Settings | None = None,
    dry_run: bool = False,
) -> RunResult:
    """Run one revision's downgrade, as ``dm rollback``."""
    from dm import verbs

    return await verbs.rollback(_settings(config, settings), revision, dry_run=dry_run)


async def verify(
    revisions: Sequence[str] = (),
    *,
    config: str | Path | None = None,
    settings: Settings | None = None,
) -> VerifyResult:
    """Re-run ``verify()`` of applied revisions read-only, as ``dm verify``."""
    from dm import verbs

    return await verbs.verify(_settings(config, settings), revisions)


async def resolve(
    revision: str,
    *,
    as_status: str,
    reason: str,
    config: str | Path | None = None,
    settings: Settings | None = None,
) -> ResolveResult:
    """Record that a failed revision was fixed by hand, as ``dm resolve``."""
    from dm import verbs

    return await verbs.resolve(
        _settings(config, settings), revision, as_status=as_status, reason=reason
    )


async def pause(
    revision: str,
    *,
    reason: str | None = None,
    config: str | Path | None = None,
    settings: Settings | None = None,
) -> ControlResult:
    """Ask the run working on a batched revision to stop at its next batch boundary, as
    ``dm pause``."""
    from dm import verbs

    return await verbs.pause(_settings(config, settings), revision, reason=reason)


async def resume(
    revision: str,
    *,
    dry_run: bool = False,
    config: str | Path | None = None,
    settings: Settings | None = None,
) -> RunResult:
    """Resume a batched revision stopped part-way from its checkpoint, as ``dm resume``."""
    from dm import verbs

    return await verbs.resume(_settings(config, settings), revision, dry_run=dry_run)


async def cancel(
    revision: str,
    *,
    reason: str | None = None,
    skip: bool = False,
    stuck_after: float | None = None,
    config: str | Path | None = None,
    settings: Settings | None = None,
) -> ControlResult:
    """Stop a batched revision and settle it (start over, or with ``skip`` never run it
    again), as ``dm cancel``; ``stuck_after`` as ``--stuck-after``."""
    from dm import verbs

    return await verbs.cancel(
        _settings(config, settings), revision, reason=reason, skip=skip, stuck_after=stuck_after
    )


async def info(*, config: str | Path | None = None, settings: Settings | None = None) -> InfoResult:
    """Describe the environment, database, project, tracker and lock, as ``dm info``."""
    from dm import verbs

    return await verbs.info(_settings(config, settings))


def blocking(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run the coroutine function ``fn`` to completion from synchronous code.

    Uses ``asyncio.run``, or, when this thread's event loop is already running, a worker
    thread with a loop of its own (``asyncio.run`` cannot nest).
    """

    async def call() -> T:
        return await fn(*args, **kwargs)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False
    else:
        running = True
    if not running:  # outside the except block: its errors do not chain to this one
        return asyncio.run(call())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dm") as pool:
        return pool.submit(asyncio.run, call()).result()


def _blocking_twin(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Return the blocking twin of the coroutine function ``fn``: it runs ``fn`` with
    :func:`blocking` and has ``fn``'s parameters, named ``<fn>_sync``."""

    @functools.wraps(fn)
    def twin(*args: P.args, **kwargs: P.kwargs) -> T:
        return blocking(fn, *args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"{fn.__name__}_sync"
    twin.__doc__ = f"Blocking :func:`{fn.__name__}`."
    return twin


upgrade_sync = _blocking_twin(upgrade)
downgrade_sync = _blocking_twin(downgrade)
current_sync = _blocking_twin(current)
status_sync = _blocking_twin(status)
check_sync = _blocking_twin(check)
run_sync = _blocking_twin(run)
rollback_sync = _blocking_twin(rollback)
verify_sync = _blocking_twin(verify)
resolve_sync = _blocking_twin(resolve)
pause_sync = _blocking_twin(pause)
resume_sync = _blocking_twin(resume)
cancel_sync = _blocking_twin(cancel)
info_sync = _blocking_twin(info)
