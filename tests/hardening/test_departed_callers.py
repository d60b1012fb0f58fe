"""No work continues for a caller that left: measured in the encoder's own metrics."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tests import images
from tests.support import free_port, start_search_process, wait_until
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc


def counter(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


def test_a_cancelled_stream_stops_costing_inference(make_encoder) -> None:
    # Fewer images than a batch and a long batch wait: all ten sit queued when the client leaves.
    thread, app = make_encoder(max_batch=16, max_delay_ms=3000.0)
    metrics = app.engine.metrics
    encoded = counter(metrics.items, "image")
    stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(thread.target))
    requests = [
        encoder_pb2.ImageItem(id=str(i), data=images.jpeg(64, 64, seed=i)) for i in range(10)
    ]
    call = stub.EncodeImages(iter(requests), timeout=60)
    wait_until(lambda: app.engine.in_flight() == 10)
    call.cancel()
    # Dropped when their batch comes up (after the 3 s wait), before any inference.
    wait_until(lambda: counter(metrics.dropped_items, "image", "cancelled") == 10)
    assert app.engine.in_flight() == 0
    assert counter(metrics.items, "image") == encoded  # none of them reached the model


@pytest.mark.slow
def test_a_search_whose_caller_left_does_not_cost_an_encoding(make_encoder, tmp_path: Path) -> None:
    thread, app = make_encoder(max_batch=8, max_delay_ms=1500.0)  # an encoder slow to start a batch
    metrics = app.engine.metrics
    port = free_port()
    search = start_search_process(port, tmp_path / "search", [thread.target])
    try:
        stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Search(search_pb2.SearchRequest(image=images.jpeg(64, 64, seed=4)), timeout=30)
        encoded = counter(metrics.items, "image")  # the path is warm: 1 image so far

        def gone() -> float:
            return sum(
                counter(metrics.dropped_items, "image", why) for why in ("cancelled", "deadline")
            )

        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(search_pb2.SearchRequest(image=images.jpeg(64, 64, seed=5)), timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: gone() == 1)  # dropped when its batch came up, never run
        assert app.engine.in_flight() == 0 and counter(metrics.items, "image") == encoded
    finally:
        search.stop()


@pytest.mark.slow
def test_a_search_the_encoder_cannot_serve_in_time_is_shed_not_timed_out(
    make_encoder, tmp_path: Path
) -> None:
    """The caller's deadline travels with the encoder call, so a busy encoder refuses at once."""
    from encoder_service.batcher import Caller

    thread, app = make_encoder(max_batch=8, max_delay_ms=3000.0)
    port = free_port()
    search = start_search_process(
        port, tmp_path / "search", [thread.target], "--query-cache-size", "0"
    )
    try:
        stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Search(search_pb2.SearchRequest(image=images.jpeg(64, 64, seed=1)), timeout=30)
        for _ in range(60):  # as if every item had cost 2 s lately
            app.engine.metrics.observe_item_cost(2.0)
        waiting = app.engine.submit_image(images.jpeg(64, 64, seed=2), Caller())  # queued ahead
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(search_pb2.SearchRequest(image=images.jpeg(64, 64, seed=3)), timeout=1.5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert "retry" in caught.value.details()
        assert time.monotonic() - started < 1.0  # refused at once, not after the deadline
        waiting.result(30)
    finally:
        search.stop()
