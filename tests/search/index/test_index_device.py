"""Domain tier: the index on device "cuda" against the numpy oracle, on both device layers.

Each test runs twice: on the real GPU (FAISS's GPU build; skipped where there is none,
run by bench/gpu.sh), and on this machine with CPU indexes standing in for the GPU ones
(`cpu_stand_in`): FAISS's CPU flat index in float16 for GpuIndexFlatIP, a CPU clone
for index_cpu_to_gpu. The stand-ins answer the same calls without ID selectors, so
the oversampling, fallbacks, tombstones and snapshots are all exercised here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from search_service.index import gpu
from search_service.index.exact_topk import FirstPass, exact_top_k, first_fetch
from search_service.index.vector_index import VectorIndex
from tests.search.conftest import assert_exact_top_k, brute_force

DIM = 64
NO_GPU = gpu.gpu_missing()


def unit_rows(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clustered_rows(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Tight clusters: many near-ties, where a float16 first pass must widen."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(20, dim, seed + 1)
    rows = centres[rng.integers(0, 20, count)] + 0.02 * rng.standard_normal((count, dim))
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def float16_flat_standing_in_for_gpu(dim: int) -> faiss.Index:
    """GpuIndexFlatIP(useFloat16) stand-in: adds at the end, searches, resets; no selectors."""
    return faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )


@pytest.fixture(params=["cpu stand-in", "gpu"])
def device_layer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which device layer the 'cuda' index runs on in this test."""
    if request.param == "gpu":
        if NO_GPU is not None:
            pytest.skip(f"no GPU FAISS here: {NO_GPU}")
    else:
        monkeypatch.setattr(gpu, "new_flat_replica", float16_flat_standing_in_for_gpu)
        monkeypatch.setattr(gpu, "copy_to_gpu", faiss.clone_index)
    return request.param


def oracle_check(index: VectorIndex, keys: np.ndarray, vectors: np.ndarray, k: int, rows=None):
    """Search a few queries on `index`, each against numpy brute force over `vectors`."""
    allowed = None if rows is None else keys[rows]
    for query in unit_rows(5, vectors.shape[1], seed=k + 100):
        found, scores = index.search(query, k, allowed)
        expected_rows, expected = brute_force(vectors, query, k, rows)
        true_score = dict(zip(keys.tolist(), (vectors @ query).tolist(), strict=True)).get
        assert_exact_top_k(
            found.tolist(), scores, keys[expected_rows].tolist(), expected, true_score
        )


@pytest.mark.parametrize("make", [unit_rows, clustered_rows], ids=["random", "clustered"])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_flat_on_cuda_equals_brute_force(device_layer: str, make, k: int) -> None:
    vectors = make(20_000)
    keys = np.arange(20_000, dtype=np.int64) * 7 + 3
    index = VectorIndex(DIM, device="cuda")
    index.put(keys, vectors)
    oracle_check(index, keys, vectors, k)


@pytest.mark.parametrize("share", [0.0005, 0.08, 0.2, 0.9])
def test_filtered_flat_on_cuda_is_exact_k_among_allowed(device_layer: str, share: float) -> None:
    """Direct scoring (tiny subsets), oversampling (wide filters) and the exact scan of the
    subset (selective ones, past what one GPU search returns) all give the oracle's top k."""
    vectors = clustered_rows(30_000)
    keys = np.arange(30_000, dtype=np.int64)
    index = VectorIndex(DIM, device="cuda")
    index.put(keys, vectors)
    rows = np.random.default_rng(5).random(30_000) < share
    rows[:3] = True
    for k in (10, 100):
        oracle_check(index, keys, vectors, k, rows)


