"""Bearer tokens: refused without one, any configured one accepted, health open, files rotate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests import images
from tests.security.conftest import Locked, Pki, new_token
from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.security import ClientSecurity
from vpm_common.server.guards import TokenSet

INFO = encoder_pb2.GetModelInfoRequest()


def test_no_token_or_a_wrong_one_is_unauthenticated(pki: Pki, locked_encoder: Locked) -> None:
    cases = {
        "authentication required: send 'authorization: Bearer <token>'": pki.client_security(),
        "invalid bearer token": pki.client_security(new_token()),
    }
    for expected, security in cases.items():
        with security.channel(locked_encoder.target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(INFO, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert caught.value.details() == expected


def test_another_scheme_is_not_a_bearer_token(pki: Pki, locked_encoder: Locked) -> None:
    token = locked_encoder.tokens[0]
    with pki.client_security().channel(locked_encoder.target) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModelInfo(INFO, timeout=5, metadata=[("authorization", f"Basic {token}")])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The scheme is case-insensitive (RFC 7235).
        reply = stub.GetModelInfo(INFO, timeout=5, metadata=[("authorization", f"bearer {token}")])
        assert reply.dim == 64


def test_every_configured_token_is_accepted(pki: Pki, locked_encoder: Locked) -> None:
    """Both lines of the token file and the token from the environment: clients rotate
    one at a time while the server accepts old and new."""
    for token in locked_encoder.tokens:
        with pki.client_security(token).channel(locked_encoder.target) as channel:
            assert encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(INFO, timeout=5).dim == 64


def test_a_refused_stream_is_refused_before_anything_is_read(
    pki: Pki, locked_encoder: Locked
) -> None:
    with pki.client_security(new_token()).channel(locked_encoder.target) as channel:
        items = iter([encoder_pb2.ImageItem(id="a", data=images.jpeg(64, 64))])
        with pytest.raises(grpc.RpcError) as caught:
            list(encoder_pb2_grpc.EncoderStub(channel).EncodeImages(items, timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Not even parsed: bytes that are no message get the same answer, not INVALID_ARGUMENT.
        raw = channel.unary_unary("/vpm.v1.Encoder/EncodeText")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\x0a\x10truncated", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_answers_without_a_token_and_reflection_does_not(
    pki: Pki, locked_encoder: Locked
) -> None:
    with pki.client_security().channel(locked_encoder.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="vpm.v1.Encoder")
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(request, timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([listing]), timeout=5))  # fmt: skip
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pki.client_security(locked_encoder.tokens[1]).channel(locked_encoder.target) as channel:
        (reply,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([listing]), timeout=5
        )
        names = {service.name for service in reply.list_services_response.service}
        assert "vpm.v1.Encoder" in names


def test_a_token_over_plain_text_works_for_unary_and_streaming_calls(
    make_encoder: Callable[..., tuple], token_file: Callable[..., Path]
) -> None:
    """Without TLS gRPC refuses call credentials; our client interceptor sends the token
    (for loopback and encrypted networks only, as its warning says)."""
    token = new_token()
    server = make_encoder(auth_token_file=token_file(token))[0]
    with ClientSecurity(token=token).channel(server.target) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        assert stub.GetModelInfo(INFO, timeout=5).dim == 64
        items = iter([encoder_pb2.ImageItem(id="a", data=images.jpeg(64, 64))])
        assert len(list(stub.EncodeImages(items, timeout=30))[0].vector) == 64

    async def encode() -> list:
        pool = EncoderPool([server.target], timeout_s=30, security=ClientSecurity(token=token))
        try:
            items = [(str(i), images.jpeg(80, 80, i)) for i in range(3)]
            return await pool.encode_images(items)
        finally:
            await pool.close()

    results = asyncio.run(encode())
    assert [r.code for r in results] == [0, 0, 0]
    assert all(r.vector is not None and r.vector.shape == (64,) for r in results)
    with ClientSecurity().channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(INFO, timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_changed_token_file_is_read_again_and_a_broken_one_is_not(
    token_file: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    old, new, inline = new_token(), new_token(), new_token()
    path = token_file(old)
    tokens = TokenSet(inline, path, recheck_s=0)
    assert old in tokens and inline in tokens and new not in tokens
    path.write_text(f"{new}\n")  # rotated: the old token is retired
    assert new in tokens and old not in tokens and inline in tokens
    path.write_text("two words\n")  # a bad edit must not open the door, nor lock everyone out
    assert new in tokens and "two words" not in tokens
    assert "not reloaded, keeping the tokens read before" in caplog.text
    assert "two words" not in caplog.text and new not in caplog.text
    path.unlink()
    assert new in tokens
    assert "" not in tokens and "x" * 40 not in tokens
