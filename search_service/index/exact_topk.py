"""Exact top k from a fast first pass whose scores are off by at most a known error.

A first pass (the float16 copy on the CPU, the index's replica on a GPU) ranks
the vectors by approximate score; its best candidates are rescored exactly from
the float32 vectors, and the candidate list is widened until the error bound
proves that no vector left out could enter the top k.

A first pass that cannot filter (FAISS GPU indexes take no ID selector) is
oversampled instead: asked for as many more candidates as the filter is
selective, those failing the filter dropped here. When that would take more
candidates than the first pass can return in one call, the filtered subset is
scored exactly instead, so a filtered query still returns its exact k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# fetch -> the first pass's best `fetch` rows as (approximate scores, keys), best first;
# fewer only when it holds fewer rows; key -1 for a row that is no result (a removed vector).
Scan = Callable[[int], tuple[np.ndarray, np.ndarray]]
# (keys, k) -> the exact best k of `keys` as (keys, scores), best first.
Score = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class FirstPass:
    """An approximate ranking of `rows` rows and what it can do."""

    scan: Scan
    rows: int  # rows it ranks: removed vectors (key -1) count, filtered-out ones do not
    error: float  # the most an approximate score differs from the exact one
    limit: int | None = None  # the most rows one scan returns (None: no limit)
    filters: bool = True  # it ranks only the allowed rows (a selector); else they are mixed in


def first_fetch(k: int, passing: int, rows: int) -> int:
    """Rows to ask for first: k and a margin, scaled up by how few of the rows pass.

    With a filter independent of similarity, the best `fetch` rows hold about
    fetch * passing / rows passing ones; twice k leaves room for the chance and
    for the error bound to prove the top k.
    """
    want = max(2 * k, k + 64)
    if 0 < passing < rows:
        want = math.ceil(want * rows / passing)
    return min(rows, want)


def exact_top_k(
    first: FirstPass,
    score: Score,
    k: int,
    passing: int,
    passes: np.ndarray | None = None,
    subset: Callable[[], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact best `k` (keys, scores) among the `passing` rows that are results.

    `passes`: for a first pass that does not filter, a bool array by key of the
    allowed keys (None: every key held is allowed). `subset()`: the keys to score
    exactly when the first pass cannot go deep enough (the allowed keys, or all).
    """
    k = min(k, passing)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    fetch = first_fetch(k, passing, first.rows)
    while True:
        if first.limit is not None and fetch > first.limit:
            if subset is None:
                raise ValueError("a first pass with a limit needs a subset to fall back on")
            return score(subset(), k)
        scores, keys = first.scan(fetch)
        wanted = keys >= 0
        if passes is not None:
            wanted &= passes[np.where(wanted, keys, 0)]
        candidates, candidate_scores = keys[wanted], scores[wanted]
        # Every row left out scores at most scores[-1] + error exactly; the k candidates
        # ahead score at least candidate_scores[k - 1] - error.
        if (
            len(keys) < fetch
            or fetch >= first.rows
            or (len(candidates) >= k and scores[-1] < candidate_scores[k - 1] - 2 * first.error)
        ):
            # By key: equal scores then rank the same whichever device ranked them first.
            return score(np.sort(candidates), k)
        wider = min(first.rows, fetch * 4)
        if first.limit is not None and fetch < first.limit < wider:
            wider = first.limit  # its deepest scan first, before the exact scan of the subset
        fetch = wider
