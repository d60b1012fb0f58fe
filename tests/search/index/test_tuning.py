"""Domain tier: recall measurement and the search parameter it chooses, against brute force."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest

from search_service.engine import SearchEngine
from search_service.index.search_params import EF_SEARCH_LADDER
from search_service.index.tuning import (
    RETUNE_SHARE,
    SELECTIVITIES,
    K,
    choose_value,
    exact_neighbours,
    measure_recall,
)
from search_service.index.vector_index import VectorIndex
from search_service.models import Product
from tests.search.conftest import assert_exact_top_k, brute_force, random_catalog


def unit_rows(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def oracle_neighbours(vectors: np.ndarray, keys: np.ndarray, row: int, allowed=None) -> list[int]:
    """The exact K nearest keys to row `row` among the `allowed` rows, the row itself left out."""
    others = np.ones(len(vectors), bool) if allowed is None else allowed.copy()
    others[row] = False
    rows, _ = brute_force(vectors, vectors[row], K, others)
    return keys[rows].tolist()


def oracle_recall(index: VectorIndex, vectors: np.ndarray, keys: np.ndarray, rows) -> np.ndarray:
    """Per query row: the share of its exact neighbours that the index's own search (the
    service's path, at the value in force) returns, the query left out."""
    shares = []
    for row in rows:
        found, _ = index.search(vectors[row], K + 1)
        found = [key for key in found.tolist() if key != keys[row]][:K]
        shares.append(len(set(found) & set(oracle_neighbours(vectors, keys, row))) / K)
    return np.array(shares)


@pytest.fixture(scope="module")
def hnsw_5k() -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    """An HNSW8 index of 5,000 isotropic unit vectors of dim 32: recall grows with efSearch."""
    vectors = unit_rows(5000, 32)
    keys = np.arange(5000, dtype=np.int64) * 2 + 7
    index = VectorIndex(32, "HNSW8")
    index.put(keys, vectors)
    return index, keys, vectors


def test_exact_neighbours_over_pages_and_masks_equal_brute_force() -> None:
    vectors = unit_rows(3000, 16, seed=1)
    keys = np.arange(3000, dtype=np.int64) * 3
    rng = np.random.default_rng(2)
    query_rows = rng.choice(3000, 40, replace=False)
    allowed = rng.random(3000) < 0.02
    mask = np.zeros(keys.max() + 1, bool)
    mask[keys[allowed]] = True
    pages = [
        (keys[start : start + 700], vectors[start : start + 700]) for start in range(0, 3000, 700)
    ]
    every, filtered = exact_neighbours(
        vectors[query_rows], keys[query_rows], pages, K, [None, mask]
    )
    for number, row in enumerate(query_rows.tolist()):
        assert every[number].tolist() == oracle_neighbours(vectors, keys, row)
        expected = oracle_neighbours(vectors, keys, row, allowed)
        assert every[number].shape == (K,)
        assert filtered[number].tolist() == expected + [-1] * (K - len(expected))


def test_measured_recall_equals_the_oracle_at_each_value(hnsw_5k: tuple) -> None:
    index, keys, vectors = hnsw_5k
    rows = np.random.default_rng(3).choice(len(keys), 200, replace=False)
    before = index.search_value
    try:
        for value in (16, 64):
            in_force = index.search_value
            measured = measure_recall(index, vectors, keys, keys[rows], value)
            assert index.search_value == in_force  # measured beside it, not put in force
            index.set_search_value(value)
            assert measured == pytest.approx(oracle_recall(index, vectors, keys, rows).mean())
    finally:
        index.set_search_value(before)


def test_chosen_value_reaches_the_target_on_held_out_queries(hnsw_5k: tuple) -> None:
    index, keys, vectors = hnsw_5k
    rng = np.random.default_rng(4)
    order = rng.permutation(len(keys))
    tuning_rows, held_out_rows = order[:500], order[500:1000]
    queries = vectors[tuning_rows]
    truth = exact_neighbours(queries, keys[tuning_rows], [(keys, vectors)], K, [None])[0]
    target = 0.97
    choice = choose_value(index, queries, keys[tuning_rows], truth, target)
    assert choice.reached and choice.recall >= target and choice.value in EF_SEARCH_LADDER
    # The smallest value that reaches it: every value tried before fell short.
    assert [value for value, _ in choice.tried] == list(EF_SEARCH_LADDER[: len(choice.tried)])
    assert all(recall < target for _, recall in choice.tried[:-1]) and len(choice.tried) > 1
    before = index.search_value
    try:
        index.set_search_value(choice.value)
        held_out = oracle_recall(index, vectors, keys, held_out_rows)
    finally:
        index.set_search_value(before)
    # Another sample of the same catalog: within three standard errors of the mean.
    error = held_out.std(ddof=1) / np.sqrt(len(held_out))
    assert held_out.mean() >= target - 3 * error


