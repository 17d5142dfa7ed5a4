"""One redaction rule for every path text takes out of the process.

What dm prints, logs, stores in the tracker or raises to Alembic's command line goes
through :func:`scrub`: every URL in the text has its password and secret query values
masked (``dm.config.urls.mask_url``), and every secret dm knows of is replaced by ``***``. The
secrets are registered process-wide (:func:`register`) as soon as settings are loaded, so
a path that never saw the settings (the tracker's writer, a logger outside ``dm``) masks
them too.

The tracker keeps no row values either (:func:`for_tracker`): PostgreSQL's ``DETAIL`` and
``CONTEXT`` lines (``Key (email)=(...)``, ``Failing row contains (...)``, a ``COPY`` line)
and SQLAlchemy's ``[SQL: ...]`` and ``[parameters: ...]`` are left out of what is stored,
and masked again when stored text is printed (rows written by older versions exist).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

from dm.config.urls import MASK
from dm.config.urls import mask_urls_in

_lock = threading.Lock()
_known: list[str] = []

ROW_VALUES_REMOVED = "(row values not stored)"
_ROW_VALUE_LINES = re.compile(r"^[ \t]*(?:DETAIL|CONTEXT):.*(?:\n|\Z)", re.MULTILINE)
_SQL_BLOCK = re.compile(
    r"^\[SQL: .*?\](?=\n\[|\n\(Background on this error|\n*\Z)", re.DOTALL | re.MULTILINE
)
_PARAMETERS = re.compile(
    r"^\[(?:SQL )?parameters: .*?\](?=\n\(Background|\n*\Z)", re.DOTALL | re.MULTILINE
)


def register(secrets: Iterable[str]) -> None:
    """Mask ``secrets`` in everything scrubbed from now on in this process."""
    with _lock:
        merged = {*_known, *(s for s in secrets if s)}
        _known[:] = sorted(merged, key=len, reverse=True)


def known() -> list[str]:
    """Return the secrets registered so far, longest first."""
    return list(_known)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Return ``text`` with every URL masked and every known (or given) secret replaced."""
    extra = [s for s in secrets if s]
    ordered = sorted({*_known, *extra}, key=len, reverse=True) if extra else _known
    return mask_urls_in(text, ordered)


def for_tracker(text: str | None) -> str | None:
    """Return ``text`` as the tracker may keep it: scrubbed, without row values or
    statements (PostgreSQL's DETAIL/CONTEXT lines, SQLAlchemy's SQL and parameters)."""
    if text is None:
        return None
    text = _ROW_VALUE_LINES.sub("", text)
    text = _SQL_BLOCK.sub(f"[SQL: {ROW_VALUES_REMOVED}]", text)
    text = _PARAMETERS.sub("", text)
    return scrub(text)


def stored(text: str | None) -> str | None:
    """Return tracker text fit to print: :func:`for_tracker` again, for rows written before
    dm scrubbed what it stores."""
    return for_tracker(text)


__all__ = ["MASK", "for_tracker", "known", "register", "scrub", "stored"]
