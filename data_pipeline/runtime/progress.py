"""How every pipeline stage reports progress: documents (or bytes) done, rate and time left.

On a terminal it is a tqdm bar; in a log (stderr not a terminal: Slurm, a file, a pipe) it is a
plain line every `interval_s` seconds and one at the end, with no carriage returns, so a log
read later says how far a task got and how fast. A stage uses it like tqdm:

    with Progress("clean", total=n_docs, unit="doc") as p:
        for doc in docs:
            ...
            p.update(1)

`unit="B"` counts bytes and shows them scaled (KiB, MiB, ...). `total=None` (not known
up front) shows what is done and the rate, without a percentage or ETA.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from data_pipeline.config_limits import OneOf

# auto: a bar on a terminal, plain lines in a log (Slurm, a file).
MODES = OneOf(("auto", "bar", "lines"))
LOG_INTERVAL_S = 30.0  # between plain lines: a line a minute or two is what a log reader wants
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_count(n: float, unit: str) -> str:
    """`12,345 docs`, or bytes scaled to a binary unit: `1.50 GiB`."""
    if unit == "B":
        i = 0
        while abs(n) >= 1024 and i < len(_BYTE_UNITS) - 1:
            n /= 1024
            i += 1
        return f"{n:.0f} B" if i == 0 else f"{n:.2f} {_BYTE_UNITS[i]}"
    return f"{n:,.0f} {unit}s"


def format_duration(seconds: float) -> str:
    """`0:01:10`, `2d 3:04:05`."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{h}:{m:02d}:{s:02d}"


class Progress:
    """A bar on a terminal, plain lines in a log (`mode`: auto | bar | lines); `enabled=False`
    shows nothing (a stage's `progress=false`)."""

    def __init__(
        self,
        desc: str,
        total: float | None = None,
        unit: str = "doc",
        *,
        enabled: bool = True,
        mode: str = "auto",
        stream: TextIO | None = None,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not MODES.allows(mode):
            raise ValueError(f"progress mode must be {MODES.describe()}, got {mode!r}")
        self.desc, self.total, self.unit = desc, total, unit
        self.n = 0.0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self._clock = clock
        self._t0 = self._last_line = clock()
        self._closed = False
        if mode == "auto":
            tty = getattr(self.stream, "isatty", None)
            mode = "bar" if tty is not None and tty() else "lines"
        self.mode = mode
        self._bar = None
        if enabled and mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                desc=desc,
                total=total,
                unit=unit,
                unit_scale=unit == "B",
                unit_divisor=1024 if unit == "B" else 1000,
                file=self.stream,
                dynamic_ncols=True,
            )

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.mode == "lines":
            now = self._clock()
            if now - self._last_line >= self.interval_s:
                self._last_line = now
                self._print(self.line(now))

    def line(self, now: float | None = None) -> str:
        """The plain line for the current count: done (of total, %), rate, time left."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = self.n / elapsed
        done = format_count(self.n, self.unit)
        if self.total:
            if self.unit == "B":
                done += f" of {format_count(self.total, self.unit)}"
            else:
                done = f"{self.n:,.0f}/{format_count(self.total, self.unit)}"
            done += f" ({100 * self.n / self.total:.1f}%)"
        parts = [f"{self.desc}: {done}"]
        parts.append(f"{format_count(rate, self.unit)}/s")
        if self.total:
            left = (self.total - self.n) / rate if rate > 0 else None
            parts.append("ETA " + (format_duration(left) if left is not None else "?"))
        parts.append(f"elapsed {format_duration(elapsed)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.mode == "lines":
            now = self._clock()
            elapsed = max(now - self._t0, 1e-9)
            self._print(
                f"{self.desc}: done, {format_count(self.n, self.unit)} in "
                f"{format_duration(elapsed)} ({format_count(self.n / elapsed, self.unit)}/s)"
            )

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
