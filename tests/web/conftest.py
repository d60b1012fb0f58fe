"""Fixtures of the page's tests: the real app served by uvicorn on a free port, in-process."""

from __future__ import annotations

import dataclasses
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import free_port
from web.server import create_server
from web.settings import WebSettings


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> str:
        return self.json()["error"]["message"]


class RunningPage:
    """The page's own server (create_server) on a daemon thread; raw HTTP requests to it."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.server = create_server(settings)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> Reply:
        """`path` is sent exactly as given: no normalizing, no re-encoding."""
        connection = http.client.HTTPConnection("127.0.0.1", self.settings.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            reply = connection.getresponse()
            return Reply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
        finally:
            connection.close()

    def get(self, path: str, **headers: str) -> Reply:
        return self.request(
            "GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()}
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def start_page() -> Iterator[Callable[..., RunningPage]]:
    """Factory: a RunningPage for WebSettings(**overrides) on a free port; stopped afterwards."""
    running: list[RunningPage] = []

    def start(**overrides: Any) -> RunningPage:
        settings = dataclasses.replace(WebSettings(port=free_port()), **overrides)
        running.append(RunningPage(settings))
        return running[-1]

    yield start
    for page in running:
        page.stop()


def multipart(
    fields: dict[str, str], image: bytes | None, filename: str = "photo.jpg"
) -> tuple[bytes, dict]:
    """A multipart/form-data body as a browser sends it, and its headers."""
    boundary = "----vpm-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if image is not None:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + image
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
