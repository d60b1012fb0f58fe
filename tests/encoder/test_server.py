"""In-process tier: the real encoder server on a free port, called over gRPC."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from encoder_service.server import EncoderApp, create_server
from tests import images
from tests.support import ServerThread, call_all, free_port
from vpm.v1 import encoder_pb2, encoder_pb2_grpc

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def stub_for(target: str) -> encoder_pb2_grpc.EncoderStub:
    return encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(target))


def health_of(target: str, service: str = "vpm.v1.Encoder") -> int:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def encode_all(
    stub: encoder_pb2_grpc.EncoderStub, items: dict[str, bytes]
) -> dict[str, encoder_pb2.EmbeddingItem]:
    requests = (encoder_pb2.ImageItem(id=key, data=data) for key, data in items.items())
    replies = list(stub.EncodeImages(requests, timeout=60))
    assert len(replies) == len(items)
    return {reply.id: reply for reply in replies}


BAD_INPUTS = {
    "empty": (b"", "image is empty"),
    "random": (
        bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "not a recognized image",
    ),
    "truncated": (images.jpeg()[:3000], "truncated or corrupt"),
    "bomb": (images.png_declaring(30_000, 30_000), "over the limit"),
    "html": (b"<html><body>not an image</body></html>", "not a recognized image"),
}


def test_serving_with_health_and_reflection(encoder_server: ServerThread) -> None:
    assert health_of(encoder_server.target) == health_pb2.HealthCheckResponse.SERVING
    assert health_of(encoder_server.target, "") == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(encoder_server.target))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {service.name for service in reply.list_services_response.service}
    assert {"vpm.v1.Encoder", "grpc.health.v1.Health"} <= names


def test_model_info_describes_the_tiny_model(encoder_server: ServerThread) -> None:
    info = stub_for(encoder_server.target).GetModelInfo(
        encoder_pb2.GetModelInfoRequest(), timeout=5
    )
    assert (info.model, info.pretrained, info.model_id) == (
        "VPM-Tiny",
        "none",
        "VPM-Tiny/random-seed0",
    )
    assert (info.dim, info.image_size, info.context_length) == (64, 64, 77)
    assert (info.runtime, info.device, info.dtype) == ("onnx", "cpu", "float32")
    assert info.random_weights and info.normalization == "l2" and info.max_batch == 8


def test_a_stream_of_good_and_bad_images_answers_every_item(encoder_server: ServerThread) -> None:
    stub = stub_for(encoder_server.target)
    good = {f"good-{i}": images.jpeg(320, 240, seed=i) for i in range(30)}
    bad = {key: data for key, (data, _) in BAD_INPUTS.items()}
    mixed = dict(list(good.items())[:10]) | bad | dict(list(good.items())[10:])
    replies = encode_all(stub, mixed)
    for key in good:
        vector = np.array(replies[key].vector, dtype=np.float32)
        assert vector.shape == (64,) and not replies[key].HasField("error")
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    for key, (_, message) in BAD_INPUTS.items():
        assert replies[key].error.code == INVALID_ARGUMENT, key
        assert message in replies[key].error.message and not replies[key].vector
    assert health_of(encoder_server.target) == health_pb2.HealthCheckResponse.SERVING
    # Same image, same vector, however it was batched.
    again = encode_all(stub, {"again": good["good-3"]})["again"]
    np.testing.assert_allclose(again.vector, replies["good-3"].vector, atol=1e-5)


def test_texts_get_one_reply_each_in_order(encoder_server: ServerThread) -> None:
    stub = stub_for(encoder_server.target)
    texts = ["red dress", "", "white sneakers", "x" * 20_000, "red dress", "a " * 500]
    texts += ["\x00\x01", "&nbsp;", "shoes " + "y" * 101]
    items = stub.EncodeText(encoder_pb2.TextBatch(texts=texts), timeout=10).items
    assert [item.id for item in items] == [str(i) for i in range(len(texts))]
    assert (
        items[1].error.code == INVALID_ARGUMENT
        and "texts[1]: text is empty" in items[1].error.message
    )
    assert (
        items[3].error.code == INVALID_ARGUMENT
        and "over the limit of 16384" in items[3].error.message
    )
    for index in (6, 7):  # what cleaning leaves nothing of would be the empty prompt's vector
        assert items[index].error.code == INVALID_ARGUMENT
        assert "text is empty once cleaned" in items[index].error.message
    assert items[8].error.code == INVALID_ARGUMENT
    assert "a word of 101 characters (no space in it), over the limit of 100" in (
        items[8].error.message
    )
    for index in (0, 2, 4, 5):  # index 5 is longer than the context: truncated, still encoded
        assert len(items[index].vector) == 64
    np.testing.assert_allclose(items[0].vector, items[4].vector, atol=1e-6)
    assert not np.allclose(items[0].vector, items[2].vector)


@pytest.mark.parametrize(
    ("texts", "message"),
    [([], "texts is empty"), (["a"] * 1025, "texts has 1025 items, over the limit of 64")],
)
def test_text_batch_limits_are_invalid_arguments(
    encoder_server: ServerThread, texts: list[str], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(encoder_server.target).EncodeText(encoder_pb2.TextBatch(texts=texts), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        # --max-texts (1024 by default) above what the queue holds: a call told to retry
        # after RESOURCE_EXHAUSTED could never be admitted, so it is refused as too large.
        ({"queue_size": 16}, "over the limit of 16 (the queue's size, --queue-size)"),
        ({"queue_size": 32, "max_texts": 16}, "over the limit of 16"),
    ],
)
def test_a_text_call_over_the_limit_says_which_limit(make_encoder, limits, message) -> None:
    thread, _app = make_encoder(**limits)
    stub = stub_for(thread.target)
    with pytest.raises(grpc.RpcError) as caught:
        stub.EncodeText(encoder_pb2.TextBatch(texts=["red dress"] * 17), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"texts has 17 items, {message}"
    items = stub.EncodeText(encoder_pb2.TextBatch(texts=["red dress"] * 16), timeout=30).items
    assert len(items) == 16 and all(len(item.vector) == 64 for item in items)


def test_while_loading_calls_are_unavailable_and_health_is_not_serving(tiny_settings) -> None:
    app = EncoderApp()
    thread = ServerThread(lambda: create_server(tiny_settings(), app))
    thread.start()
    try:
        assert health_of(thread.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            stub_for(thread.target).GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            list(
                stub_for(thread.target).EncodeImages(
                    iter([encoder_pb2.ImageItem(id="a", data=b"x")]), timeout=5
                )
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        thread.stop(0)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The metrics endpoint's samples as {(name, sorted labels): value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_concurrent_single_image_clients_share_batches_and_get_their_own_vectors(
    make_encoder,
) -> None:
    port = free_port()
    thread, app = make_encoder(max_delay_ms=100.0, max_batch=16, metrics_port=0)
    from prometheus_client import start_http_server

    http, _ = start_http_server(port, addr="127.0.0.1", registry=app.engine.metrics.registry)
    try:
        pictures = {f"client-{i}": images.jpeg(200, 150, seed=100 + i) for i in range(16)}
        stub = stub_for(thread.target)

        def one_client(key: str) -> encoder_pb2.EmbeddingItem:
            return encode_all(stub_for(thread.target), {key: pictures[key]})[key]

        replies = call_all(one_client, list(pictures), threads=16)
        samples = scrape(port)
        batches = samples[("vpm_encoder_batch_size_count", (("kind", "image"),))]
        items = samples[("vpm_encoder_batch_size_sum", (("kind", "image"),))]
        assert items == 16 and batches < 16, f"{batches} batches for 16 items: no batching"
        for key, reply in zip(pictures, replies, strict=True):
            assert reply.id == key
            alone = encode_all(stub, {key: pictures[key]})[key]
            np.testing.assert_allclose(reply.vector, alone.vector, atol=1e-5)
    finally:
        http.shutdown()


def test_when_the_queue_is_full_items_get_resource_exhausted_and_the_rest_go_on(
    make_encoder,
) -> None:
    thread, _ = make_encoder(max_batch=4, queue_size=2, max_delay_ms=300.0)
    pictures = {f"p{i}": images.jpeg(200, 150, seed=i) for i in range(8)}
    replies = encode_all(stub_for(thread.target), pictures)
    codes = [reply.error.code for reply in replies.values()]
    assert codes.count(RESOURCE_EXHAUSTED) >= 1
    assert codes.count(0) >= 2
    assert all(code in (0, RESOURCE_EXHAUSTED) for code in codes)
    exhausted = next(r for r in replies.values() if r.error.code == RESOURCE_EXHAUSTED)
    assert "queue is full" in exhausted.error.message
    assert health_of(thread.target) == health_pb2.HealthCheckResponse.SERVING


def test_work_for_a_caller_past_its_deadline_is_dropped_not_run(make_encoder) -> None:
    thread, app = make_encoder(max_batch=64, max_delay_ms=1500.0)
    with pytest.raises(grpc.RpcError) as caught:
        stub_for(thread.target).EncodeText(encoder_pb2.TextBatch(texts=["late"]), timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    metrics = app.engine.metrics
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        dropped = sum(
            metrics.dropped_items.labels("text", reason)._value.get()
            for reason in ("cancelled", "deadline")
        )
        if dropped:
            break
        time.sleep(0.05)
    assert dropped == 1
    assert metrics.items.labels("text")._value.get() == 0
    assert app.engine.in_flight() == 0


def decode_matrix(result: encoder_pb2.ImageBatchResult) -> np.ndarray:
    """The reply's matrix read with numpy alone, from the layout vectors.proto documents."""
    matrix = result.vectors
    wire = {0: "<f4", 1: "<f2"}[matrix.dtype]
    return np.frombuffer(matrix.data, dtype=wire).reshape(matrix.rows, matrix.dim)


