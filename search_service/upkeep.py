"""Background upkeep of a serving engine: following the shared catalog, pruning its deletions
log, checkpointing a SQLite catalog's write-ahead log once writes pause, and measuring an
approximate index's recall when it has changed enough.

Several search processes may share one catalog (PostgreSQL). Each keeps its
mirror in step by reading the catalog's change log every few seconds: only
the changes since the version it holds, never a full rebuild.
"""

from __future__ import annotations

import asyncio
import logging

from search_service.engine import SearchEngine
from vpm_common.errors import VpmError

logger = logging.getLogger(__name__)

# Pruning is cheap and retention is counted in days: once an hour is plenty.
PRUNE_INTERVAL_S = 3600.0
# Writes have paused once the catalog version stays put this long.
CHECKPOINT_INTERVAL_S = 1.0
# How often to look whether the index needs its recall measured (looking is cheap).
TUNE_CHECK_INTERVAL_S = 5.0


async def catch_up_every(engine: SearchEngine, interval_s: float) -> None:
    """Apply what other processes wrote to the catalog, every `interval_s`, until cancelled."""
    if interval_s <= 0:
        return
    failing = False
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(engine.catch_up)
        except VpmError as err:
            if not failing:  # once per outage, not once a second
                logger.warning("cannot catch up with the catalog: %s (retrying)", err.message)
            failing = True
            continue
        except Exception:  # noqa: BLE001 - a bug must not stop the process from following
            logger.exception("catching up with the catalog failed")
            continue
        if failing:
            logger.info("catching up with the catalog again")
            failing = False


async def prune_every(
    engine: SearchEngine, retention_days: float, interval_s: float = PRUNE_INTERVAL_S
) -> None:
    """Drop deletions older than `retention_days` from the catalog's log, now and then.

    Any process sharing the catalog may do it; the catalog's state row orders them.
    """
    if retention_days <= 0:
        return
    while True:
        try:
            await asyncio.to_thread(engine.prune_deletions, retention_days * 86400)
        except VpmError as err:
            logger.warning("cannot prune the catalog's deletions log: %s", err.message)
        except Exception:  # noqa: BLE001 - retried at the next interval
            logger.exception("pruning the catalog's deletions log failed")
        await asyncio.sleep(interval_s)


async def checkpoint_when_quiet(
    engine: SearchEngine, interval_s: float = CHECKPOINT_INTERVAL_S
) -> None:
    """Copy a SQLite catalog's write-ahead log into its file whenever writes pause.

    Commits only append to the log (see catalog.WAL_AUTOCHECKPOINT_BYTES), so a
    bulk upsert never stops to copy; this copies once the catalog version has
    stayed put for `interval_s`, off the write path. Other databases: returns.
    """
    if not engine.catalog.checkpoints:
        return
    seen, checkpointed = engine.mirror.version, None  # a log left from before: copied too
    while True:
        await asyncio.sleep(interval_s)
        version = engine.mirror.version
        if version != seen:  # still writing
            seen = version
            continue
        if version == checkpointed:
            continue
        try:
            frames = await asyncio.to_thread(engine.catalog.checkpoint)
        except VpmError as err:
            logger.warning("cannot checkpoint the catalog: %s", err.message)
            continue
        except Exception:  # noqa: BLE001 - retried once writes pause again
            logger.exception("checkpointing the catalog failed")
            continue
        checkpointed = version
        logger.debug(
            "checkpointed the catalog at version %d: %s log frames in the file", version, frames
        )


async def tune_when_due(engine: SearchEngine, interval_s: float = TUNE_CHECK_INTERVAL_S) -> None:
    """Measure the approximate index's recall now and whenever it is due (see tuning), in a
    worker thread: searches go on meanwhile. Returns at once without a target or for Flat."""
    tuner = engine.tuner
    if not tuner.enabled:
        return
    while True:
        try:
            await asyncio.to_thread(tuner.tune_if_due)
        except VpmError as err:
            logger.warning("cannot measure the index's recall: %s (retrying)", err.message)
        except Exception:  # noqa: BLE001 - retried at the next check
            logger.exception("measuring the index's recall failed")
        await asyncio.sleep(interval_s)
