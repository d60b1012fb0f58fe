"""Rows of an approximate index labelled by position, and the catalog key of each.

FAISS's approximate indexes cannot remove a vector in place: a removed key's
row stays, as a tombstone that searches skip, until the index is rebuilt.
"""

from __future__ import annotations

import numpy as np


class Labels:
    """Rows of an index that removes nothing in place, labelled by position, and their keys.

    A removed key's row stays as a tombstone (key -1) until the index is rebuilt.
    """

    def __init__(self, label_keys: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, dtype=np.int64)  # by label; -1 once removed; room past `rows`
        self.labels = np.zeros(0, dtype=np.int64)  # by key; -1 when absent
        self.rows = 0
        self.dead = 0
        if label_keys is not None and len(label_keys):
            self.keys = label_keys.copy()
            self.rows = len(label_keys)
            live = self.live()
            self.dead = self.rows - len(live)
            if len(live):
                self._fit_keys(int(self.keys[live].max()) + 1)
                self.labels[self.keys[live]] = live

    def live(self) -> np.ndarray:
        """The labels of rows not removed."""
        return np.flatnonzero(self.keys[: self.rows] >= 0)

    def add(self, keys: np.ndarray) -> None:
        """Label new rows for `keys` (not held), after the last row."""
        first, end = self.rows, self.rows + len(keys)
        if len(self.keys) < end:
            grown = np.full(max(2 * len(self.keys), end), -1, np.int64)
            grown[: len(self.keys)] = self.keys
            self.keys = grown
        self.keys[first:end] = keys
        self._fit_keys(int(keys.max()) + 1)
        self.labels[keys] = np.arange(first, end, dtype=np.int64)
        self.rows = end

    def remove(self, keys: np.ndarray) -> None:
        """Make tombstones of the rows of `keys` (all held)."""
        self.keys[self.labels[keys]] = -1
        self.labels[keys] = -1
        self.dead += len(keys)

    def _fit_keys(self, size: int) -> None:
        if size > len(self.labels):
            grown = np.full(max(size, 2 * len(self.labels), 1024), -1, np.int64)
            grown[: len(self.labels)] = self.labels
            self.labels = grown
