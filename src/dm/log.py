"""Logging for one dm invocation: to stderr, text or JSON lines, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from collections.abc import Iterable
from datetime import UTC
from datetime import datetime

_HANDLER_NAME = "dm"

Scrub = Callable[[str, Iterable[str]], str]
"""Return a text with the given secrets (and anything else secret) masked."""


def _replace_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Mask every registered secret (and, with ``scrub``, every URL) in a record."""

    def __init__(self, secrets: list[str], scrub: Scrub | None = None) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]
        self.scrub: Scrub = scrub or _replace_secrets

    def add(self, secrets: Iterable[str]) -> None:
        """Register more secrets, longest first (a secret may contain another)."""
        merged = {*self.secrets, *(s for s in secrets if s)}
        self.secrets = sorted(merged, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.scrub(record.getMessage(), self.secrets), None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = self.scrub(text, self.secrets)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and progress, traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        progress = getattr(record, "progress", None)
        if progress is not None:
            entry["progress"] = progress
        if record.exc_text:
            entry["traceback"] = record.exc_text
        elif record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00Z INFO  message`` lines."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def configure(
    *,
    verbose: bool = False,
    json_lines: bool = False,
    secrets: list[str] | None = None,
    scrub: Scrub | None = None,
) -> None:
    """Send dm's log records to stderr; call once per invocation (handlers are replaced).

    :param scrub: masks secrets in a text (default: replaces each of ``secrets``).
    """
    logger = logging.getLogger("dm")
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-5s %(message)s"))
    handler.addFilter(RedactingFilter(secrets or [], scrub))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask ``secrets`` in every later record of dm's handler (once settings are known)."""
    for handler in logging.getLogger("dm").handlers:
        if handler.get_name() == _HANDLER_NAME:
            for log_filter in handler.filters:
                if isinstance(log_filter, RedactingFilter):
                    log_filter.add(secrets)
