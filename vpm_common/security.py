"""TLS, mutual TLS and bearer tokens for our gRPC servers and clients, from their settings.

Servers: `ServerSecurity` gives their credentials (TLS, client certificates
when a CA is given) and the server.guards.TokenAuth interceptor for their tokens.
Clients: `ClientSecurity` opens sync and aio channels with or without TLS and
with the token. Over TLS the token travels as call credentials, which gRPC
never sends on an unencrypted connection; without TLS a client interceptor
adds it, with a warning, since anyone on the path can read it then.
The `check_*` functions validate settings at start, naming the offending key.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from vpm_common.server.guards import TokenAuth, TokenSet, read_token_file, token_problem
from vpm_common.settings import check

logger = logging.getLogger(__name__)


# -- validating settings ------------------------------------------------------------------


def flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def check_tls_settings(settings: Any, cert: str, key: str, ca: str, *, server: bool) -> None:
    """Validate the TLS fields `cert`, `key` and `ca` (names of fields of `settings`).

    Files must exist and hold PEM; the key must belong to the certificate.
    For a server, `ca` is the CA of client certificates and needs cert and key.
    """
    cert_path, key_path, ca_path = (getattr(settings, name) for name in (cert, key, ca))
    check(cert_path is not None or key_path is None, cert, f"{flag(key)} needs {flag(cert)} too")
    check(key_path is not None or cert_path is None, key, f"{flag(cert)} needs {flag(key)} too")
    if server:
        check(
            ca_path is None or cert_path is not None,
            ca,
            f"client certificates are checked over TLS only: give {flag(cert)} and {flag(key)}",
        )
    if ca_path is not None:
        _fail_on(ca, _pem_problem(ca_path, "CERTIFICATE") or _ca_problem(ca_path))
    if cert_path is not None:
        _fail_on(cert, _pem_problem(cert_path, "CERTIFICATE"))
        _fail_on(
            key, _pem_problem(key_path, "PRIVATE KEY") or _pair_problem(cert_path, key_path, cert)
        )


def _fail_on(field_name: str, problem: str | None) -> None:
    check(problem is None, field_name, problem or "")


def _pem_problem(path: Path, label: str) -> str | None:
    """Why `path` is not a readable PEM file holding a `label`, or None."""
    try:
        text = path.read_bytes()
    except OSError as error:
        return f"cannot read {path} ({error.strerror or error})"
    if re.search(rb"-----BEGIN [A-Z ]*" + label.encode() + rb"-----", text) is None:
        return f"{path} holds no PEM {label.lower()}"
    return None


def _ca_problem(path: Path) -> str | None:
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as error:
        return f"{path} holds no usable CA certificate ({_ssl_reason(error)})"
    return None


def _pair_problem(cert: Path, key: Path, cert_field: str) -> str | None:
    def no_password() -> bytes:
        raise ValueError("the key is encrypted; gRPC needs an unencrypted key file")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_cert_chain(str(cert), str(key), password=no_password)
    except ValueError as error:
        return f"{key}: {error}"
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            return f"{key} is not the key of the certificate in {flag(cert_field)} ({cert})"
        return f"{key} and {cert} do not load together ({_ssl_reason(error)})"
    return None


def _ssl_reason(error: Exception) -> str:
    return getattr(error, "reason", None) or str(error)


def check_token_settings(settings: Any, token: str, token_file: str, *, server: bool) -> None:
    """Validate a token given inline (`token`, from the environment) and/or in `token_file`.

    A server accepts every token of both; a client sends one, so it takes one of the two.
    Messages never quote a token.
    """
    value, path = getattr(settings, token), getattr(settings, token_file)
    if value:
        _fail_on(token, token_problem(value))
    if path is not None:
        try:
            tokens = read_token_file(path)
        except OSError as error:
            check(False, token_file, f"cannot read {path} ({error.strerror or error})")
        except ValueError as error:
            check(False, token_file, f"{path}: {error}")
        check(bool(tokens), token_file, f"{path} holds no token")
        check(
            server or len(tokens) == 1,
            token_file,
            f"{path} holds {len(tokens)} tokens; a client sends one",
        )
    if not server:
        check(
            not (value and path is not None),
            token_file,
            f"give the token in {flag(token_file)} or in the environment, not both",
        )


# -- servers ------------------------------------------------------------------------------


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with `cert` and `key`; with `client_ca`, clients must show a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


@dataclass(frozen=True)
class ServerSecurity:
    """A server's TLS files and accepted tokens, as its settings give them (all optional)."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    token: str = ""
    token_file: Path | None = None

    def describe(self) -> str:
        """For the log line at start: 'TLS, client certificates, bearer tokens' or 'plain text'."""
        parts = ["TLS" if self.cert is not None else "plain text"]
        if self.client_ca is not None:
            parts.append("client certificates")
        if self.token or self.token_file is not None:
            parts.append("bearer tokens")
        return ", ".join(parts)

    def credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None or self.key is None:
            return None
        return server_credentials(self.cert, self.key, self.client_ca)

    def auth(self) -> TokenAuth | None:
        """The interceptor that asks for a token, or None when no token is configured."""
        if not self.token and self.token_file is None:
            return None
        if self.cert is None:
            logger.warning(
                "bearer tokens are accepted without TLS: anyone on the network path can read "
                "them; use --tls-cert/--tls-key unless the network itself is encrypted"
            )
        return TokenAuth(TokenSet(self.token, self.token_file))


