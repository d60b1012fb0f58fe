"""TLS and token settings fail at start with one line naming the flag and variable, not a token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from encoder_service.settings import ENV_PREFIX as ENCODER_PREFIX
from encoder_service.settings import EncoderSettings
from indexer.settings import ENV_PREFIX as INDEXER_PREFIX
from indexer.settings import IndexerSettings
from search_service.settings import SearchSettings
from tests.security.conftest import Pki, new_token
from vpm_common.health_probe import ENV_PREFIX as PROBE_PREFIX
from vpm_common.health_probe import ProbeSettings
from vpm_common.settings import SettingsError, load_settings


def encoder(*argv: str, **environ: str) -> EncoderSettings:
    return load_settings(EncoderSettings, ENCODER_PREFIX, list(argv), environ)


def refusal(load: Callable[[], object]) -> str:
    with pytest.raises(SettingsError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_complete_server_setup_loads(pki: Pki, token_file: Callable[..., Path]) -> None:
    token = new_token()
    settings = encoder(
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca), "--auth-token-file", str(token_file(new_token())),
        VPM_ENCODER_AUTH_TOKEN=token,
    )  # fmt: skip
    security = settings.security()
    assert security.describe() == "TLS, client certificates, bearer tokens"
    assert security.credentials() is not None and security.auth() is not None
    assert token not in repr(security.auth().__dict__)


def test_plain_text_stays_the_default() -> None:
    settings = encoder()
    assert settings.security().describe() == "plain text"
    assert settings.security().credentials() is None and settings.security().auth() is None
    assert (settings.max_concurrent_rpcs, settings.max_streams_per_connection) == (1000, 256)


def test_certificate_and_key_go_together(pki: Pki) -> None:
    message = refusal(lambda: encoder("--tls-cert", str(pki.server.cert)))
    assert message == "--tls-key / VPM_ENCODER_TLS_KEY: --tls-cert needs --tls-key too"
    message = refusal(lambda: encoder(VPM_ENCODER_TLS_KEY=str(pki.server.key)))
    assert message == "--tls-cert / VPM_ENCODER_TLS_CERT: --tls-key needs --tls-cert too"


def test_client_certificates_need_tls(pki: Pki) -> None:
    message = refusal(lambda: encoder("--tls-client-ca", str(pki.ca)))
    assert message.startswith("--tls-client-ca / VPM_ENCODER_TLS_CLIENT_CA: ")
    assert "over TLS only" in message


def test_missing_unreadable_and_wrong_files_are_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    message = refusal(lambda: encoder("--tls-cert", str(missing), "--tls-key", str(pki.server.key)))
    assert message == (
        f"--tls-cert / VPM_ENCODER_TLS_CERT: cannot read {missing} (No such file or directory)"
    )
    message = refusal(
        lambda: encoder("--tls-cert", str(pki.server.key), "--tls-key", str(pki.server.key))
    )
    assert (
        message == f"--tls-cert / VPM_ENCODER_TLS_CERT: {pki.server.key} holds no PEM certificate"
    )
    message = refusal(lambda: encoder("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.ca)))
    assert message == f"--tls-key / VPM_ENCODER_TLS_KEY: {pki.ca} holds no PEM private key"
    # A key that belongs to another certificate: the most likely mix-up in a rotation.
    message = refusal(
        lambda: encoder("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key))
    )
    assert message.startswith("--tls-key / VPM_ENCODER_TLS_KEY: ")
    assert "is not the key of the certificate in --tls-cert" in message
    garbage = tmp_path / "ca.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    message = refusal(
        lambda: encoder(
            "--tls-cert",
            str(pki.server.cert),
            "--tls-key",
            str(pki.server.key),
            "--tls-client-ca",
            str(garbage),
        )  # fmt: skip
    )
    assert message.startswith(
        f"--tls-client-ca / VPM_ENCODER_TLS_CLIENT_CA: {garbage} holds no usable"
    )


def test_tokens_are_checked_without_being_quoted(
    tmp_path: Path, token_file: Callable[..., Path]
) -> None:
    short = "hunter2"
    message = refusal(lambda: encoder(VPM_ENCODER_AUTH_TOKEN=short))
    assert message.startswith("--auth-token / VPM_ENCODER_AUTH_TOKEN: a token needs at least 16")
    assert short not in message
    spaced = "correct horse battery staple"
    message = refusal(lambda: encoder(VPM_ENCODER_AUTH_TOKEN=spaced))
    assert "letters, digits" in message and spaced not in message
    good, bad = new_token(), "not a token, has spaces!"
    path = token_file(good, bad)
    message = refusal(lambda: encoder("--auth-token-file", str(path)))
    assert message.startswith(f"--auth-token-file / VPM_ENCODER_AUTH_TOKEN_FILE: {path}: line 3: ")
    assert good not in message and bad not in message
    empty = token_file(name="empty")
    message = refusal(lambda: encoder("--auth-token-file", str(empty)))
    assert message == f"--auth-token-file / VPM_ENCODER_AUTH_TOKEN_FILE: {empty} holds no token"
    gone = tmp_path / "gone"
    message = refusal(lambda: encoder("--auth-token-file", str(gone)))
    assert "cannot read" in message


def test_a_client_sends_one_token(token_file: Callable[..., Path], tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    two = token_file(new_token(), new_token())

    def indexer(*argv: str, **environ: str) -> IndexerSettings:
        return load_settings(
            IndexerSettings, INDEXER_PREFIX, ["--dir", str(catalog), *argv], environ
        )

    message = refusal(lambda: indexer("--auth-token-file", str(two)))
    assert message.endswith("holds 2 tokens; a client sends one")
    one = token_file(new_token(), name="one")
    message = refusal(
        lambda: indexer("--auth-token-file", str(one), VPM_INDEXER_AUTH_TOKEN=new_token())
    )
    assert message.startswith("--auth-token-file / VPM_INDEXER_AUTH_TOKEN_FILE: give the token")
    assert indexer("--auth-token-file", str(one)).security().token == one.read_text().split()[-1]


def test_the_search_services_encoder_client_has_its_own_keys(pki: Pki) -> None:
    message = refusal(
        lambda: load_settings(
            SearchSettings, "VPM_SEARCH_", ["--encoder-tls-cert", str(pki.client.cert)], {}
        )
    )
    assert message == (
        "--encoder-tls-key / VPM_SEARCH_ENCODER_TLS_KEY: "
        "--encoder-tls-cert needs --encoder-tls-key too"
    )
    settings = load_settings(
        SearchSettings,
        "VPM_SEARCH_",
        ["--encoder-tls-ca", str(pki.ca)],
        {"VPM_SEARCH_ENCODER_AUTH_TOKEN": new_token()},
    )
    client = settings.encoder_security()
    assert client.tls and client.ca == pki.ca.read_bytes() and client.cert is None
    assert client.token not in repr(client)


def test_the_probe_takes_tls_flags(pki: Pki) -> None:
    settings = load_settings(
        ProbeSettings, PROBE_PREFIX, ["--tls-ca", str(pki.ca), "--tls-server-name", "localhost"], {}
    )
    assert settings.security().tls and settings.tls_server_name == "localhost"
    message = refusal(
        lambda: load_settings(ProbeSettings, PROBE_PREFIX, ["--tls-key", str(pki.client.key)], {})
    )
    assert message.startswith("--tls-cert / VPM_PROBE_TLS_CERT: ")
