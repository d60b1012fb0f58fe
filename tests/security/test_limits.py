"""Server-wide and per-connection caps on calls in flight, on the real encoder server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import images
from vpm.v1 import encoder_pb2, encoder_pb2_grpc

INFO = encoder_pb2.GetModelInfoRequest()


class HeldStream:
    """An EncodeImages stream that sends one image, gets its vector, and stays open."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._release = threading.Event()
        self.call = encoder_pb2_grpc.EncoderStub(channel).EncodeImages(self._items(), timeout=60)
        assert len(next(self.call).vector) == 64  # the server is running this call now

    def _items(self) -> Iterator[encoder_pb2.ImageItem]:
        yield encoder_pb2.ImageItem(id="held", data=images.jpeg(64, 64))
        self._release.wait(60)

    def finish(self) -> None:
        self._release.set()
        assert list(self.call) == []


def model_info(channel: grpc.Channel, timeout: float = 5) -> encoder_pb2.ModelInfo:
    return encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(INFO, timeout=timeout)


def serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_calls_past_the_cap_are_shed_at_once_and_health_still_answers(
    make_encoder: Callable[..., tuple],
) -> None:
    server = make_encoder(max_concurrent_rpcs=2)[0]
    with grpc.insecure_channel(server.target) as channel:
        held = [HeldStream(channel), HeldStream(channel)]
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            model_info(channel)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert caught.value.details() == (
            "the server is at its limit of 2 calls in flight; retry shortly"
        )
        assert time.monotonic() - started < 1.0, "shed at once, not queued"
        assert serving(channel), "probes are never shed: a busy server is not a dead one"
        for stream in held:
            stream.finish()
        assert model_info(channel).dim == 64


def test_a_cancelled_call_gives_its_slot_back(make_encoder: Callable[..., tuple]) -> None:
    server = make_encoder(max_concurrent_rpcs=1)[0]
    with grpc.insecure_channel(server.target) as channel:
        HeldStream(channel).call.cancel()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert model_info(channel).dim == 64
                break
            except grpc.RpcError as error:  # the server may not have seen the cancel yet
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the cancelled call kept its slot"
                time.sleep(0.05)


def test_one_connection_holds_at_most_its_streams(
    make_encoder: Callable[..., tuple],
) -> None:
    server = make_encoder(max_streams_per_connection=1, max_concurrent_rpcs=0)[0]
    with grpc.insecure_channel(server.target) as channel:
        held = HeldStream(channel)
        # HTTP/2 flow: the client itself holds the next call until a stream frees up.
        with pytest.raises(grpc.RpcError) as caught:
            model_info(channel, timeout=1)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Another connection is not held back by this one.
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.target, options=options) as other:
            assert model_info(other).dim == 64
        held.finish()
        assert model_info(channel).dim == 64
