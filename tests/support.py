"""Test support: run a real grpc.aio server in-process on its own event loop thread.

Tests talk to it with ordinary synchronous clients on the port it bound
(port 0 asks the OS for a free one), exactly as a remote caller would.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpc import aio

T = TypeVar("T")


class ServerThread:
    """An event loop on a daemon thread hosting one aio server built by `build`."""

    def __init__(self, build: Callable[[], Awaitable[tuple[aio.Server, int]]]) -> None:
        self._build = build
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: aio.Server | None = None
        self.port = 0

    def start(self) -> int:
        self._thread.start()
        self.server, self.port = self.run(self._start())
        return self.port

    async def _start(self) -> tuple[aio.Server, int]:
        server, port = await self._build()
        await server.start()
        return server, port

    def run(self, coro: Awaitable[T], timeout: float = 120) -> T:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Stop the server and its loop; calling it again does nothing."""
        if not self._thread.is_alive():
            return
        if self.server is not None:
            self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port() -> int:
    """A TCP port that was free a moment ago (for real processes that need a fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call_all(fn: Callable[..., Any], args: list[Any], threads: int) -> list[Any]:
    """Call fn(arg) for every arg from `threads` threads at once; results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, args))
