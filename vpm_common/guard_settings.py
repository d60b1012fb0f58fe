"""The settings our gRPC servers share (TLS, bearer tokens, caps on calls), and those our client
programs share (TLS and the bearer token they send)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpm_common.security import (
    ClientSecurity,
    ServerSecurity,
    check_tls_settings,
    check_token_settings,
)
from vpm_common.settings import check, setting


@dataclass(frozen=True)
class ServerGuards:
    """Inherited by each service's settings dataclass; call check_guards() in __post_init__."""

    tls_cert: Path | None = setting(
        None, "PEM certificate (chain) of this server: serve TLS only (with --tls-key)"
    )
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert, unencrypted")
    tls_client_ca: Path | None = setting(
        None, "PEM CA: clients must show a certificate it signed (mutual TLS)"
    )
    auth_token: str = setting(
        "",
        "bearer token clients must send (authorization: Bearer ...), health checks excepted; "
        "set the variable: a flag shows in the process list",
    )
    auth_token_file: Path | None = setting(
        None,
        "file of accepted bearer tokens, one per line; re-read when it changes, so tokens "
        "rotate without a restart",
    )
    max_concurrent_rpcs: int = setting(
        1000, "calls in flight before new ones get RESOURCE_EXHAUSTED (health checks excepted)"
    )
    max_streams_per_connection: int = setting(
        256, "calls one client connection may hold open at once; more wait in the client"
    )

    def check_guards(self) -> None:
        check(self.max_concurrent_rpcs >= 0, "max_concurrent_rpcs", "must be >= 0 (0: no cap)")
        check(
            self.max_streams_per_connection >= 0,
            "max_streams_per_connection",
            "must be >= 0 (0: no limit)",
        )
        check_tls_settings(self, "tls_cert", "tls_key", "tls_client_ca", server=True)
        check_token_settings(self, "auth_token", "auth_token_file", server=True)

    def security(self) -> ServerSecurity:
        """How this server takes calls: TLS files and accepted tokens."""
        return ServerSecurity(
            self.tls_cert, self.tls_key, self.tls_client_ca, self.auth_token, self.auth_token_file
        )


@dataclass(frozen=True)
class ClientGuards:
    """Inherited by a client program's settings (the indexer, the page): how it reaches the
    services it calls. Call check_client_guards() in __post_init__."""

    tls: bool = setting(
        False,
        "reach the services over TLS (implied by --tls-ca and --tls-cert); without --tls-ca "
        "the system's roots verify them",
    )
    tls_ca: Path | None = setting(None, "PEM CA that signed the services' certificates")
    tls_cert: Path | None = setting(
        None, "PEM client certificate shown to services that ask for one (mutual TLS)"
    )
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    auth_token: str = setting(
        "",
        "bearer token sent with every call (list it in the services' tokens; it stays in this "
        "process, never in a page); set the variable: a flag shows in the process list",
    )
    auth_token_file: Path | None = setting(None, "file holding the bearer token to send")

    def check_client_guards(self) -> None:
        check_tls_settings(self, "tls_cert", "tls_key", "tls_ca", server=False)
        check_token_settings(self, "auth_token", "auth_token_file", server=False)

    def security(self) -> ClientSecurity:
        """How the services are reached (reads the files: call once, at start)."""
        return ClientSecurity.load(
            tls=self.tls,
            ca=self.tls_ca,
            cert=self.tls_cert,
            key=self.tls_key,
            token=self.auth_token,
            token_file=self.auth_token_file,
        )