def test_updates_and_removals_on_cuda_leave_no_stale_vector(device_layer: str) -> None:
    """Tombstones on the replica are skipped, and it is refilled once they pile up."""
    vectors = unit_rows(5000)
    keys = np.arange(5000, dtype=np.int64)
    index = VectorIndex(DIM, device="cuda")
    index.put(keys, vectors)
    moved = unit_rows(1000, seed=9)
    index.put(keys[:1000], moved)  # 1000 tombstones of 6000 rows: kept
    assert index._replica.rows == 6000  # noqa: SLF001 - the replica's rows are the point
    vectors = vectors.copy()
    vectors[:1000] = moved
    assert index.remove(keys[4000:]) == 1000  # 2000 of 6000: refilled
    assert index._replica.rows == 4000  # noqa: SLF001
    oracle_check(index, keys[:4000], vectors[:4000], 10)
    found, _ = index.search(moved[0], 1)
    assert found.tolist() == [0]


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat"])
def test_snapshots_move_between_cpu_and_cuda(
    device_layer: str, tmp_path: Path, factory: str
) -> None:
    """A snapshot written on either device loads on the other, and searches the same."""
    vectors = unit_rows(6000)
    keys = np.arange(6000, dtype=np.int64) * 2
    on_cpu = VectorIndex(DIM, factory)
    on_cpu.train(vectors)
    on_cpu.put(keys, vectors)
    on_cpu.remove(keys[:10])
    on_cpu.save(tmp_path / "cpu.snapshot", {"version": 1})
    on_cuda, meta = VectorIndex.load(tmp_path / "cpu.snapshot", device="cuda")
    assert meta["version"] == 1 and len(on_cuda) == 5990 and on_cuda.device == "cuda"
    on_cuda.save(tmp_path / "cuda.snapshot", {"version": 2})
    back, _ = VectorIndex.load(tmp_path / "cuda.snapshot")
    for query in unit_rows(5, seed=4):
        expected = on_cpu.search(query, 10)
        for index in (on_cuda, back):
            found = index.search(query, 10)
            if factory == "Flat":
                assert found[0].tolist() == expected[0].tolist()
                np.testing.assert_allclose(found[1], expected[1], atol=1e-6)
            else:  # approximate: the same vectors, each scored as stored
                assert len(set(found[0].tolist()) & set(expected[0].tolist())) >= 8
    assert np.array_equal(back.keys(), on_cpu.keys())


@pytest.mark.parametrize("share", [None, 0.3, 0.01])
def test_ivf_on_cuda_returns_k_and_high_recall(device_layer: str, share: float | None) -> None:
    vectors = clustered_rows(20_000)
    keys = np.arange(20_000, dtype=np.int64)
    index = VectorIndex(DIM, "IVF64,Flat", "nprobe=16", device="cuda")
    index.train(vectors[:5000])
    index.put(keys, vectors)
    index.remove(keys[:100])
    rows = (
        np.ones(20_000, bool) if share is None else np.random.default_rng(2).random(20_000) < share
    )
    rows[:100] = False
    hits = 0
    for query in unit_rows(10, seed=8):
        found, _ = index.search(query, 10, None if share is None else keys[rows])
        assert len(found) == 10 and np.all(rows[found])
        expected, _ = brute_force(vectors, query, 10, rows)
        hits += len(set(found.tolist()) & set(keys[expected].tolist()))
    assert hits / 100 >= 0.9


def test_concurrent_searches_are_batched_and_each_gets_its_own(device_layer: str) -> None:
    vectors = unit_rows(20_000)
    keys = np.arange(20_000, dtype=np.int64)
    index = VectorIndex(DIM, device="cuda")
    index.put(keys, vectors)
    queries = unit_rows(200, seed=3)
    alone = [index.search(q, 10)[0].tolist() for q in queries]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: index.search(q, 10)[0].tolist(), queries))
    assert together == alone
    batches = index._replica.search  # noqa: SLF001 - how the queries went is the point
    assert batches.queries >= 400


