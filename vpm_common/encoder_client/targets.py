"""Encoder target lists: "host:port,host:port" or "dns:///name:port", one address each."""

from __future__ import annotations

import socket

DNS_PREFIX = "dns:///"


def split_targets(spec: str | tuple[str, ...] | list[str]) -> list[str]:
    """The comma-separated targets of `spec`, stripped, empty ones dropped, order kept."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    return [part.strip() for part in parts if part.strip()]


def expand(target: str) -> list[str]:
    """A dns:/// target becomes one "address:port" per address the name resolves to, today.

    Clients that hold one stream per encoder (the indexer) use this so that
    every replica behind a headless Kubernetes Service gets its own stream;
    they call it again from time to time to notice replicas coming and going.
    """
    if not target.startswith(DNS_PREFIX):
        return [target]
    host, _, port = target[len(DNS_PREFIX) :].rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{target!r}: expected dns:///name:port")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"{target!r}: cannot resolve {host} ({error.strerror})") from None
    addresses = []
    for family, _, _, _, address in infos:
        text = (
            f"[{address[0]}]:{address[1]}"
            if family == socket.AF_INET6
            else f"{address[0]}:{address[1]}"
        )
        if text not in addresses:
            addresses.append(text)
    return addresses
