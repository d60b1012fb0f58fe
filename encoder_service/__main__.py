"""`python -m encoder_service`: serve CLIP embeddings over gRPC until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from encoder_service.factory import build_engine
from encoder_service.inference.runtimes import ParityError
from encoder_service.metrics import EncoderMetrics
from encoder_service.model import WeightsUnavailable
from encoder_service.server import EncoderApp, create_server
from encoder_service.settings import ENV_PREFIX, EncoderSettings
from vpm_common.logs import configure_logging
from vpm_common.server.serving import stop_gracefully, wait_for_stop_signal
from vpm_common.settings import SettingsError, load_settings

logger = logging.getLogger("encoder_service")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(
            EncoderSettings,
            ENV_PREFIX,
            argv,
            prog="python -m encoder_service",
            description="CLIP encoder: images and texts to unit-norm embeddings over gRPC.",
        )
    except SettingsError as error:
        print(f"encoder_service: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings))


async def serve(settings: EncoderSettings) -> int:
    """Listen at once (UNAVAILABLE, NOT_SERVING), load and warm up, then SERVING until a signal."""
    app = EncoderApp()
    try:
        server, port = await create_server(settings, app)
    except RuntimeError as error:
        logger.error("cannot listen on %s:%d (%s)", settings.host, settings.port, error)
        return 2
    await server.start()
    metrics = EncoderMetrics()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, registry=metrics.registry)
    logger.info(
        "listening on port %d (%s; metrics on %s); loading %s (%s)",
        port,
        settings.security().describe(),
        settings.metrics_port or "off",
        settings.model,
        settings.pretrained,
    )
    loading = _in_daemon_thread(lambda: build_engine(settings, metrics))
    stopping = asyncio.ensure_future(wait_for_stop_signal())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stopping.done():
        logger.info("received %s while loading; stopping", stopping.result())
        await server.stop(0)
        return 0
    try:
        engine = loading.result()
    except (WeightsUnavailable, ValueError, ParityError) as error:
        logger.error("%s", error)
        await server.stop(0)
        return 2
    await app.serve(engine)
    logger.info("SERVING on port %d", port)
    signal_name = await stopping
    logger.info(
        "received %s: NOT_SERVING, finishing running calls (up to %.0f s)",
        signal_name,
        settings.grace_s,
    )
    await stop_gracefully(server, app.health, settings.grace_s)
    engine.close(drain=True)
    logger.info("stopped")
    return 0


def _in_daemon_thread(work: Callable[[], Any]) -> asyncio.Future:
    """Run blocking `work` on a daemon thread, so a signal during loading need not wait for it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run() -> None:
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 - handed to the loop as is
            loop.call_soon_threadsafe(_set_exception, future, error)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)

    threading.Thread(target=run, name="load-model", daemon=True).start()
    return future


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


if __name__ == "__main__":
    sys.exit(main())