def tagged_catalog(count: int, dim: int, shares: dict[str, float], seed: int = 5):
    """Products whose attribute `tag` is one of `shares` (each on that share of the catalog,
    the rest untagged), with isotropic vectors."""
    products, vectors = random_catalog(count, dim, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(count)
    tags = {}
    start = 0
    for tag, share in shares.items():
        chosen = order[start : start + round(share * count)]
        start += len(chosen)
        tags.update(dict.fromkeys(chosen.tolist(), tag))
    tagged = [
        Product(id=p.id, name=p.name, attributes={"tag": tags.get(i, "none")}, model_id=p.model_id)
        for i, p in enumerate(products)
    ]
    return tagged, vectors


def test_filtered_queries_return_k_that_pass_and_meet_the_target(
    open_engine: Callable[..., SearchEngine], sqlite_url: str
) -> None:
    """At 0.1% the result is exactly brute force over the filtered products; at 1% and 10%
    (the index or the scan, as measured), k that pass, at the recall target on average."""
    shares = {"thousandth": 0.001, "hundredth": 0.01, "tenth": 0.1}
    products, vectors = tagged_catalog(20_000, 32, shares)
    engine = open_engine(sqlite_url, index_factory="HNSW16", target_recall=0.95)
    engine.upsert_products(products, vectors)
    tuning = engine.tuner.tune()
    assert tuning.status == "measured" and tuning.reached
    assert [level.selectivity for level in tuning.filters] == list(SELECTIVITIES)
    narrowest = tuning.filters[-1]
    assert narrowest.allowed == 20 and narrowest.exact
    assert tuning.exact_filter_limit >= narrowest.allowed
    tags = np.array([p.attributes["tag"] for p in products])
    ids = np.array([p.id for p in products])
    queries = unit_rows(30, 32, seed=6)
    for tag in shares:
        allowed = tags == tag
        hits = 0
        for query in queries:
            result = engine.search_vector(query, top_k=K, terms=[("attributes.tag", tag)])
            found = [match.product.id for match in result.matches]
            rows, expected = brute_force(vectors, query, K, allowed)
            assert len(found) == K and all(tags[int(i[1:])] == tag for i in found)
            if tag == "thousandth":
                true_score = dict(zip(ids.tolist(), (vectors @ query).tolist(), strict=True)).get
                scores = np.array([match.score for match in result.matches])
                assert_exact_top_k(found, scores, ids[rows].tolist(), expected, true_score)
            hits += len(set(found) & set(ids[rows].tolist()))
        assert hits / (K * len(queries)) >= 0.95 - 0.03  # 300 neighbours: about +-0.013


def test_an_unreachable_target_says_so_with_the_best_seen(
    open_engine: Callable[..., SearchEngine], sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Product quantization caps recall whatever nprobe: the best is put in force, reached is
    false, and a warning names the target and the best."""
    products, vectors = random_catalog(3000, 32, seed=7)
    engine = open_engine(sqlite_url, index_factory="IVF16,PQ4x4", target_recall=0.99)
    engine.upsert_products(products, vectors)
    with caplog.at_level(logging.WARNING, logger="search_service.index.tuning"):
        tuning = engine.tuner.tune()
    assert tuning.parameter == "nprobe" and not tuning.reached
    assert tuning.measured_recall < 0.99
    assert engine.mirror.index.search_value == tuning.value
    warning = caplog.records[-1].getMessage()
    assert "cannot reach recall@10 0.990" in warning
    assert f"the best measured is {tuning.measured_recall:.3f}, at nprobe={tuning.value}" in warning


def test_measured_again_once_a_tenth_changed_or_rebuilt_and_never_for_flat(
    open_engine: Callable[..., SearchEngine], sqlite_url: str, tmp_path
) -> None:
    products, vectors = random_catalog(2000, 16, seed=8)
    engine = open_engine(sqlite_url, index_factory="HNSW16", target_recall=0.9)
    assert engine.tuner.tuning.status == "pending"
    engine.upsert_products(products[:1000], vectors[:1000])
    assert engine.tuner.tune_if_due() is not None and not engine.tuner.due()
    changed = round(RETUNE_SHARE * 1000)
    engine.upsert_products(products[1000 : 1000 + changed - 1], vectors[1000 : 1000 + changed - 1])
    assert not engine.tuner.due()
    engine.upsert_products(products[1999:], vectors[1999:])
    assert engine.tuner.due()
    tuning = engine.tuner.tune_if_due()
    assert tuning.measured_at_version == engine.mirror.version and not engine.tuner.due()
    # A rebuilt index is another index: measured again, with the last value until then.
    mirror = engine.mirror
    rebuilt = mirror._build(mirror.catalog.state())  # noqa: SLF001 - as a reload rebuilds
    with mirror.lock.write():
        mirror.index = rebuilt
    assert engine.tuner.due() and rebuilt.search_value != tuning.value
    engine.tuner._carry_over(rebuilt)  # noqa: SLF001 - what tune does first
    assert rebuilt.search_value == tuning.value
    assert engine.tuner.tune_if_due() is not None and not engine.tuner.due()

    flat = open_engine(f"sqlite:///{tmp_path}/flat.db", tmp_path / "flat", target_recall=0.9)
    flat.upsert_products(products, vectors)
    assert not flat.tuner.enabled and not flat.tuner.due()
    assert flat.tuner.tuning.status == "exact"
