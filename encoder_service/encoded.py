"""Encoded: the vectors of a run of items as one matrix, and the items that failed, by position.

It is what an inference batch returns and what a caller's request gets back:
the batcher hands out slices of a batch's Encoded and joins the slices of a
request that spanned several batches, so no vector is ever handled alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Encoded:
    # (n, D) float32 unit rows; the row of a failed item is zeros (or whatever the
    # batch left there: only `errors` says which rows to ignore).
    vectors: np.ndarray
    # position -> the VpmError (or other exception) of that item
    errors: dict[int, BaseException] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows: slice) -> Encoded:
        start, stop, _ = rows.indices(len(self.vectors))
        errors = {i - start: e for i, e in self.errors.items() if start <= i < stop}
        return Encoded(self.vectors[start:stop], errors)

    @staticmethod
    def join(parts: Sequence[Encoded]) -> Encoded:
        """The parts one after the other (one part: itself, no copy)."""
        if len(parts) == 1:
            return parts[0]
        errors: dict[int, BaseException] = {}
        offset = 0
        for part in parts:
            errors.update({offset + i: e for i, e in part.errors.items()})
            offset += len(part)
        return Encoded(np.concatenate([part.vectors for part in parts]), errors)

    def spread(
        self, count: int, positions: Sequence[int], errors: dict[int, BaseException]
    ) -> Encoded:
        """These rows placed at `positions` among `count` items, the others failing with
        `errors` (position -> error): the outcome of a request some items of which never
        reached inference."""
        if not errors:
            return self
        vectors = np.zeros((count, self.vectors.shape[1]), dtype=np.float32)
        index = np.asarray(positions, dtype=np.int64)
        if len(index):
            vectors[index] = self.vectors
        merged = {positions[i]: e for i, e in self.errors.items()}
        merged.update(errors)
        return Encoded(vectors, merged)

    def error_or_vector(self, row: int) -> np.ndarray | BaseException:
        """One item's outcome: its vector, or its error."""
        error = self.errors.get(row)
        return error if error is not None else self.vectors[row]


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32 (a zero row stays zero)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.float32(1e-12))
