"""The FAISS vector index: catalog keys as ids, inner product, exact filtered search, snapshots.

"Flat" (the default) is exact: an IndexIDMap2 over an IndexFlatIP holds every
vector, and a float16 copy of it answers the first pass of a search. A single
query is bound by memory bandwidth, so scanning half the bytes halves its
latency; the candidates are then rescored from the float32 vectors, and the
candidate list is widened until the float16 error bound proves that no
vector left out could enter the top k. Results are therefore the exact
float32 top k, not an approximation.

Any other FAISS factory string (HNSW32, "IVF4096,PQ64", ...) is approximate.
Such indexes cannot remove vectors in place, so each vector gets a label (its
position) and a removed vector becomes a tombstone that searches skip. Their
search parameter (efSearch, nprobe; see search_service.index.search_params) is set
on the built index, never a reason to rebuild it, and search_service.index.tuning
chooses it, and how narrow a filter is scored exactly, by measuring recall.

On device "cuda" (see search_service.index.gpu) this CPU index stays the master and a
replica in GPU memory answers the first pass of each search; the rest (exact
rescoring, filters, snapshots) is the same code as on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from search_service.index import gpu, search_params
from search_service.index.exact_topk import FirstPass, exact_top_k, first_fetch
from search_service.index.labels import Labels
from vpm_common.errors import FailedPrecondition

logger = logging.getLogger(__name__)

FLAT = "Flat"
# |float16 score - float32 score| for unit vectors: float16 rounding is at most 2**-11
# relative per component, so by Cauchy-Schwarz the score moves by at most 4.9e-4;
# float32 summation adds ~3e-5. Twice that margin keeps the proof safe.
FP16_SCORE_ERROR = 1e-3
# Filters that leave at most this many products are scored directly, without a scan
# (an approximate index's limit is then measured: VectorIndex.exact_filter_limit).
DIRECT_LIMIT = 2048
# Vectors scored per matrix product when a large set is scored exactly (bounds the memory).
SCORE_CHUNK = 65_536
SNAPSHOT_FORMAT = 1


class IndexNotReady(FailedPrecondition):
    """An index that needs training has not seen enough vectors yet."""


class SnapshotError(Exception):
    """A snapshot file that cannot be trusted: missing, truncated, corrupt or foreign."""


def single_threaded() -> None:
    """Make FAISS calls from the current thread use one OpenMP thread.

    Search threads run one query per call; FAISS parallelizes over queries, so
    OpenMP adds nothing there but idle workers that spin on the cores the
    other searches need (measured: p50 5 ms instead of 25 ms with 2 cores busy).
    """
    faiss.omp_set_num_threads(1)


@contextmanager
def all_cores() -> Iterator[None]:
    """FAISS calls from the current thread use every core inside the block (index builds)."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def check_index_settings(factory: str, params: str, dim: int) -> None:
    """ValueError with FAISS's reason when `factory` or `params` cannot make an index of `dim`."""
    try:
        VectorIndex(dim, factory, params)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        reason = re.sub(r"^Error in .*? at \S+:\d+: ", "", reason)  # FAISS's C++ location
        raise ValueError(
            f"{factory!r} with params {params!r} makes no FAISS index of dim {dim}: {reason}"
        ) from None


def training_need(factory: str) -> int:
    """How many vectors an untrained index of `factory` wants before it is trained.

    39 points per centroid is FAISS's own minimum before it warns about k-means.
    """
    need = 1000
    if match := re.search(r"IVF(\d+)", factory):
        need = max(need, 39 * int(match[1]))
    if match := re.search(r"PQ(\d+)(?:x(\d+))?", factory):
        need = max(need, 39 * 2 ** int(match[2] or 8))
    return need