def test_image_batches_come_back_as_one_matrix_equal_to_the_per_item_vectors(
    encoder_server: ServerThread,
) -> None:
    stub = stub_for(encoder_server.target)
    files = [images.jpeg(320, 240, seed=40 + i) for i in range(12)]
    bad = {3: BAD_INPUTS["truncated"], 7: BAD_INPUTS["html"]}
    first = [bad[i][0] if i in bad else data for i, data in enumerate(files)]
    batches = [
        encoder_pb2.ImageBatch(id="first", images=first),
        encoder_pb2.ImageBatch(id="second", images=files[:5]),
        encoder_pb2.ImageBatch(id="half", images=files[:5], dtype=1),  # FLOAT16
    ]
    results = {r.id: r for r in stub.EncodeImageBatches(iter(batches), timeout=60)}
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5)
    assert set(results) == {"first", "second", "half"}
    assert all(r.model_id == info.model_id for r in results.values())
    single = encode_all(stub, {str(i): data for i, data in enumerate(files)})
    expected = np.array([single[str(i)].vector for i in range(12)], dtype=np.float32)

    matrix = decode_matrix(results["first"])
    assert matrix.shape == (12, 64) and matrix.dtype == np.dtype("<f4")
    errors = results["first"].errors
    assert [e.index for e in errors] == [3, 7]
    for error in errors:
        assert error.error.code == INVALID_ARGUMENT
        assert bad[error.index][1] in error.error.message
        assert not matrix[error.index].any()
    good = [i for i in range(12) if i not in bad]
    np.testing.assert_allclose(matrix[good], expected[good], atol=1e-5)
    np.testing.assert_allclose(decode_matrix(results["second"]), expected[:5], atol=1e-5)

    half = decode_matrix(results["half"])
    assert half.dtype == np.dtype("<f2") and len(results["half"].vectors.data) == 5 * 64 * 2
    np.testing.assert_allclose(half.astype(np.float32), expected[:5], atol=2e-3)
    cosines = (half.astype(np.float64) * expected[:5]).sum(axis=1)
    assert cosines.min() > 0.9999


