"""`python -m indexer`: index a catalog on disk into the search service through the encoders.

Exit status: 0 when everything found was indexed (or was already), 1 when
some images or products failed (each is listed), 2 when the run could not
start (bad settings, services unreachable, model mismatch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

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
    try:
        summary = asyncio.run(run(settings))
    except SetupError as error:
        logger.error("cannot start: %s", error)
        return 2
    except (EncodingError, SearchUnavailable) as error:
        logger.error("run stopped: %s; what was acknowledged is kept, run again to finish", error)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted; what was acknowledged is kept, run again to finish")
        return 130
    report(summary)
    if settings.summary_json:
        settings.summary_json.write_text(json.dumps(summary.as_dict(), indent=2))
    return 1 if summary.failed else 0


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
