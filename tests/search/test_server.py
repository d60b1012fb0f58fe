"""In-process gRPC tier: the real search server on port 0, called with ordinary sync clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from search_service import engine as engine_module
from search_service.engine import SearchEngine
from search_service.storage.catalog import Catalog
from tests.search.conftest import (
    RunningSearch,
    assert_exact_top_k,
    brute_force,
    random_catalog,
    serve_engine,
)
from vpm.v1 import search_pb2

DIM = 32
NOT_AN_IMAGE = b"not an image, just bytes"
NO_ENCODER = (
    "no encoder is configured (--encoder), so image and text queries are unavailable; "
    "product_id and vector queries work"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSearch]:
    """One server over 10,000 products for the tests that only read."""
    folder = tmp_path_factory.mktemp("served")
    engine = SearchEngine(Catalog.open(f"sqlite:///{folder}/catalog.db"), folder / "data")
    engine.load()
    products, vectors = random_catalog(10_000, DIM, seed=2)
    engine.upsert_products(products, vectors)
    running = serve_engine(engine)
    running.products, running.vectors = products, vectors
    yield running
    running.stop()
    engine.close()


@pytest.fixture
def small(
    open_engine: Callable[..., SearchEngine], catalog_url: str, start_search: Callable
) -> RunningSearch:
    """A server over 1,000 products, for the tests that change them."""
    engine = open_engine(catalog_url)
    products, vectors = random_catalog(1000, DIM, seed=3)
    engine.upsert_products(products, vectors)
    running = start_search(engine)
    running.products, running.vectors = products, vectors
    return running


def serving(running: RunningSearch) -> str:
    health = health_pb2_grpc.HealthStub(running.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="vpm.v1.Search"))
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def vector(values) -> search_pb2.Vector:
    return search_pb2.Vector(values=list(values))


def test_search_through_the_rpc_is_exact(served: RunningSearch) -> None:
    products, vectors = served.products, served.vectors
    true_scores = {}
    for row in (3, 500, 9000):
        query = vectors[row]
        true_scores = dict(zip((p.id for p in products), (vectors @ query).tolist(), strict=True))
        by_vector = served.stub.Search(search_pb2.SearchRequest(vector=vector(query), top_k=50))
        rows, expected = brute_force(vectors, query, 50)
        found = [m.product.id for m in by_vector.matches]
        scores = np.array([m.score for m in by_vector.matches])
        assert_exact_top_k(found, scores, [products[r].id for r in rows], expected, true_scores.get)
        assert by_vector.model_id == "test-model"
        by_id = served.stub.Search(
            search_pb2.SearchRequest(
                product_id=products[row].id, top_k=20, filters={"gender": "Men"}
            )
        )
        allowed = np.array([p.gender == "Men" and i != row for i, p in enumerate(products)])
        rows, expected = brute_force(vectors, query, 20, allowed)
        found = [m.product.id for m in by_id.matches]
        scores = np.array([m.score for m in by_id.matches])
        assert_exact_top_k(found, scores, [products[r].id for r in rows], expected, true_scores.get)
    match = by_id.matches[0].product
    source = products[int(match.id[1:])]
    assert (match.name, match.master_category, match.year) == (
        source.name,
        source.master_category,
        source.year,
    )
    assert dict(match.attributes) == dict(source.attributes)


BAD_SEARCHES = [
    (
        search_pb2.SearchRequest(),
        "INVALID_ARGUMENT",
        "query: set exactly one of image, text, product_id and vector",
    ),
    (
        search_pb2.SearchRequest(vector=vector([1.0] * 3)),
        "INVALID_ARGUMENT",
        "vector: expected 32 values (the catalog's dimension), got 3",
    ),
    (
        search_pb2.SearchRequest(vector=vector([1.0, float("nan")] * 16)),
        "INVALID_ARGUMENT",
        "vector: value 1 is not finite (nan)",
    ),
    (
        search_pb2.SearchRequest(vector=vector([float("inf")] * 32)),
        "INVALID_ARGUMENT",
        "vector: value 0 is not finite (inf)",
    ),
    (
        search_pb2.SearchRequest(vector=vector([0.0] * 32)),
        "INVALID_ARGUMENT",
        "vector: has zero norm",
    ),
    (
        search_pb2.SearchRequest(product_id="p1", top_k=-5),
        "INVALID_ARGUMENT",
        "top_k: must be between 1 and 1000 (0 means 10), got -5",
    ),
    (
        search_pb2.SearchRequest(product_id="p1", top_k=1001),
        "INVALID_ARGUMENT",
        "top_k: must be between 1 and 1000 (0 means 10), got 1001",
    ),
    (
        search_pb2.SearchRequest(product_id="p1", offset=-1),
        "INVALID_ARGUMENT",
        "offset: must not be negative, got -1",
    ),
    (
        search_pb2.SearchRequest(product_id="p1", offset=9991, top_k=10),
        "INVALID_ARGUMENT",
        "offset: offset + top_k must be at most 10000, got 10001",
    ),
    (
        search_pb2.SearchRequest(product_id="p1", filters={"colour": "Red"}),
        "INVALID_ARGUMENT",
        "filters: unknown key 'colour'; use one of id, name, gender, master_category, "
        "sub_category, article_type, base_colour, season, year, usage, category (or styles.csv "
        "spellings such as masterCategory), or attributes.<name>",
    ),
    (
        search_pb2.SearchRequest(product_id="p1", filters={"year": "old"}),
        "INVALID_ARGUMENT",
        "filters: 'year' must be an integer, got 'old'",
    ),
    (
        search_pb2.SearchRequest(product_id="no-such-product"),
        "NOT_FOUND",
        "product_id: no product 'no-such-product' in the catalog",
    ),
    (search_pb2.SearchRequest(product_id=""), "INVALID_ARGUMENT", "product_id: must not be empty"),
    (search_pb2.SearchRequest(text=""), "INVALID_ARGUMENT", "text: must not be empty"),
    (search_pb2.SearchRequest(image=b""), "INVALID_ARGUMENT", "image: must not be empty"),
    (
        search_pb2.SearchRequest(text="red shoes"),
        "UNAVAILABLE",
        "text: " + NO_ENCODER,
    ),
    (
        search_pb2.SearchRequest(image=b"\xff\xd8\xff"),
        "UNAVAILABLE",
        "image: " + NO_ENCODER,
    ),
]


@pytest.mark.parametrize(("request_", "code", "message"), BAD_SEARCHES)
def test_bad_searches_get_exact_status_and_message(
    served: RunningSearch, request_: search_pb2.SearchRequest, code: str, message: str
) -> None:
    before = (
        REGISTRY.get_sample_value("vpm_search_requests_total", {"method": "Search", "code": code})
        or 0
    )
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.Search(request_)
    assert caught.value.code() == grpc.StatusCode[code]
    assert caught.value.details() == message
    assert serving(served) == "SERVING"
    assert served.stub.Search(search_pb2.SearchRequest(product_id="p1", top_k=3)).matches
    after = REGISTRY.get_sample_value(
        "vpm_search_requests_total", {"method": "Search", "code": code}
    )
    assert after == before + 1


def test_product_reads_and_deletes(small: RunningSearch) -> None:
    stub = small.stub
    product = stub.GetProduct(search_pb2.GetProductRequest(id="p42"))
    assert product.id == "p42" and not product.vector
    with_vector = stub.GetProduct(search_pb2.GetProductRequest(id="p42", include_vector=True))
    np.testing.assert_array_equal(np.array(with_vector.vector, np.float32), small.vectors[42])
    for request_, code, message in [
        (
            search_pb2.GetProductRequest(id="ghost"),
            grpc.StatusCode.NOT_FOUND,
            "id: no product 'ghost' in the catalog",
        ),
        (
            search_pb2.GetProductRequest(id=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "id: must not be empty",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetProduct(request_)
        assert (caught.value.code(), caught.value.details()) == (code, message)

    deleted = stub.DeleteProducts(search_pb2.DeleteProductsRequest(ids=["p1", "p2", "ghost"]))
    assert (deleted.deleted, list(deleted.not_found)) == (2, ["ghost"])
    stats = stub.GetStats(search_pb2.GetStatsRequest())
    assert (stats.products, stats.index_size, stats.index_type) == (998, 998, "Flat")
    assert stats.catalog_version == deleted.catalog_version == 2
    assert (stats.model_id, stats.dim, list(stats.encoders)) == ("test-model", DIM, [])
    assert stats.catalog_url == small.engine.catalog.url  # password masked, if any
    listed = list(stub.ListProducts(search_pb2.ListProductsRequest()))
    assert len(listed) == 998 and not listed[0].vector
    assert {p.id for p in listed} == {p.id for p in small.products} - {"p1", "p2"}
    some = stub.ListProducts(search_pb2.ListProductsRequest(include_vectors=True))
    first = next(iter(some))
    assert len(first.vector) == DIM


def test_products_listed_in_batches_are_those_listed_one_by_one(
    small: RunningSearch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ListProductBatches: the products ListProducts streams one by one, a page a message,
    and their vectors as one matrix when asked, read by the documented layout with numpy."""
    monkeypatch.setattr(engine_module, "LIST_PAGE", 300)
    request = search_pb2.ListProductsRequest()
    one_by_one = {product.id: product for product in small.stub.ListProducts(request)}
    batches = list(small.stub.ListProductBatches(request))
    assert [len(batch.products) for batch in batches] == [300, 300, 300, 100]
    assert not any(batch.HasField("vectors") for batch in batches)
    listed = [product for batch in batches for product in batch.products]
    assert len(listed) == len(one_by_one) and {p.id: p for p in listed} == one_by_one
    request.include_vectors = True
    rows = 0
    for batch in small.stub.ListProductBatches(request):
        matrix = batch.vectors
        assert (matrix.rows, matrix.dim) == (len(batch.products), DIM)
        vectors = np.frombuffer(matrix.data, "<f4").reshape(matrix.rows, matrix.dim)
        for product, vector in zip(batch.products, vectors, strict=True):
            assert not product.vector
            stored = np.array(small.stub.GetProduct(
                search_pb2.GetProductRequest(id=product.id, include_vector=True)
            ).vector, np.float32)  # fmt: skip
            assert np.array_equal(vector, stored)
        rows += matrix.rows
    assert rows == len(one_by_one)


