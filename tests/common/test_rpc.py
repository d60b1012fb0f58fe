"""The gRPC boundary: malformed protobuf is INVALID_ARGUMENT, never UNKNOWN with a trace."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.support import ServerThread
from vpm.v1 import encoder_pb2

BAD_UTF8_TEXT = b"\x0a\x02\xff\xfe"  # TextBatch.texts[0] = bytes that are not UTF-8
TRUNCATED = b"\x0a\x10ab"  # a length prefix longer than the message


def raw(target: str, method: str, kind: str = "unary_unary"):  # noqa: ANN201
    channel = grpc.insecure_channel(target)
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)


@pytest.mark.parametrize(("payload", "reason"), [(BAD_UTF8_TEXT, "UTF-8"), (TRUNCATED, "corrupt")])
def test_a_malformed_unary_request_is_an_invalid_argument(
    encoder_server: ServerThread, payload: bytes, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw(encoder_server.target, "/vpm.v1.Encoder/EncodeText")(payload, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("the request is not a valid message")
    assert reason in caught.value.details() and "Traceback" not in caught.value.details()


def test_a_malformed_message_in_a_stream_is_an_invalid_argument(
    encoder_server: ServerThread,
) -> None:
    good = encoder_pb2.ImageItem(id="a", data=b"not an image").SerializeToString()
    bad = b"\x0a\x02\xff\xfe"  # ImageItem.id that is not UTF-8
    call = raw(encoder_server.target, "/vpm.v1.Encoder/EncodeImages", "stream_stream")
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([good, bad, good]), timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 1 of the stream is not a valid message" in caught.value.details()


def test_health_checks_are_guarded_too(encoder_server: ServerThread) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw(encoder_server.target, "/grpc.health.v1.Health/Check")(TRUNCATED, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    check = raw(encoder_server.target, "/grpc.health.v1.Health/Check")
    reply = health_pb2.HealthCheckResponse.FromString(check(b"", timeout=5))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
