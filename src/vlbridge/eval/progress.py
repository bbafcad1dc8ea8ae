"""Progress that suits where the output goes: a tqdm bar on a terminal, a plain line every so often otherwise.

A redirected tqdm writes a carriage-return update many times a second (tens of KB per run in a log file); a
:class:`PlainProgress` instead prints ``desc: n/total unit (rate/s, ~ETA left)`` at most every ``every``
seconds, and once at the end. Both offer the subset of tqdm's interface used here: ``update``, ``reset``,
``set_postfix``, ``close`` and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["PlainProgress", "progress_bar"]

PLAIN_EVERY_S = 30.0  # seconds between plain progress lines


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """Periodic one-line progress reports for a non-terminal stream (a log file, a pipe)."""

    def __init__(
        self,
        *,
        total: int | None,
        desc: str,
        unit: str,
        enabled: bool = True,
        every: float = PLAIN_EVERY_S,
        file: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        self.total, self.desc, self.unit, self.enabled, self.every = total, desc, unit, enabled, every
        self.file = file if file is not None else sys.stderr
        self.n = initial
        self.initial = initial
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.printed = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.n - self.initial) / elapsed
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit} ({rate:.1f} {self.unit}/s"
        if self.total is not None and rate > 0 and self.n < self.total:
            text += f", ~{_duration((self.total - self.n) / rate)} left"
        text += f", {_duration(elapsed)} elapsed)"
        return text + (f" {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.last = time.monotonic()
        self.printed = True

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and time.monotonic() - self.last >= self.every:
            self._emit()

    def reset(self, total: int | None = None) -> None:
        self.total, self.n, self.initial = total, 0, 0
        self.started = self.last = time.monotonic()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.enabled and self.n > self.initial:
            self._emit()
        self.enabled = False

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_bar(
    total: int | None,
    desc: str,
    unit: str,
    enabled: bool = True,
    *,
    file: TextIO | None = None,
    initial: int = 0,
    leave: bool = False,
    every: float = PLAIN_EVERY_S,
) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`PlainProgress`.

    Args:
        total: Expected count (None: unknown; ``reset(total=...)`` can set it later).
        desc: Label of the bar / line.
        unit: What is counted.
        enabled: False shows nothing at all.
        file: The stream; stderr by default.
        initial: Count already done (a resumed run).
        leave: Keep the finished tqdm bar on screen.
        every: Seconds between plain lines.
    """
    stream = file if file is not None else sys.stderr
    if enabled and _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, initial=initial, leave=leave, dynamic_ncols=True)
    return PlainProgress(total=total, desc=desc, unit=unit, enabled=enabled, every=every, file=stream, initial=initial)