def test_image_batch_limits_and_empty_batches(encoder_server: ServerThread) -> None:
    stub = stub_for(encoder_server.target)
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5)
    assert info.max_request_images == 64  # the queue size: 8 x max batch
    empty = list(stub.EncodeImageBatches(iter([encoder_pb2.ImageBatch(id="e")]), timeout=10))
    assert len(empty) == 1 and empty[0].vectors.rows == 0 and empty[0].vectors.dim == 64
    too_many = encoder_pb2.ImageBatch(id="big", images=[b"x"] * 65)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.EncodeImageBatches(iter([too_many]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64 images" in caught.value.details()


def test_a_refused_message_ends_the_stream_after_the_answers_to_those_before_it(
    make_encoder,
) -> None:
    # Batches before the bad one are in flight (a 300 ms wait for a batch of 8 to fill)
    # when it arrives: each still gets its one reply, then the call fails.
    thread, _ = make_encoder(max_batch=8, max_delay_ms=300.0)
    stub = stub_for(thread.target)
    good = [
        encoder_pb2.ImageBatch(id=str(n), images=[images.jpeg(64, 64, seed=n)] * 2)
        for n in range(2)
    ]
    bad = encoder_pb2.ImageBatch(id="bad", images=[images.jpeg(64, 64)], dtype=7)
    replies = []
    with pytest.raises(grpc.RpcError) as caught:
        for reply in stub.EncodeImageBatches(iter([*good, bad]), timeout=30):
            replies.append(reply)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "dtype: unknown vector dtype 7"
    assert sorted(reply.id for reply in replies) == ["0", "1"]
    assert all(reply.vectors.rows == 2 and not reply.errors for reply in replies)


def test_an_image_batch_the_queue_cannot_take_is_refused_row_by_row(make_encoder) -> None:
    # The stream's window (16) takes the batches of 5 faster than the first one runs
    # (a 300 ms wait for a batch of 8 to fill), but the queue holds only 6 images.
    thread, _ = make_encoder(max_batch=8, queue_size=6, max_delay_ms=300.0)
    stub = stub_for(thread.target)
    batches = [
        encoder_pb2.ImageBatch(id=str(n), images=[images.jpeg(200, 150, seed=n)] * 5)
        for n in range(4)
    ]
    results = list(stub.EncodeImageBatches(iter(batches), timeout=60))
    assert sorted(r.id for r in results) == ["0", "1", "2", "3"]  # in the order they finish
    assert not next(r for r in results if r.id == "0").errors  # nothing was ahead of it
    refused = [r for r in results if r.errors]
    assert refused
    for result in refused:
        assert [e.index for e in result.errors] == list(range(5))
        assert {e.error.code for e in result.errors} == {RESOURCE_EXHAUSTED}
        assert "queue is full" in result.errors[0].error.message
    for result in results:
        if not result.errors:
            assert np.abs(np.linalg.norm(decode_matrix(result), axis=1) - 1).max() < 1e-5


def test_every_vector_reply_names_its_model(encoder_server: ServerThread) -> None:
    stub = stub_for(encoder_server.target)
    info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=5)
    texts = stub.EncodeText(encoder_pb2.TextBatch(texts=["shoe", ""]), timeout=10)
    assert texts.model_id == info.model_id == texts.items[0].model_id
    replies = encode_all(stub, {"ok": images.jpeg(seed=1), "bad": b"nope"})
    assert replies["ok"].model_id == info.model_id and replies["bad"].error.code


def test_a_client_with_reflection_alone_encodes_a_batch_as_the_readme_shows(
    encoder_server: ServerThread,
) -> None:
    """What grpcurl does: the contract from server reflection, the request from JSON, no
    generated code of ours; the matrix read by the documented layout."""
    import base64
    import json

    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    channel = grpc.insecure_channel(encoder_server.target)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("vpm.v1.Encoder").FindMethodByName("EncodeImageBatches")
    request_class = message_factory.GetMessageClass(method.input_type)
    reply_class = message_factory.GetMessageClass(method.output_type)
    data = images.jpeg(120, 90, seed=9)
    body = json.dumps({"id": "b1", "images": [base64.b64encode(data).decode()]})
    request = json_format.Parse(body, request_class())
    call = channel.stream_stream(
        "/vpm.v1.Encoder/EncodeImageBatches",
        request_serializer=request_class.SerializeToString,
        response_deserializer=reply_class.FromString,
    )
    [reply] = list(call(iter([request]), timeout=30))
    answer = json_format.MessageToDict(reply)
    matrix = answer["vectors"]
    assert (answer["id"], matrix["rows"], matrix["dim"]) == ("b1", 1, 64)
    row = np.frombuffer(base64.b64decode(matrix["data"]), dtype="<f4")
    expected = encode_all(stub_for(encoder_server.target), {"x": data})["x"].vector
    np.testing.assert_allclose(row, expected, atol=1e-5)
    assert answer["modelId"] == "VPM-Tiny/random-seed0"
