"""`python -m web`: serve the search page (and its JSON API) over HTTP; stop on SIGTERM."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from vpm_common.logs import configure_logging
from vpm_common.settings import SettingsError, load_settings
from web.server import create_server
from web.settings import ENV_PREFIX, WebSettings

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(
            WebSettings, ENV_PREFIX, argv, description=__doc__, prog="python -m web"
        )
    except SettingsError as err:
        print(f"web: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.images is not None and not settings.images.exists():
        logger.warning(
            "--images %s does not exist (yet): thumbnails are missing until it does",
            settings.images,
        )
    server = create_server(settings)
    logger.info(
        "search page for %s, images %s: starting on %s:%d",
        settings.search,
        settings.images or "none (image_url attributes only)",
        settings.host,
        settings.port,
    )
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