def test_batched_search_hands_each_caller_its_rows_and_errors() -> None:
    """Device-independent: a search function standing in for the GPU index."""
    calls: list[int] = []
    gate = threading.Event()

    def search(queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        gate.wait(5)
        calls.append(len(queries))
        if np.any(queries[:, 0] < 0):
            raise RuntimeError("bad query")
        rows = np.tile(queries[:, :1], (1, fetch))
        return rows, rows.astype(np.int64)

    batched = gpu.BatchedSearch(search)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batched, np.array([float(i), 0.0]), 1 + i % 3) for i in range(8)]
        gate.set()
        results = [future.result() for future in futures]
    for i, (scores, labels) in enumerate(results):
        assert scores.tolist() == [float(i)] * (1 + i % 3) and labels.tolist() == [i] * (1 + i % 3)
    assert sum(calls) == 8 and len(calls) < 8  # some went together
    with pytest.raises(RuntimeError, match="bad query"):
        batched(np.array([-1.0, 0.0]), 2)
    assert batched(np.array([3.0, 0.0]), 1)[1].tolist() == [3]  # not stuck after an error


class RecordingFirstPass:
    """A first pass without filters (as on a GPU), on a CPU float16 index standing in; it
    records how deep each scan went."""

    def __init__(self, vectors: np.ndarray, query: np.ndarray, limit: int) -> None:
        self.index = float16_flat_standing_in_for_gpu(vectors.shape[1])
        self.index.add(vectors)
        self.query = query.reshape(1, -1)
        self.fetches: list[int] = []
        self.first = FirstPass(
            self.scan, len(vectors), gpu.GPU_SCORE_ERROR, limit=limit, filters=False
        )

    def scan(self, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        self.fetches.append(fetch)
        scores, labels = self.index.search(self.query, fetch)
        return scores[0], labels[0]


@pytest.mark.parametrize(
    ("share", "k", "expected"),
    [(1.0, 10, "one scan"), (0.25, 10, "one scan"), (0.002, 10, "exact scan of the subset")],
)
def test_oversampling_decides_by_selectivity_and_stays_exact(
    share: float, k: int, expected: str
) -> None:
    """How deep to scan follows the filter's share; past the limit, the subset is scored."""
    vectors = unit_rows(20_000, 32)
    rows = np.random.default_rng(1).random(20_000) < share
    query = unit_rows(1, 32, seed=2)[0]
    recorder = RecordingFirstPass(vectors, query, limit=2048)
    scored: list[int] = []

    def score(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scored.append(len(keys))
        scores = vectors[keys] @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return keys[order], scores[order]

    found, scores = exact_top_k(
        recorder.first, score, k, int(rows.sum()), rows, subset=lambda: np.flatnonzero(rows)
    )
    expected_rows, expected_scores = brute_force(vectors, query, k, rows)
    true_score = dict(enumerate((vectors @ query).tolist())).get
    assert_exact_top_k(found.tolist(), scores, expected_rows.tolist(), expected_scores, true_score)
    if expected == "one scan":
        assert recorder.fetches == [first_fetch(k, int(rows.sum()), 20_000)]
        assert scored[0] <= recorder.fetches[0] * share + 30  # only the candidates that pass
    else:
        assert recorder.fetches == [] and scored == [int(rows.sum())]


def test_a_short_oversample_widens_then_falls_back_to_the_subset() -> None:
    """A filter that keeps the vectors least like the query: the oversampled scan finds too
    few, widens to the limit, then scores the subset exactly."""
    vectors = unit_rows(20_000, 32)
    query = unit_rows(1, 32, seed=2)[0]
    rows = vectors @ query < np.quantile(vectors @ query, 0.3)  # the worst 30%
    recorder = RecordingFirstPass(vectors, query, limit=2048)

    def score(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = vectors[keys] @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return keys[order], scores[order]

    found, _ = exact_top_k(
        recorder.first, score, 10, int(rows.sum()), rows, subset=lambda: np.flatnonzero(rows)
    )
    assert recorder.fetches == [247, 988, 2048]
    assert found.tolist() == brute_force(vectors, query, 10, rows)[0].tolist()


def test_first_fetch_scales_with_the_share_that_passes() -> None:
    assert first_fetch(10, 1000, 1000) == 74
    assert first_fetch(100, 1000, 1000) == 200
    assert first_fetch(10, 100, 1000) == 740
    assert first_fetch(10, 10, 1000) == 1000  # never past the rows