def test_upsert_through_the_rpc(small: RunningSearch) -> None:
    def stream():
        yield search_pb2.Product(id="new-1", name="New", vector=[0.5] * DIM, model_id="test-model")
        yield search_pb2.Product(
            id="p5", name="Renamed", vector=small.vectors[5].tolist(), model_id="test-model"
        )
        yield search_pb2.Product(
            id="p6", vector=small.vectors[6].tolist()
        )  # empty model: encoders'
        yield search_pb2.Product(id="both", vector=[1.0] * DIM, image=b"x", model_id="test-model")
        yield search_pb2.Product(id="bad-dim", vector=[1.0] * 3, model_id="test-model")

    summary = small.stub.UpsertProducts(stream())
    assert (summary.inserted, summary.updated, summary.unchanged, summary.failed) == (1, 1, 0, 3)
    failures = {f.id: (f.code, f.message) for f in summary.failures}
    assert failures["both"] == (3, "vector, image: set one of them, not both")
    assert failures["bad-dim"][0] == 9
    assert failures["p6"][0] == 14
    assert small.stub.GetProduct(search_pb2.GetProductRequest(id="p5")).name == "Renamed"
    hit = small.stub.Search(search_pb2.SearchRequest(vector=vector([1.0] * DIM), top_k=1))
    assert hit.matches[0].product.id == "new-1"
    assert hit.matches[0].score == pytest.approx(1.0, abs=1e-6)


