"""dm's project template: the ini section, ``env.py`` and the revision template."""

from __future__ import annotations

import shutil
from pathlib import Path

from mako.template import Template

TEMPLATE_DIR = Path(__file__).parent / "dm"


def render_section(section: str) -> str:
    """Return dm's ``alembic.ini`` section named ``section``."""
    text = Template(filename=str(TEMPLATE_DIR / "alembic.ini.mako")).render(section=section)
    return str(text)


def write_script_directory(directory: Path) -> None:
    """Create ``directory`` with ``env.py``, ``script.py.mako``, ``README`` and ``versions/``."""
    (directory / "versions").mkdir(parents=True, exist_ok=True)
    for name in ("env.py", "script.py.mako", "README"):
        shutil.copyfile(TEMPLATE_DIR / name, directory / name)
