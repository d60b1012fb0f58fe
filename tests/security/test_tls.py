"""TLS and mutual TLS on the real encoder server: who gets through and who does not."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests import images
from tests.security.conftest import Locked, Pki
from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from vpm_common.health_probe import check_health, main
from vpm_common.security import ClientSecurity


def model_info(channel: grpc.Channel) -> encoder_pb2.ModelInfo:
    with channel:
        return encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(
            encoder_pb2.GetModelInfoRequest(), timeout=5
        )


def refused(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        model_info(channel)
    return caught.value


def test_a_client_that_trusts_the_ca_gets_answers_and_vectors(
    pki: Pki, make_encoder: Callable[..., tuple]
) -> None:
    server = make_encoder(tls_cert=pki.server.cert, tls_key=pki.server.key)[0]
    security = ClientSecurity.load(ca=pki.ca)
    assert model_info(security.channel(server.target)).model_id == "VPM-Tiny/random-seed0"
    with security.channel(server.target) as channel:
        items = [encoder_pb2.ImageItem(id=str(i), data=images.jpeg(96, 96, i)) for i in range(3)]
        replies = list(encoder_pb2_grpc.EncoderStub(channel).EncodeImages(iter(items), timeout=30))
    assert sorted(r.id for r in replies) == ["0", "1", "2"]
    assert all(len(r.vector) == 64 for r in replies)
    # The same port speaks nothing but TLS.
    error = refused(grpc.insecure_channel(server.target))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_trusts_another_ca_is_refused(pki: Pki, locked_encoder: Locked) -> None:
    impostor_trust = ClientSecurity.load(
        ca=pki.other_ca, cert=pki.client.cert, key=pki.client.key, token=locked_encoder.tokens[0]
    )
    assert refused(impostor_trust.channel(locked_encoder.target)).code() == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_mutual_tls_wants_a_certificate_from_its_own_ca(pki: Pki, locked_encoder: Locked) -> None:
    token = locked_encoder.tokens[0]
    without_cert = pki.client_security(token, cert=False)
    assert refused(without_cert.channel(locked_encoder.target)).code() == (
        grpc.StatusCode.UNAVAILABLE
    )
    foreign_cert = ClientSecurity.load(
        ca=pki.ca, cert=pki.other_client.cert, key=pki.other_client.key, token=token
    )
    assert refused(foreign_cert.channel(locked_encoder.target)).code() == (
        grpc.StatusCode.UNAVAILABLE
    )
    assert model_info(pki.client_security(token).channel(locked_encoder.target)).dim == 64


def test_the_certificate_name_is_checked_and_can_be_named(pki: Pki, locked_encoder: Locked) -> None:
    """The indexer dials addresses resolved from a DNS name, and the probe dials 127.0.0.1:
    both name the host the certificate was made for."""
    client = pki.client_security(locked_encoder.tokens[0])
    target = f"localhost:{locked_encoder.thread.port}"
    assert model_info(client.channel(target, server_name="encoder.vpm.test")).dim == 64
    error = refused(client.channel(target, server_name="search.vpm.test"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_probe_speaks_tls_without_a_token(
    pki: Pki, locked_encoder: Locked, capsys: pytest.CaptureFixture[str]
) -> None:
    target = locked_encoder.target
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert)]
    argv = [
        "--target",
        target,
        "--service",
        "vpm.v1.Encoder",
        *tls,
        "--tls-key",
        str(pki.client.key),
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == f"{target} vpm.v1.Encoder: SERVING\n"
    assert main([*argv, "--tls-server-name", "encoder.vpm.test"]) == 0
    assert main(["--target", target, "--timeout-s", "2"]) == 1, "plain text meets a TLS port"
    serving, seen = check_health(target, "", 2, pki.client_security(cert=False))
    assert not serving and seen.startswith("UNAVAILABLE")
