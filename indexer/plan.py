"""What a run must do: compare what is on disk with what the catalog holds.

A product is skipped when its image's sha256, its metadata, its image's path and
the model of its vector all match the catalog; it is re-sent without re-encoding
when only its metadata or its image's path changed; and it is encoded when new
or when its image changed. Identical images (same sha256) are encoded once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from indexer.sources import SourceItem

logger = logging.getLogger(__name__)

# Files read and hashed by one task of the reading threads: a future per small file cost as
# much as hashing it. A slice (a run for each thread) is held in memory at once.
HASH_RUN = 32

METADATA_FIELDS = (
    "name", "gender", "master_category", "sub_category", "article_type",
    "base_colour", "season", "year", "usage", "category",
)  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """What the catalog holds for one product, as far as deciding goes."""

    sha256: str
    model_id: str
    metadata: tuple[tuple[str, str | int], ...]
    image_path: str = ""  # where the page finds its picture (see sources.IMAGE_PATH_ATTRIBUTE)


@dataclass(frozen=True)
class Hashed:
    item: SourceItem
    sha256: str


@dataclass
class Plan:
    encode: list[Hashed] = field(default_factory=list)
    metadata_only: list[Hashed] = field(default_factory=list)
    unchanged: list[Hashed] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    unreadable: list[tuple[SourceItem, str]] = field(default_factory=list)
    # sha256 -> ids sharing that image, for every hash shared by two or more products
    duplicates: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Read:
    """A file's bytes and their sha256, or why it could not be read."""

    data: bytes = b""
    sha256: str = ""
    error: str | None = None


def normalized(metadata: Iterable[tuple[str, str | int]]) -> tuple[tuple[str, str | int], ...]:
    """Every metadata field, defaults filled in, so disk and catalog compare field by field."""
    values = dict(metadata)
    return tuple((name, values.get(name, 0 if name == "year" else "")) for name in METADATA_FIELDS)


class Planner:
    """Decides product by product, as the hashes of their images come, what a run does."""

    def __init__(self, stored: dict[str, Stored], model_id: str) -> None:
        self.stored = stored
        self.model_id = model_id
        self.plan = Plan()
        self._ids_by_hash: dict[str, list[str]] = {}

    def decide(self, item: SourceItem, sha256: str, error: str | None) -> str:
        """ "encode", "metadata_only", "unchanged" or "unreadable", and noted in the plan."""
        if error is not None:
            self.plan.unreadable.append((item, error))
            return "unreadable"
        hashed = Hashed(item, sha256)
        before = self.stored.get(item.id)
        if before is None or before.sha256 != sha256 or before.model_id != self.model_id:
            kind = "encode"
        elif (
            normalized(before.metadata) != normalized(item.metadata)
            or before.image_path != item.image_path  # renamed or moved, the same bytes
        ):
            kind = "metadata_only"
        else:
            kind = "unchanged"
        getattr(self.plan, kind).append(hashed)
        self._ids_by_hash.setdefault(sha256, []).append(item.id)
        return kind

    def finish(self) -> Plan:
        """The plan once every item is decided, with its groups of identical images."""
        self.plan.duplicates = {sha: ids for sha, ids in self._ids_by_hash.items() if len(ids) > 1}
        return self.plan


def to_prune(items: list[SourceItem], stored: dict[str, Stored]) -> list[str]:
    """Catalog products whose image is no longer on disk."""
    on_disk = {item.id for item in items}
    return sorted(set(stored) - on_disk)


def read_files(items: list[SourceItem], pool: ThreadPoolExecutor) -> list[Read]:
    """Each item's file read and hashed, in order, on the pool's threads, a run a task."""
    paths = [item.path for item in items]
    runs = [paths[start : start + HASH_RUN] for start in range(0, len(paths), HASH_RUN)]
    return [read for run in pool.map(_read_run, runs) for read in run]


def slices(items: list[SourceItem], workers: int) -> list[list[SourceItem]]:
    """The items in slices of a run of files for each of `workers` reading threads."""
    size = HASH_RUN * workers
    return [items[start : start + size] for start in range(0, len(items), size)]


def make_plan(
    items: list[SourceItem],
    stored: dict[str, Stored],
    model_id: str,
    workers: int = 4,
    on_hashed: Callable[[int], None] | None = None,
) -> Plan:
    """The whole plan at once, prunes aside (a dry run reports it; a run streams it, see
    indexer.run)."""
    planner = Planner(stored, model_id)
    with ThreadPoolExecutor(workers, thread_name_prefix="read") as pool:
        for part in slices(items, workers):
            for item, read in zip(part, read_files(part, pool), strict=True):
                planner.decide(item, read.sha256, read.error)
            if on_hashed:
                on_hashed(len(part))
    return planner.finish()


def _read_run(paths: list[Path]) -> list[Read]:
    return [_read(path) for path in paths]


def _read(path: Path) -> Read:
    try:
        data = path.read_bytes()
    except OSError as error:
        return Read(error=f"cannot read: {error.strerror or error}")
    return Read(data, hashlib.sha256(data).hexdigest())
