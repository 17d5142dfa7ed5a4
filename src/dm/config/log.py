"""Logging for one dm invocation: to stderr, text or JSON lines, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import sys
from datetime import UTC
from datetime import datetime
from typing import Any

from dm.config.redaction import scrub

_HANDLER_NAME = "dm"


class RedactingFilter(logging.Filter):
    """Mask every URL and every secret registered with ``dm.config.redaction`` in a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = scrub(text)
        return True


def json_line(
    level: str, logger: str, message: str, *, created: float | None = None, **fields: Any
) -> str:
    """Return one JSON log line: ts, level, logger, message, then ``fields`` (None dropped)."""
    when = datetime.now(UTC) if created is None else datetime.fromtimestamp(created, UTC)
    entry = {
        "ts": when.isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": message,
    }
    entry.update({key: value for key, value in fields.items() if value is not None})
    return json.dumps(entry, default=str)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and progress, waiting,
    traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        return json_line(
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            created=record.created,
            progress=getattr(record, "progress", None),
            waiting=getattr(record, "waiting", None),
            traceback=record.exc_text
            or (self.formatException(record.exc_info) if record.exc_info else None),
        )


class OutputWriter(io.TextIOBase):
    """A text stream whose every line becomes a log record of ``logger`` at ``level``.

    Stands in for ``sys.stdout`` (and, with JSON logs, ``sys.stderr``) while dm runs, so
    what revision code prints reaches the log instead of dm's own output.
    """

    def __init__(self, logger: str, level: str = "info") -> None:
        super().__init__()
        self._log = logging.getLogger(logger)
        self._level = logging.getLevelName(level.upper())
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._log.log(self._level, "%s", line.rstrip("\r"))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            line, self._pending = self._pending, ""
            self._log.log(self._level, "%s", line)


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00Z INFO  message`` lines."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def format(self, record: logging.LogRecord) -> str:
        """Format the line, its control characters and bidi overrides escaped."""
        from dm.core.printable import printable

        return printable(super().format(record))


def configure(*, verbose: bool = False, json_lines: bool = False) -> None:
    """Send dm's log records to stderr; call once per invocation (handlers are replaced).

    Records are redacted by ``dm.config.redaction``'s rule, with the secrets registered
    there (the settings register theirs when they load).
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
    redacting = RedactingFilter()
    handler.addFilter(redacting)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    _redact_other_loggers(redacting)


def _redact_other_loggers(redacting: RedactingFilter) -> None:
    """Mask secrets in the records of loggers outside ``dm`` too (a revision's own, a
    library's): they reach stderr through the root logger's handlers or Python's
    last-resort handler."""
    handlers = [*logging.getLogger().handlers, logging.lastResort]
    for handler in handlers:
        if handler is None:
            continue
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(redacting)
