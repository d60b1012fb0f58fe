"""Domain tier: the FAISS index against the numpy oracle, and its snapshots."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from search_service.engine import SearchEngine
from search_service.index import gpu
from search_service.index.vector_index import (
    DIRECT_LIMIT,
    IndexNotReady,
    SnapshotError,
    VectorIndex,
    all_cores,
    check_index_settings,
    single_threaded,
    training_need,
)
from search_service.storage.catalog import Catalog
from tests.search.conftest import assert_exact_top_k, brute_force, random_catalog


def unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module", params=[1, 3], ids=["one scan thread", "three shards"])
def flat_10k(request: pytest.FixtureRequest) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    """A Flat index of 10,000 random unit vectors of dim 64 under scattered keys."""
    vectors = unit_rows(10_000, 64)
    keys = np.arange(10_000, dtype=np.int64) * 3 + 5
    index = VectorIndex(64, scan_threads=request.param)
    index.put(keys, vectors)
    return index, keys, vectors


@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_flat_search_equals_brute_force(flat_10k: tuple, k: int) -> None:
    index, keys, vectors = flat_10k
    for query in unit_rows(20, 64, seed=k):
        found, scores = index.search(query, k)
        rows, expected = brute_force(vectors, query, k)
        true_score = dict(zip(keys.tolist(), (vectors @ query).tolist(), strict=True)).get
        assert_exact_top_k(found.tolist(), scores, keys[rows].tolist(), expected, true_score)


@pytest.mark.parametrize("share", [0.0003, 0.1, 0.5])
def test_filtered_flat_search_equals_brute_force_among_allowed(
    flat_10k: tuple, share: float
) -> None:
    """Narrow filters (scored directly) and wide ones (selector scan) are both exact."""
    index, keys, vectors = flat_10k
    rng = np.random.default_rng(7)
    allowed_rows = rng.random(len(keys)) < share
    allowed_rows[:3] = True
    for query in unit_rows(10, 64, seed=11):
        found, scores = index.search(query, 10, keys[allowed_rows])
        rows, expected = brute_force(vectors, query, 10, allowed_rows)
        true_score = dict(zip(keys.tolist(), (vectors @ query).tolist(), strict=True)).get
        assert_exact_top_k(found.tolist(), scores, keys[rows].tolist(), expected, true_score)
        assert len(found) == min(10, int(allowed_rows.sum()))


@pytest.mark.parametrize("scan_threads", [1, 2])
def test_flat_search_widens_candidates_when_float16_cannot_tell_them_apart(
    scan_threads: int,
) -> None:
    """Hundreds of vectors within the float16 error of each other: still the float32 order."""
    rng = np.random.default_rng(3)
    base = unit_rows(1, 32)[0]
    # Scores spread over ~1e-3: inside float16's error, far apart for float32.
    noise = rng.standard_normal((3000, 32)).astype(np.float32) * 8e-3
    vectors = base + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = np.arange(3000, dtype=np.int64)
    index = VectorIndex(32, scan_threads=scan_threads)
    index.put(keys, vectors)
    found, scores = index.search(base, 10)
    rows, expected = brute_force(vectors, base, 10)
    true_score = dict(enumerate((vectors @ base).tolist())).get
    assert_exact_top_k(found.tolist(), scores, rows.tolist(), expected, true_score)


def test_put_replaces_and_remove_forgets() -> None:
    vectors = unit_rows(100, 16)
    index = VectorIndex(16, scan_threads=2)
    index.put(np.arange(100), vectors)
    index.put(np.array([5]), -vectors[5:6])  # replaced, not duplicated
    assert len(index) == 100
    found, _ = index.search(-vectors[5], 1)
    assert found.tolist() == [5]
    assert index.remove(np.array([5, 6, 999])) == 2
    assert len(index) == 98 and 5 not in index and 7 in index
    assert index.keys().tolist() == [k for k in range(100) if k not in (5, 6)]


def _storage_addresses(index: VectorIndex) -> list[int]:
    """Where the exact copy and each float16 shard keep their vectors."""
    parts = [index._exact, *index._coarse]  # noqa: SLF001 - the storage is the point here
    return [
        faiss.rev_swig_ptr(faiss.downcast_index(part.index).codes.data(), 1).ctypes.data
        for part in parts
    ]


@pytest.mark.parametrize("reserved", [0, 1000])
def test_reserve_makes_room_once_and_the_adds_stay_exact(reserved: int) -> None:
    vectors = unit_rows(1010, 16)
    index = VectorIndex(16, scan_threads=2)
    index.put(np.arange(10), vectors[:10])
    index.reserve(reserved)
    assert len(index) == 10  # room, not vectors
    before = _storage_addresses(index)
    for start in range(10, 1010, 100):
        index.put(np.arange(start, start + 100), vectors[start : start + 100])
    assert (_storage_addresses(index) == before) == (reserved > 0)  # no move once reserved
    assert np.array_equal(index.vectors(np.arange(1010)), vectors)
    found, scores = index.search(vectors[500], 3)
    assert found[0] == 500 and scores[0] == pytest.approx(1.0, abs=1e-6)


def test_room_the_allocator_refuses_is_skipped_and_the_index_grows_as_vectors_come(
    caplog: pytest.LogCaptureFixture,
) -> None:
    vectors = unit_rows(200, 16)
    index = VectorIndex(16, scan_threads=2)
    index.put(np.arange(100), vectors[:100])
    index.reserve(2**40)  # 64 TB: std::bad_alloc, which FAISS raises as MemoryError
    assert "no memory for 1099511627776 more vectors at once" in caplog.text
    index.put(np.arange(100, 200), vectors[100:])
    assert np.array_equal(index.vectors(np.arange(200)), vectors)


def test_reserve_leaves_approximate_indexes_alone() -> None:
    index = VectorIndex(16, "HNSW8")
    index.reserve(1000)
    index.put(np.arange(50), unit_rows(50, 16))
    assert len(index) == 50


def test_snapshot_round_trip_keeps_vectors_and_meta(tmp_path: Path, flat_10k: tuple) -> None:
    index, keys, vectors = flat_10k
    path = tmp_path / "index.snapshot"
    index.save(path, {"version": 42, "catalog_id": "c"})
    loaded, meta = VectorIndex.load(path, scan_threads=2)
    assert meta["version"] == 42 and meta["size"] == len(keys)
    assert loaded.keys().tolist() == sorted(keys.tolist())
    found, scores = loaded.search(vectors[17], 5)
    assert found[0] == keys[17]
    np.testing.assert_allclose(scores[0], 1.0, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing"])
def test_damaged_snapshots_are_refused(tmp_path: Path, damage: str) -> None:
    index = VectorIndex(16)
    index.put(np.arange(50), unit_rows(50, 16))
    path = tmp_path / "index.snapshot"
    index.save(path, {"version": 1})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(data)
    elif damage == "garbage":
        path.write_bytes(b"not a snapshot at all")
    else:
        path.unlink()
    with pytest.raises(SnapshotError):
        VectorIndex.load(path)


def test_snapshot_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    index = VectorIndex(8)
    index.put(np.arange(10), unit_rows(10, 8))
    index.save(tmp_path / "index.snapshot", {"version": 1})
    index.save(tmp_path / "index.snapshot", {"version": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["index.snapshot"]


def test_hnsw_recall_tombstones_and_narrow_filters() -> None:
    vectors = unit_rows(3000, 32)
    keys = np.arange(3000, dtype=np.int64) + 100
    index = VectorIndex(32, "HNSW32")
    index.put(keys, vectors)
    queries = unit_rows(50, 32, seed=9)
    hits = 0
    for query in queries:
        found, _ = index.search(query, 10)
        rows, _ = brute_force(vectors, query, 10)
        hits += len(set(found.tolist()) & set(keys[rows].tolist()))
    assert hits / 500 >= 0.9
    # Removing leaves tombstones that searches skip; replacing re-adds under the same key.
    index.remove(keys[:1000])
    index.put(keys[:10], vectors[:10])
    assert len(index) == 2010 and index.dead_fraction > 0.3
    found, _ = index.search(vectors[500], 50)
    assert not set(found.tolist()) & set(keys[10:1000].tolist())
    found, _ = index.search(vectors[3], 1)
    assert found.tolist() == [keys[3]]
    # A narrow filter the graph walk would miss still returns every allowed product.
    allowed = keys[[1500, 2500, 2999]]
    found, scores = index.search(queries[0], 10, allowed)
    assert sorted(found.tolist()) == sorted(allowed.tolist())
    np.testing.assert_allclose(
        np.sort(scores), np.sort(vectors[allowed - 100] @ queries[0]), atol=1e-5
    )


def test_wide_filter_on_hnsw_returns_top_k_of_allowed() -> None:
    vectors = unit_rows(6000, 16)
    keys = np.arange(6000, dtype=np.int64)
    index = VectorIndex(16, "HNSW32")
    index.put(keys, vectors)
    allowed = keys[keys % 2 == 0]
    assert len(allowed) > DIRECT_LIMIT
    found, _ = index.search(vectors[0], 20, allowed)
    assert len(found) == 20 and all(k % 2 == 0 for k in found.tolist())


def test_ivf_needs_training_and_says_how_much() -> None:
    assert training_need("IVF16,Flat") == 1000  # FAISS's 39 per centroid, at least 1000
    assert training_need("IVF4096,PQ64") == 39 * 4096
    index = VectorIndex(16, "IVF16,Flat")
    assert not index.is_trained
    with pytest.raises(IndexNotReady):
        index.put(np.arange(3), unit_rows(3, 16))
    vectors = unit_rows(training_need("IVF16,Flat"), 16)
    index.train(vectors)
    index.put(np.arange(len(vectors)), vectors)
    found, _ = index.search(vectors[7], 1)
    assert found.tolist() == [7]
    assert index.vectors(np.array([7])).shape == (1, 16)


def test_pq_index_without_selectors_overfetches_for_filters() -> None:
    vectors = unit_rows(5000, 16)
    index = VectorIndex(16, "PQ4x4")
    index.train(vectors[:1000])
    index.put(np.arange(5000), vectors)
    allowed = np.arange(0, 5000, 2, dtype=np.int64)  # wider than DIRECT_LIMIT
    found, _ = index.search(vectors[3], 10, allowed)
    assert len(found) == 10 and all(k % 2 == 0 for k in found.tolist())


def test_bad_factory_or_params_are_refused_with_faiss_reason() -> None:
    check_index_settings("HNSW32", "efSearch=64", 512)
    with pytest.raises(ValueError, match="could not parse index string Nope"):
        check_index_settings("Nope", "", 512)
    with pytest.raises(ValueError, match="could not set parameter nprobe"):
        check_index_settings("HNSW32", "nprobe=4", 512)


def test_openmp_threads_are_set_per_thread_and_restored() -> None:
    def inside_worker() -> tuple[int, int, int]:
        single_threaded()
        with all_cores():
            during = faiss.omp_get_max_threads()
        return faiss.omp_get_max_threads(), during, faiss.omp_get_max_threads()

    mine = faiss.omp_get_max_threads()
    with ThreadPoolExecutor(1) as worker:
        before, during, after = worker.submit(inside_worker).result()
    assert (before, during, after) == (1, os.cpu_count(), 1)
    assert faiss.omp_get_max_threads() == mine  # this thread kept its own setting


def test_snapshot_loads_with_other_search_params_without_a_rebuild(tmp_path: Path) -> None:
    """efSearch is a search-time setting: a snapshot written at 16 loads at 128, in force."""
    vectors = unit_rows(3000, 32)
    keys = np.arange(3000, dtype=np.int64)
    index = VectorIndex(32, "HNSW8", "efSearch=16")
    index.put(keys, vectors)
    path = tmp_path / "index.snapshot"
    index.save(path, {"version": 1})
    loaded, _meta = VectorIndex.load(path, params="efSearch=128")
    assert (index.search_value, loaded.search_value) == (16, 128)
    # The same graph searched at 128: what FAISS itself answers with efSearch=128.
    queries = unit_rows(20, 32, seed=5)
    raw = faiss.deserialize_index(faiss.serialize_index(index._ann))  # noqa: SLF001 - the graph
    _, expected = raw.search(queries, 10, params=faiss.SearchParametersHNSW(efSearch=128))
    _, at_16 = raw.search(queries, 10, params=faiss.SearchParametersHNSW(efSearch=16))
    found = np.stack([loaded.search(query, 10)[0] for query in queries])
    assert np.array_equal(found, expected) and not np.array_equal(found, at_16)


def test_a_restart_with_another_ef_search_keeps_the_snapshot(tmp_path: Path) -> None:
    url, data = f"sqlite:///{tmp_path}/catalog.db", tmp_path / "data"
    engine = SearchEngine(
        Catalog.open(url), data, index_factory="HNSW8", index_params="efSearch=16"
    )
    engine.load()
    engine.upsert_products(*random_catalog(2000, 16))
    engine.close()  # writes the snapshot
    again = SearchEngine(
        Catalog.open(url), data, index_factory="HNSW8", index_params="efSearch=128"
    )
    again.load()
    try:
        assert again.mirror.snapshot_loaded is not None  # loaded, not rebuilt
        assert again.mirror.index.search_value == 128
    finally:
        again.close()


def test_a_restart_with_another_ef_construction_rebuilds_the_graph(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """efConstruction is built into the graph: a snapshot made with another value is
    rebuilt (else only vectors added later would get it); the same value, or none
    asked, keeps it."""
    url, data = f"sqlite:///{tmp_path}/catalog.db", tmp_path / "data"

    def started(params: str) -> SearchEngine:
        engine = SearchEngine(Catalog.open(url), data, index_factory="HNSW8", index_params=params)
        engine.load()
        return engine

    engine = started("efConstruction=20")
    engine.upsert_products(*random_catalog(500, 16))
    engine.close()  # writes the snapshot
    # The last start keeps the snapshot the rebuild wrote: that graph was built with 80.
    for params, kept in [
        ("efConstruction=20", True),
        ("", True),
        ("efConstruction=80", False),
        ("efConstruction=80", True),
    ]:
        caplog.clear()
        again = started(params)
        try:
            assert (again.mirror.snapshot_loaded is not None) == kept, params
            if not kept:
                assert "was built with efConstruction=20 (asked: 80): rebuilding" in caplog.text
        finally:
            again.close()


@pytest.mark.parametrize("factory", ["HNSW8", "IVF16,Flat", "PQ4x4"])
def test_approximate_many_is_what_each_search_finds_at_that_value(factory: str) -> None:
    """The batch a measurement runs skips tombstones and leaves the value in force alone."""
    vectors = unit_rows(2000, 16, seed=2)
    keys = np.arange(2000, dtype=np.int64) + 10
    index = VectorIndex(16, factory)
    index.train(vectors)
    index.put(keys, vectors)
    index.remove(keys[::3])
    in_force = index.search_value
    value = {"HNSW8": 24, "IVF16,Flat": 2, "PQ4x4": None}[factory]
    queries = unit_rows(15, 16, seed=3)
    found = index.approximate_many(queries, 10, value)
    assert index.search_value == in_force
    if value is not None:
        index.set_search_value(value)
    for query, row in zip(queries, found, strict=True):
        assert row.tolist() == index.search(query, 10)[0].tolist()
        assert not set(row.tolist()) & set(keys[::3].tolist())


def test_search_value_reaches_the_gpu_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """On cuda an IVF replica answers the first pass: nprobe is set there too (a CPU clone
    stands in for the GPU copy here; tests/search/index/test_index_device.py runs the real one)."""
    monkeypatch.setattr(gpu, "copy_to_gpu", faiss.clone_index)
    vectors = unit_rows(2000, 16)
    index = VectorIndex(16, "IVF16,Flat", "nprobe=2", device="cuda")
    index.train(vectors)
    index.put(np.arange(2000), vectors)
    replica = index._replica.index  # noqa: SLF001 - the replica's setting is the point
    assert (index.search_value, replica.nprobe) == (2, 2)
    index.set_search_value(16)
    assert (index.search_value, replica.nprobe) == (16, 16)