# -- clients ------------------------------------------------------------------------------


def channel_credentials(
    ca: bytes | None = None, cert: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS that trusts `ca` (the system's roots when None), showing `cert` and `key` if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """How a client reaches a server: TLS or not, its CA, its own certificate, its token."""

    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    token: str = ""

    @classmethod
    def load(
        cls,
        *,
        tls: bool = False,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        token: str = "",
        token_file: Path | None = None,
    ) -> ClientSecurity:
        """Read the files once; TLS is on when asked for or when a CA or certificate is given."""
        if token_file is not None and not token:
            tokens = read_token_file(token_file)
            if not tokens:
                raise ValueError(f"{token_file} holds no token")
            token = tokens[0]
        return cls(
            tls=tls or ca is not None or cert is not None,
            ca=ca.read_bytes() if ca is not None else None,
            cert=cert.read_bytes() if cert is not None else None,
            key=key.read_bytes() if key is not None else None,
            token=token,
        )

    def __repr__(self) -> str:  # never show the token or the key
        cert, token = self.cert is not None, bool(self.token)
        return f"ClientSecurity(tls={self.tls}, client_cert={cert}, token={token})"

    def credentials(self) -> grpc.ChannelCredentials:
        """The TLS channel credentials, with the token as call credentials when there is one."""
        credentials = channel_credentials(self.ca, self.cert, self.key)
        if self.token:
            token = grpc.access_token_call_credentials(self.token)
            credentials = grpc.composite_channel_credentials(credentials, token)
        return credentials

    def aio_channel(
        self, target: str, options: Sequence[tuple[str, Any]] = (), server_name: str = ""
    ) -> aio.Channel:
        """An aio channel to `target`; `server_name` is the name its certificate must carry
        when it differs from the target's host (an address resolved from a DNS name)."""
        options = [*options, *_name_options(server_name)]
        if self.tls:
            return aio.secure_channel(target, self.credentials(), options=options)
        interceptors = _aio_bearers(self.token) if self.token else None
        if self.token:
            _warn_plaintext(target)
        return aio.insecure_channel(target, options=options, interceptors=interceptors)

    def channel(
        self, target: str, options: Sequence[tuple[str, Any]] = (), server_name: str = ""
    ) -> grpc.Channel:
        """A synchronous channel to `target`, likewise."""
        options = [*options, *_name_options(server_name)]
        if self.tls:
            return grpc.secure_channel(target, self.credentials(), options=options)
        channel = grpc.insecure_channel(target, options=options)
        if not self.token:
            return channel
        _warn_plaintext(target)
        return grpc.intercept_channel(channel, _SyncBearer(self.token))


PLAINTEXT = ClientSecurity()


def _name_options(server_name: str) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


_warned: set[str] = set()


def _warn_plaintext(target: str) -> None:
    if target not in _warned:
        _warned.add(target)
        logger.warning(
            "sending a bearer token to %s without TLS: only safe on loopback or an encrypted "
            "network (a service mesh)",
            target,
        )


def _bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


class _AioBearer:
    """Adds the token to the calls of an aio channel without TLS (call credentials cannot).

    aio channels file each interceptor under one kind of call only, so there is one
    subclass per kind (see `_aio_bearers`).
    """

    def __init__(self, token: str) -> None:
        self._header = _bearer(token)

    def _with_token(self, details: aio.ClientCallDetails) -> aio.ClientCallDetails:
        return details._replace(metadata=aio.Metadata(*(details.metadata or ()), self._header))


class _AioBearerUnaryUnary(_AioBearer, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._with_token(details), request)


class _AioBearerUnaryStream(_AioBearer, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return await continuation(self._with_token(details), request)


class _AioBearerStreamUnary(_AioBearer, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return await continuation(self._with_token(details), requests)


class _AioBearerStreamStream(_AioBearer, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return await continuation(self._with_token(details), requests)


def _aio_bearers(token: str) -> list[_AioBearer]:
    kinds = (_AioBearerUnaryUnary, _AioBearerUnaryStream, _AioBearerStreamUnary,
             _AioBearerStreamStream)  # fmt: skip
    return [kind(token) for kind in kinds]


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The same for a synchronous channel."""

    def __init__(self, token: str) -> None:
        self._header = _bearer(token)

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), requests)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: list[tuple[str, str]]
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None
