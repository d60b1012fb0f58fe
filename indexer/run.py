"""One indexing run: discover, compare with the catalog, prune, encode changes, upsert, report."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from indexer.encoding import EncodingError, FileEncoder, Job, Outcome
from indexer.plan import Hashed, Plan, make_plan
from indexer.progress import Progress
from indexer.settings import IndexerSettings
from indexer.sources import Discovery, SourceItem, fashion_catalog, folder_catalog
from indexer.upload import SearchClient, Uploader
from vpm.v1 import search_pb2
from vpm_common.encoder_pool import EncoderPool

logger = logging.getLogger(__name__)


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
        }


def discover(settings: IndexerSettings) -> Discovery:
    if settings.dir is not None:
        return folder_catalog(settings.dir)
    return fashion_catalog(settings.styles, settings.images)


async def run(settings: IndexerSettings) -> Summary:
    started = time.monotonic()
    summary = Summary(dry_run=settings.dry_run)
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

    security = settings.security()
    try:
        pool = EncoderPool(list(settings.encoder), security=security, expand_dns=True)
    except ValueError as error:
        raise SetupError(str(error)) from None
    encoders = FileEncoder(pool, window=settings.window, stall_s=settings.stall_s)
    search = SearchClient(settings.search, timeout_s=settings.timeout_s, security=security)
    try:
        plan = await _prepare(settings, discovery, encoders, search, summary)
        if not settings.dry_run:
            await _apply(settings, plan, encoders, search, summary)
    finally:
        summary.encoder_spread = encoders.spread()
        await pool.close()
        await search.close()
    summary.elapsed_s = time.monotonic() - started
    return summary


async def _prepare(
    settings: IndexerSettings,
    discovery: Discovery,
    encoders: FileEncoder,
    search: SearchClient,
    summary: Summary,
) -> Plan:
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
        stored = await search.stored()
    except Exception as error:  # noqa: BLE001 - any failure here means no run
        raise SetupError(f"search service {settings.search} unusable: {_reason(error)}") from None
    if stats.model_id and stats.model_id != info.model_id:
        raise SetupError(
            f"the catalog holds vectors of {stats.model_id} but the encoders run {info.model_id}; "
            "point at encoders of the catalog's model, or index into a new catalog"
        )
    hashing = Progress(len(discovery.items), "hashing", unit="file", mode=settings.progress)
    plan = await asyncio.to_thread(
        make_plan, discovery.items, stored, info.model_id, settings.prune, settings.hash_workers(),
        lambda n: hashing.advance(n),
    )  # fmt: skip
    hashing.close()
    _check_prune(plan, len(stored), settings.prune_limit)
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
    return plan


def _check_prune(plan: Plan, stored: int, limit: float) -> None:
    """A wrong or empty catalog path must not wipe the catalog: big prunes need saying so."""
    if plan.delete and len(plan.delete) > limit * stored:
        raise SetupError(
            f"--prune would delete {len(plan.delete)} of the catalog's {stored} products "
            f"(more than --prune-limit {limit}); check the catalog path, or pass "
            "--prune-limit 1 if that many products really are gone"
        )


async def _apply(
    settings: IndexerSettings,
    plan: Plan,
    encoders: FileEncoder,
    search: SearchClient,
    summary: Summary,
) -> None:
    if plan.delete:
        summary.pruned = await search.delete(plan.delete)
        logger.info("pruned %d products no longer on disk", summary.pruned)
    total = len(plan.encode) + len(plan.metadata_only)
    progress = Progress(total, "indexing", mode=settings.progress)
    uploader = Uploader(search, settings.batch_size, on_acknowledged=progress.advance)
    model_id = encoders.model_info.model_id
    try:
        if plan.metadata_only:
            vectors = await search.vectors([h.item.id for h in plan.metadata_only])
            for hashed in plan.metadata_only:
                await uploader.add(
                    _product(hashed.item, hashed.sha256), vectors[hashed.item.id], model_id
                )
            summary.metadata_updated = len(plan.metadata_only)
        await _encode(plan, encoders, uploader, progress, summary, model_id)
        totals = await uploader.close()
    finally:
        progress.close()
    summary.failed += totals.failures
    logger.info(
        "search acknowledged: %d inserted, %d updated, %d unchanged, %d refused",
        totals.inserted, totals.updated, totals.unchanged, len(totals.failures),
    )  # fmt: skip


async def _encode(
    plan: Plan,
    encoders: FileEncoder,
    uploader: Uploader,
    progress: Progress,
    summary: Summary,
    model_id: str,
) -> None:
    """Encode each distinct image once and upsert every product that shows it."""
    products_of: dict[str, list[Hashed]] = {}
    for hashed in plan.encode:
        products_of.setdefault(hashed.sha256, []).append(hashed)
    jobs = [Job(sha256, group[0].item.path) for sha256, group in products_of.items()]

    async def done(outcome: Outcome) -> None:
        group = products_of[outcome.job.key]
        if outcome.vector is None:
            summary.failed += [(str(h.item.path), outcome.error) for h in group]
            progress.advance(len(group))  # settled, if not indexed
            return
        summary.encoded += 1
        summary.reused_duplicates += len(group) - 1
        for hashed in group:
            await uploader.add(_product(hashed.item, outcome.sha256), outcome.vector, model_id)

    await encoders.encode(jobs, done)


def _product(item: SourceItem, sha256: str) -> search_pb2.Product:
    """The product's metadata; its vector and model travel in its batch (see Uploader)."""
    return search_pb2.Product(id=item.id, image_sha256=sha256, **item.fields())


def _reason(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if callable(code):
        return f"{code().name}: {error.details()}"
    return str(error) or type(error).__name__
