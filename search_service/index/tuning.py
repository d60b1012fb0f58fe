"""The recall of an approximate index, measured on the catalog's own vectors, and the search
parameter chosen from it (--target-recall).

Recall@k: a sample of catalog vectors serve as queries; each one's exact k
nearest other vectors are found by brute force over the catalog, page by page,
and recall is the share of them the index returns in its own k. The query
itself is left out of both lists: the index would find it for free. The
index's search parameter (efSearch, nprobe) is tried from small to large, and
the smallest that reaches the target is put in force; when none does, the one
with the best recall is, and a warning says so.

Filtered searches are measured at a few selectivities through the path they
take (the index with a selector, an exact scan when it finds fewer than k) and
against an exact scan of the allowed keys; filters as narrow as the widest
level where the index missed the target, or cost more than the scan, are
scanned exactly from then on (VectorIndex.exact_filter_limit).

It runs off the request path (see upkeep), on one core, and holds the mirror's
read lock for a chunk of queries at a time, so a write (and the searches queued
behind it) waits for one chunk at most. It measures again once the index was
rebuilt or has changed by RETUNE_SHARE of its size.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import faiss
import numpy as np

from search_service.index.mirror import CatalogMirror
from search_service.index.vector_index import FLAT, VectorIndex
from search_service.metrics import INDEX_TUNING
from search_service.models import FilterRecall, IndexTuning

logger = logging.getLogger(__name__)

K = 10
# Queries per measurement: 10 neighbours each, enough for recall@10 to two decimals.
SAMPLE_SIZE = 1000
# Of them, the queries per filter level, and those that time the exact scan (the slow side).
FILTER_QUERIES = 200
EXACT_TIMING_QUERIES = 20
# Filter levels: the share of the catalog a random filter lets pass.
SELECTIVITIES = (0.5, 0.1, 0.01, 0.001)
# Measured again once puts and removals since the last measurement reach this share of
# the index's size then: a catalog grown or changed by a tenth.
RETUNE_SHARE = 0.10
# Below this many vectors a recall figure says little: nothing is measured.
MIN_VECTORS = 100
# Queries searched per hold of the mirror's read lock.
CHUNK = 32

# (keys, vectors) pages of the catalog; vectors as rows.
Pages = Iterable[tuple[np.ndarray, np.ndarray]]
# Holds whatever keeps the index still while a chunk is searched (the mirror's read lock).
Reading = Callable[[], AbstractContextManager]


def exact_neighbours(
    queries: np.ndarray,
    query_keys: np.ndarray,
    pages: Pages,
    k: int,
    masks: list[np.ndarray | None],
) -> list[np.ndarray]:
    """For each mask (bool by key; None: every key), each query's k nearest keys among the
    masked keys of `pages` by exact inner product, best first, its own key left out;
    -1 past the last when fewer pass. One pass over the pages for all masks."""
    n = len(queries)
    best = [(np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)) for _ in masks]
    for keys, vectors in pages:
        keys = np.asarray(keys, np.int64)
        scores = queries @ np.asarray(vectors, np.float32).T
        scores[query_keys[:, None] == keys[None, :]] = -np.inf  # leave-one-out
        for number, mask in enumerate(masks):
            if mask is None:
                columns = np.arange(len(keys))
            else:
                inside = keys < len(mask)
                columns = np.flatnonzero(inside & mask[np.where(inside, keys, 0)])
            best[number] = _merge(*best[number], scores[:, columns], keys[columns], k)
    return [np.where(np.isfinite(scores), keys, -1) for scores, keys in best]


def _merge(
    scores: np.ndarray, keys: np.ndarray, more: np.ndarray, more_keys: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of (scores, keys) and (more, more_keys) per row, best first."""
    if more.shape[1] == 0:
        return scores, keys
    both = np.concatenate([scores, more], axis=1)
    both_keys = np.concatenate([keys, np.broadcast_to(more_keys, more.shape)], axis=1)
    top = np.argpartition(-both, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(both, top, 1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, 1), np.take_along_axis(
        np.take_along_axis(both_keys, top, 1), order, 1
    )


def without_self(found: np.ndarray, query_keys: np.ndarray, k: int) -> np.ndarray:
    """Each row of `found` (keys, -1 for none) without its query's own key, cut to k."""
    keep = (found != query_keys[:, None]) & (found >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(found, order, 1), -1)


def recall_of(found: np.ndarray, truth: np.ndarray) -> float:
    """The share of the true neighbours (`truth`, -1 for none) that `found` holds, over all
    queries; 1.0 when there was nothing to find."""
    wanted = truth >= 0
    hits = (truth[:, :, None] == found[:, None, :]).any(axis=2) & wanted
    total = int(wanted.sum())
    return float(hits.sum() / total) if total else 1.0


def recall_at(
    index: VectorIndex,
    queries: np.ndarray,
    query_keys: np.ndarray,
    truth: np.ndarray,
    value: int | None,
    reading: Reading = nullcontext,
    k: int = K,
) -> float:
    """Recall@k of `index` at `value` of its search parameter (None: the one in force)."""
    found = []
    for start in range(0, len(queries), CHUNK):
        with reading():
            found.append(index.approximate_many(queries[start : start + CHUNK], k + 1, value))
    return recall_of(without_self(np.concatenate(found), query_keys, k), truth)


def measure_recall(
    index: VectorIndex,
    vectors: np.ndarray,
    keys: np.ndarray,
    query_keys: np.ndarray,
    value: int | None = None,
    k: int = K,
) -> float:
    """Recall@k of `index` at `value`, the catalog being `vectors` (rows keyed by `keys`)
    and the vectors of `query_keys` the queries, each left out of its own results."""
    rows = {key: row for row, key in enumerate(np.asarray(keys).tolist())}
    queries = vectors[[rows[key] for key in np.asarray(query_keys).tolist()]]
    truth = exact_neighbours(queries, query_keys, [(keys, vectors)], k, [None])[0]
    return recall_at(index, queries, np.asarray(query_keys, np.int64), truth, value, k=k)


@dataclass(frozen=True)
class Choice:
    """The value chosen, its recall, whether it reached the target, and each value tried."""

    value: int | None
    recall: float
    reached: bool
    tried: tuple[tuple[int | None, float], ...]


def choose_value(
    index: VectorIndex,
    queries: np.ndarray,
    query_keys: np.ndarray,
    truth: np.ndarray,
    target: float,
    reading: Reading = nullcontext,
    k: int = K,
) -> Choice:
    """The smallest value of the index's search parameter whose recall@k reaches `target`;
    when none does, the smallest with the best recall."""
    tried = []
    for value in index.search_values or (None,):
        recall = recall_at(index, queries, query_keys, truth, value, reading, k)
        tried.append((value, recall))
        if recall >= target:
            return Choice(value, recall, True, tuple(tried))
    value, recall = max(tried, key=lambda item: item[1])  # the first of equals: the smallest
    return Choice(value, recall, False, tuple(tried))


def measure_filter(
    index: VectorIndex,
    queries: np.ndarray,
    query_keys: np.ndarray,
    allowed: np.ndarray,
    truth: np.ndarray,
    reading: Reading = nullcontext,
    k: int = K,
) -> tuple[float, float, float]:
    """Recall@k of filtered searches through the index for the `allowed` keys, and the
    median milliseconds per query of that path and of the exact scan of `allowed`."""
    found = np.full((len(queries), k), -1, np.int64)
    index_s, scan_s = [], []
    for start in range(0, len(queries), CHUNK):
        with reading():
            for row in range(start, min(start + CHUNK, len(queries))):
                started = time.perf_counter()
                keys, _ = index.approximate(queries[row], k + 1, allowed)
                index_s.append(time.perf_counter() - started)
                found[row] = without_self(_padded(keys, k + 1), query_keys[row : row + 1], k)
    for start in range(0, min(EXACT_TIMING_QUERIES, len(queries)), CHUNK):
        with reading():
            for row in range(start, min(start + CHUNK, EXACT_TIMING_QUERIES, len(queries))):
                started = time.perf_counter()
                index.score(queries[row], allowed, k + 1)
                scan_s.append(time.perf_counter() - started)
    return recall_of(found, truth), 1e3 * float(np.median(index_s)), 1e3 * float(np.median(scan_s))


def _padded(keys: np.ndarray, width: int) -> np.ndarray:
    row = np.full((1, width), -1, np.int64)
    row[0, : len(keys)] = keys[:width]
    return row


def exact_filter_limit(levels: Iterable[FilterRecall]) -> int:
    """The widest filtered set to scan exactly: that of the least selective level where the
    scan was chosen (0: none was)."""
    return max((level.allowed for level in levels if level.exact), default=0)


@contextmanager
def _one_core() -> Iterator[None]:
    """FAISS calls from this thread use one OpenMP thread: the other cores serve searches."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class IndexTuner:
    """Holds a mirror's approximate index to `target` recall@k: measures it when due, puts
    the chosen search parameter and exact filter limit in force, and reports them."""

    def __init__(
        self, mirror: CatalogMirror, target: float, sample_size: int = SAMPLE_SIZE, seed: int = 0
    ) -> None:
        self.mirror = mirror
        self.target = target
        self.sample_size = sample_size
        self._rng = np.random.default_rng(seed)
        status = "off" if target <= 0 else "exact" if mirror.factory == FLAT else "pending"
        self.tuning = IndexTuning(status=status, target_recall=target, k=K)
        self._measured: weakref.ref | None = None  # the index last measured
        self._changes_then = 0  # its `changes` when measured
        self._size_then = 0
        self._running = threading.Lock()
        self._stopping = threading.Event()

    @property
    def enabled(self) -> bool:
        return self.target > 0 and self.mirror.factory != FLAT

    def due(self) -> bool:
        """A target, an approximate index ready to search, and it is new or changed enough."""
        if not self.enabled:
            return False
        with self.mirror.lock.read():
            index = self.mirror.index
            if index is None or index.exact or not index.is_trained or len(index) < MIN_VECTORS:
                return False
            if self._measured is None or self._measured() is not index:
                return True
            return index.changes - self._changes_then >= RETUNE_SHARE * max(self._size_then, 1)

    def stop(self) -> None:
        """End a measurement under way at its next chunk (the process is stopping)."""
        self._stopping.set()

    def tune_if_due(self) -> IndexTuning | None:
        """Measure and apply when `due` (None: it was not)."""
        if not self.due():
            return None
        return self.tune()

    def tune(self) -> IndexTuning:
        """Measure the index now, put what it chose in force, and report it."""
        try:
            return self._tune()
        except _Stopped:
            logger.info("recall measurement abandoned: the service is stopping")
            return self.tuning

    def _tune(self) -> IndexTuning:
        mirror = self.mirror
        with self._running, _one_core():
            started = time.monotonic()
            with mirror.lock.read():
                index, version = mirror.index, mirror.version
                if index is None or index.exact or not index.is_trained or len(index) <= K:
                    return self.tuning
                keys, changes = index.keys(), index.changes
            self._carry_over(index)
            queries, query_keys = self._queries(keys)
            levels = [
                np.sort(self._rng.choice(keys, max(1, round(share * len(keys))), replace=False))
                for share in SELECTIVITIES
            ]
            # Every key held, then each level's: one pass over the catalog for all of them.
            masks = [_mask(keys), *(_mask(level) for level in levels)]
            pages = _of_dim(mirror.catalog.vector_pages(), index.dim, self._stopping)
            truths = exact_neighbours(queries, query_keys, pages, K, masks)
            choice = choose_value(
                index, queries, query_keys, truths[0], self.target, self._reading()
            )
            if not self._apply(index, value=choice.value):
                return self.tuning  # rebuilt meanwhile: measured again at the next check
            filters = self._measure_filters(index, queries, query_keys, levels, truths[1:])
            limit = exact_filter_limit(filters)
            if not self._apply(index, limit=limit):
                return self.tuning
            self._measured = weakref.ref(index)
            self._changes_then, self._size_then = changes, len(keys)
            self.tuning = IndexTuning(
                status="measured",
                target_recall=self.target,
                measured_recall=choice.recall,
                parameter=index.search_parameter or "",
                value=choice.value or 0,
                reached=choice.reached,
                k=K,
                sample_size=len(query_keys),
                measured_at_version=version,
                measured_at=time.time(),
                seconds=time.monotonic() - started,
                exact_filter_limit=limit,
                filters=tuple(filters),
            )
        self._report(choice)
        return self.tuning

    def _carry_over(self, index: VectorIndex) -> None:
        """A rebuilt index takes the last chosen value at once, until measured itself."""
        last = self.tuning
        measured = self._measured() if self._measured is not None else None
        if last.status != "measured" or measured is index:
            return
        if last.parameter and index.search_parameter == last.parameter:
            self._apply(index, value=last.value, limit=last.exact_filter_limit)

    def _apply(
        self, index: VectorIndex, value: int | None = None, limit: int | None = None
    ) -> bool:
        """Put `value` and `limit` in force on `index`; False when the mirror holds another."""
        with self.mirror.lock.write():
            if self.mirror.index is not index:
                return False
            if value is not None:
                index.set_search_value(value)
            if limit is not None:
                index.exact_filter_limit = limit
            return True

    def _queries(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Catalog vectors of a random sample of `keys`, and their keys (those still there)."""
        sample = self._rng.choice(keys, min(self.sample_size, len(keys)), replace=False)
        stored = self.mirror.catalog.vectors_of(sample.tolist())
        query_keys = np.array([key for key in sample.tolist() if key in stored], np.int64)
        queries = np.stack([stored[key] for key in query_keys.tolist()]).astype(np.float32)
        return queries, query_keys

    def _measure_filters(
        self,
        index: VectorIndex,
        queries: np.ndarray,
        query_keys: np.ndarray,
        levels: list[np.ndarray],
        truths: list[np.ndarray],
    ) -> list[FilterRecall]:
        count = min(FILTER_QUERIES, len(queries))
        filters = []
        for share, allowed, truth in zip(SELECTIVITIES, levels, truths, strict=True):
            recall, index_ms, scan_ms = measure_filter(
                index,
                queries[:count],
                query_keys[:count],
                allowed,
                truth[:count],
                self._reading(),
            )
            exact = bool(recall < self.target or scan_ms <= index_ms)
            filters.append(FilterRecall(share, len(allowed), recall, index_ms, scan_ms, exact))
        return filters

    def _reading(self) -> Reading:
        """The mirror's read lock, refused once the tuner is stopping."""

        def reading() -> AbstractContextManager:
            if self._stopping.is_set():
                raise _Stopped
            return self.mirror.lock.read()

        return reading

    def _report(self, choice: Choice) -> None:
        tuning = self.tuning
        INDEX_TUNING.target.set(tuning.target_recall)
        INDEX_TUNING.recall.set(tuning.measured_recall)
        INDEX_TUNING.reached.set(1 if tuning.reached else 0)
        if tuning.parameter:
            INDEX_TUNING.value.labels(tuning.parameter).set(tuning.value)
        for level in tuning.filters:
            INDEX_TUNING.filter_recall.labels(f"{level.selectivity:g}").set(
                level.approximate_recall
            )
        INDEX_TUNING.exact_filter_limit.set(tuning.exact_filter_limit)
        INDEX_TUNING.seconds.set(tuning.seconds)
        setting = f"{tuning.parameter}={tuning.value}" if tuning.parameter else "its settings"
        where = (
            f"{tuning.sample_size} catalog vectors as queries, catalog version "
            f"{tuning.measured_at_version}, {tuning.seconds:.1f}s"
        )
        filters = ", ".join(
            f"{level.selectivity:.1%}: recall {level.approximate_recall:.3f} "
            f"{level.approximate_ms:.2f} ms, scan {level.exact_ms:.2f} ms"
            for level in tuning.filters
        )
        if tuning.reached:
            logger.info(
                "%s index: recall@%d %.3f at %s, the least reaching the target %.3f (%s); "
                "filters of at most %d products are scanned exactly (%s)",
                self.mirror.factory,
                K,
                tuning.measured_recall,
                setting,
                tuning.target_recall,
                where,
                tuning.exact_filter_limit,
                filters,
            )
        else:
            tried = ", ".join(f"{value}: {recall:.3f}" for value, recall in choice.tried)
            logger.warning(
                "%s index cannot reach recall@%d %.3f: the best measured is %.3f, at %s, now in "
                "force (%s; %s tried: %s). A denser index (HNSW with a larger M, IVF-Flat) or "
                "Flat would reach it; filters of at most %d products are scanned exactly (%s)",
                self.mirror.factory,
                K,
                tuning.target_recall,
                tuning.measured_recall,
                setting,
                where,
                tuning.parameter or "values",
                tried,
                tuning.exact_filter_limit,
                filters,
            )


def _mask(keys: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(keys.max()) + 1 if len(keys) else 0, dtype=bool)
    mask[keys] = True
    return mask


def _of_dim(
    pages: Pages, dim: int, stopping: threading.Event
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pages whose vectors have the index's dimension (a catalog's new model's do not)."""
    for keys, vectors in pages:
        if stopping.is_set():
            raise _Stopped
        if vectors.shape[1] == dim:
            yield keys, vectors


class _Stopped(Exception):
    """The tuner was stopped in the middle of a measurement."""
