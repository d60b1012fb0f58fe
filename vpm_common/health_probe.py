"""`python -m vpm_common.health_probe`: exit 0 when a gRPC server reports SERVING, 1 otherwise.

A container health check in the manner of grpc_health_probe, written with
grpcio alone so that every image can run it without another binary:

    python -m vpm_common.health_probe --target 127.0.0.1:50051 --service vpm.v1.Encoder

With --tls-ca (and --tls-cert/--tls-key where the server wants client
certificates) it speaks TLS; --tls-server-name is the name the server's
certificate carries when the target is an address such as 127.0.0.1. Health
checks need no bearer token.

It asks grpc.health.v1.Health/Check once, within --timeout-s. Exit status 0
when the answer is SERVING; 1 when it is anything else (NOT_SERVING while a
model loads or a service drains, an unknown service name) or when no answer
comes (refused, timed out); 2 for bad flags. One line says what it saw.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vpm_common.security import PLAINTEXT, ClientSecurity, check_tls_settings
from vpm_common.settings import SettingsError, check, load_settings, setting

ENV_PREFIX = "VPM_PROBE_"
HEALTHY, UNHEALTHY, USAGE = 0, 1, 2


@dataclass(frozen=True)
class ProbeSettings:
    target: str = setting("127.0.0.1:50051", "host:port of the gRPC server to ask")
    service: str = setting("", "service name to ask about (empty: the server as a whole)")
    timeout_s: float = setting(3.0, "seconds to wait for the answer, connecting included")
    tls: bool = setting(False, "speak TLS (implied by --tls-ca); without --tls-ca, system roots")
    tls_ca: Path | None = setting(None, "PEM CA that signed the server's certificate")
    tls_cert: Path | None = setting(None, "PEM client certificate, for servers that ask for one")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_server_name: str = setting(
        "", "name the server's certificate must carry (default: the target's host)"
    )

    def __post_init__(self) -> None:
        check(bool(self.target.strip()), "target", "must not be empty")
        check(self.timeout_s > 0, "timeout_s", f"must be positive, got {self.timeout_s}")
        check_tls_settings(self, "tls_cert", "tls_key", "tls_ca", server=False)

    def security(self) -> ClientSecurity:
        return ClientSecurity.load(
            tls=self.tls, ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key
        )


def check_health(
    target: str,
    service: str = "",
    timeout_s: float = 3.0,
    security: ClientSecurity = PLAINTEXT,
    server_name: str = "",
) -> tuple[bool, str]:
    """Ask `target` once whether `service` is SERVING; returns (serving, what was seen)."""
    # The probe talks to its own pod or container: a proxy set in the environment
    # must not carry a health check somewhere else.
    options = [("grpc.enable_http_proxy", 0)]
    with security.channel(target, options, server_name=server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            # NOT_FOUND (no details) is the health service's answer for an unknown name.
            details = error.details()
            return False, f"{error.code().name}: {details}" if details else error.code().name
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(
            ProbeSettings,
            ENV_PREFIX,
            argv,
            prog="python -m vpm_common.health_probe",
            description="Exit 0 when a gRPC server reports SERVING on grpc.health.v1, 1 otherwise.",
        )
    except SettingsError as error:
        print(f"health_probe: {error}", file=sys.stderr)
        return USAGE
    serving, seen = check_health(
        settings.target,
        settings.service,
        settings.timeout_s,
        settings.security(),
        settings.tls_server_name,
    )
    name = settings.service or '""'
    print(f"{settings.target} {name}: {seen}", file=sys.stdout if serving else sys.stderr)
    return HEALTHY if serving else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
