"""`python -m web.probe`: exit 0 when the search page answers its health check, 1 otherwise.

The container health check of the page's image, with the standard library
alone: GET --url within --timeout-s; status 200 is healthy. The page answers
while the search service is down (it says so on the page), so this checks
the page's own process only.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from vpm_common.settings import SettingsError, check, load_settings, setting

ENV_PREFIX = "VPM_WEB_PROBE_"
HEALTHY, UNHEALTHY, USAGE = 0, 1, 2


@dataclass(frozen=True)
class WebProbeSettings:
    url: str = setting("http://127.0.0.1:8080/healthz", "the page's health address")
    timeout_s: float = setting(3.0, "seconds to wait for the answer, connecting included")

    def __post_init__(self) -> None:
        check(self.url.startswith(("http://", "https://")), "url", "must be an http(s) URL")
        check(self.timeout_s > 0, "timeout_s", f"must be positive, got {self.timeout_s}")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(
            WebProbeSettings, ENV_PREFIX, argv, description=__doc__, prog="python -m web.probe"
        )
    except SettingsError as err:
        print(f"web.probe: {err}", file=sys.stderr)
        return USAGE
    try:
        with urllib.request.urlopen(settings.url, timeout=settings.timeout_s) as reply:
            status = reply.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (urllib.error.URLError, OSError) as error:
        print(f"{settings.url}: no answer ({getattr(error, 'reason', error)})")
        return UNHEALTHY
    print(f"{settings.url}: HTTP {status}")
    return HEALTHY if status == 200 else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
