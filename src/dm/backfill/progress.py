"""Progress of a long loop: a bar on a terminal, otherwise a log line every few seconds.

The CLI chooses the style once per invocation (``use_bar``): a bar redrawn in place on
stderr when stderr is a terminal and logs are text, log lines otherwise (log aggregators
get one JSON object per line, with the figures in a ``progress`` field). The programmatic
API keeps the default, log lines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any
from typing import TextIO

log = logging.getLogger("dm.progress")

LOG_INTERVAL = 5.0
"""Seconds between two progress log lines."""

_BAR_INTERVAL = 0.2
_BAR_WIDTH = 24
_MIN_BAR_WIDTH = 8
_DEFAULT_COLUMNS = 80
_CLEAR_TO_END = "\x1b[K"

_style = {"bar": False}


def use_bar(enabled: bool) -> None:
    """Draw a progress bar on stderr (True) or log progress lines (False, the default)."""
    _style["bar"] = enabled


@dataclass(frozen=True)
class Figures:
    """Where a loop stands: rows done, the total if known, rate, time left, batch size."""

    done: int
    total: int | None
    rate: float
    eta: float | None
    batch_size: int | None = None
    worker_rates: tuple[float, ...] = ()
    """Rows/s of each worker of a parallel loop (``workers=N``); empty for one worker."""

    def as_dict(self) -> dict[str, Any]:
        """Return the figures as JSON-ready values (rate in rows/s, eta in seconds)."""
        figures: dict[str, Any] = {
            "rows_done": self.done,
            "rows_total": self.total,
            "rows_per_second": round(self.rate, 1),
            "eta_seconds": None if self.eta is None else round(self.eta, 1),
            "batch_size": self.batch_size,
        }
        if self.worker_rates:
            figures["worker_rows_per_second"] = [round(rate, 1) for rate in self.worker_rates]
        return figures


class Progress:
    """Report the progress of one loop labelled ``label`` (e.g. ``upgrade a1b2c3d4e5f6``)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        done: int = 0,
        batch_size: int | None = None,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.done = done
        self.batch_size = batch_size
        self._start_done = done
        self._stream = stream if stream is not None else sys.stderr
        self._bar = _style["bar"] if bar is None else bar
        self._started = time.monotonic()
        self._last_report = self._started
        self._drawn = False
        self._by_worker: dict[int, int] = {}

    def figures(self) -> Figures:
        """Return the current figures; the rate counts only this run's rows."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - self.done, 0) / rate
        workers: tuple[float, ...] = ()
        if len(self._by_worker) > 1:
            workers = tuple(self._by_worker[w] / elapsed for w in sorted(self._by_worker))
        return Figures(self.done, self.total, rate, eta, self.batch_size, workers)

    def advance(self, rows: int, *, batch_size: int | None = None, worker: int = 0) -> None:
        """Count ``rows`` more rows done by ``worker`` (the next batch's size:
        ``batch_size``); report if the interval has passed."""
        self._by_worker[worker] = self._by_worker.get(worker, 0) + rows
        self.done += rows
        if batch_size is not None:
            self.batch_size = batch_size
        now = time.monotonic()
        interval = _BAR_INTERVAL if self._bar else LOG_INTERVAL
        if now - self._last_report >= interval:
            self._last_report = now
            self._report()

    def finish(self) -> None:
        """Report the final figures (and end the bar's line)."""
        self._report(final=True)

    def close(self) -> None:
        """End a bar left mid-line (the loop stopped early), so later lines start clean."""
        if self._bar and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False

    def _report(self, final: bool = False) -> None:
        figures = self.figures()
        if self._bar:
            self._draw(figures, final)
            return
        if final and self.done == self._start_done and not self._drawn:
            return  # nothing happened worth a line
        self._drawn = True
        log.info(
            "%s: %s",
            self.label,
            describe(figures, final=final),
            extra={"progress": figures.as_dict()},
        )

    def _draw(self, figures: Figures, final: bool) -> None:
        line = bar_line(self.label, figures, final, _columns(self._stream))
        # Back to the start of the line, draw, and clear what a longer earlier line left.
        self._stream.write(f"\r{line}{_CLEAR_TO_END}" + ("\n" if final else ""))
        self._stream.flush()
        self._drawn = not final


def bar_line(label: str, figures: Figures, final: bool, columns: int) -> str:
    """Return the bar's line, at most ``columns - 1`` characters (the cursor stays on it).

    The bar shrinks (down to ``_MIN_BAR_WIDTH``, then goes), then the batch size goes,
    before the figures are cut; the label is shortened last.
    """
    text = describe(figures, final=final)
    room = max(columns - 1, 1)
    if len(label) + len(text) + 2 > room:  # ": "
        text = describe(dataclasses.replace(figures, batch_size=None), final=final)
    width = min(_BAR_WIDTH, room - len(label) - len(text) - 5)  # ": " + "[" + "] "
    bar = ""
    if figures.total and width >= _MIN_BAR_WIDTH:
        filled = min(int(width * figures.done / figures.total), width)
        bar = "[" + "#" * filled + "." * (width - filled) + "] "
    line = f"{label}: {bar}{text}"
    if len(line) > room:
        keep = max(room - len(text) - 3, 0)  # "…: "
        line = f"{label[:keep]}\u2026: {text}" if keep else text
    return line[:room]


def _columns(stream: TextIO) -> int:
    """Return the width of the terminal ``stream`` writes to (80 when it cannot be known)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return _DEFAULT_COLUMNS
    return columns or _DEFAULT_COLUMNS


def describe(figures: Figures, *, final: bool = False) -> str:
    """``450,000/1,000,000 rows (45%), 12,345 rows/s, batch 10,000, ETA 0:00:45``."""
    text = f"{figures.done:,}"
    if figures.total is not None:
        share = figures.done / figures.total * 100 if figures.total else 100.0
        text += f"/{figures.total:,} rows ({share:.0f}%)"
    else:
        text += " rows"
    text += f", {figures.rate:,.0f} rows/s"
    if figures.worker_rates:
        text += " (" + " + ".join(f"{rate:,.0f}" for rate in figures.worker_rates) + ")"
    if final:
        return text + ", done"
    if figures.batch_size is not None:
        text += f", batch {figures.batch_size:,}"
    if figures.eta is not None:
        return text + f", ETA {clock(figures.eta)}"
    return text


def clock(seconds: float) -> str:
    """``0:01:05`` for 65 seconds."""
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
