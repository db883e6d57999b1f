"""Progress of long CLI work on stderr: how much is done, time spent, time left.

On a terminal one line is rewritten in place (at most twice a second); into a log file or
a pipe a line is written every :data:`LOG_INTERVAL_S` seconds. Work that ends before the
first line is due prints nothing (its result line says it all). ``-q`` turns it off.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_INTERVAL_S = 0.5
LOG_INTERVAL_S = 10.0


def fmt_seconds(s: float) -> str:
    """``"8 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(round(s) // 60, 60)
    return f"{h} h {m:02d} min"


class Progress:
    """A ``progress(done, total)`` callback that reports on a stream.

    Args:
        label: what is being worked on (a file name, ``"training"``).
        unit: what ``done`` counts (``"tiles"``, ``"epochs"``).
        quiet: report nothing.
        stream: where to write (default stderr).
        interval: seconds between lines (default by whether ``stream`` is a terminal).
    """

    def __init__(
        self,
        label: str,
        unit: str,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float | None = None,
    ):
        self.label, self.unit, self.quiet = label, unit, quiet
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        if interval is None:
            interval = TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S
        self.interval = interval
        self.t0 = self.last = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, done) of the first report
        self.prev = 0
        self.shown = False
        self.open_line = False

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total <= 0:
            return
        now = time.perf_counter()
        if self.first is None or done < self.prev:  # first report, or a restart (a retry)
            self.first = (now, done)
        self.prev = done
        final = done >= total
        if (final and not self.shown) or (not final and now - self.last < self.interval):
            return
        self.last, self.shown = now, True
        self._write(self.line(done, total, now), final)

    def line(self, done: int, total: int, now: float) -> str:
        """``"scan.nii.gz: tiles 12/48 (25%), 31 s, about 1 min 33 s left"``.

        The rate is measured from the first report on (so that loading and setting up are
        not counted as work); until a second report, the first unit is taken to have
        lasted since the start.
        """
        text = f"{self.label}: {self.unit} {done}/{total} ({done / total:.0%}), "
        text += fmt_seconds(now - self.t0)
        t_first, d_first = self.first or (self.t0, 0)
        t_base, d_base = (t_first, d_first) if done > d_first else (self.t0, d_first - 1)
        if done < total and done > d_base:
            left = (now - t_base) / (done - d_base) * (total - done)
            text += f", about {fmt_seconds(left)} left"
        return text

    def _write(self, line: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
            self.open_line = not final
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End a line left open on a terminal (work that stopped before the end)."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False