class VectorIndex:
    """Unit vectors keyed by int64 catalog keys; scores are inner products (cosines)."""

    def __init__(
        self,
        dim: int,
        factory: str = FLAT,
        params: str = "",
        scan_threads: int = 1,
        device: str = "cpu",
    ) -> None:
        if device == "cuda" and (problem := gpu.factory_problem(factory)) is not None:
            raise gpu.DeviceError(problem)
        self.dim = dim
        self.factory = factory
        self.params = params
        # A loaded snapshot's build-time parameters, as it was built (see built_otherwise).
        self.built_with: dict[str, int] = {}
        self.device = device
        self._present = np.zeros(0, dtype=bool)  # by key
        # Filtered sets of at most this many keys are scored exactly instead of searched.
        self.exact_filter_limit = DIRECT_LIMIT
        self.changes = 0  # vectors put or removed since it was made (see tuning)
        # The search replica in GPU memory (device cuda; IVF: once trained).
        self._replica: gpu.Replica | None = None
        # Labels of the rows of an index that removes nothing in place: the approximate
        # index (and its replica), or the replica alone of a Flat index.
        self._rows = Labels()
        if factory == FLAT:
            self._exact = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
            # The float16 copy in shards (key % shards) that one query scans in parallel;
            # on cuda the replica takes its place.
            self._coarse = [
                faiss.IndexIDMap2(
                    faiss.IndexScalarQuantizer(
                        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
                    )
                )
                for _ in range(max(1, scan_threads) if device == "cpu" else 0)
            ]
            self._scans = _Scans()
            self._ann = None
            if device == "cuda":
                self._replica = gpu.Replica(gpu.new_flat_replica(dim))
        else:
            self._ann = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            search_params.apply_params(self._ann, params)

    # -- state ---------------------------------------------------------------------------

    @property
    def exact(self) -> bool:
        return self._ann is None

    @property
    def holds_vectors(self) -> bool:
        """Whether `vectors` gives back the vectors as they were put (Flat, HNSW over a flat
        store, IVF-Flat), not a lossy decoding (PQ, scalar quantizers)."""
        if self._ann is None:
            return True
        return isinstance(
            faiss.downcast_index(self._ann), (faiss.IndexHNSWFlat, faiss.IndexIVFFlat)
        )

    @property
    def is_trained(self) -> bool:
        return self._ann is None or self._ann.is_trained

    @property
    def dead_fraction(self) -> float:
        """Share of tombstones among stored vectors (approximate indexes only)."""
        if self._ann is None or self._rows.rows == 0:
            return 0.0
        return self._rows.dead / self._rows.rows

    def __len__(self) -> int:
        if self._ann is None:
            return int(self._exact.ntotal)
        return self._rows.rows - self._rows.dead

    @property
    def search_parameter(self) -> str | None:
        """efSearch or nprobe: what trades this index's recall for speed (None: nothing)."""
        return None if self._ann is None else search_params.parameter_of(self._ann)

    @property
    def search_value(self) -> int | None:
        """The value of `search_parameter` in force."""
        return None if self._ann is None else search_params.value_of(self._ann)

    @property
    def search_values(self) -> tuple[int, ...]:
        """The values of `search_parameter` worth trying, smallest first (see tuning)."""
        return () if self._ann is None else search_params.ladder(self._ann)

    def set_search_value(self, value: int) -> None:
        """Put `value` in force for `search_parameter`, on the replica too (hold the write
        side of the caller's lock: searches read it)."""
        if self._ann is None:
            raise ValueError("an exact index has no search parameter")
        search_params.set_value(self._ann, value)
        replica = self._replica
        if replica is not None and hasattr(replica.index, "nprobe"):  # a GPU IVF copy
            with replica.search.device_lock:
                replica.index.nprobe = value

    def keys(self) -> np.ndarray:
        """Every key held, sorted."""
        return np.flatnonzero(self._present).astype(np.int64)

    def __contains__(self, key: int) -> bool:
        return 0 <= key < len(self._present) and bool(self._present[key])

    # -- changes -------------------------------------------------------------------------

    def train(self, vectors: np.ndarray) -> None:
        if self._ann is None or self._ann.is_trained:
            return
        logger.info("training %s index on %d vectors", self.factory, len(vectors))
        self._ann.train(np.ascontiguousarray(vectors, dtype=np.float32))
        self._after_training()

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more vectors in one step (exact Flat only; others: nothing).

        FAISS grows a flat index's storage by doubling, copying every vector held
        and touching fresh memory each time: 42,700 vectors added 5,000 at a time
        took 0.21 s, and 0.12 s with the room made first. Growing the storage and
        shrinking it back keeps the capacity (a std::vector keeps it on a shrink).
        """
        if self._ann is not None or extra <= 0:
            return
        per_shard = -(-extra // max(1, len(self._coarse)))
        for index, count in [(self._exact, extra), *((c, per_shard) for c in self._coarse)]:
            storage = faiss.downcast_index(index.index)
            codes = storage.codes
            if codes.is_owned:  # not a view of memory FAISS does not own
                size = codes.size()
                try:
                    codes.resize(size + count * storage.code_size)
                except MemoryError:  # room is a speed-up: the index grows as vectors come
                    logger.warning(
                        "no memory for %d more vectors at once; growing as they come", count
                    )
                    return
                codes.resize(size)

    def put(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under `keys`, replacing any already held under the same keys."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        if not self.is_trained:
            raise IndexNotReady(f"the {self.factory} index is not trained yet")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._remove(keys)
        self.changes += len(keys)
        self._grow(int(keys.max()) + 1)
        if self._ann is None:
            self._exact.add_with_ids(vectors, keys)
            if self._replica is None:
                self._add_coarse(keys, vectors)
        else:
            self._ann.add(vectors)
        if self._replica is not None:
            self._replica.add(vectors)
        if self._ann is not None or self._replica is not None:
            self._rows.add(keys)
        self._present[keys] = True

    def remove(self, keys: np.ndarray) -> int:
        """Drop the vectors held under `keys` (unknown keys are ignored); how many went."""
        removed = self._remove(keys)
        self.changes += removed
        return removed

    def _remove(self, keys: np.ndarray) -> int:
        keys = np.asarray(keys, dtype=np.int64)
        keys = keys[(keys >= 0) & (keys < len(self._present))]
        keys = np.unique(keys[self._present[keys]])
        if len(keys) == 0:
            return 0
        if self._ann is None:
            selector = faiss.IDSelectorBatch(keys)
            self._exact.remove_ids(selector)
            for shard in self._coarse:
                shard.remove_ids(selector)
        if self._ann is not None or self._replica is not None:
            self._rows.remove(keys)
        self._present[keys] = False
        if (
            self._ann is None
            and self._replica is not None
            and 4 * self._rows.dead > self._rows.rows
        ):
            # The Flat master holds every vector: refill the replica without its tombstones.
            self._refill_replica()
        return len(keys)

    # -- reads ---------------------------------------------------------------------------

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of held keys (exact for Flat; decoded, maybe lossy, otherwise)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._ann is None:
            return self._exact.reconstruct_batch(keys)
        return self._ann.reconstruct_batch(self._rows.labels[keys])

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best `k` (keys, scores), best first, among all keys or only the `allowed` ones.

        `allowed` must hold only keys present in the index. Fewer than k come
        back only when fewer are held (or allowed).
        """
        if not self.is_trained:
            raise IndexNotReady(f"the {self.factory} index is not trained yet")
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        available = len(self) if allowed is None else len(allowed)
        k = min(k, available)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if allowed is not None and len(allowed) <= self.exact_filter_limit:
            return self.score(query[0], np.asarray(allowed, dtype=np.int64), k)
        if self._ann is None:
            return self._flat_search(query, k, allowed, available)
        return self._ann_search(query, k, allowed)

    def approximate(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """What `search` answers through the approximate index, however few are `allowed`
        (tuning measures it against `score`)."""
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, self.dim)
        k = min(k, len(self) if allowed is None else len(allowed))
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        return self._ann_search(query, k, allowed)

    def approximate_many(self, queries: np.ndarray, k: int, value: int | None) -> np.ndarray:
        """The keys (one row per query, -1 past the last found) the approximate index alone
        finds at `value` of its search parameter, on the CPU, leaving the one in force be."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        rows = self._rows
        bits = None if rows.dead == 0 else _bitmap(rows.live(), rows.rows)
        try:
            params = search_params.search_parameters(self._ann, bits, value)
            _, found = self._ann.search(queries, k, params=params)
        except RuntimeError:
            # This index type takes no selector: over-fetch, then drop the tombstones.
            _, found = self._ann.search(queries, min(rows.rows, k + rows.dead))
        keys = np.where(found >= 0, rows.keys[np.maximum(found, 0)], -1)
        # Found keys first in each row (stable: best first), tombstones and misses last.
        order = np.argsort(keys < 0, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(keys, order, axis=1)

    def score(self, query: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact best k of `keys`, best first; equal scores in the order of `keys`."""
        if len(keys) > SCORE_CHUNK:
            parts = [
                self.score(query, keys[start : start + SCORE_CHUNK], k)
                for start in range(0, len(keys), SCORE_CHUNK)
            ]
            keys = np.concatenate([part[0] for part in parts])
            scores = np.concatenate([part[1] for part in parts])
        else:
            scores = self.vectors(keys) @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return keys[order], scores[order].astype(np.float32)

    def _flat_search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None, available: int
    ) -> tuple[np.ndarray, np.ndarray]:
        def score(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return self.score(query[0], keys, k)

        if self._replica is not None:
            return self._replica_search(query[0], k, allowed, available, score)
        bits = None if allowed is None else _bitmap(allowed, len(self._present))
        selector = None if bits is None else faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))

        def scan(fetch: int) -> tuple[np.ndarray, np.ndarray]:
            scores, keys = self._coarse_search(query, fetch, selector)
            held = keys >= 0  # -1: past the last vector
            return scores[held], keys[held]

        first = FirstPass(scan, rows=available, error=FP16_SCORE_ERROR)
        return exact_top_k(first, score, k, available)

    def _replica_search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None, available: int, score
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flat on the GPU: the replica ranks every row, unfiltered; filters by oversampling."""
        replica = self._replica
        assert replica is not None

        def scan(fetch: int) -> tuple[np.ndarray, np.ndarray]:
            scores, labels = replica.scan(query, fetch)
            return scores, self._rows.keys[labels]  # a tombstone's key is -1

        passes = None
        if allowed is not None:
            passes = np.zeros(len(self._present), dtype=bool)
            passes[allowed] = True
        first = FirstPass(
            scan, rows=replica.rows, error=gpu.GPU_SCORE_ERROR, limit=gpu.MAX_FETCH, filters=False
        )
        return exact_top_k(
            first,
            score,
            k,
            available,
            passes,
            subset=self.keys if allowed is None else lambda: np.asarray(allowed, np.int64),
        )

    def _add_coarse(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        shards = len(self._coarse)
        if shards == 1:
            self._coarse[0].add_with_ids(vectors, keys)
            return
        for number, shard in enumerate(self._coarse):
            mine = keys % shards == number
            shard.add_with_ids(np.ascontiguousarray(vectors[mine]), keys[mine])

    def _coarse_search(
        self, query: np.ndarray, fetch: int, selector: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best `fetch` (float16 scores, keys) over all shards, scanned in parallel."""

        def scan(shard: faiss.Index) -> tuple[np.ndarray, np.ndarray]:
            # A SearchParameters per call: IndexIDMap2.search swaps in its own selector
            # while it runs, so one shared between threads would be a data race.
            params = None if selector is None else faiss.SearchParameters(sel=selector)
            return shard.search(query, fetch, params=params)

        if len(self._coarse) == 1:
            scores, keys = scan(self._coarse[0])
            return scores[0], keys[0]
        # Shards go to other threads only while this is the only search: with more
        # searches than cores, the cores are busy anyway and hand-offs only cost.
        with self._scans.scanning() as alone:
            if alone:
                pool = _scan_pool(len(self._coarse) - 1)
                others = [pool.submit(scan, shard) for shard in self._coarse[1:]]
                parts = [scan(self._coarse[0]), *(other.result() for other in others)]
            else:
                parts = [scan(shard) for shard in self._coarse]
        scores = np.concatenate([part[0][0] for part in parts])
        keys = np.concatenate([part[1][0] for part in parts])
        # Each shard's own best `fetch` are all here, so the merged best `fetch` are exact.
        best = np.argsort(-scores, kind="stable")[:fetch]
        return scores[best], keys[best]

    def _ann_search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows
        if allowed is None:
            labels = None if rows.dead == 0 else rows.live()
        else:
            labels = rows.labels[allowed]
        bits = None if labels is None else _bitmap(labels, rows.rows)
        passing = len(self) if allowed is None else len(allowed)
        replica = self._replica
        if replica is not None:
            # A GPU index takes no selector: oversample on the replica, filter here.
            scores, found = self._overfetch(
                lambda fetch: replica.scan(query[0], fetch), k, bits, passing, gpu.MAX_FETCH
            )
        else:
            try:
                params = search_params.search_parameters(self._ann, bits)
                scores, found = self._ann.search(query, k, params=params)
                scores, found = scores[0], found[0]
            except RuntimeError:
                # This index type takes no selector: over-fetch, then filter here.
                scores, found = self._overfetch(
                    lambda fetch: tuple(a[0] for a in self._ann.search(query, fetch)),
                    k,
                    bits,
                    passing,
                )
        held = found >= 0
        scores, found = scores[held], found[held]
        if len(found) < k:
            # Approximate search missed some passing vectors (a narrow filter): score them all.
            pool = rows.live() if labels is None else labels
            keys, scores = self.score(query[0], rows.keys[pool], k)
            return keys, scores
        return rows.keys[found], scores

    def _overfetch(
        self,
        search,
        k: int,
        bits: np.ndarray | None,
        passing: int,
        limit: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first k passing rows of `search(fetch)` (scores, labels), fetching deeper
        until k pass, all rows were seen, or `limit` rows is as deep as it goes."""
        total = self._rows.rows
        fetch = first_fetch(k, passing, total)
        if limit is not None:
            fetch = min(fetch, limit)
        while True:
            scores, found = search(fetch)
            keep = found >= 0
            if bits is not None:
                labels = np.where(keep, found, 0)
                keep &= (bits[labels >> 3] >> (labels & 7)) & 1 == 1
            deepest = fetch >= total or (limit is not None and fetch >= limit)
            if keep.sum() >= k or deepest:
                return scores[keep][:k], found[keep][:k]
            fetch = min(total, fetch * 4, limit or total)

    # -- internals -----------------------------------------------------------------------

    def _grow(self, size: int) -> None:
        if size <= len(self._present):
            return
        size = max(size, 2 * len(self._present), 1024)
        present = np.zeros(size, dtype=bool)
        present[: len(self._present)] = self._present
        self._present = present

    def _after_training(self) -> None:
        ivf = faiss.try_extract_index_ivf(self._ann)
        if ivf is not None:
            # Direct map: reconstruct vectors by label (narrow filters, rescoring).
            ivf.make_direct_map()
        if self.device == "cuda":
            self._replica = gpu.Replica(gpu.copy_to_gpu(self._ann))

    def _stored(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and float32 vectors of a Flat index, in storage order (a view, not a copy)."""
        keys = faiss.vector_to_array(self._exact.id_map).astype(np.int64)
        flat = faiss.downcast_index(self._exact.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * self.dim)
        return keys, vectors.reshape(-1, self.dim)

    def _refill_replica(self) -> None:
        """Load every vector of the Flat master into an emptied replica, in chunks."""
        assert self._replica is not None
        keys, vectors = self._stored()
        self._replica.reset()
        self._rows = Labels()
        for start in range(0, len(keys), SCORE_CHUNK):
            self._replica.add(vectors[start : start + SCORE_CHUNK])
            self._rows.add(keys[start : start + SCORE_CHUNK])

    # -- snapshots -----------------------------------------------------------------------

    def save(self, path: Path, meta: dict) -> None:
        """Write the index and `meta` to `path` atomically: temp file, fsync, rename."""
        arrays = self.snapshot_arrays(meta)
        write_snapshot(path, arrays)

    def snapshot_arrays(self, meta: dict) -> dict[str, np.ndarray]:
        """What a snapshot holds, copied: safe to write out after the caller's lock is gone."""
        main = self._exact if self._ann is None else self._ann
        data = faiss.serialize_index(main)
        header = {
            **meta,
            "format": SNAPSHOT_FORMAT,
            "factory": self.factory,
            "dim": self.dim,
            "params": self.params,
            "size": len(self),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "index": data,
        }
        if self._ann is not None:
            arrays["label_keys"] = self._rows.keys[: self._rows.rows].copy()
        return arrays

    @classmethod
    def load(
        cls, path: Path, scan_threads: int = 1, device: str = "cpu", params: str | None = None
    ) -> tuple[VectorIndex, dict]:
        """The index saved at `path` (on either device) and its meta, on `device`, with
        the search-time `params` in force (None: those it was saved with);
        SnapshotError when it cannot be trusted."""
        try:
            with np.load(path, allow_pickle=False) as archive:
                header = json.loads(archive["header"].tobytes())
                data = archive["index"]
                label_keys = archive["label_keys"] if "label_keys" in archive.files else None
        except FileNotFoundError:
            raise SnapshotError(f"no snapshot at {path}") from None
        except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
            raise SnapshotError(f"unreadable snapshot {path}: {err}") from None
        if header.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"snapshot {path} has format {header.get('format')}")
        if hashlib.sha256(data).hexdigest() != header.get("sha256"):
            raise SnapshotError(f"snapshot {path} fails its checksum")
        try:
            index = cls(
                int(header["dim"]),
                header["factory"],
                header.get("params", "") if params is None else params,
                scan_threads,
                device,
            )
            index._restore(faiss.deserialize_index(data), label_keys)
        except gpu.DeviceError:
            raise
        except Exception as err:  # noqa: BLE001
            raise SnapshotError(f"snapshot {path} does not load: {err}") from None
        if len(index) != header.get("size"):
            raise SnapshotError(f"snapshot {path} holds {len(index)} vectors, not {header['size']}")
        return index, header

    def built_otherwise(self) -> str | None:
        """How the loaded index was built, where --index-params now asks for another
        build-time value (None: as asked, or nothing asked)."""
        built = self.built_with
        asked = search_params.asked_build_params(self.params)
        differ = [name for name, value in asked.items() if built.get(name, value) != value]
        if not differ:
            return None
        return ", ".join(f"{name}={built[name]} (asked: {asked[name]})" for name in differ)

    def _restore(self, main: faiss.Index, label_keys: np.ndarray | None) -> None:
        if self._ann is None:
            # deserialize_index returns the concrete type and owns it: keep that proxy.
            self._exact = main
            keys, vectors = self._stored()
            if self._replica is not None:
                self._refill_replica()
            elif len(keys):
                self._add_coarse(keys, vectors)
        else:
            self._ann = main
            self.built_with = search_params.build_params_of(main)
            # Search-time parameters are the service's, not the snapshot's.
            search_params.apply_params(self._ann, self.params)
            self._rows = Labels(np.asarray(label_keys, dtype=np.int64))
            keys = self._rows.keys[self._rows.live()]
            if self.device == "cuda" and self._ann.is_trained:
                self._replica = gpu.Replica(gpu.copy_to_gpu(self._ann))
        self._present = np.zeros(0, dtype=bool)
        if len(keys):
            self._grow(int(keys.max()) + 1)
            self._present[keys] = True


class _Scans:
    """Counts the searches scanning at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0

    @contextmanager
    def scanning(self) -> Iterator[bool]:
        """Count this search in while inside; yields True when no other search is scanning."""
        with self._lock:
            self._running += 1
            alone = self._running == 1
        try:
            yield alone
        finally:
            with self._lock:
                self._running -= 1


_scan_pools: dict[int, ThreadPoolExecutor] = {}
_scan_pools_lock = threading.Lock()


def _scan_pool(threads: int) -> ThreadPoolExecutor:
    """The process's threads for scanning shards, set up like search threads."""
    with _scan_pools_lock:
        pool = _scan_pools.get(threads)
        if pool is None:
            pool = _scan_pools[threads] = ThreadPoolExecutor(
                threads, thread_name_prefix="scan", initializer=single_threaded
            )
        return pool


def _bitmap(ids: np.ndarray, size: int) -> np.ndarray:
    """A little-endian bitmap of `ids` for faiss.IDSelectorBitmap."""
    mask = np.zeros(max(size, int(ids.max()) + 1 if len(ids) else 0), dtype=bool)
    mask[ids] = True
    return np.packbits(mask, bitorder="little")


def write_snapshot(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` to `path` atomically: a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
