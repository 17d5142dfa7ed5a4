"""The verbs: one function per ``dm`` command, settings and arguments in, result objects out.

Nothing here prints or exits: ``dm.cli`` and ``dm.api`` call these.
"""

from __future__ import annotations

from dm.verbs.control import RESOLVABLE
from dm.verbs.control import SQLITE_REQUEST_SECONDS
from dm.verbs.control import STUCK_POLL_SECONDS
from dm.verbs.control import ControlResult
from dm.verbs.control import ResolveResult
from dm.verbs.control import cancel
from dm.verbs.control import pause
from dm.verbs.control import resolve
from dm.verbs.inspect import AttemptRecord
from dm.verbs.inspect import CheckResult
from dm.verbs.inspect import CurrentResult
from dm.verbs.inspect import InfoResult
from dm.verbs.inspect import RevisionInfo
from dm.verbs.inspect import RevisionStatus
from dm.verbs.inspect import VerifyOutcome
from dm.verbs.inspect import VerifyResult
from dm.verbs.inspect import attempts
from dm.verbs.inspect import branches
from dm.verbs.inspect import check
from dm.verbs.inspect import check_wait
from dm.verbs.inspect import current
from dm.verbs.inspect import heads
from dm.verbs.inspect import history
from dm.verbs.inspect import info
from dm.verbs.inspect import lock_state
from dm.verbs.inspect import show
from dm.verbs.inspect import status
from dm.verbs.inspect import verify
from dm.verbs.inspect import versions
from dm.verbs.project import InitResult
from dm.verbs.project import init
from dm.verbs.project import merge
from dm.verbs.project import revision
from dm.verbs.run import downgrade
from dm.verbs.run import resume
from dm.verbs.run import rollback
from dm.verbs.run import run
from dm.verbs.run import stamp
from dm.verbs.run import upgrade
from dm.verbs.run import work

__all__ = [
    "AttemptRecord",
    "CheckResult",
    "ControlResult",
    "CurrentResult",
    "InfoResult",
    "InitResult",
    "RESOLVABLE",
    "ResolveResult",
    "RevisionInfo",
    "RevisionStatus",
    "SQLITE_REQUEST_SECONDS",
    "STUCK_POLL_SECONDS",
    "VerifyOutcome",
    "VerifyResult",
    "attempts",
    "branches",
    "cancel",
    "check",
    "check_wait",
    "current",
    "downgrade",
    "heads",
    "history",
    "info",
    "init",
    "lock_state",
    "merge",
    "pause",
    "resolve",
    "resume",
    "revision",
    "rollback",
    "run",
    "show",
    "stamp",
    "status",
    "upgrade",
    "verify",
    "versions",
    "work",
]
