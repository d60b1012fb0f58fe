"""Progress of a long run: a bar (rate, ETA) on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


class Progress:
    """Counts units done out of a total; `mode` is "bar", "log" or "off" ("auto" picks)."""

    def __init__(
        self, total: int, what: str, unit: str = "img", mode: str = "auto", every_s: float = 5.0
    ):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.what = what
        self.unit = unit
        self.done = 0
        self.every_s = every_s
        self.started = time.monotonic()
        self._last_log = self.started
        self._bar: Any = None
        if mode == "bar" and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last_log >= self.every_s or self.done >= self.total:
                self._last_log = now
                logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"ETA {left:.0f} s" if left != float("inf") else "ETA ?"
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, {eta})"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
