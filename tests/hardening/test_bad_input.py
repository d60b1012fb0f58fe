"""The bad-input corpus: each case gets its exact status, and both services stay SERVING and right.

Encoder cases go straight to the encoder (per-item errors inside a stream,
or the call's status); search cases go through the search service, which
calls that encoder for image and text queries. After every case a health
check and a known-good query must still give the right answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import images
from tests.hardening.raw_http2 import send_truncated_message
from tests.support import ServerThread, ServiceProcess, free_port, start_search_process
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc

SEARCH_MAX_MESSAGE = 4 * 1024 * 1024
MODEL = "VPM-Tiny/random-seed0"
SQL_ID = "x'; DROP TABLE products;--"
OK = "OK"


@dataclass
class Stack:
    encoder: encoder_pb2_grpc.EncoderStub
    encoder_target: str
    search: search_pb2_grpc.SearchStub
    search_target: str
    process: ServiceProcess


def unit(seed: int, dim: int = 64) -> list[float]:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (vector / np.linalg.norm(vector)).tolist()


def stored(product_id: str, seed: int) -> search_pb2.Product:
    return search_pb2.Product(
        id=product_id, name=f"product {product_id}", vector=unit(seed), model_id=MODEL
    )


@pytest.fixture(scope="module")
def stack(
    encoder_server: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    port = free_port()
    process = start_search_process(
        port, tmp_path_factory.mktemp("search"), [encoder_server.target],
        "--max-message-bytes", str(SEARCH_MAX_MESSAGE),
    )  # fmt: skip
    options = [("grpc.max_send_message_length", 64 << 20)]
    search = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=options))
    encoder = encoder_pb2_grpc.EncoderStub(
        grpc.insecure_channel(encoder_server.target, options=options)
    )
    summary = search.UpsertProducts(iter([stored(f"p{i}", i) for i in range(30)]), timeout=30)
    assert summary.inserted == 30
    yield Stack(encoder, encoder_server.target, search, f"127.0.0.1:{port}", process)
    process.stop()


def one_image(stack: Stack, data: bytes) -> encoder_pb2.EmbeddingItem:
    [reply] = stack.encoder.EncodeImages(
        iter([encoder_pb2.ImageItem(id="x", data=data)]), timeout=30
    )
    return reply


def one_text(stack: Stack, text: str) -> encoder_pb2.EmbeddingItem:
    return stack.encoder.EncodeText(encoder_pb2.TextBatch(texts=[text]), timeout=30).items[0]


def raw_call(target: str, method: str, payload: bytes) -> bytes:
    call = grpc.insecure_channel(target).unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    return call(payload, timeout=10)


def upsert_one(stack: Stack, product: search_pb2.Product) -> search_pb2.UpsertSummary:
    return stack.search.UpsertProducts(iter([product]), timeout=30)


def search(stack: Stack, **fields) -> search_pb2.SearchResponse:
    return stack.search.Search(search_pb2.SearchRequest(**fields), timeout=30)


# (name, action, expected status, a fragment of the message). Per-item errors are
# returned by the action as (code name, message); whole-call errors are raised.
Case = tuple[str, Callable[[Stack], object], str, str]


def case(cases: list[Case], name: str, code: str, fragment: str) -> Callable:
    """Register the decorated action as a case of `cases`."""

    def register(action: Callable[[Stack], object]) -> Callable[[Stack], object]:
        cases.append((name, action, code, fragment))
        return action

    return register


def code_name(number: int) -> str:
    return next(code.name for code in grpc.StatusCode if code.value[0] == number)


def item_status(reply: encoder_pb2.EmbeddingItem) -> tuple[str, str]:
    """A per-item outcome of the encoder as (status name, message)."""
    if reply.HasField("error"):
        return code_name(reply.error.code), reply.error.message
    assert len(reply.vector) == 64
    return OK, ""


def summary_status(summary: search_pb2.UpsertSummary) -> tuple[str, str]:
    """The first per-item failure of an upsert as (status name, message)."""
    if summary.failures:
        return code_name(summary.failures[0].code), summary.failures[0].message
    return OK, ""


ENCODER_CASES: list[Case] = []


@case(ENCODER_CASES, "zero-length image", "INVALID_ARGUMENT", "image is empty")
def _(s: Stack) -> object:
    return item_status(one_image(s, b""))


@case(ENCODER_CASES, "random bytes", "INVALID_ARGUMENT", "not a recognized image")
def _(s: Stack) -> object:
    return item_status(
        one_image(s, bytes(np.random.default_rng(1).integers(0, 256, 5000, np.uint8)))
    )


@case(ENCODER_CASES, "truncated JPEG", "INVALID_ARGUMENT", "truncated or corrupt")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.jpeg()[:3000]))


@case(ENCODER_CASES, "truncated PNG", "INVALID_ARGUMENT", "truncated or corrupt")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.encode(images.picture(300, 200), "PNG")[:2500]))


@case(ENCODER_CASES, "valid header, garbage body", "INVALID_ARGUMENT", "truncated or corrupt")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.jpeg()[:300] + b"\x13" * 20000))


@case(ENCODER_CASES, "1x1 image", OK, "")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.encode(images.picture(1, 1), "PNG")))


@case(
    ENCODER_CASES,
    "30000x30000 declared pixels",
    "INVALID_ARGUMENT",
    "over the limit of 40000000 pixels",
)
def _(s: Stack) -> object:
    return item_status(one_image(s, images.png_declaring(30000, 30000)))


@case(ENCODER_CASES, "animated GIF", OK, "")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.animated_gif()))


@case(ENCODER_CASES, "16-bit PNG", OK, "")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.sixteen_bit_png()))


@case(ENCODER_CASES, "CMYK JPEG", OK, "")
def _(s: Stack) -> object:
    return item_status(one_image(s, images.cmyk_jpeg()))


@case(ENCODER_CASES, "SVG bytes", "INVALID_ARGUMENT", "not a recognized image")
def _(s: Stack) -> object:
    return item_status(one_image(s, b"<svg xmlns='http://www.w3.org/2000/svg'/>"))


@case(ENCODER_CASES, "HTML bytes", "INVALID_ARGUMENT", "not a recognized image")
def _(s: Stack) -> object:
    return item_status(one_image(s, b"<!doctype html><title>x</title>"))


@case(ENCODER_CASES, "PDF bytes", "INVALID_ARGUMENT", "not a recognized image")
def _(s: Stack) -> object:
    return item_status(one_image(s, b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj"))


@case(ENCODER_CASES, "message over the size limit", "RESOURCE_EXHAUSTED", "larger than max")
def _(s: Stack) -> object:
    return one_image(s, b"\xff\xd8" + b"\x00" * (33 * 1024 * 1024))


@case(ENCODER_CASES, "image over --max-image-bytes", "INVALID_ARGUMENT", "over the limit")
def _(s: Stack) -> object:
    return item_status(one_image(s, b"\xff\xd8" + b"\x00" * (21 * 1024 * 1024)))


@case(ENCODER_CASES, "text of 100 KB", "INVALID_ARGUMENT", "over the limit of 16384")
def _(s: Stack) -> object:
    return item_status(one_text(s, "shoe " * 20000))


@case(ENCODER_CASES, "text of 0 bytes", "INVALID_ARGUMENT", "text is empty")
def _(s: Stack) -> object:
    return item_status(one_text(s, ""))


@case(ENCODER_CASES, "text that is not UTF-8", "INVALID_ARGUMENT", "not a valid message")
def _(s: Stack) -> object:
    return raw_call(s.encoder_target, "/vpm.v1.Encoder/EncodeText", b"\n\x03\xc3(\xff")


SEARCH_CASES: list[Case] = []


@case(SEARCH_CASES, "empty query", "INVALID_ARGUMENT", "query: set exactly one of")
def _(s: Stack) -> object:
    return search(s)


@case(SEARCH_CASES, "top_k 0 means 10", OK, "")
def _(s: Stack) -> object:
    return len(search(s, product_id="p1", top_k=0).matches) == 10 and OK


@case(SEARCH_CASES, "top_k -1", "INVALID_ARGUMENT", "top_k: must be between 1 and 1000")
def _(s: Stack) -> object:
    return search(s, product_id="p1", top_k=-1)


@case(SEARCH_CASES, "top_k huge", "INVALID_ARGUMENT", "top_k: must be between 1 and 1000")
def _(s: Stack) -> object:
    return search(s, product_id="p1", top_k=10**9)


@case(SEARCH_CASES, "unknown filter field", "INVALID_ARGUMENT", "filters: unknown key 'colour'")
def _(s: Stack) -> object:
    return search(s, product_id="p1", filters={"colour": "red"})


@case(
    SEARCH_CASES, "vector of the wrong dimension", "INVALID_ARGUMENT", "vector: expected 64 values"
)
def _(s: Stack) -> object:
    return search(s, vector=search_pb2.Vector(values=[0.5] * 10))


@case(SEARCH_CASES, "vector with NaN", "INVALID_ARGUMENT", "is not finite (nan)")
def _(s: Stack) -> object:
    return search(s, vector=search_pb2.Vector(values=[math.nan] + [0.1] * 63))


@case(SEARCH_CASES, "vector with Inf", "INVALID_ARGUMENT", "is not finite (inf)")
def _(s: Stack) -> object:
    return search(s, vector=search_pb2.Vector(values=[0.1] * 63 + [math.inf]))


@case(SEARCH_CASES, "vector of zero norm", "INVALID_ARGUMENT", "vector: has zero norm")
def _(s: Stack) -> object:
    return search(s, vector=search_pb2.Vector(values=[0.0] * 64))


@case(SEARCH_CASES, "unknown product id", "NOT_FOUND", "no product 'no-such'")
def _(s: Stack) -> object:
    return search(s, product_id="no-such")


@case(SEARCH_CASES, "id with SQL metacharacters, absent", "NOT_FOUND", "no product")
def _(s: Stack) -> object:
    return s.search.GetProduct(search_pb2.GetProductRequest(id=SQL_ID), timeout=10)


@case(SEARCH_CASES, "id with SQL metacharacters, stored", OK, "")
def _(s: Stack) -> object:
    return (
        upsert_one(s, stored(SQL_ID, 99)).inserted == 1
        and s.search.GetProduct(search_pb2.GetProductRequest(id=SQL_ID), timeout=10).id == SQL_ID
    ) and OK


@case(
    SEARCH_CASES, "image that does not decode", "INVALID_ARGUMENT", "image: not a recognized image"
)
def _(s: Stack) -> object:
    return search(s, image=b"GIF89a-nope")


@case(SEARCH_CASES, "image over the search message limit", "RESOURCE_EXHAUSTED", "larger than max")
def _(s: Stack) -> object:
    return search(s, image=b"\xff" * (SEARCH_MAX_MESSAGE + 1))


@case(SEARCH_CASES, "text of 100 KB", "INVALID_ARGUMENT", "over the limit of 16384")
def _(s: Stack) -> object:
    return search(s, text="bag " * 25000)


@case(SEARCH_CASES, "text of 0 bytes", "INVALID_ARGUMENT", "text: must not be empty")
def _(s: Stack) -> object:
    return search(s, text="")


@case(SEARCH_CASES, "negative offset", "INVALID_ARGUMENT", "offset: must not be negative")
def _(s: Stack) -> object:
    return search(s, product_id="p1", offset=-5)


@case(SEARCH_CASES, "min_score NaN", "INVALID_ARGUMENT", "min_score: must be a number from -1")
def _(s: Stack) -> object:
    return search(s, product_id="p1", min_score=math.nan)


@case(SEARCH_CASES, "min_score above 1", "INVALID_ARGUMENT", "min_score: must be a number from -1")
def _(s: Stack) -> object:
    return search(s, product_id="p1", min_score=1.5)


@case(SEARCH_CASES, "metadata that is not UTF-8", "INVALID_ARGUMENT", "not a valid message")
def _(s: Stack) -> object:
    return raw_call(s.search_target, "/vpm.v1.Search/GetProduct", b"\n\x02\xff\xfe")


@case(SEARCH_CASES, "duplicate ids in one upsert stream: the last wins", OK, "")
def _(s: Stack) -> object:
    return (
        s.search.UpsertProducts(
            iter(
                [
                    stored("dup", 1),
                    search_pb2.Product(id="dup", name="second", vector=unit(2), model_id=MODEL),
                ]
            ),
            timeout=30,
        ).failed
        == 0
        and s.search.GetProduct(search_pb2.GetProductRequest(id="dup"), timeout=10).name == "second"
    ) and OK


@case(
    SEARCH_CASES,
    "upsert: vector of another model",
    "FAILED_PRECONDITION",
    "differs from the catalog's model",
)
def _(s: Stack) -> object:
    return summary_status(
        upsert_one(s, search_pb2.Product(id="m1", vector=unit(3), model_id="other-model"))
    )


@case(SEARCH_CASES, "upsert: vector of another dimension", "FAILED_PRECONDITION", "64-dimensional")
def _(s: Stack) -> object:
    return summary_status(
        upsert_one(s, search_pb2.Product(id="m2", vector=[1.0] * 10, model_id=MODEL))
    )


@case(SEARCH_CASES, "upsert: NaN vector", "INVALID_ARGUMENT", "not finite")
def _(s: Stack) -> object:
    return summary_status(
        upsert_one(s, search_pb2.Product(id="m3", vector=[math.nan] * 64, model_id=MODEL))
    )


@case(SEARCH_CASES, "upsert: neither vector nor image, not stored", "INVALID_ARGUMENT", "only a")
def _(s: Stack) -> object:
    return summary_status(upsert_one(s, search_pb2.Product(id="m4")))


@case(SEARCH_CASES, "upsert: empty id", "INVALID_ARGUMENT", "id: must be 1 to 256 characters")
def _(s: Stack) -> object:
    return summary_status(upsert_one(s, search_pb2.Product(id="", vector=unit(4), model_id=MODEL)))


@case(SEARCH_CASES, "upsert: image that does not decode", "INVALID_ARGUMENT", "image:")
def _(s: Stack) -> object:
    return summary_status(
        upsert_one(s, search_pb2.Product(id="m5", image=b"\x89PNG\r\n\x1a\nbroken"))
    )


@case(SEARCH_CASES, "get: empty id", "INVALID_ARGUMENT", "id: must not be empty")
def _(s: Stack) -> object:
    return s.search.GetProduct(search_pb2.GetProductRequest(id=""), timeout=10)


def outcome(action: Callable[[Stack], object], stack: Stack) -> tuple[str, str]:
    try:
        result = action(stack)
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    if isinstance(result, tuple):
        return result
    assert result == OK, result
    return OK, ""


def still_right(stack: Stack) -> None:
    """Both services SERVING, and a known-good query still finds its product first."""
    for target, service in (
        (stack.encoder_target, "vpm.v1.Encoder"),
        (stack.search_target, "vpm.v1.Search"),
    ):
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, target
    top = search(stack, vector=search_pb2.Vector(values=unit(7)), top_k=1).matches[0]
    assert top.product.id == "p7" and top.score > 0.999
    assert item_status(one_image(stack, images.jpeg(64, 64, seed=1)))[0] == OK


@pytest.mark.parametrize(("name", "action", "code", "fragment"), ENCODER_CASES + SEARCH_CASES,
                         ids=[case[0] for case in ENCODER_CASES + SEARCH_CASES])  # fmt: skip
def test_bad_input(stack: Stack, name: str, action, code: str, fragment: str) -> None:
    got_code, message = outcome(action, stack)
    assert (got_code, fragment in message) == (code, True), f"{name}: {got_code}: {message}"
    assert "Traceback" not in message and "/work/" not in message and "SELECT" not in message
    still_right(stack)


def test_the_corpus_is_at_least_thirty_cases() -> None:
    assert len(ENCODER_CASES) + len(SEARCH_CASES) >= 30


@pytest.mark.parametrize("target_kind", ["encoder", "encoder-batches", "search"])
def test_a_stream_that_ends_mid_message(stack: Stack, target_kind: str) -> None:
    """A raw HTTP/2 client declares a 1000-byte message, sends 3 bytes and ends the stream.

    gRPC drops the incomplete message as if the stream had ended before it: the call
    ends OK having received nothing, so nothing is encoded or written.
    """
    target, method = {
        "encoder": (stack.encoder_target, "/vpm.v1.Encoder/EncodeImages"),
        "encoder-batches": (stack.encoder_target, "/vpm.v1.Encoder/EncodeImageBatches"),
        "search": (stack.search_target, "/vpm.v1.Search/UpsertProducts"),
    }[target_kind]
    search_stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(stack.search_target))
    before = search_stub.GetStats(search_pb2.GetStatsRequest(), timeout=5)
    answer = send_truncated_message(target, method, declared=1000, sent=b"\x0a\x01a")
    assert answer.get("grpc-status") == "0", answer  # an answer, not a timeout or a reset
    after = search_stub.GetStats(search_pb2.GetStatsRequest(), timeout=5)
    assert (after.products, after.catalog_version) == (before.products, before.catalog_version)
    still_right(stack)
