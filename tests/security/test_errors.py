"""Internal failures reach clients as a status and a reference, never a path, SQL or a trace.

Faults are provoked in the real servers: a domain object made to raise what a
bug or a broken disk would raise, and a catalog table dropped under a running
search service. The log keeps the detail, under the reference the client got.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future

import grpc
import pytest

from tests import images
from tests.security.conftest import RunningSearch
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc

SECRET_PATH = "/srv/vpm/private/weights.onnx"
REFERENCE = re.compile(r"^internal error \(ref ([0-9a-f]{8})\)$")


def failure(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def assert_internal(error: grpc.RpcError, caplog: pytest.LogCaptureFixture) -> None:
    """INTERNAL with a bare reference; the log has the reference, the path and the trace."""
    assert error.code() == grpc.StatusCode.INTERNAL
    match = REFERENCE.match(error.details())
    assert match, error.details()
    logged = [r for r in caplog.records if f"(ref {match.group(1)})" in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert SECRET_PATH in str(logged[0].exc_info[1])


def test_encoder_failures_become_internal_with_a_reference(
    make_encoder: Callable[..., tuple], caplog: pytest.LogCaptureFixture
) -> None:
    thread, app = make_encoder()

    def broken(*args: object) -> None:
        raise OSError(13, "Permission denied", SECRET_PATH)

    app.engine.submit_texts = broken
    app.engine.submit_image = broken
    app.engine.submit_images = broken
    with grpc.insecure_channel(thread.target) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        error = failure(lambda: stub.EncodeText(encoder_pb2.TextBatch(texts=["a"]), timeout=10))
        assert_internal(error, caplog)
        items = iter([encoder_pb2.ImageItem(id="a", data=images.jpeg(64, 64))])
        assert_internal(failure(lambda: list(stub.EncodeImages(items, timeout=10))), caplog)
        batches = iter([encoder_pb2.ImageBatch(id="a", images=[images.jpeg(64, 64)])])
        assert_internal(failure(lambda: list(stub.EncodeImageBatches(batches, timeout=10))), caplog)


def test_one_images_internal_failure_is_its_own_reply_with_a_reference(
    make_encoder: Callable[..., tuple], caplog: pytest.LogCaptureFixture
) -> None:
    thread, app = make_encoder()
    submit = app.engine.submit_image

    def sometimes_broken(data: bytes, caller: object) -> Future:
        if data != b"poison":
            return submit(data, caller)
        future: Future = Future()
        future.set_exception(RuntimeError(f"cannot map {SECRET_PATH}"))
        return future

    app.engine.submit_image = sometimes_broken
    items = [encoder_pb2.ImageItem(id="good", data=images.jpeg(64, 64)),
             encoder_pb2.ImageItem(id="bad", data=b"poison")]  # fmt: skip
    with grpc.insecure_channel(thread.target) as channel:
        replies = {
            reply.id: reply
            for reply in encoder_pb2_grpc.EncoderStub(channel).EncodeImages(iter(items), timeout=30)
        }
    assert len(replies["good"].vector) == 64
    error = replies["bad"].error
    assert error.code == grpc.StatusCode.INTERNAL.value[0]
    ref = REFERENCE.match(error.message)
    assert ref and SECRET_PATH not in error.message
    assert any(f"(ref {ref.group(1)})" in r.getMessage() for r in caplog.records)


def test_a_broken_catalog_is_unavailable_without_sql_or_paths(
    secure_search: Callable[..., RunningSearch], caplog: pytest.LogCaptureFixture
) -> None:
    search = secure_search()
    vector = [1.0] + [0.0] * 63
    with grpc.insecure_channel(search.target) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        product = search_pb2.Product(id="p1", name="Shirt", vector=vector, model_id="m")
        assert stub.UpsertProducts(iter([product]), timeout=10).inserted == 1
        database = search.engine.catalog.engine.url.database
        with sqlite3.connect(database) as connection:
            connection.execute("DROP TABLE products")
        request = search_pb2.GetProductRequest(id="p1", include_vector=True)
        error = failure(lambda: stub.GetProduct(request, timeout=10))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "the catalog database is unavailable; retry later"
    assert "no such table: products" in caplog.text, "the cause is in the log"


def test_search_failures_become_internal_with_a_reference(
    secure_search: Callable[..., RunningSearch], caplog: pytest.LogCaptureFixture
) -> None:
    search = secure_search()

    async def broken() -> None:
        raise OSError(28, "No space left on device", SECRET_PATH)

    search.engine.stats = broken
    with grpc.insecure_channel(search.target) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        error = failure(lambda: stub.GetStats(search_pb2.GetStatsRequest(), timeout=10))
    assert_internal(error, caplog)
