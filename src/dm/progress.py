"""Progress of a long loop: a bar on a terminal, otherwise a log line every few seconds.

The CLI chooses the style once per invocation (``use_bar``): a bar redrawn in place on
stderr when stderr is a terminal and logs are text, log lines otherwise (log aggregators
get one JSON object per line, with the figures in a ``progress`` field). The programmatic
API keeps the default, log lines.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger("dm.progress")

LOG_INTERVAL = 5.0
"""Seconds between two progress log lines."""

_BAR_INTERVAL = 0.2
_BAR_WIDTH = 24

_style = {"bar": False}


def use_bar(enabled: bool) -> None:
    """Draw a progress bar on stderr (True) or log progress lines (False, the default)."""
    _style["bar"] = enabled


@dataclass(frozen=True)
class Figures:
    """Where a loop stands: rows done, the total if known, rate and time left."""

    done: int
    total: int | None
    rate: float
    eta: float | None

    def as_dict(self) -> dict[str, int | float | None]:
        """Return the figures as JSON-ready values (rate in rows/s, eta in seconds)."""
        return {
            "rows_done": self.done,
            "rows_total": self.total,
            "rows_per_second": round(self.rate, 1),
            "eta_seconds": None if self.eta is None else round(self.eta, 1),
        }


class Progress:
    """Report the progress of one loop labelled ``label`` (e.g. ``upgrade a1b2c3d4e5f6``)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        done: int = 0,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.done = done
        self._start_done = done
        self._stream = stream if stream is not None else sys.stderr
        self._bar = _style["bar"] if bar is None else bar
        self._started = time.monotonic()
        self._last_report = self._started
        self._drawn = False

    def figures(self) -> Figures:
        """Return the current figures; the rate counts only this run's rows."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - self.done, 0) / rate
        return Figures(self.done, self.total, rate, eta)

    def advance(self, rows: int) -> None:
        """Count ``rows`` more rows done; report if the interval has passed."""
        self.done += rows
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
        if figures.total:
            filled = min(int(_BAR_WIDTH * figures.done / figures.total), _BAR_WIDTH)
            bar = "[" + "#" * filled + "." * (_BAR_WIDTH - filled) + "] "
        else:
            bar = ""
        line = f"\r{self.label}: {bar}{describe(figures, final=final)}"
        self._stream.write(line.ljust(80) + ("\n" if final else ""))
        self._stream.flush()
        self._drawn = not final


def describe(figures: Figures, *, final: bool = False) -> str:
    """``450,000/1,000,000 rows (45%), 12,345 rows/s, ETA 0:00:45``."""
    text = f"{figures.done:,}"
    if figures.total is not None:
        share = figures.done / figures.total * 100 if figures.total else 100.0
        text += f"/{figures.total:,} rows ({share:.0f}%)"
    else:
        text += " rows"
    text += f", {figures.rate:,.0f} rows/s"
    if final:
        return text + ", done"
    if figures.eta is not None:
        return text + f", ETA {_clock(figures.eta)}"
    return text


def _clock(seconds: float) -> str:
    whole = int(seconds + 0.5)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
