"""Domain tier: SearchEngine against the numpy oracle; snapshots, catching up, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from search_service import engine as engine_module
from search_service.encoders.embedder import QueryEmbedder
from search_service.engine import MAX_RESERVED, SearchEngine
from search_service.index import mirror as mirror_module
from search_service.index.vector_index import VectorIndex
from search_service.models import Product, SearchQuery, UpsertItem, VectorBatch
from tests.search.conftest import assert_exact_top_k, brute_force, random_catalog
from tests.search.fake_encoder import fake_vector
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

OpenEngine = Callable[..., SearchEngine]
DIM = 64
NO_ENCODER_MODEL = (
    "model_id: no encoder is configured (--encoder), so image and text queries are "
    "unavailable; product_id and vector queries work"
)


@pytest.fixture(scope="module")
def catalog_10k() -> tuple[list[Product], np.ndarray]:
    return random_catalog(10_000, DIM, seed=1)


@pytest.fixture
def engine_10k(
    open_engine: OpenEngine, sqlite_url: str, catalog_10k: tuple
) -> tuple[SearchEngine, list[Product], np.ndarray]:
    # SQLite only: these searches read the in-memory mirror, never the catalog, and the
    # catalog's own tests and the writing tests below run on PostgreSQL too.
    products, vectors = catalog_10k
    engine = open_engine(sqlite_url)
    summary = engine.upsert_products(products, vectors)
    assert (summary.inserted, summary.failed) == (10_000, 0)
    return engine, products, vectors


def check_exact(engine, products, vectors, query, k, allowed=None, exclude=None, **search):
    result = engine.search_vector(query if exclude is None else None, top_k=k, **search)
    oracle_allowed = np.ones(len(products), bool) if allowed is None else allowed.copy()
    if exclude is not None:
        oracle_allowed[exclude] = False
    rows, expected = brute_force(vectors, query, k, oracle_allowed)
    scores = {p.id: float(s) for p, s in zip(products, vectors @ query, strict=True)}
    found = [m.product.id for m in result.matches]
    got = np.array([m.score for m in result.matches])
    assert_exact_top_k(found, got, [products[r].id for r in rows], expected, scores.get)
    assert all(m.product == products[int(m.product.id[1:])] for m in result.matches)


def test_search_by_vector_is_the_brute_force_top_k(engine_10k: tuple) -> None:
    engine, products, vectors = engine_10k
    rng = np.random.default_rng(5)
    for k in (1, 10, 100):
        for _ in range(10):
            query = rng.standard_normal(DIM).astype(np.float32) * 3  # normalized on entry
            check_exact(engine, products, vectors, query / np.linalg.norm(query), k)


def test_search_by_product_id_excludes_itself(engine_10k: tuple) -> None:
    engine, products, vectors = engine_10k
    for row in (0, 17, 4242, 9999):
        result = engine.search_vector(product_id=products[row].id, top_k=10)
        assert products[row].id not in [m.product.id for m in result.matches]
        allowed = np.ones(len(products), bool)
        allowed[row] = False
        rows, expected = brute_force(vectors, vectors[row], 10, allowed)
        assert [m.product.id for m in result.matches] == [products[r].id for r in rows]
        np.testing.assert_allclose([m.score for m in result.matches], expected, atol=1e-5)


@pytest.mark.parametrize(
    "filters",
    [
        {"gender": "Men"},
        {"masterCategory": "Footwear", "baseColour": "Navy Blue"},
        {"article_type": "Type3", "year": "2012", "attributes.fit": "slim"},
        {"id": "p77"},
    ],
)
def test_filtered_search_is_the_brute_force_top_k_among_passing(
    engine_10k: tuple, filters: dict
) -> None:
    from search_service.index.filters import parse_filters

    engine, products, vectors = engine_10k
    terms = parse_filters(filters)

    def passes(product: Product) -> bool:
        for name, value in terms:
            if name.startswith("attributes."):
                held = product.attributes.get(name.split(".", 1)[1])
            elif name == "id":
                held = product.id
            else:
                held = str(getattr(product, name))
            if held != value:
                return False
        return True

    allowed = np.array([passes(p) for p in products])
    rng = np.random.default_rng(8)
    for _ in range(5):
        query = vectors[rng.integers(len(vectors))]
        check_exact(engine, products, vectors, query, 25, allowed, terms=terms)
    if allowed.sum() > 30:
        row = int(np.flatnonzero(allowed)[3])
        result = engine.search_vector(product_id=products[row].id, top_k=30, terms=terms)
        assert len(result.matches) == 30  # the filter never makes a page come back short
        assert all(passes(m.product) for m in result.matches)


@pytest.fixture
def ran_in(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread each search of the engine ran in, in order."""
    names: list[str] = []
    search_held = engine_module._search_held

    def recorded(*args, **kwargs):
        names.append(threading.current_thread().name)
        return search_held(*args, **kwargs)

    monkeypatch.setattr(engine_module, "_search_held", recorded)
    return names


