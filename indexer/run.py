"""One indexing run: discover, compare with the catalog, prune, encode changes, upsert, report."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from indexer.encoding import EncodingError, FileEncoder, Job, Jobs, Outcome
from indexer.plan import (
    Hashed,
    Plan,
    Planner,
    Read,
    Stored,
    make_plan,
    read_files,
    slices,
    to_prune,
)
from indexer.progress import Progress
from indexer.settings import IndexerSettings
from indexer.sources import (
    IMAGE_EXTENSIONS,
    Discovery,
    SourceItem,
    fashion_catalog,
    folder_catalog,
)
from indexer.upload import Uploader, delete_products, stored_products
from vpm.v1 import search_pb2
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.search_client import SearchClient

logger = logging.getLogger(__name__)

# Vectors kept for identical files hashed after their image was encoded (2 KB each at
# 512-d); past this many, such a file is encoded again.
KEPT_VECTORS = 100_000
# How long the search service may take to answer at the start (then --stall-s, as the
# encoders get): a wrong address says so soon.
CONNECT_S = 15.0


class SetupError(RuntimeError):
    """The run cannot start: services unreachable, or encoders and catalog disagree on the model."""


@dataclass
class Summary:
    found: int = 0
    encoded: int = 0
    reused_duplicates: int = 0
    skipped_unchanged: int = 0
    metadata_updated: int = 0
    pruned: int = 0
    # (file or id, reason): what was meant to be indexed and was not
    failed: list[tuple[str, str]] = field(default_factory=list)
    # (where, what): rows and files that could not be used, reported but not failures
    problems: list[tuple[str, str]] = field(default_factory=list)
    duplicate_groups: int = 0
    elapsed_s: float = 0.0
    encoder_spread: dict[str, int] = field(default_factory=dict)
    model_id: str = ""
    dry_run: bool = False
    stopped: str = ""  # why the run stopped before the end; empty when it finished

    @property
    def rate(self) -> float:
        return self.encoded / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "encoded": self.encoded,
            "reused_duplicates": self.reused_duplicates,
            "skipped_unchanged": self.skipped_unchanged,
            "metadata_updated": self.metadata_updated,
            "pruned": self.pruned,
            "failed": [{"what": what, "reason": reason} for what, reason in self.failed],
            "problems": [{"where": where, "what": what} for where, what in self.problems],
            "duplicate_groups": self.duplicate_groups,
            "elapsed_s": round(self.elapsed_s, 3),
            "images_per_s": round(self.rate, 2),
            "encoder_spread": self.encoder_spread,
            "model_id": self.model_id,
            "dry_run": self.dry_run,
            "stopped": self.stopped,
        }


def discover(settings: IndexerSettings) -> Discovery:
    if settings.dir is not None:
        return folder_catalog(settings.dir)
    return fashion_catalog(settings.styles, settings.images)


async def run(settings: IndexerSettings, summary: Summary | None = None) -> Summary:
    """Index the catalog on disk; `summary` (a new one by default) is filled in as it goes,
    so that a caller holds what was done when the run stops early."""
    started = time.monotonic()
    summary = summary or Summary(dry_run=settings.dry_run)
    try:
        await _run(settings, summary)
    finally:
        summary.elapsed_s = time.monotonic() - started
    return summary


async def _run(settings: IndexerSettings, summary: Summary) -> None:
    discovery = await asyncio.to_thread(discover, settings)
    summary.found = len(discovery.items)
    summary.problems = discovery.problems
    for where, what in discovery.problems[:20]:
        logger.warning("%s: %s", where, what)
    if len(discovery.problems) > 20:
        logger.warning(
            "... and %d more problems (all in the summary)", len(discovery.problems) - 20
        )
    logger.info("found %d products with images", summary.found)
    if not discovery.items:  # most often a wrong path: say where it looked, and for what
        logger.warning(
            "no product with an image in %s (image files end in %s)",
            settings.dir or settings.images, ", ".join(IMAGE_EXTENSIONS),
        )  # fmt: skip

    security = settings.security()
    try:
        pool = EncoderPool(list(settings.encoder), security=security, expand_dns=True)
    except ValueError as error:
        raise SetupError(str(error)) from None
    encoders = FileEncoder(pool, window=settings.window, stall_s=settings.stall_s)
    search = SearchClient(settings.search, settings.timeout_s, security, retry_s=CONNECT_S)
    try:
        stored = await _prepare(settings, discovery, encoders, search, summary)
        search.retry_s = settings.stall_s  # running: wait out a restart of the service
        delete = to_prune(discovery.items, stored) if settings.prune else []
        _check_prune(delete, len(stored), settings.prune_limit, discovery.incomplete)
        if settings.dry_run:
            plan = await _whole_plan(settings, discovery, stored, summary.model_id)
            plan.delete = delete
            _report(plan, summary)
        else:
            await _apply(settings, discovery, stored, delete, encoders, search, summary)
    finally:
        summary.encoder_spread = encoders.spread()
        await pool.close()
        await search.close()


async def _prepare(
    settings: IndexerSettings,
    discovery: Discovery,
    encoders: FileEncoder,
    search: SearchClient,
    summary: Summary,
) -> dict[str, Stored]:
    """Connect to the encoders and the search service; what the catalog holds, by id."""
    try:
        info = await encoders.connect()
    except EncodingError as error:
        raise SetupError(str(error)) from None
    summary.model_id = info.model_id
    if info.random_weights:
        logger.warning(
            "the encoders run RANDOM weights (%s): vectors carry no meaning", info.model_id
        )
    try:
        stats = await search.stats()
        stored = await stored_products(search)
    except Exception as error:  # noqa: BLE001 - any failure here means no run
        raise SetupError(f"search service {settings.search} unusable: {_reason(error)}") from None
    if stats.model_id and stats.model_id != info.model_id:
        raise SetupError(
            f"the catalog holds vectors of {stats.model_id} but the encoders run {info.model_id}; "
            "point at encoders of the catalog's model, or index into a new catalog"
        )
    return stored


def _check_prune(
    delete: list[str], stored: int, limit: float, incomplete: tuple[str, str] | None
) -> None:
    """A wrong or empty catalog path must not wipe the catalog: big prunes need saying so;
    and a catalog not read whole must not prune what was not read."""
    if delete and incomplete is not None:
        where, what = incomplete
        raise SetupError(
            f"--prune refused: the catalog was not read whole ({where}: {what}), and the "
            "products not read would be deleted as gone; mend that, or run without --prune"
        )
    if delete and len(delete) > limit * stored:
        raise SetupError(
            f"--prune would delete {len(delete)} of the catalog's {stored} products "
            f"(more than --prune-limit {limit}); check the catalog path, or pass "
            "--prune-limit 1 if that many products really are gone"
        )


async def _whole_plan(
    settings: IndexerSettings, discovery: Discovery, stored: dict[str, Stored], model_id: str
) -> Plan:
    """Every file hashed and decided, nothing written: what a dry run reports."""
    hashing = Progress(len(discovery.items), "hashing", unit="file", mode=settings.progress)
    try:
        return await asyncio.to_thread(
            make_plan, discovery.items, stored, model_id, settings.hash_workers(),
            hashing.advance,
        )  # fmt: skip
    finally:
        hashing.close()


def _report(plan: Plan, summary: Summary) -> None:
    """The plan's counts into the summary and the log."""
    summary.failed += [(str(item.path), reason) for item, reason in plan.unreadable]
    summary.skipped_unchanged = len(plan.unchanged)
    summary.duplicate_groups = len(plan.duplicates)
    for sha256, ids in list(plan.duplicates.items())[:10]:
        logger.info("identical images (sha256 %s...): products %s", sha256[:12], ", ".join(ids[:8]))
    logger.info(
        "plan: %d to encode, %d metadata-only, %d unchanged, %d to prune, %d unreadable",
        len(plan.encode), len(plan.metadata_only), len(plan.unchanged),
        len(plan.delete), len(plan.unreadable),
    )  # fmt: skip


