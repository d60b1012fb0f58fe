"""create_server(settings): the uvicorn server of the page, apart from main() so tests run it."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import uvicorn

from web.app import create_app
from web.settings import WebSettings

# Seconds running requests get to finish after SIGTERM.
GRACE_S = 10


class PageServer(uvicorn.Server):
    """uvicorn's server, except that SIGTERM and SIGINT end it with status 0.

    uvicorn raises a caught signal again once it has shut down, so the process
    dies by the signal; SIGTERM is how a container or `make stop` ends the page
    normally, and the other services exit 0 on it.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = (signal.SIGINT, signal.SIGTERM)
        before = {stop: signal.signal(stop, self.handle_exit) for stop in stops}
        try:
            yield
        finally:
            for stop, handler in before.items():
                signal.signal(stop, handler)


def create_server(settings: WebSettings) -> PageServer:
    """The server of the page on settings.host:settings.port; not started."""
    return PageServer(
        uvicorn.Config(
            create_app(settings),
            host=settings.host.strip("[]"),
            port=settings.port,
            log_config=None,  # the entry point's one-line format
            access_log=settings.log_level == "DEBUG",
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACE_S,
        )
    )
