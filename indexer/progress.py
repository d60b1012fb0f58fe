"""Progress of a long run: a bar (rate, ETA) on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)


class Progress:
    """Counts units done out of a total; `mode` is "bar", "log" or "off" ("auto" picks).

    A run whose work is acknowledged later and in batches (products stored by the search
    service, after they are encoded) also counts those with `acknowledge`: its line says
    how many of the units done were acknowledged, so the count and the rate move with the
    work while the acknowledgements trail it.
    """

    def __init__(
        self,
        total: int,
        what: str,
        unit: str = "img",
        mode: str = "auto",
        every_s: float = 5.0,
        acknowledgements: bool = False,
    ):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total = total
        self.what = what
        self.unit = unit
        self.done = 0
        self.acknowledged = 0 if acknowledgements else None
        self.every_s = every_s
        self.started = time.monotonic()
        self._last_log = self.started
        self._logged: tuple = (0, self.acknowledged)  # the counts the last line showed
        self._bar: Any = None
        if mode == "bar" and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        self._log(finished=self.done >= self.total)

    def acknowledge(self, count: int) -> None:
        """`count` of the units done were acknowledged (stored) where they go."""
        self.acknowledged += count
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.acknowledged} acknowledged")
        self._log(finished=False)

    def _log(self, finished: bool) -> None:
        if self.mode != "log":
            return
        now = time.monotonic()
        if now - self._last_log >= self.every_s or finished:
            self._last_log = now
            self._logged = (self.done, self.acknowledged)
            logger.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"ETA {left:.0f} s" if left != float("inf") else "ETA ?"
        line = (
            f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, {eta})"
        )
        if self.acknowledged is not None:
            line += f", {self.acknowledged} acknowledged"
        return line

    def close(self) -> None:
        """End the display; in log mode, a last line with the final counts if the last one
        logged is behind them (the acknowledgements trail the work)."""
        if self.mode == "log" and self._logged != (self.done, self.acknowledged):
            self._log(finished=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