async def _apply(
    settings: IndexerSettings,
    discovery: Discovery,
    stored: dict[str, Stored],
    delete: list[str],
    encoders: FileEncoder,
    search: SearchClient,
    summary: Summary,
) -> None:
    """Prune, then read the files and encode the images that need it at the same time: each
    image goes to the encoders, with the bytes read to hash it, as soon as its hash says so,
    not once all are hashed."""
    if delete:
        summary.pruned = await delete_products(search, delete)
        logger.info("pruned %d products no longer on disk", summary.pruned)
    # Every product found is done once unchanged, failed with its reason, or sent to
    # search with its vector; the search service's acknowledgements are counted beside.
    progress = Progress(
        len(discovery.items), "indexing", mode=settings.progress, acknowledgements=True
    )
    uploader = Uploader(search, settings.batch_size, on_acknowledged=progress.acknowledge)
    # Images read ahead of the encoders: what a window of every encoder holds in flight.
    queued = encoders.window * len(encoders.pool.targets)
    indexing = _Indexing(
        encoders.model_info.model_id, stored, uploader, progress, summary, Jobs(limit=queued)
    )
    producer = asyncio.create_task(
        indexing.hash_and_route(discovery.items, settings.hash_workers())
    )
    try:
        await encoders.encode(indexing.jobs, indexing.encoded)
        plan = await producer
        for hashed in plan.metadata_only:  # no vector: the service keeps the stored one
            await indexing.upload(hashed.item, hashed.sha256, None)
        summary.metadata_updated = len(plan.metadata_only)
        totals = await uploader.close()
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        progress.close()
    plan.delete = delete
    _report(plan, summary)
    summary.failed += totals.failures
    logger.info(
        "search acknowledged: %d inserted, %d updated, %d unchanged, %d refused",
        totals.inserted, totals.updated, totals.unchanged, len(totals.failures),
    )  # fmt: skip


