"""Logging set-up shared by every entry point: one line per record, to stderr."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send records to stderr in one format; quiet the chattiest third-party loggers."""
    logging.basicConfig(level=level.upper(), format=FORMAT, stream=sys.stderr, force=True)
    for noisy in ("urllib3", "httpx", "huggingface_hub", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
