"""Test support: run a real grpc.aio server in-process on its own event loop thread.

Tests talk to it with ordinary synchronous clients on the port it bound
(port 0 asks the OS for a free one), exactly as a remote caller would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def wait_until(
    condition: Callable[[], bool], timeout_s: float = 30, every_s: float = 0.05
) -> float:
    """Seconds until `condition()` held, polled every `every_s`; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"condition not met in {timeout_s} s"
        time.sleep(every_s)
    return time.monotonic() - started


def call_all(fn: Callable[..., Any], args: list[Any], threads: int) -> list[Any]:
    """Call fn(arg) for every arg from `threads` threads at once; results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, args))


ROOT = Path(__file__).resolve().parents[1]


class ServiceProcess:
    """A real `python -m <module>` process, started the way a user starts it, output to a log."""

    def __init__(
        self, module: str, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ):
        self.module = module
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, target: str, service: str, timeout_s: float = 120) -> None:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.module} exited ({self.process.returncode}):\n{self.output[-3000:]}"
                )
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.module} at {target} not SERVING after {timeout_s} s:\n{self.output[-3000:]}"
        )

    def kill(self) -> None:
        """kill -9: no cleanup of any kind, like a crash or an OOM kill."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, then wait; kill -9 if it does not exit in time. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


def start_encoder_process(
    port: int, log_path: Path, cache_dir: Path, *extra: str
) -> ServiceProcess:
    """The tiny-model encoder as a real process on `port`, SERVING when this returns."""
    process = ServiceProcess(
        "encoder_service",
        ["--model", "VPM-Tiny", "--pretrained", "none", "--port", str(port), "--metrics-port", "0",
         "--cache-dir", str(cache_dir), *extra],
        log_path,
    )  # fmt: skip
    process.wait_serving(f"127.0.0.1:{port}", "vpm.v1.Encoder")
    return process


def start_search_process(
    port: int, data_dir: Path, encoders: list[str], *extra: str
) -> ServiceProcess:
    """The search service as a real process on `port` with a SQLite catalog in data_dir."""
    process = ServiceProcess(
        "search_service",
        ["--port", str(port), "--data-dir", str(data_dir),
         "--catalog-url", f"sqlite:///{data_dir}/catalog.db",
         "--encoder", ",".join(encoders), "--metrics-port", "0", *extra],
        data_dir / "search.log",
    )  # fmt: skip
    process.wait_serving(f"127.0.0.1:{port}", "vpm.v1.Search")
    return process


def wait_http(url: str, process: ServiceProcess, timeout_s: float = 30) -> None:
    """Until `url` answers 200; fails at once, with its output, if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise RuntimeError(f"{process.module} exited:\n{process.output[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer:\n{process.output[-3000:]}")


@dataclass
class DemoStack:
    """What `make run` starts, on free ports: the encoder (tiny model), the search service
    holding a demo catalog put there by the indexer, and the search page."""

    encoder: ServiceProcess
    encoder_target: str
    search: ServiceProcess
    search_target: str
    web: ServiceProcess
    web_url: str


@contextmanager
def demo_stack(work: Path, catalog: Path, model_cache: Path) -> Iterator[DemoStack]:
    """A DemoStack over `catalog` (demo.catalog's fashion layout), its logs and data in `work`."""
    encoder_port, search_port, web_port = free_port(), free_port(), free_port()
    encoder_target, search_target = f"127.0.0.1:{encoder_port}", f"127.0.0.1:{search_port}"
    encoder = start_encoder_process(encoder_port, work / "encoder.log", model_cache)
    search = start_search_process(search_port, work / "search", [encoder_target])
    web = None
    try:
        indexed = subprocess.run(
            [sys.executable, "-m", "indexer", "--styles", str(catalog / "styles.csv"),
             "--images", str(catalog / "images"), "--encoder", encoder_target,
             "--search", search_target, "--progress", "off"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert indexed.returncode == 0, indexed.stdout + indexed.stderr
        web = ServiceProcess(
            "web",
            ["--port", str(web_port), "--search", search_target,
             "--images", str(catalog / "images")],
            work / "web.log",
        )  # fmt: skip
        web_url = f"http://127.0.0.1:{web_port}"
        wait_http(f"{web_url}/healthz", web)
        yield DemoStack(encoder, encoder_target, search, search_target, web, web_url)
    finally:
        for process in (web, search, encoder):
            if process is not None:
                process.stop()
