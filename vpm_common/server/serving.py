"""Server bootstrap shared by both services: options, health, reflection, signal-driven stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vpm_common.server.guards import CallLimit
from vpm_common.server.rpc import DecodeGuard

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options for a server that takes messages up to `max_message_bytes`."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Let clients keep idle connections open with keepalive pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def new_server(
    max_message_bytes: int,
    interceptors: Sequence[aio.ServerInterceptor] = (),
    max_connection_age_s: float = 0,
    *,
    auth: aio.ServerInterceptor | None = None,
    max_concurrent_rpcs: int = 0,
    max_streams_per_connection: int = 0,
) -> aio.Server:
    """An aio server with our options; malformed requests get INVALID_ARGUMENT (DecodeGuard).

    With max_connection_age_s, connections are closed after that long (running
    calls get a minute more): clients then resolve names again and spread over
    replicas added since. `auth` (security.TokenAuth) runs first, so a refused
    call costs no parsing and no slot of `max_concurrent_rpcs` (past which calls
    get RESOURCE_EXHAUSTED; 0: no cap). `max_streams_per_connection` is HTTP/2's
    SETTINGS_MAX_CONCURRENT_STREAMS: one client connection cannot hold more calls
    open at once (0: gRPC's default, no limit).
    """
    options = server_options(max_message_bytes)
    if max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", 60_000),
        ]
    if max_streams_per_connection:
        options.append(("grpc.max_concurrent_streams", max_streams_per_connection))
    guards: list[aio.ServerInterceptor] = [auth] if auth is not None else []
    if max_concurrent_rpcs:
        guards.append(CallLimit(max_concurrent_rpcs))
    return aio.server(options=options, interceptors=[*guards, DecodeGuard(), *interceptors])


def listen(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind `address` with TLS when `credentials` are given, in plain text otherwise."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def add_health_and_reflection(
    server: aio.Server,
    service_names: list[str],
    health_servicer: health.aio.HealthServicer | None = None,
) -> health.aio.HealthServicer:
    """Register grpc.health.v1 and server reflection on `server`; returns the health servicer."""
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return health_servicer


async def set_serving(
    health_servicer: health.aio.HealthServicer, services: list[str], serving: bool
) -> None:
    """Report every named service, and the server as a whole (""), as SERVING or NOT_SERVING."""
    status = SERVING if serving else NOT_SERVING
    for name in ["", *services]:
        await health_servicer.set(name, status)


async def wait_for_stop_signal() -> str:
    """Return the name of the first SIGTERM or SIGINT received."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def stop_gracefully(
    server: aio.Server, health_servicer: health.aio.HealthServicer, grace_s: float
) -> None:
    """Report NOT_SERVING to every watcher, then stop taking calls and let running ones finish."""
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
