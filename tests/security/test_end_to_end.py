"""The whole path secured: indexer -> encoder and search, search -> encoder, a query client.

Every hop is mutual TLS with a bearer token, each client with its own token:
the encoder accepts the search service's and the indexer's, the search
service accepts the indexer's and the query client's.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from demo import query
from demo.catalog import generate
from indexer.run import SetupError, run
from indexer.settings import IndexerSettings
from tests.security.conftest import Locked, Pki, RunningSearch, new_token
from vpm.v1 import search_pb2, search_pb2_grpc
from vpm_common.security import ClientSecurity


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    generate(folder, count=12)
    return folder


def first_id(catalog: Path) -> str:
    with (catalog / "styles.csv").open() as rows:
        return next(csv.DictReader(rows))["id"]


def test_index_and_query_over_mutual_tls_with_tokens(
    pki: Pki,
    locked_encoder: Locked,
    secure_search: Callable[..., RunningSearch],
    token_file: Callable[..., Path],
    catalog: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, indexer_token, search_token = locked_encoder.tokens
    query_token = new_token()
    search = secure_search(
        encoders=(locked_encoder.target,),
        encoder_security=pki.client_security(search_token),
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca,
        auth_token_file=token_file(indexer_token, query_token),
    )
    settings = IndexerSettings(
        styles=catalog / "styles.csv",
        images=catalog / "images",
        encoder=(locked_encoder.target,),
        search=search.target,
        progress="off",
        tls_ca=pki.ca,
        tls_cert=pki.client.cert,
        tls_key=pki.client.key,
        auth_token=indexer_token,
    )
    summary = asyncio.run(run(settings))
    assert (summary.found, summary.encoded, summary.failed) == (12, 12, [])

    # An image query: the search service encodes it through the encoder, over TLS, with its token.
    product = first_id(catalog)
    image = catalog / "images" / f"{product}.jpg"
    secured = ["--search", search.target, "--tls-ca", str(pki.ca),
               "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]  # fmt: skip
    assert query.main(["--image", str(image), *secured, "--auth-token-file",
                       str(token_file(query_token, name="query-token"))]) == 0  # fmt: skip
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[:3] == ["1", "1.000", product], "the product itself comes first"

    # Without its token the same client is turned away, with a clear status.
    assert query.main(["--id", product, *secured]) == 1
    assert capsys.readouterr().err == (
        "search failed: UNAUTHENTICATED: authentication required: "
        "send 'authorization: Bearer <token>'\n"
    )


def test_an_indexer_without_a_valid_token_cannot_start(
    pki: Pki, locked_encoder: Locked, catalog: Path
) -> None:
    settings = IndexerSettings(
        dir=catalog / "images",
        encoder=(locked_encoder.target,),
        search="127.0.0.1:1",
        progress="off",
        tls_ca=pki.ca,
        tls_cert=pki.client.cert,
        tls_key=pki.client.key,
        auth_token=new_token(),
    )
    with pytest.raises(SetupError) as caught:
        asyncio.run(run(settings))
    assert "UNAUTHENTICATED: invalid bearer token" in str(caught.value)


def test_search_refuses_encoders_it_cannot_verify(
    pki: Pki, locked_encoder: Locked, secure_search: Callable[..., RunningSearch], catalog: Path
) -> None:
    """A search service that trusts another CA does not talk to the encoder: image queries
    are UNAVAILABLE, and the message says no more than that to the search's client."""
    wrong_trust = ClientSecurity.load(
        ca=pki.other_ca,
        cert=pki.client.cert,
        key=pki.client.key,
        token=locked_encoder.tokens[2],
    )
    search = secure_search(encoders=(locked_encoder.target,), encoder_security=wrong_trust)
    image = (catalog / "images" / f"{first_id(catalog)}.jpg").read_bytes()
    with grpc.insecure_channel(search.target) as channel, pytest.raises(grpc.RpcError) as caught:
        search_pb2_grpc.SearchStub(channel).Search(
            search_pb2.SearchRequest(image=image), timeout=20
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details()
    assert details.startswith(f"image: no encoder answered ({locked_encoder.target}: UNAVAILABLE")
    # The handshake's failure is for the operator's log: it describes the service's own setup.
    assert "SSL" not in details and "handshake" not in details.lower() and ".pem" not in details
