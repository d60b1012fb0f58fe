"""Where the vector index lives (cpu or cuda), and its search replica in GPU memory.

On cuda the CPU index stays the master: snapshots, exact rescoring and stored
vectors read it, so a snapshot is the same file whichever device wrote it, and
loads on either. The GPU holds a search-only replica of it (float16 for Flat,
FAISS's own copy for IVF), whose rows are labelled by position: FAISS GPU
indexes remove nothing in place and take no ID selector, so a removed vector
becomes a tombstone there and filters are applied by oversampling (see
exact_topk). Only `new_flat_replica` and `copy_to_gpu` touch the GPU; the rest
is plain bookkeeping, tested on the CPU with CPU indexes standing in.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "auto")
# FAISS GPU selects at most this many neighbours per query (GPU_MAX_SELECTION_K).
MAX_FETCH = 2048
# Bound on |GPU score - float32 score| for unit vectors. The replica stores float16, and the
# query is rounded to float16 (or TF32, same mantissa) for the matrix product too: 2**-11
# relative each by Cauchy-Schwarz, twice that margin as on the CPU.
GPU_SCORE_ERROR = 2e-3
# Factories with a FAISS GPU version that the replica is built for.
_ON_GPU = re.compile(r"^(Flat|IVF\d+,(Flat|PQ\d+(x8)?))$")
# Queries gathered into one GPU call at most.
MAX_BATCH = 256


class DeviceError(ValueError):
    """The index cannot live on the device asked for; the message says why."""


def factory_problem(factory: str) -> str | None:
    """Why an index of `factory` cannot live on a GPU (None: it can)."""
    if "HNSW" in factory:
        return (
            f"{factory} is an HNSW index, which FAISS runs on the CPU only: use "
            "--index-device cpu, or Flat, IVF<n>,Flat or IVF<n>,PQ<m> on cuda"
        )
    if not _ON_GPU.match(factory):
        return f"{factory} has no GPU version here: on cuda use Flat, IVF<n>,Flat or IVF<n>,PQ<m>"
    return None


def gpu_missing() -> str | None:
    """Why FAISS cannot use a GPU in this process (None: it can)."""
    try:
        import faiss
    except ImportError as err:  # a GPU build whose CUDA libraries are missing fails here
        return f"FAISS does not import: {err}"
    if not hasattr(faiss, "StandardGpuResources"):
        return (
            "this FAISS build has no GPU support (faiss-cpu is installed; the GPU build "
            "comes with the search-gpu extra, instead of faiss-cpu)"
        )
    if faiss.get_num_gpus() < 1:
        return "FAISS sees no GPU (faiss.get_num_gpus() is 0)"
    return None


def resolve_device(requested: str, factory: str) -> str:
    """'cpu' or 'cuda' for --index-device `requested`; DeviceError when cuda cannot be had.

    auto takes cuda when the factory, FAISS's build and a GPU allow it, else the
    CPU, and says why in one line.
    """
    if requested == "cpu":
        return "cpu"
    problem = factory_problem(factory) or gpu_missing()
    if problem is None:
        return "cuda"
    if requested == "cuda":
        raise DeviceError(f"cuda: {problem}")
    logger.info("index device auto: the index stays on the CPU: %s", problem)
    return "cpu"


# -- the device layer: the only code that makes GPU objects -------------------------------

_resources: Any = None
_resources_lock = threading.Lock()


def _gpu_resources() -> Any:
    """The process's FAISS GPU resources (streams, cuBLAS handle, scratch memory)."""
    global _resources
    import faiss

    with _resources_lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return _resources


def new_flat_replica(dim: int) -> Any:
    """An empty exact inner-product index in GPU memory, stored in float16.

    Float16 halves the memory a scan reads; the candidates are rescored from the
    float32 master, within GPU_SCORE_ERROR.
    """
    import faiss

    config = faiss.GpuIndexFlatConfig()
    config.device = 0
    config.useFloat16 = True
    return faiss.GpuIndexFlatIP(_gpu_resources(), dim, config)


def copy_to_gpu(index: Any) -> Any:
    """A GPU copy of a trained CPU IVF index, its ids and search parameters included."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    options = faiss.GpuClonerOptions()
    # For IVF-PQ this means float16 lookup tables: those of many sub-quantizers pass the
    # GPU's shared memory in float32. (For IVF-Flat it would mean float16 lists: left off.)
    options.useFloat16 = isinstance(ivf, faiss.IndexIVFPQ)
    copy = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index, options)
    if ivf is not None and hasattr(copy, "nprobe"):
        copy.nprobe = ivf.nprobe
    return copy


# -- device-independent bookkeeping ---------------------------------------------------------


@dataclass
class _Request:
    query: np.ndarray
    fetch: int
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: tuple[np.ndarray, np.ndarray] | None = None
    error: BaseException | None = None


class BatchedSearch:
    """One search on the device at a time; queries that arrive meanwhile go in the next, together.

    A GPU answers 64 queries in about the time of one (the scan reads the vectors
    once for all), and its index takes one caller at a time. The caller whose
    query arrives first runs the batch; when queries wait after it, the first of
    them is handed the next batch, so nobody serves others for long.
    """

    def __init__(self, search: Any, max_batch: int = MAX_BATCH) -> None:
        self._search = search  # (queries (n, dim), fetch) -> (scores, labels), both (n, fetch)
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._busy = False
        self.device_lock = threading.Lock()  # held around every call into the device index
        self.batches = 0
        self.queries = 0

    def __call__(self, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The best `fetch` (scores, labels) for one query."""
        request = _Request(np.asarray(query, dtype=np.float32).reshape(-1), fetch)
        with self._lock:
            self._pending.append(request)
            lead, self._busy = not self._busy, True
        if not lead:
            request.done.wait()
        if request.result is None and request.error is None:
            self._run_batch()  # led from the start, or handed the lead
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _run_batch(self) -> None:
        with self._lock:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
        try:
            fetch = max(request.fetch for request in batch)
            with self.device_lock:
                scores, labels = self._search(np.stack([r.query for r in batch]), fetch)
            self.batches += 1
            self.queries += len(batch)
            for row, request in enumerate(batch):
                request.result = (scores[row, : request.fetch], labels[row, : request.fetch])
        except BaseException as err:  # noqa: BLE001 - each waiting caller raises it
            for request in batch:
                request.error = err
        finally:
            for request in batch:
                request.done.set()
            with self._lock:
                if self._pending:
                    following = self._pending[0]
                    following.lead = True
                    following.done.set()
                else:
                    self._busy = False


class Replica:
    """A search-only copy of the index on the device; rows labelled by position.

    `index` is a FAISS index that adds rows at the end and searches (a GPU index,
    or in tests a CPU one standing in); removals are kept as tombstones, which
    the caller drops from results.
    """

    def __init__(self, index: Any) -> None:
        self.index = index
        self.search = BatchedSearch(self._search_batch)

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        with self.search.device_lock:
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def reset(self) -> None:
        with self.search.device_lock:
            self.index.reset()

    def _search_batch(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, min(fetch, MAX_FETCH))

    def scan(self, query: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The best `fetch` rows for one query as (scores, labels); fewer when fewer are held."""
        scores, labels = self.search(query, fetch)
        held = labels >= 0
        return scores[held], labels[held]