def test_searches_run_on_the_event_loop_while_short_else_in_threads_alike(
    engine_10k: tuple, ran_in: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short search runs on the event loop; past INLINE_SEARCH_S, or while a write
    holds the index, in a search thread (the loop meanwhile serves others): the answer
    is the same brute-force top-k either way."""
    engine, products, vectors = engine_10k
    rng = np.random.default_rng(9)
    queries = rng.standard_normal((20, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    def expect(result, query) -> None:
        rows, expected = brute_force(vectors, query, 10, np.ones(len(products), bool))
        assert [m.product.id for m in result.matches] == [products[r].id for r in rows]
        assert np.allclose([m.score for m in result.matches], expected, atol=1e-5)

    async def searches() -> list:
        return [await engine.search(SearchQuery(vector=q, top_k=10)) for q in queries]

    # 10,000 x 64-d Flat: well under INLINE_SEARCH_S, so on the loop's own thread.
    for result, query in zip(asyncio.run(searches()), queries, strict=True):
        expect(result, query)
    assert set(ran_in) == {threading.main_thread().name}
    # A filtered search may scan the passing products exactly: always in a thread.
    filtered = SearchQuery(vector=queries[0], top_k=10, filters={"gender": "Men"})
    men = np.array([p.gender == "Men" for p in products])
    rows, expected = brute_force(vectors, queries[0], 10, men)
    result = asyncio.run(engine.search(filtered))
    assert [m.product.id for m in result.matches] == [products[r].id for r in rows]
    assert ran_in[-1].startswith("search")

    ran_in.clear()
    monkeypatch.setattr(engine_module, "INLINE_SEARCH_S", 0.0)  # every search is "long"
    for result, query in zip(asyncio.run(searches()), queries, strict=True):
        expect(result, query)
    assert len(ran_in) == 20 and all(name.startswith("search") for name in ran_in)

    monkeypatch.setattr(engine_module, "INLINE_SEARCH_S", 1.0)
    ran_in.clear()
    writing, leave = threading.Event(), threading.Event()

    def writer() -> None:
        with engine.mirror.lock.write():
            writing.set()
            leave.wait(5)

    async def during_a_write() -> None:
        thread = threading.Thread(target=writer)
        thread.start()
        assert writing.wait(5)
        pending = asyncio.ensure_future(engine.search(SearchQuery(vector=queries[0], top_k=10)))
        await asyncio.sleep(0.1)  # the loop is free meanwhile
        assert not pending.done()
        leave.set()
        expect(await pending, queries[0])
        thread.join()

    asyncio.run(during_a_write())
    assert len(ran_in) == 1 and ran_in[0].startswith("search")


@pytest.mark.parametrize(
    ("factory", "from_catalog"), [("HNSW8", False), ("IVF4,Flat", False), ("IVF4,PQ4x4", True)]
)
def test_a_product_id_query_reads_the_catalog_only_for_a_lossy_index_and_off_the_loop(
    open_engine: OpenEngine,
    sqlite_url: str,
    ran_in: list[str],
    monkeypatch: pytest.MonkeyPatch,
    factory: str,
    from_catalog: bool,
) -> None:
    """HNSW and IVF-Flat keep each vector as it came: a product's is read from them, on the
    event loop. A PQ code is not the vector: that one comes from the catalog (SQL, maybe
    over a network), in a search thread. Either way the product's neighbours are those of
    its vector."""
    engine = open_engine(sqlite_url, index_factory=factory)
    products, vectors = random_catalog(1500, DIM, seed=3)  # enough to train the IVFs
    engine.upsert_products(products, vectors)
    read = []
    vectors_of = engine.catalog.vectors_of

    def reading(keys):
        read.append(keys)
        return vectors_of(keys)

    monkeypatch.setattr(engine.catalog, "vectors_of", reading)
    by_vector = asyncio.run(engine.search(SearchQuery(vector=vectors[7], top_k=5)))
    by_id = asyncio.run(engine.search(SearchQuery(product_id=products[7].id, top_k=4)))
    assert bool(read) == from_catalog
    assert ran_in[0] == threading.main_thread().name
    assert ran_in[1].startswith("search") if from_catalog else ran_in[1] == ran_in[0]
    # The same search, less the product itself (PQ's coarse scores may not rank it first).
    found = [m.product.id for m in by_vector.matches]
    assert [m.product.id for m in by_id.matches] == [f for f in found if f != products[7].id][:4]


def test_paging_and_min_score(engine_10k: tuple) -> None:
    engine, products, vectors = engine_10k
    query = vectors[123]
    whole = engine.search_vector(query, top_k=50).matches
    pages = [engine.search_vector(query, top_k=10, offset=o).matches for o in range(0, 50, 10)]
    assert [m.product.id for page in pages for m in page] == [m.product.id for m in whole]
    threshold = whole[20].score
    above = engine.search_vector(query, top_k=50, min_score=threshold).matches
    assert [m.product.id for m in above] == [m.product.id for m in whole[:21]]


def test_query_checks_name_the_field(engine_10k: tuple) -> None:
    engine, _, vectors = engine_10k

    def search(**query):
        return asyncio.run(engine.search(SearchQuery(**query)))

    cases = [
        ({}, InvalidArgument, "query: set exactly one of image, text, product_id and vector"),
        ({"product_id": "x", "text": "y"}, InvalidArgument, "query: set exactly one of"),
        ({"vector": vectors[0], "top_k": -1}, InvalidArgument, "top_k: must be between 1 and 1000"),
        ({"vector": vectors[0], "top_k": 1001}, InvalidArgument, "top_k: must be between 1 and"),
        ({"vector": vectors[0], "offset": -1}, InvalidArgument, "offset: must not be negative"),
        ({"vector": vectors[0], "offset": 9995, "top_k": 10}, InvalidArgument, "offset: offset +"),
        ({"vector": vectors[0][:5]}, InvalidArgument, "vector: expected 64 values"),
        ({"product_id": "nope"}, NotFound, "product_id: no product 'nope' in the catalog"),
        ({"product_id": ""}, InvalidArgument, "product_id: must not be empty"),
        ({"text": "  "}, InvalidArgument, "text: must not be empty"),
        ({"image": b"jpeg"}, Unavailable, "image: no encoder is configured (--encoder)"),
        ({"vector": vectors[0], "filters": {"colour": "x"}}, InvalidArgument, "filters: unknown"),
        ({"vector": vectors[0], "min_score": float("nan")}, InvalidArgument, "min_score: must be"),
        ({"vector": vectors[0], "min_score": -1.01}, InvalidArgument, "min_score: must be a"),
    ]
    for query, error, message in cases:
        with pytest.raises(error) as caught:
            search(**query)
        assert caught.value.message.startswith(message), (query, caught.value.message)


NOT_STORED = (
    "vector, image: set one of them (only a product in the catalog may come without, "
    "to change its metadata and keep its vector)"
)


def test_a_product_sent_without_vector_or_image_changes_its_metadata_alone(
    open_engine: OpenEngine, catalog_url: str
) -> None:
    """Neither vector nor image: the stored vector and model stay, exact, under the same key;
    the index finds the product by that vector with its new metadata."""
    engine = open_engine(catalog_url)
    products, vectors = random_catalog(4, 4)
    engine.upsert_products(products, vectors)
    key, stored = engine.mirror.keys["p0"], engine.get("p0", include_vector=True)[1]

    async def stream(items):
        for item in items:
            yield item

    items = [
        UpsertItem(dataclasses.replace(products[0], name="Renamed", model_id="")),
        UpsertItem(dataclasses.replace(products[1], model_id="")),  # the same metadata
        UpsertItem(Product(id="ghost", name="never stored")),
        UpsertItem(dataclasses.replace(products[2], name="x", model_id="other")),
        # Inserted, then renamed in the same stream: applied in order, as any repeat.
        UpsertItem(Product(id="fresh", model_id="test-model"), vectors[3]),
        UpsertItem(Product(id="fresh", name="named later")),
    ]
    summary = asyncio.run(engine.upsert(stream(items)))
    assert (summary.inserted, summary.updated, summary.unchanged) == (1, 2, 1)
    assert {f.id: (f.code, f.message) for f in summary.failures} == {
        "ghost": (3, NOT_STORED),
        "p2": (3, "model_id: 'other' but no vector; the stored vector is of model 'test-model'"),
    }
    product, vector = engine.get("p0", include_vector=True)
    assert (product.name, product.model_id) == ("Renamed", "test-model")
    assert engine.mirror.keys["p0"] == key
    assert np.array_equal(vector, stored)
    assert engine.get("p2")[0].name == products[2].name
    fresh, fresh_vector = engine.get("fresh", include_vector=True)
    assert (fresh.name, fresh.model_id) == ("named later", "test-model")
    np.testing.assert_allclose(fresh_vector, vectors[3], atol=1e-6)
    with pytest.raises(NotFound):
        engine.get("ghost")
    [match] = asyncio.run(engine.search(SearchQuery(vector=vectors[0], top_k=1))).matches
    assert (match.product.id, match.product.name) == ("p0", "Renamed")


def test_a_metadata_change_without_an_image_hash_keeps_the_stored_one(
    open_engine: OpenEngine, catalog_url: str
) -> None:
    """The hash names the image of the kept vector: an indexer's rerun must still find the
    image unchanged after a client renamed the product without sending it."""
    engine = open_engine(catalog_url)
    products, vectors = random_catalog(2, 4)
    hashes = ["a" * 64, "b" * 64]
    stored = [dataclasses.replace(p, image_sha256=h) for p, h in zip(products, hashes, strict=True)]
    engine.upsert_products(stored, vectors)

    async def stream(items):
        for item in items:
            yield item

    renamed = [
        UpsertItem(Product(id="p0", name="Renamed")),
        UpsertItem(Product(id="p1", name="Renamed too", image_sha256="c" * 64)),
    ]
    summary = asyncio.run(engine.upsert(stream(renamed)))
    assert (summary.updated, summary.failed) == (2, 0)
    assert engine.catalog.get("p0")[1].image_sha256 == "a" * 64  # the stored one, kept
    assert engine.catalog.get("p1")[1].image_sha256 == "c" * 64  # the one sent
    assert engine.get("p0")[0].image_sha256 == "a" * 64  # the index's record alike
    again = asyncio.run(engine.upsert(stream(renamed[:1])))
    assert again.unchanged == 1


def test_upsert_stream_counts_each_outcome_and_last_duplicate_wins(
    open_engine: OpenEngine, catalog_url: str
) -> None:
    engine = open_engine(catalog_url)
    products, vectors = random_catalog(5, 4)

    async def stream(items):
        for item in items:
            yield item

    items = [UpsertItem(p, v) for p, v in zip(products, vectors, strict=True)]
    items += [
        UpsertItem(dataclasses.replace(products[0], name="second"), vectors[0]),  # repeat: update
        UpsertItem(products[1], vectors[1]),  # repeat, unchanged
        UpsertItem(Product(id="", model_id="test-model"), vectors[0]),
        UpsertItem(Product(id="both", model_id="test-model"), vectors[0], image=b"x"),
        UpsertItem(Product(id="neither", model_id="test-model")),
        UpsertItem(Product(id="nan", model_id="test-model"), np.full(4, np.nan, np.float32)),
        UpsertItem(Product(id="zero", model_id="test-model"), np.zeros(4, np.float32)),
        UpsertItem(Product(id="dim", model_id="test-model"), np.ones(3, np.float32)),
        UpsertItem(Product(id="model", model_id="other"), vectors[0]),
        UpsertItem(Product(id="nomodel"), vectors[0]),
        UpsertItem(Product(id="sha", model_id="test-model", image_sha256="XYZ"), vectors[0]),
        UpsertItem(Product(id="nul", season="a\x00", model_id="test-model"), vectors[0]),
        UpsertItem(Product(id="longmodel", model_id="m" * 257), vectors[0]),
    ]
    summary = asyncio.run(engine.upsert(stream(items)))
    assert (summary.inserted, summary.updated, summary.unchanged) == (5, 1, 1)
    failures = {f.id: (f.code, f.message) for f in summary.failures}
    assert failures == {
        "": (3, "id: must be 1 to 256 characters, got 0"),
        "both": (3, "vector, image: set one of them, not both"),
        "neither": (3, NOT_STORED),
        "nan": (3, "vector: value 0 is not finite (nan)"),
        "zero": (3, "vector: has zero norm"),
        "dim": (
            9,
            "vector: 3 values, but the catalog holds 4-dimensional vectors of model 'test-model'",
        ),
        "model": (9, "model_id: 'other' differs from the catalog's model 'test-model'"),
        "nomodel": (14, NO_ENCODER_MODEL),
        "sha": (3, "image_sha256: must be 64 lower-case hex digits"),
        "nul": (3, "season: must not contain NUL characters (U+0000)"),
        "longmodel": (3, "model_id: must be at most 256 characters, got 257"),
    }
    assert summary.failed == 11
    assert engine.get("p0")[0].name == "second"
    assert summary.catalog_version == engine.mirror.version == 2


def test_bulk_upsert_fails_bad_rows_alone_and_cuts_batches_at_repeats(
    open_engine: OpenEngine, catalog_url: str
) -> None:
    engine = open_engine(catalog_url, batch_size=3)
    products, vectors = random_catalog(5, 4)
    extra = [
        dataclasses.replace(products[0], name="second"),  # repeat: update, the last wins
        products[1],  # repeat, unchanged
        Product(id="", model_id="test-model"),
        Product(id="nan", model_id="test-model"),
        Product(id="zero", model_id="test-model"),
        Product(id="model", model_id="other"),
        Product(id="sha", model_id="test-model", image_sha256="XYZ"),
        Product(id="tiny", model_id="test-model"),
        Product(id="nomodel"),
        # PostgreSQL stores no NUL in text (it refused the whole batch): refused alone, anywhere.
        Product(id="nul", name="a\x00b", model_id="test-model"),
        Product(id="nulattr", attributes={"colour": "red\x00"}, model_id="test-model"),
        # Longer than the catalog's column: refused alone (PostgreSQL refused the batch).
        Product(id="longmodel", model_id="m" * 257),
    ]
    rows = [vectors[0], vectors[1], vectors[0], [np.nan] * 4, [0.0] * 4, vectors[0]]
    rows += [vectors[0], [1e-30] * 4]  # a norm float32 cannot hold is normalized in float64
    rows += [vectors[0], vectors[2], vectors[3], vectors[0]]
    summary = engine.upsert_products(products + extra, np.vstack([vectors, rows]))
    assert (summary.inserted, summary.updated, summary.unchanged) == (6, 1, 1)
    failures = {f.id: (f.code, f.message) for f in summary.failures}
    assert failures == {
        "": (3, "id: must be 1 to 256 characters, got 0"),
        "nan": (3, "vector: value 0 is not finite (nan)"),
        "zero": (3, "vector: has zero norm"),
        "model": (9, "model_id: 'other' differs from the catalog's model 'test-model'"),
        "sha": (3, "image_sha256: must be 64 lower-case hex digits"),
        # As in the stream: no model id means the encoders', and there are none here.
        "nomodel": (14, NO_ENCODER_MODEL),
        "nul": (3, "name: must not contain NUL characters (U+0000)"),
        "nulattr": (3, "attributes['colour']: must not contain NUL characters (U+0000)"),
        "longmodel": (3, "model_id: must be at most 256 characters, got 257"),
    }
    assert engine.get("p0")[0].name == "second"
    np.testing.assert_allclose(engine.get("tiny", include_vector=True)[1], [0.5] * 4)
    assert engine.index_keys().size == engine.catalog.count() == 6
    assert summary.catalog_version == engine.mirror.version

    with pytest.raises(InvalidArgument, match=r"vectors: expected a matrix with one row per "):
        engine.upsert_products(products, vectors[:4])


def test_bulk_upsert_makes_room_in_the_index_for_new_ids_only(
    open_engine: OpenEngine, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(sqlite_url, batch_size=100)
    asked: list[int] = []
    reserve = VectorIndex.reserve
    monkeypatch.setattr(
        VectorIndex, "reserve", lambda index, extra: (asked.append(extra), reserve(index, extra))
    )
    products, vectors = random_catalog(310, 8)
    engine.upsert_products(products[:300], vectors[:300])
    assert asked == [300]  # once, at the first batch, for the whole upsert
    # A re-send with one vector changed and 10 new products: room for the 10.
    summary = engine.upsert_products(products, np.vstack([-vectors[:1], vectors[1:]]))
    assert (summary.inserted, summary.updated, summary.unchanged) == (10, 1, 299)
    assert asked == [300, 10]
    assert engine.index_keys().size == 310
    best = engine.search_vector(-vectors[0], top_k=1).matches[0]
    assert best.product.id == "p0" and best.score == pytest.approx(1.0, abs=1e-6)


def test_a_stream_size_beyond_reason_makes_room_for_at_most_max_reserved(
    open_engine: OpenEngine, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(sqlite_url)
    asked: list[int] = []
    monkeypatch.setattr(VectorIndex, "reserve", lambda index, extra: asked.append(extra))
    products, vectors = random_catalog(2, 8)

    async def batches():
        yield VectorBatch(products, vectors, stream_products=2**62)

    summary = asyncio.run(engine.upsert(batches()))
    assert summary.inserted == 2
    assert asked == [MAX_RESERVED]


def test_a_failed_bulk_commit_leaves_catalog_and_index_agreeing(
    open_engine: OpenEngine, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(sqlite_url, batch_size=100)
    products, vectors = random_catalog(500, 8)
    commits: list[int] = []
    upsert = engine.catalog.upsert

    def third_fails(rows, durable=True):  # a fault injected into the real catalog's third commit
        commits.append(len(rows))
        if len(commits) == 3:
            raise Unavailable("the catalog database is unavailable; retry later")
        return upsert(rows, durable)

    monkeypatch.setattr(engine.catalog, "upsert", third_fails)
    with pytest.raises(Unavailable):
        engine.upsert_products(products, vectors)
    # The fourth batch was queued behind the third and committed; the fifth never started.
    assert commits == [100, 100, 100, 100]
    assert engine.catalog.count() == engine.index_keys().size == 300
    assert engine.mirror.version == engine.catalog.state().version
    summary = engine.upsert_products(products, vectors)  # the re-send converges
    assert (summary.inserted, summary.unchanged) == (200, 300)
    assert engine.catalog.count() == engine.index_keys().size == 500


@pytest.mark.parametrize("path", ["bulk", "stream"])
def test_upserts_defer_each_commits_sync_and_return_once_synced(
    open_engine: OpenEngine, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    engine = open_engine(sqlite_url, batch_size=100)
    products, vectors = random_catalog(450, 8)
    events: list[str] = []
    upsert, sync = engine.catalog.upsert, engine.catalog.sync

    def recorded_upsert(rows, durable=True):
        write = upsert(rows, durable)
        events.append(f"commit durable={durable}")
        return write

    def recorded_sync():
        sync()
        events.append("sync")

    monkeypatch.setattr(engine.catalog, "upsert", recorded_upsert)
    monkeypatch.setattr(engine.catalog, "sync", recorded_sync)

    def run(vectors):
        if path == "bulk":
            return engine.upsert_products(products, vectors)

        async def stream():
            for product, vector in zip(products, vectors, strict=True):
                yield UpsertItem(product, vector)

        return asyncio.run(engine.upsert(stream()))

    assert run(vectors).inserted == 450
    # Five commits, none waiting for the disk; each queues a sync, and the upsert
    # returns only after the sync queued by the last commit (the sync thread runs
    # them in order).
    assert events.count("commit durable=False") == events.count("sync") == 5
    assert events[-1] == "sync" and len(events) == 10

    def failing_sync():
        raise Unavailable("the catalog could not be synced to disk; retry later")

    monkeypatch.setattr(engine.catalog, "sync", failing_sync)
    with pytest.raises(Unavailable, match="could not be synced"):
        run(-vectors)  # an upsert whose batches may not be on disk is never acknowledged


def test_a_snapshot_is_written_after_a_sync_of_the_catalog(
    open_engine: OpenEngine, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine(sqlite_url)
    products, vectors = random_catalog(20, 8)
    engine.upsert_products(products, vectors)
    order: list[str] = []
    monkeypatch.setattr(engine.catalog, "sync", lambda: order.append("sync"))
    monkeypatch.setattr(mirror_module, "write_snapshot", lambda *_args: order.append("write"))
    assert engine.save_snapshot()
    assert order == ["sync", "write"]  # never a snapshot of products a power loss could undo


def test_restart_loads_the_snapshot_and_catches_up(
    catalog_url: str, open_engine: OpenEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second engine on the same catalog (another process) and a restart from a snapshot."""
    products, vectors = random_catalog(3000, 16)
    first = open_engine(catalog_url, tmp_path / "a")
    first.upsert_products(products[:2000], vectors[:2000])
    assert first.save_snapshot()
    # Changes after the snapshot: new products, a moved vector, new metadata, deletions.
    first.upsert_products(products[2000:], vectors[2000:])
    first.upsert_products(
        [products[5], dataclasses.replace(products[6], name="x")], [-vectors[5], vectors[6]]
    )
    first.delete(["p7", "p2500"])

    caplog.set_level(logging.INFO)
    second = open_engine(catalog_url, tmp_path / "a")
    assert "catching up" in caplog.text and "rebuild" not in caplog.text
    assert second.mirror.version == first.mirror.version
    assert second.mirror.agrees() and len(second.mirror.records) == 2998
    assert second.index_keys().tolist() == first.index_keys().tolist()
    assert second.search_vector(-vectors[5], top_k=1).matches[0].product.id == "p5"
    assert second.get("p6")[0].name == "x"
    with pytest.raises(NotFound):
        second.get("p7")
    # The other direction: the second writes, the first catches up without a rebuild.
    second.upsert_products([products[8]], [-vectors[8]])
    first.catch_up()
    assert first.search_vector(-vectors[8], top_k=1).matches[0].product.id == "p8"
    assert first.mirror.version == second.mirror.version


@pytest.mark.parametrize("damage", ["corrupt", "other catalog", "ahead", "other factory"])
def test_untrustworthy_snapshots_are_rebuilt(
    open_engine: OpenEngine,
    catalog_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    products, vectors = random_catalog(500, 8)
    engine = open_engine(catalog_url, tmp_path / "d")
    engine.upsert_products(products, vectors)
    engine.save_snapshot()
    path = engine.mirror.snapshot_path
    index, meta = VectorIndex.load(path)
    if damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0x55
        path.write_bytes(data)
    elif damage == "other catalog":
        index.save(path, {**meta, "catalog_id": "someone-else"})
    elif damage == "ahead":
        index.save(path, {**meta, "version": meta["version"] + 5})
    options = {"index_factory": "HNSW32"} if damage == "other factory" else {}
    caplog.set_level(logging.INFO)
    again = open_engine(catalog_url, tmp_path / "d", **options)
    assert "rebuild" in caplog.text and "building the" in caplog.text
    assert again.mirror.agrees() and len(again.index_keys()) == 500
    assert again.search_vector(vectors[9], top_k=1).matches[0].product.id == "p9"


def test_searches_never_see_half_a_batch(open_engine: OpenEngine, catalog_url: str) -> None:
    engine = open_engine(catalog_url, batch_size=400)
    products, vectors = random_catalog(4000, 8)
    tagged = [
        dataclasses.replace(p, attributes={"batch": str(i // 400)}) for i, p in enumerate(products)
    ]
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def searcher() -> None:
        rng = np.random.default_rng(0)
        try:
            while not done.is_set():
                batch = str(int(rng.integers(10)))
                result = engine.search_vector(
                    vectors[0], top_k=1000, terms=[("attributes.batch", batch)]
                )
                seen.append(len(result.matches))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    engine.upsert_products(tagged, vectors)
    done.set()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(seen) > 10 and set(seen) <= {0, 400}


def test_of_an_id_sent_twice_in_a_stream_the_last_wins_whatever_each_carries(
    open_engine: OpenEngine, catalog_url: str, fake_encoders: Callable
) -> None:
    """Items of one batch are not regrouped by kind: vector, image and metadata-only
    items of one id apply in the order sent (as any repeat does)."""
    _fake, server = fake_encoders(dim=16)
    engine = open_engine(catalog_url)
    vector = np.ones(16, np.float32) / 4  # a unit vector no image of the fake gives

    async def run():
        engine.embedder = QueryEmbedder(EncoderPool([server.target], timeout_s=5))
        try:
            await engine.upsert(_stream([UpsertItem(Product(id="b"), image=b"img-b")]))
            return await engine.upsert(
                _stream(
                    [
                        UpsertItem(Product(id="a", name="by image"), image=b"img-a"),
                        UpsertItem(
                            Product(id="a", name="by vector", model_id="fake-model"), vector
                        ),
                        UpsertItem(
                            Product(id="b", name="by vector", model_id="fake-model"), vector
                        ),
                        # The image stored before: not skipped, since b changed since.
                        UpsertItem(Product(id="b", name="by image again"), image=b"img-b"),
                        UpsertItem(Product(id="b", name="renamed")),
                    ]
                )
            )
        finally:
            await engine.embedder.close()

    summary = asyncio.run(run())
    assert summary.failed == 0
    a, a_vector = engine.get("a", include_vector=True)
    assert a.name == "by vector"
    np.testing.assert_allclose(a_vector, vector, atol=1e-6)
    b, b_vector = engine.get("b", include_vector=True)
    assert b.name == "renamed"
    np.testing.assert_allclose(b_vector, fake_vector(b"img-b", 16), atol=1e-6)


def test_image_products_and_queries_go_through_the_encoder(
    open_engine: OpenEngine, catalog_url: str, fake_encoders: Callable
) -> None:
    fake, server = fake_encoders(dim=16)
    engine = open_engine(catalog_url)

    async def run():
        engine.embedder = QueryEmbedder(EncoderPool([server.target], timeout_s=5))
        try:
            items = [
                UpsertItem(Product(id=f"i{i}", name=f"n{i}"), image=b"img%d" % i) for i in range(20)
            ]
            items.append(UpsertItem(Product(id="broken"), image=b"not an image, truncated"))
            first = await engine.upsert(_stream(items))
            encoded = fake.images
            again = await engine.upsert(_stream(items[:20]))  # same bytes, same metadata
            renamed = [UpsertItem(Product(id="i3", name="renamed"), image=b"img3")]
            third = await engine.upsert(_stream(renamed))
            hit = await engine.search(SearchQuery(image=b"img7", top_k=1))
            text = await engine.search(SearchQuery(text="red shoes", top_k=3))
            return first, encoded, again, third, hit, text
        finally:
            await engine.embedder.close()

    first, encoded, again, third, hit, text = asyncio.run(run())
    assert (first.inserted, first.failed) == (20, 1)
    assert first.failures[0].code == 3
    assert first.failures[0].message == "image: image data is truncated or corrupt"
    assert encoded == 20
    assert (again.unchanged, again.inserted, again.updated) == (20, 0, 0)
    assert third.updated == 1
    assert fake.images == 20 + 1 + 1  # nothing re-encoded for the unchanged; then the query
    stored = engine.get("i0")[0]
    assert stored.model_id == "fake-model" and len(stored.image_sha256) == 64
    assert hit.matches[0].product.id == "i7" and hit.matches[0].score == pytest.approx(1, abs=1e-5)
    assert len(text.matches) == 3 and fake.texts == 1


def test_an_encoder_of_another_model_is_refused(
    open_engine: OpenEngine, catalog_url: str, fake_encoders: Callable
) -> None:
    _, server = fake_encoders(dim=8, model_id="a-new-model")
    engine = open_engine(catalog_url)
    products, vectors = random_catalog(10, 8)
    engine.upsert_products(products, vectors)

    async def run():
        engine.embedder = QueryEmbedder(EncoderPool([server.target], timeout_s=5))
        try:
            with pytest.raises(FailedPrecondition) as caught:
                await engine.search(SearchQuery(text="shoes"))
            summary = await engine.upsert(_stream([UpsertItem(Product(id="x"), image=b"y")]))
            return caught.value.message, summary
        finally:
            await engine.embedder.close()

    message, summary = asyncio.run(run())
    assert message == (
        "text: the encoders run model 'a-new-model', but the catalog holds vectors of model "
        "'test-model'"
    )
    assert summary.failed == 1 and summary.failures[0].code == 9


def test_ivf_index_trains_once_the_catalog_is_large_enough(
    open_engine: OpenEngine, catalog_url: str
) -> None:
    engine = open_engine(catalog_url, index_factory="IVF8,Flat")
    products, vectors = random_catalog(1500, 8)
    engine.upsert_products(products[:300], vectors[:300])
    with pytest.raises(FailedPrecondition) as caught:
        engine.search_vector(vectors[0])
    assert caught.value.message == (
        "the IVF8,Flat index needs at least 1000 vectors to train and the catalog has 300; "
        "searches fail until then (or use --index-factory Flat)"
    )
    engine.upsert_products(products[300:], vectors[300:])
    assert engine.search_vector(vectors[1200], top_k=1).matches[0].product.id == "p1200"
    assert engine.mirror.agrees()


async def _stream(items):
    for item in items:
        yield item


def test_an_emptied_catalog_takes_a_new_model_and_dimension(
    open_engine: OpenEngine, catalog_url: str
) -> None:
    engine = open_engine(catalog_url)
    old, old_vectors = random_catalog(20, 8, model_id="old-model")
    engine.upsert_products(old, old_vectors)
    engine.delete([p.id for p in old])
    new, new_vectors = random_catalog(20, 12, model_id="new-model", prefix="n")
    summary = engine.upsert_products(new, new_vectors)
    assert summary.inserted == 20 and summary.failed == 0
    result = engine.search_vector(new_vectors[4], top_k=1)
    assert result.matches[0].product.id == "n4" and result.model_id == "new-model"