class _Indexing:
    """One run's hashing and encoding, side by side: each distinct image is encoded once,
    and every product that shows it is upserted with its vector."""

    def __init__(
        self,
        model_id: str,
        stored: dict[str, Stored],
        uploader: Uploader,
        progress: Progress,
        summary: Summary,
        jobs: Jobs,
    ) -> None:
        self.model_id = model_id
        self.planner = Planner(stored, model_id)
        self.uploader = uploader
        self.progress = progress
        self.summary = summary
        self.jobs = jobs  # keyed by sha256
        self.waiting: dict[str, list[Hashed]] = {}  # sha256 -> products awaiting its vector
        # Vectors of images already encoded, for identical files hashed after them.
        self.done: dict[str, Any] = {}
        self.hashing = True

    async def hash_and_route(self, items: list[SourceItem], workers: int) -> Plan:
        """Read and hash the files a slice at a time on `workers` threads, while the encoders
        have room; route each as decided."""
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="read") as pool:
                for part in slices(items, workers):
                    await self.jobs.room()
                    reads = await asyncio.to_thread(read_files, part, pool)
                    for item, read in zip(part, reads, strict=True):
                        kind = self.planner.decide(item, read.sha256, read.error)
                        await self._route(item, read, kind)
        finally:
            self.hashing = False
            self.done.clear()  # no identical file can come any more
            self.jobs.close()
        return self.planner.finish()

    async def _route(self, item: SourceItem, read: Read, kind: str) -> None:
        sha256 = read.sha256
        if kind in ("unchanged", "unreadable"):
            self.progress.advance(1)  # done (an unreadable file is reported as failed)
        elif kind == "encode":
            hashed_item = Hashed(item, sha256)
            if sha256 in self.waiting:
                self.waiting[sha256].append(hashed_item)
            elif sha256 in self.done:
                self.summary.reused_duplicates += 1
                await self.upload(item, sha256, self.done[sha256])
            else:
                self.waiting[sha256] = [hashed_item]
                self.jobs.put(Job(sha256, read.data))

    async def encoded(self, outcome: Outcome) -> None:
        group = self.waiting.pop(outcome.job.key)
        if outcome.vector is None:
            self.summary.failed += [(str(h.item.path), outcome.error) for h in group]
            self.progress.advance(len(group))
            return
        self.summary.encoded += 1
        self.summary.reused_duplicates += len(group) - 1
        if self.hashing and len(self.done) < KEPT_VECTORS:
            self.done[outcome.job.key] = outcome.vector
        for hashed_item in group:
            await self.upload(hashed_item.item, hashed_item.sha256, outcome.vector)

    async def upload(self, item: SourceItem, sha256: str, vector: Any) -> None:
        await self.uploader.add(_product(item, sha256), vector, self.model_id)
        self.progress.advance(1)


def _product(item: SourceItem, sha256: str) -> search_pb2.Product:
    """The product's metadata; its vector and model travel in its batch (see Uploader)."""
    return search_pb2.Product(id=item.id, image_sha256=sha256, **item.fields())


def _reason(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if callable(code):
        return f"{code().name}: {error.details()}"
    return str(error) or type(error).__name__
