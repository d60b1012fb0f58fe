"""`python -m indexer`: index a catalog on disk into the search service through the encoders.

Exit status: 0 when everything found was indexed (or was already), 1 when
some images or products failed (each is listed), 2 when the run could not
start (bad settings, services unreachable, model mismatch), 130 on Ctrl-C
and 143 on SIGTERM (as `docker stop` or a deleted Kubernetes Job sends).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from indexer.encoding import EncodingError
from indexer.run import SetupError, Summary, run
from indexer.settings import ENV_PREFIX, IndexerSettings
from indexer.upload import SearchUnavailable
from vpm_common.logs import configure_logging
from vpm_common.settings import SettingsError, load_settings

logger = logging.getLogger("indexer")


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(
            IndexerSettings,
            ENV_PREFIX,
            argv,
            prog="python -m indexer",
            description="Index a catalog on disk: images through encoders, products into search.",
        )
    except SettingsError as error:
        print(f"indexer: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    summary = Summary(dry_run=settings.dry_run)
    status = _run(settings, summary)
    if settings.summary_json:
        try:
            _write_json(settings.summary_json, summary.as_dict())
        except OSError as error:
            logger.error("could not write --summary-json %s: %s", settings.summary_json, error)
            return status or 1
    return status


def _run(settings: IndexerSettings, summary: Summary) -> int:
    """Run, report, and return the exit status; why the run stopped early, if it did,
    goes in `summary.stopped` (and so in --summary-json) as well as in the log."""
    kept = "what was acknowledged is kept, run again to finish"
    try:
        asyncio.run(_until_terminated(settings, summary))
    except Terminated:
        summary.stopped = "terminated (SIGTERM)"
        logger.error("%s; %s", summary.stopped, kept)
        return 128 + signal.SIGTERM
    except SetupError as error:
        summary.stopped = f"cannot start: {error}"
        logger.error("%s", summary.stopped)
        return 2
    except (EncodingError, SearchUnavailable) as error:
        summary.stopped = f"run stopped: {error}"
        logger.error("%s; %s", summary.stopped, kept)
        return 1
    except KeyboardInterrupt:
        summary.stopped = "interrupted"
        logger.error("%s; %s", summary.stopped, kept)
        return 130
    report(summary)
    return 1 if summary.failed else 0


def _write_json(path: Path, content: dict) -> None:
    """Written whole or not at all: a reader never finds half a summary."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, path)


class Terminated(Exception):
    """The run was stopped by SIGTERM."""


async def _until_terminated(settings: IndexerSettings, summary: Summary) -> Summary:
    """The run, cancelled on SIGTERM as Ctrl-C cancels it: its cleanup runs (connections
    closed) and it says it stopped, rather than dying silently mid-batch."""
    task = asyncio.current_task()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await run(settings, summary)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise


def report(summary: Summary) -> None:
    """The final summary, on stdout: what was found, done, skipped and failed."""
    lines = [
        "dry run: nothing was sent" if summary.dry_run else "indexing finished",
        f"  found              {summary.found}",
        f"  encoded            {summary.encoded} images"
        + (
            f" (+{summary.reused_duplicates} products sharing an identical image)"
            if summary.reused_duplicates
            else ""
        ),
        f"  skipped unchanged  {summary.skipped_unchanged}",
        f"  metadata updated   {summary.metadata_updated}",
        f"  pruned             {summary.pruned}",
        f"  failed             {len(summary.failed)}",
        f"  elapsed            {summary.elapsed_s:.1f} s ({summary.rate:.1f} images/s encoded)",
    ]
    if summary.duplicate_groups:
        lines.append(
            f"  identical images   {summary.duplicate_groups} groups of products share one image"
        )
    if summary.problems:
        lines.append(
            f"  problems           {len(summary.problems)} rows/files not usable (logged above)"
        )
    if len(summary.encoder_spread) > 1:
        spread = ", ".join(f"{target} {count}" for target, count in summary.encoder_spread.items())
        lines.append(f"  per encoder        {spread}")
    for what, reason in summary.failed[:50]:
        lines.append(f"  FAILED {what}: {reason}")
    if len(summary.failed) > 50:
        lines.append(f"  ... and {len(summary.failed) - 50} more failures (see --summary-json)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
