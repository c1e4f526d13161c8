"""Progress on long work: a redrawn bar on a terminal, plain log lines when stderr is a file.

Under SLURM, nohup or CI the output is a file, where a redrawn bar becomes thousands of carriage
returns; there :func:`progress_bar` writes a line at most every ``interval`` seconds (and the last
one), each complete by itself: what, how far, how fast, how long still, and the latest details.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: Seconds between two progress lines in a file (MUPFAST_PROGRESS_INTERVAL overrides).
INTERVAL_S = 30.0


def progress_bar(
    total: int,
    *,
    initial: int = 0,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: TextIO | None = None,
):
    """A tqdm bar on a terminal, a :class:`LineProgress` otherwise (same calls: update, set_postfix,
    set_postfix_str, write, close, ``n``; usable as a context manager)."""
    import os

    file = file if file is not None else sys.stderr
    if disable or (hasattr(file, "isatty") and file.isatty()):
        from tqdm import tqdm

        return tqdm(
            total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=file
        )
    interval = float(os.environ.get("MUPFAST_PROGRESS_INTERVAL", INTERVAL_S))
    return LineProgress(total, initial=initial, desc=desc, unit=unit, file=file, interval=interval)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LineProgress:
    """tqdm's calls, written as one plain line per ``interval`` seconds."""

    def __init__(self, total: int, *, initial: int, desc: str, unit: str, file: TextIO, interval: float):
        self.total, self.n, self.desc, self.unit, self.file = total, initial, desc, unit, file
        self.interval, self.postfix = interval, ""
        self.t0 = self.last = time.monotonic()
        self.start_n, self.printed_n, self.closed = initial, initial, False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or self.n >= self.total:
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def refresh(self) -> None:
        pass

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._line(time.monotonic())
        self.closed = True

    def _line(self, now: float) -> None:
        self.last, self.printed_n = now, self.n
        done = self.n - self.start_n
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = f", {_duration((self.total - self.n) / rate)} left" if rate > 0 and self.n < self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        speed = f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"
        tail = f"  {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {speed}, {_duration(elapsed)} elapsed{left}{tail}",
            file=self.file,
            flush=True,
        )
