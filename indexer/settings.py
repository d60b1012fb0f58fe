"""The indexer's settings: every flag has a VPM_INDEXER_* environment equivalent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vpm_common.cpus import available_cpus
from vpm_common.guard_settings import ClientGuards
from vpm_common.settings import check, setting

ENV_PREFIX = "VPM_INDEXER_"


@dataclass(frozen=True)
class IndexerSettings(ClientGuards):
    styles: Path | None = setting(None, "fashion layout: the styles.csv file (with --images)")
    images: Path | None = setting(
        None, "fashion layout: the folder of <id>.jpg images (with --styles)"
    )
    dir: Path | None = setting(None, "any folder of images: sub-folder = category, file stem = id")
    encoder: tuple[str, ...] = setting(
        ("127.0.0.1:50051",), "encoder targets: host:port,host:port or dns:///name:port"
    )
    search: str = setting("127.0.0.1:50052", "the search service, host:port")
    prune: bool = setting(False, "delete catalog products whose image is no longer on disk")
    prune_limit: float = setting(
        0.5, "refuse a --prune that would delete more than this fraction of the catalog"
    )
    batch_size: int = setting(
        1000, "products per UpsertProductBatches call (one acknowledged batch)"
    )
    window: int = setting(
        0,
        "images in flight per encoder, and as many read ahead (0: four times its max batch)",
    )
    workers: int = setting(0, "threads reading and hashing files (0: one per core, at most 8)")
    dry_run: bool = setting(False, "only report what a run would do")
    progress: str = setting("auto", "progress display", choices=("auto", "bar", "log", "off"))
    timeout_s: float = setting(120.0, "deadline of each call to the search service")
    stall_s: float = setting(
        120.0, "give up when no encoder, or the search service, answers for this long"
    )
    summary_json: Path | None = setting(None, "also write the final summary to this JSON file")
    log_level: str = setting("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        fashion = self.styles is not None or self.images is not None
        check(
            fashion != (self.dir is not None),
            "dir",
            "give either --styles FILE --images DIR (fashion layout) or --dir DIR (any folder)",
        )
        if fashion:
            check(self.styles is not None, "styles", "--images needs --styles FILE too")
            check(self.images is not None, "images", "--styles needs --images DIR too")
            check(self.styles.is_file(), "styles", f"{self.styles} is not a file")
            check(self.images.is_dir(), "images", f"{self.images} is not a folder")
        else:
            check(self.dir.is_dir(), "dir", f"{self.dir} is not a folder")
        check(bool(self.encoder), "encoder", "give at least one encoder target")
        check(0 <= self.prune_limit <= 1, "prune_limit", f"must be 0..1, got {self.prune_limit}")
        check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        check(self.window >= 0, "window", f"must be >= 0, got {self.window}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.timeout_s > 0, "timeout_s", "must be positive")
        check(self.stall_s > 0, "stall_s", "must be positive")
        if self.summary_json is not None:
            folder = self.summary_json.parent
            check(folder.is_dir(), "summary_json", f"{folder} is not a folder")
        self.check_client_guards()

    def hash_workers(self) -> int:
        # More threads than cores only wait on each other (and on the interpreter lock).
        return self.workers or min(8, available_cpus())
