"""In-process gRPC tier: UpsertProductBatches on the real server, against the numpy oracle.

The matrices are built and read here with numpy alone, as the layout in
vectors.proto says a client in any language would, not with vpm_common.matrix.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest

from search_service.engine import SearchEngine
from tests.search.conftest import (
    RunningSearch,
    assert_exact_top_k,
    brute_force,
    random_catalog,
)
from tests.search.fake_encoder import fake_vector
from vpm.v1 import search_pb2, vectors_pb2

DIM = 16
MODEL = "test-model"


def matrix(rows: np.ndarray, dtype: int = vectors_pb2.FLOAT32) -> vectors_pb2.VectorMatrix:
    """Rows as vectors.proto lays them out: little-endian floats, row after row."""
    wire = "<f4" if dtype == vectors_pb2.FLOAT32 else "<f2"
    rows = np.asarray(rows)
    return vectors_pb2.VectorMatrix(
        rows=rows.shape[0], dim=rows.shape[1], dtype=dtype, data=rows.astype(wire).tobytes()
    )


def metadata(product_id: str, **fields: object) -> search_pb2.Product:
    return search_pb2.Product(id=product_id, name=f"name of {product_id}", **fields)


def batch(ids: list[str], rows: np.ndarray, model_id: str = MODEL, **options: object):
    return search_pb2.ProductBatch(
        products=[metadata(i) for i in ids],
        vectors=matrix(rows, **options),
        model_id=model_id,
    )


def stored_vector(running: RunningSearch, product_id: str) -> np.ndarray:
    reply = running.stub.GetProduct(
        search_pb2.GetProductRequest(id=product_id, include_vector=True)
    )
    return np.asarray(reply.vector, dtype=np.float32)


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.fixture
def empty(
    open_engine: Callable[..., SearchEngine], catalog_url: str, start_search: Callable
) -> RunningSearch:
    """A server over an empty catalog, small commits so that a call spans several."""
    return start_search(open_engine(catalog_url, batch_size=7))


def failures(summary: search_pb2.UpsertSummary) -> dict[str, tuple[int, str]]:
    return {f.id: (f.code, f.message) for f in summary.failures}


def test_float32_and_float16_rows_are_stored_normalized(empty: RunningSearch) -> None:
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((20, DIM)).astype(np.float32) * 3  # not unit: normalized here
    narrow = rng.standard_normal((15, DIM)).astype(np.float32)
    first = [f"a{i}" for i in range(20)]
    second = [f"b{i}" for i in range(15)]
    summary = empty.stub.UpsertProductBatches(
        iter([batch(first, wide), batch(second, narrow, dtype=vectors_pb2.FLOAT16)])
    )
    assert (summary.inserted, summary.failed) == (35, 0)
    for row, product_id in enumerate(first):
        np.testing.assert_allclose(stored_vector(empty, product_id), unit(wide[row]), atol=1e-6)
    sent16 = np.frombuffer(matrix(narrow, vectors_pb2.FLOAT16).data, "<f2").reshape(15, DIM)
    for row, product_id in enumerate(second):
        stored = stored_vector(empty, product_id)
        np.testing.assert_allclose(stored, unit(sent16[row].astype(np.float32)), atol=1e-6)
        assert float(stored @ unit(narrow[row])) > 0.9999  # within float16's precision
    product = empty.stub.GetProduct(search_pb2.GetProductRequest(id="b3"))
    assert (product.name, product.model_id) == ("name of b3", MODEL)


@pytest.mark.parametrize("stream_products", [0, 300, 30, 100_000])  # none, right, low, high
def test_search_finds_what_was_upserted_exactly(empty: RunningSearch, stream_products: int) -> None:
    """Whatever the stream says of its size (room is made for it), results are exact."""
    products, vectors = random_catalog(300, DIM, seed=4)
    ids = [p.id for p in products]
    messages = [batch(ids[s : s + 64], vectors[s : s + 64]) for s in range(0, 300, 64)]
    messages[0].stream_products = stream_products
    assert empty.stub.UpsertProductBatches(iter(messages)).inserted == 300
    for row in (0, 123, 299):
        query = vectors[row]
        reply = empty.stub.Search(
            search_pb2.SearchRequest(vector=search_pb2.Vector(values=query.tolist()), top_k=25)
        )
        rows, expected = brute_force(vectors, query, 25)
        true = dict(zip(ids, (vectors @ query).tolist(), strict=True))
        found = [m.product.id for m in reply.matches]
        scores = np.array([m.score for m in reply.matches])
        assert_exact_top_k(found, scores, [ids[r] for r in rows], expected, true.get)


def test_bad_rows_fail_their_products_alone(empty: RunningSearch) -> None:
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((6, DIM)).astype(np.float32)
    rows[1, 3] = np.nan
    rows[2, :] = np.inf
    rows[3, :] = 0.0
    summary = empty.stub.UpsertProductBatches(
        iter([batch(["g0", "nan", "inf", "zero", "g4", "g5"], rows)])
    )
    assert (summary.inserted, summary.failed) == (3, 3)
    assert failures(summary) == {
        "nan": (3, "vector: value 3 is not finite (nan)"),
        "inf": (3, "vector: value 0 is not finite (inf)"),
        "zero": (3, "vector: has zero norm"),
    }
    # Now the catalog holds 16-d vectors of MODEL: other dimensions and models fail per item.
    other_dim = batch(["d0", "d1"], rng.standard_normal((2, DIM + 1)))
    other_model = batch(["m0"], rng.standard_normal((1, DIM)), model_id="other-model")
    good = batch(["g6"], rng.standard_normal((1, DIM)))
    summary = empty.stub.UpsertProductBatches(iter([other_dim, other_model, good]))
    assert (summary.inserted, summary.failed) == (1, 3)
    assert failures(summary) == {
        "d0": (9, f"vector: {DIM + 1} values, but the catalog holds {DIM}-dimensional vectors "
               f"of model '{MODEL}'"),
        "d1": (9, f"vector: {DIM + 1} values, but the catalog holds {DIM}-dimensional vectors "
               f"of model '{MODEL}'"),
        "m0": (9, f"model_id: 'other-model' differs from the catalog's model '{MODEL}'"),
    }  # fmt: skip
    stats = empty.stub.GetStats(search_pb2.GetStatsRequest())
    assert (stats.products, stats.index_size) == (4, 4)


def test_repeated_ids_apply_in_order_and_count_each_time(empty: RunningSearch) -> None:
    rng = np.random.default_rng(3)
    rows = unit(rng.standard_normal((12, DIM))).astype(np.float32)
    # Within one message (x twice, y three times) and across two (x once more).
    first = batch(["x", "y", "x", "z", "y", "y"], rows[:6])
    second = batch(["w", "x"], rows[6:8])
    summary = empty.stub.UpsertProductBatches(iter([first, second]))
    assert (summary.inserted, summary.updated, summary.unchanged, summary.failed) == (4, 4, 0, 0)
    np.testing.assert_allclose(stored_vector(empty, "x"), rows[7], atol=1e-6)
    np.testing.assert_allclose(stored_vector(empty, "y"), rows[5], atol=1e-6)
    again = empty.stub.UpsertProductBatches(iter([batch(["x", "x"], rows[[7, 7]])]))
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda m: setattr(m.vectors, "data", m.vectors.data[:-4]),
            "vectors.data: 3 x 16 float32 values take 192 bytes, got 188",
        ),
        (
            lambda m: setattr(m.vectors, "dim", 15),
            "vectors.data: 3 x 15 float32 values take 180 bytes, got 192",
        ),
        (
            lambda m: setattr(m.vectors, "rows", 2),
            "vectors.data: 2 x 16 float32 values take 128 bytes, got 192",
        ),
        (
            lambda m: m.products.append(metadata("extra")),
            "vectors: expected a matrix with one row per product (4 rows), "
            "got an array of shape (3, 16)",
        ),
        (lambda m: setattr(m.vectors, "dtype", 7), "vectors.dtype: unknown vector dtype 7"),
        (
            lambda m: m.products[1].vector.extend([1.0] * DIM),
            "products[1]: carries a vector or an image in a batch with vectors",
        ),
        (
            lambda m: setattr(m.products[2], "image", b"jpeg"),
            "products[2]: carries a vector or an image in a batch with vectors",
        ),
    ],
)
def test_a_malformed_message_fails_the_call_naming_the_field(
    open_engine: Callable[..., SearchEngine],
    sqlite_url: str,
    start_search: Callable,
    breakage: Callable,
    message: str,
) -> None:
    running = start_search(open_engine(sqlite_url))
    broken = batch(["p0", "p1", "p2"], np.ones((3, DIM), np.float32))
    breakage(broken)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.UpsertProductBatches(iter([broken]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(message)


def test_a_batch_without_a_matrix_carries_vectors_and_images(
    open_engine: Callable[..., SearchEngine],
    catalog_url: str,
    start_search: Callable,
    fake_encoders: Callable,
) -> None:
    _, encoder = fake_encoders(dim=DIM)  # model "fake-model"
    running = start_search(open_engine(catalog_url), encoders=(encoder.target,))
    vector = unit(np.arange(1, DIM + 1)).astype(np.float32)
    message = search_pb2.ProductBatch(
        products=[
            metadata("v", vector=(2 * vector).tolist()),  # the batch names its model
            metadata("i", image=b"image bytes"),  # encoded by the encoders
            metadata("both", vector=vector.tolist(), image=b"x"),
        ],
        model_id="fake-model",
    )
    summary = running.stub.UpsertProductBatches(iter([message]))
    assert (summary.inserted, summary.failed) == (2, 1)
    assert failures(summary) == {"both": (3, "vector, image: set one of them, not both")}
    np.testing.assert_allclose(stored_vector(running, "v"), vector, atol=1e-6)
    np.testing.assert_allclose(
        stored_vector(running, "i"), fake_vector(b"image bytes", DIM), atol=1e-6
    )
    assert running.stub.GetProduct(search_pb2.GetProductRequest(id="i")).model_id == "fake-model"
    # A matrix without a model id takes the encoders' model.
    summary = running.stub.UpsertProductBatches(iter([batch(["m"], vector[None, :], model_id="")]))
    assert (summary.inserted, summary.failed) == (1, 0)
    assert running.stub.GetProduct(search_pb2.GetProductRequest(id="m")).model_id == "fake-model"


def test_room_is_made_for_the_share_of_new_products_the_first_message_shows(
    open_engine: Callable[..., SearchEngine], catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from search_service.models import VectorBatch

    engine = open_engine(catalog_url)
    products, vectors = random_catalog(100, DIM, seed=5)
    engine.upsert_products(products[:60], vectors[:60])
    index, asked = engine.mirror.index, []
    reserve = index.reserve
    monkeypatch.setattr(index, "reserve", lambda extra: (asked.append(extra), reserve(extra)))

    async def stream() -> AsyncIterator[VectorBatch]:
        # Says 1,000 will come; 20 of the first 40 are new: room for 500, made once.
        yield VectorBatch(products[40:80], vectors[40:80], stream_products=1000)
        yield VectorBatch(products[80:], vectors[80:])

    summary = asyncio.run(engine.upsert(stream()))
    assert (summary.inserted, summary.unchanged) == (40, 20)
    assert asked == [500]
