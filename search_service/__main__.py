"""`python -m search_service`: load catalog and index, serve vpm.v1.Search, stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from search_service.encoders.embedder import QueryEmbedder
from search_service.encoders.query_cache import CachingEmbedder
from search_service.engine import SearchEngine
from search_service.index.gpu import DeviceError, resolve_device
from search_service.index.vector_index import check_index_settings
from search_service.rpc.server import SearchApp, create_server
from search_service.settings import SearchSettings
from search_service.storage.catalog import Catalog
from search_service.upkeep import (
    catch_up_every,
    checkpoint_when_quiet,
    prune_every,
    tune_when_due,
)
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.errors import Unavailable
from vpm_common.logs import configure_logging
from vpm_common.server.serving import stop_gracefully, wait_for_stop_signal
from vpm_common.settings import SettingsError, describe, load_settings

logger = logging.getLogger(__name__)
PREFIX = "VPM_SEARCH_"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(
            SearchSettings, PREFIX, argv, description=__doc__, prog="python -m search_service"
        )
    except SettingsError as err:
        print(f"search_service: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except SettingsError as err:
        logger.error("%s", err)
        return 2
    except Unavailable as err:
        logger.error("cannot start: %s", err.message)
        return 1
    except OSError as err:
        logger.error("cannot start: %s", err)
        return 1


async def serve(settings: SearchSettings) -> int:
    """Open the catalog, listen (NOT_SERVING), load, report SERVING; on a signal, stop in order."""
    try:
        device = resolve_device(settings.index_device, settings.index_factory)
    except DeviceError as err:
        raise SettingsError(f"{describe(SearchSettings, 'index_device', PREFIX)}: {err}") from None
    catalog = await asyncio.to_thread(
        Catalog.open, settings.catalog_url, settings.sqlite_synchronous, settings.catalog_pool_size
    )
    state = await asyncio.to_thread(catalog.state)
    try:
        check_index_settings(settings.index_factory, settings.index_params, state.dim or 512)
    except ValueError as err:
        catalog.close()
        raise SettingsError(f"{describe(SearchSettings, 'index_factory', PREFIX)}: {err}") from None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    pool = (
        EncoderPool(
            settings.encoder,
            timeout_s=settings.encoder_timeout_s,
            max_message_bytes=settings.max_message_bytes,
            security=settings.encoder_security(),
        )
        if settings.encoder
        else None
    )
    embedder = CachingEmbedder(
        QueryEmbedder(pool), settings.query_cache_size, settings.query_cache_max_bytes
    )
    engine = SearchEngine(
        catalog,
        settings.data_dir,
        index_factory=settings.index_factory,
        index_params=settings.index_params,
        embedder=embedder,
        batch_size=settings.batch_size,
        search_threads=settings.search_threads,
        scan_threads=settings.scan_threads,
        index_device=device,
        target_recall=settings.target_recall,
    )
    app = SearchApp(engine)
    server, port = await create_server(settings, app)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
    await server.start()
    logger.info(
        "search service on port %d (%s; catalog %s, index %s on %s, encoders %s): loading",
        port,
        settings.security().describe(),
        catalog.url,
        settings.index_factory,
        device,
        ",".join(settings.encoder) or "none",
    )
    stop = asyncio.ensure_future(wait_for_stop_signal())
    await asyncio.to_thread(engine.load)
    await app.serve()
    logger.info("SERVING on port %d", port)
    snapshots = asyncio.create_task(_snapshot_every(engine, settings.snapshot_interval_s))
    # Other processes sharing the catalog write too: follow its change log.
    following = asyncio.create_task(catch_up_every(engine, settings.catch_up_interval_s))
    pruning = asyncio.create_task(prune_every(engine, settings.deletions_retention_days))
    checkpoints = asyncio.create_task(checkpoint_when_quiet(engine))
    # An approximate index's recall: measured once loaded and whenever it changed enough.
    tuning = asyncio.create_task(tune_when_due(engine))
    signal_name = await stop
    logger.info("%s received: NOT_SERVING, stopping within %.0fs", signal_name, settings.grace_s)
    snapshots.cancel()
    following.cancel()
    pruning.cancel()
    checkpoints.cancel()
    tuning.cancel()
    engine.tuner.stop()  # a measurement under way ends at its next chunk
    await stop_gracefully(server, app.health, settings.grace_s)
    await embedder.close()
    await asyncio.to_thread(engine.close)  # flush the index snapshot, close the catalog
    logger.info("stopped")
    return 0


async def _snapshot_every(engine: SearchEngine, interval_s: float) -> None:
    """Snapshot the index now and then, so a restart catches up from recent state."""
    if interval_s <= 0:
        return
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(engine.save_snapshot)
        except (OSError, Unavailable) as err:
            logger.error("index snapshot failed: %s", err)


if __name__ == "__main__":
    sys.exit(main())