def test_catalog_failure_is_unavailable_without_sql(small: RunningSearch) -> None:
    with small.engine.catalog.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE deletions")
    with pytest.raises(grpc.RpcError) as caught:
        small.stub.DeleteProducts(search_pb2.DeleteProductsRequest(ids=["p1"]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "the catalog database is unavailable; retry later"
    assert serving(small) == "SERVING"
    assert small.stub.Search(search_pb2.SearchRequest(product_id="p1", top_k=1)).matches


def test_image_and_text_queries_with_an_encoder(
    open_engine: Callable[..., SearchEngine],
    catalog_url: str,
    start_search: Callable,
    fake_encoders: Callable,
) -> None:
    fake, encoder = fake_encoders(dim=DIM)
    running = start_search(open_engine(catalog_url), encoders=(encoder.target,))

    def stream():
        for i in range(30):
            yield search_pb2.Product(
                id=f"img-{i}", category=("a", "b")[i % 2], image=b"picture %d" % i
            )
        yield search_pb2.Product(id="broken", image=NOT_AN_IMAGE)

    summary = running.stub.UpsertProducts(stream())
    assert (summary.inserted, summary.failed) == (30, 1)
    assert (summary.failures[0].id, summary.failures[0].code) == ("broken", 3)
    assert summary.failures[0].message == "image: image data is truncated or corrupt"
    again = running.stub.UpsertProducts(stream())
    assert (again.unchanged, again.inserted, again.failed) == (30, 0, 1)
    assert fake.images == 30  # nothing re-encoded

    hit = running.stub.Search(
        search_pb2.SearchRequest(image=b"picture 8", top_k=2, filters={"category": "a"})
    )
    assert [m.product.id for m in hit.matches][0] == "img-8"
    assert hit.matches[0].product.image_sha256 and hit.model_id == "fake-model"
    text = running.stub.Search(search_pb2.SearchRequest(text="a red dress", top_k=5))
    assert len(text.matches) == 5
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Search(search_pb2.SearchRequest(image=NOT_AN_IMAGE))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "image: image data is truncated or corrupt"
    stats = running.stub.GetStats(search_pb2.GetStatsRequest())
    assert [(e.target, e.state, e.model_id) for e in stats.encoders] == [
        (encoder.target, "SERVING", "fake-model")
    ]
    # The encoder goes away: image queries fail UNAVAILABLE, id and vector queries go on.
    encoder.stop(0)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Search(search_pb2.SearchRequest(text="shoes"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details().startswith("text: no encoder answered (127.0.0.1:")
    assert running.stub.Search(search_pb2.SearchRequest(product_id="img-1", top_k=3)).matches
    stats = running.stub.GetStats(search_pb2.GetStatsRequest())
    assert stats.encoders[0].state == "UNREACHABLE"
    assert serving(running) == "SERVING"


def test_stats_report_the_index_tuning(
    open_engine: Callable[..., SearchEngine], sqlite_url: str, start_search: Callable
) -> None:
    engine = open_engine(sqlite_url, index_factory="HNSW8", target_recall=0.9)
    products, vectors = random_catalog(2000, DIM, seed=4)
    engine.upsert_products(products, vectors)
    running = start_search(engine)
    pending = running.stub.GetStats(search_pb2.GetStatsRequest()).index_tuning
    assert (pending.status, pending.target_recall) == ("pending", pytest.approx(0.9))
    tuning = engine.tuner.tune()
    reply = running.stub.GetStats(search_pb2.GetStatsRequest()).index_tuning
    assert (reply.status, reply.parameter, reply.value, reply.reached) == (
        "measured",
        "efSearch",
        engine.mirror.index.search_value,
        True,
    )
    assert reply.measured_recall == pytest.approx(tuning.measured_recall)
    assert reply.measured_recall >= 0.9
    assert (reply.k, reply.sample_size, reply.measured_at_version) == (10, 1000, 1)
    assert reply.exact_filter_limit == tuning.exact_filter_limit
    assert [(f.selectivity, f.allowed) for f in reply.filters] == [
        (0.5, 1000),
        (0.1, 200),
        (0.01, 20),
        (0.001, 2),
    ]
    assert REGISTRY.get_sample_value("vpm_search_index_recall") == pytest.approx(
        tuning.measured_recall
    )
    value = REGISTRY.get_sample_value(
        "vpm_search_index_search_parameter", {"parameter": "efSearch"}
    )
    assert value == reply.value


def test_stats_of_a_flat_index_say_tuning_is_off(served: RunningSearch) -> None:
    tuning = served.stub.GetStats(search_pb2.GetStatsRequest()).index_tuning
    assert (tuning.status, tuning.target_recall, tuning.value) == ("off", 0.0, 0)


def test_until_the_catalog_is_loaded_every_rpc_is_unavailable(
    tmp_path, start_search: Callable
) -> None:
    engine = SearchEngine(Catalog.open(f"sqlite:///{tmp_path}/catalog.db"), tmp_path / "data")
    try:
        running = start_search(engine)  # not loaded yet, as while a large catalog loads
        stub = running.stub
        request = search_pb2.ListProductsRequest()
        calls = {
            "GetStats": lambda: stub.GetStats(search_pb2.GetStatsRequest()),
            "Search": lambda: stub.Search(search_pb2.SearchRequest(product_id="p1")),
            "GetProduct": lambda: stub.GetProduct(search_pb2.GetProductRequest(id="p1")),
            "GetFacets": lambda: stub.GetFacets(search_pb2.GetFacetsRequest()),
            "ListProducts": lambda: list(stub.ListProducts(request)),
            "ListProductBatches": lambda: list(stub.ListProductBatches(request)),
            "UpsertProducts": lambda: stub.UpsertProducts(iter([search_pb2.Product(id="p1")])),
            "DeleteProducts": lambda: stub.DeleteProducts(
                search_pb2.DeleteProductsRequest(ids=["p1"])
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, name
            assert "still loading" in caught.value.details(), name
        engine.load()
        assert stub.GetStats(search_pb2.GetStatsRequest()).products == 0
    finally:
        engine.close()
