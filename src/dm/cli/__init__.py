"""The ``dm`` command line: a thin click layer over ``dm.verbs``.

The only package that prints, reads options or picks exit codes. Each command family's
module registers its commands on the group when imported.
"""

from __future__ import annotations

from dm.cli import control as _control_commands  # noqa: F401  (registers them)
from dm.cli import inspect as _inspect_commands  # noqa: F401  (registers them)
from dm.cli import project as _project_commands  # noqa: F401  (registers them)
from dm.cli import run as _run_commands  # noqa: F401  (registers them)
from dm.cli.app import main

__all__ = ["main"]
