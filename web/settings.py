"""The search page's settings: flags over VPM_WEB_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpm_common.guard_settings import ClientGuards
from vpm_common.settings import check, setting

ENV_PREFIX = "VPM_WEB_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class WebSettings(ClientGuards):
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 or :: to be reached by others)")
    port: int = setting(8080, "HTTP port (0 picks a free one)")
    search: str = setting("127.0.0.1:50052", "the search service, host:port or dns:///name:port")
    images: Path | None = setting(
        None,
        "the folder of product images the indexer read (--images or --dir): thumbnails are "
        "made from files inside it, and only from those; empty: image_url attributes only",
    )
    thumbnail_size: int = setting(320, "longest side of a thumbnail, in pixels")
    thumbnail_cache_bytes: int = setting(
        64 * 1024 * 1024, "bytes of thumbnails kept in memory, least recently used out first"
    )
    max_upload_bytes: int = setting(10 * 1024 * 1024, "largest query photo accepted, in bytes")
    max_upload_pixels: int = setting(
        40_000_000, "largest query photo accepted, in pixels (decompression bombs)"
    )
    timeout_s: float = setting(30.0, "deadline of each call to the search service, in seconds")
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", f"must be 0 to 65535, got {self.port}")
        check(bool(self.search.strip()), "search", "must not be empty")
        if self.images is not None:  # missing is allowed: a volume may be filled later
            images = self.images
            check(not images.exists() or images.is_dir(), "images", f"{images} is not a folder")
        check(16 <= self.thumbnail_size <= 2048, "thumbnail_size", "must be 16 to 2048")
        check(self.thumbnail_cache_bytes >= 0, "thumbnail_cache_bytes", "must not be negative")
        check(self.max_upload_bytes >= 1024, "max_upload_bytes", "must be at least 1024")
        check(self.max_upload_pixels >= 1, "max_upload_pixels", "must be positive")
        check(self.timeout_s > 0, "timeout_s", "must be positive")
        self.check_client_guards()
