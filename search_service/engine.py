"""The search domain: SearchEngine checks requests, calls the encoders, writes, and searches.

No gRPC here. Writes go to the catalog first (one transaction per batch) and
then to the in-memory mirror, one batch at a time, in catalog version order.
Searches read the mirror under its read lock in worker threads (FAISS releases
the GIL), so they run alongside each other and alongside catalog writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from search_service.catalog import Catalog, Rows, UpsertWrite
from search_service.checks import checked_items, checked_rows, query_options, row_matrix
from search_service.collector import collector_paused
from search_service.embedder import QueryEmbedder
from search_service.filters import Term
from search_service.index import FLAT, single_threaded
from search_service.mirror import CatalogMirror, CaughtUp, Change
from search_service.models import (
    DEFAULT_TOP_K,
    DeleteSummary,
    ItemFailure,
    Match,
    Product,
    QueryCacheStats,
    SearchQuery,
    SearchResult,
    Stats,
    UpsertItem,
    UpsertSummary,
)
from search_service.query_cache import CachingEmbedder, Embedder
from search_service.vectors import unit_vector
from vpm_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    VpmError,
)

logger = logging.getLogger(__name__)

QUERY_KINDS = ("image", "text", "product_id", "vector")


class SearchEngine:
    """Search, upsert, delete, get, list and stats over one catalog and its mirror."""

    def __init__(
        self,
        catalog: Catalog,
        data_dir: Path,
        *,
        index_factory: str = FLAT,
        index_params: str = "",
        embedder: Embedder | None = None,
        batch_size: int = 5000,
        search_threads: int = 8,
        scan_threads: int = 1,
    ) -> None:
        self.catalog = catalog
        self.embedder: Embedder = embedder or QueryEmbedder(None)
        self.batch_size = batch_size
        self.index_factory = index_factory
        self.mirror = CatalogMirror(catalog, data_dir, index_factory, index_params, scan_threads)
        self._writer = threading.Lock()  # orders catalog writes
        # Applies committed writes to the mirror, one at a time, in commit order; with
        # one OpenMP thread, so that FAISS's idle workers do not spin on the cores the
        # writer and the searches need (-0.08 s of CPU per 42,700 bulk-upserted).
        # Index builds (mirror._build) still take every core.
        self._applier = ThreadPoolExecutor(
            1, thread_name_prefix="apply", initializer=single_threaded
        )
        self._executor = ThreadPoolExecutor(
            search_threads, thread_name_prefix="search", initializer=single_threaded
        )
        # Makes an upsert's batches durable beside its next commits (see _commit).
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="sync")
        self.loaded = False

    # -- lifecycle -----------------------------------------------------------------------

    def load(self) -> None:
        """Load products and index (snapshot plus changes since, or a rebuild)."""
        started = time.monotonic()
        with self._writer:
            self.mirror.load()
        self.loaded = True
        mirror = self.mirror
        origin = (
            "built from the catalog"
            if mirror.snapshot_loaded is None
            else f"the snapshot of version {mirror.snapshot_loaded} plus the changes since"
        )
        logger.info(
            "loaded %d products at catalog version %d (model %s), %s index of %d vectors (%s), "
            "in %.1fs",
            len(mirror.records),
            mirror.version,
            mirror.model_id or "-",
            self.index_factory,
            len(mirror.index) if mirror.index is not None else 0,
            origin,
            time.monotonic() - started,
        )

    def save_snapshot(self) -> bool:
        """Write the index snapshot if it changed since the last one."""
        return self.mirror.save_snapshot()

    def catch_up(self) -> CaughtUp:
        """Apply catalog changes made by other processes since the version held.

        It runs on the applier thread, so it takes its turn among this process's
        own writes and the mirror stays in catalog version order.
        """
        return self._applier.submit(self.mirror.catch_up).result()

    def prune_deletions(self, retention_s: float) -> int:
        """Drop deletions older than `retention_s` from the catalog's log; rows removed."""
        removed, pruned = self.catalog.prune_deletions(time.time() - retention_s)
        if removed:
            logger.info(
                "pruned %d deletions older than %.1f days from the catalog's log (through "
                "version %d)",
                removed,
                retention_s / 86400,
                pruned,
            )
        return removed

    def close(self) -> None:
        """Flush the index to a snapshot, then close the catalog."""
        try:
            self._applier.submit(lambda: None).result()  # what was committed is applied
            self.save_snapshot()
        finally:
            self._applier.shutdown(wait=True)
            self._syncer.shutdown(wait=True)
            self._executor.shutdown(wait=True)
            self.catalog.close()

    # -- queries -------------------------------------------------------------------------

    async def search(self, query: SearchQuery) -> SearchResult:
        """Validate, encode an image or text query when given one, and search in a worker thread."""
        self._require_loaded()
        kinds = [kind for kind in QUERY_KINDS if getattr(query, kind) is not None]
        if len(kinds) != 1:
            raise InvalidArgument("query: set exactly one of image, text, product_id and vector")
        top_k, terms = query_options(query)
        vector = query.vector
        if query.image is not None:
            vector = await self._embed(query.image, "image")
        elif query.text is not None:
            vector = await self._embed(query.text, "text")
        elif query.product_id is not None and not query.product_id:
            raise InvalidArgument("product_id: must not be empty")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            lambda: self.search_vector(
                vector,
                product_id=query.product_id,
                top_k=top_k,
                offset=query.offset,
                min_score=query.min_score,
                terms=terms,
            ),
        )

    def search_vector(
        self,
        vector: np.ndarray | Sequence[float] | None = None,
        *,
        product_id: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        offset: int = 0,
        min_score: float | None = None,
        terms: Sequence[Term] = (),
    ) -> SearchResult:
        """Best matches (exact for Flat) to `vector`, or to the stored vector of `product_id`."""
        mirror = self.mirror
        with mirror.lock.read():
            exclude = None
            if product_id is not None:
                exclude = mirror.keys.get(product_id)
                if exclude is None:
                    raise NotFound(f"product_id: no product {product_id!r} in the catalog")
                vector = mirror.stored_vector(exclude)
            else:
                vector = unit_vector(vector, "vector", mirror.dim)
            index = mirror.index
            if index is None:
                return SearchResult([], "")
            if not index.is_trained:
                raise mirror.not_trained()
            allowed = mirror.filters.matching(list(terms)) if terms else None
            extra = 0 if exclude is None else 1
            keys, scores = index.search(vector, offset + top_k + extra, allowed)
            if exclude is not None:
                keep = keys != exclude
                keys, scores = keys[keep], scores[keep]
            keys, scores = keys[offset : offset + top_k], scores[offset : offset + top_k]
            if min_score is not None:
                keep = scores >= min_score
                keys, scores = keys[keep], scores[keep]
            records = mirror.records
            matches = [
                Match(records[key], score)
                for key, score in zip(keys.tolist(), scores.tolist(), strict=True)
            ]
            return SearchResult(matches, mirror.model_id or "")

    def get(
        self, product_id: str, include_vector: bool = False
    ) -> tuple[Product, np.ndarray | None]:
        """A product and, when asked, its stored vector; NotFound when absent."""
        self._require_loaded()
        if not product_id:
            raise InvalidArgument("id: must not be empty")
        if include_vector:
            found = self.catalog.get(product_id, include_vector=True)
            if found is None:
                raise NotFound(f"id: no product {product_id!r} in the catalog")
            return found[1], found[2]
        with self.mirror.lock.read():
            key = self.mirror.keys.get(product_id)
            if key is None:
                raise NotFound(f"id: no product {product_id!r} in the catalog")
            return self.mirror.records[key], None

    async def list_products(
        self, include_vectors: bool = False
    ) -> AsyncIterator[tuple[Product, np.ndarray | None]]:
        """Every catalog product (and vector, when asked), read page by page in a worker thread."""
        self._require_loaded()
        pages = _pages(self.catalog.products(include_vectors), 1000)
        while True:
            page = await asyncio.to_thread(next, pages, None)
            if page is None:
                return
            for _key, product, vector in page:
                yield product, vector

    async def stats(self) -> Stats:
        encoders = await self.embedder.states()
        mirror = self.mirror
        with mirror.lock.read():
            has_products = bool(mirror.records)
            return Stats(
                products=len(mirror.records),
                index_type=self.index_factory,
                index_size=len(mirror.index) if mirror.index is not None else 0,
                catalog_url=self.catalog.url,
                catalog_version=mirror.version,
                model_id=(mirror.model_id or "") if has_products else "",
                dim=(mirror.dim or 0) if has_products else 0,
                encoders=encoders,
                query_cache=self.query_cache_stats(),
            )

    def query_cache_stats(self) -> QueryCacheStats:
        """The query embedding cache's counters (all zero without a cache in front)."""
        if isinstance(self.embedder, CachingEmbedder):
            return self.embedder.cache_stats()
        return QueryCacheStats()

    def index_keys(self) -> np.ndarray:
        """The catalog keys the vector index holds, sorted (for checks that it agrees)."""
        with self.mirror.lock.read():
            index = self.mirror.index
            return np.empty(0, np.int64) if index is None else index.keys()

    # -- writes --------------------------------------------------------------------------

    async def upsert(self, items: AsyncIterable[UpsertItem]) -> UpsertSummary:
        """Apply a stream of products in batches; the summary comes once all are committed,
        applied and synced (see `_commit`'s durable).

        Batches are pipelined: one is checked and encoded while the one before is
        written. An id sent twice is applied in order (the batch is cut before
        the repeat), so the last one wins and every occurrence is counted.
        """
        self._require_loaded()
        summary = UpsertSummary(catalog_version=self.mirror.version)
        writing: asyncio.Future | None = None  # the previous batch's commit
        applying: list[Future] = []  # what the commits queued: applies to the mirror, syncs

        async def flush(batch: list[UpsertItem]) -> None:
            nonlocal writing
            prepared = await self._prepare(batch, summary)
            if writing is not None:
                summary.add(await writing)

            def commit() -> UpsertSummary:  # the rows are built there too, off the event loop
                return self._commit(Rows(prepared), applying, durable=False)

            writing = asyncio.ensure_future(asyncio.to_thread(commit))

        batch: list[UpsertItem] = []
        ids: set[str] = set()
        try:
            async for item in items:
                if item.product.id in ids or len(batch) >= self.batch_size:
                    await flush(batch)
                    batch, ids = [], set()
                batch.append(item)
                ids.add(item.product.id)
            if batch:
                await flush(batch)
            if writing is not None:
                summary.add(await writing)
        finally:
            # Whatever happened to the stream, a commit in flight finishes and is applied.
            if writing is not None and not writing.done():
                await asyncio.wait([writing])
                if not writing.cancelled():
                    writing.exception()  # raised or not, the stream's own error comes first
            await asyncio.gather(*(asyncio.wrap_future(f) for f in list(applying)))
        return summary

    def upsert_products(self, products: Sequence[Product], vectors: np.ndarray) -> UpsertSummary:
        """Bulk upsert of products that carry their model ids, with their vectors as rows.

        Batches of `batch_size` (cut before an id repeated within one, so the last
        wins) are checked here while the batch before is committed on a writer
        thread, and the one before that is applied to the index (which makes room
        for all of them at the first). Each checked batch waits in the writer's
        queue, so the writer goes on to it as soon as a commit ends rather than
        when this thread gets to hand it over (gaps of ~15 ms a batch otherwise,
        measured); hence when a commit fails, the batch queued behind it may
        still commit before the error is raised: a re-send converges either way.
        The summary comes once every batch is applied and synced (see `_commit`'s
        durable). The garbage collector pauses meanwhile (see `collector_paused`).
        """
        self._require_loaded()
        products = list(products)
        matrix = row_matrix(vectors, len(products))
        summary = UpsertSummary(catalog_version=self.mirror.version)
        applying: list[Future] = []
        writing: Future | None = None
        with self.mirror.lock.read():  # room only for new ids: an update reuses its own
            new = sum(product.id not in self.mirror.keys for product in products)
        with collector_paused():
            try:
                with ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
                    for part in _batches([product.id for product in products], self.batch_size):
                        kept, unit = checked_rows(products[part], matrix[part], summary)
                        rows = Rows(zip(kept, unit, strict=True), unit)
                        # The first batch's apply makes room in the index for them all.
                        reserve = new if writing is None else 0
                        queued = writer.submit(self._commit, rows, applying, reserve, durable=False)
                        if writing is not None:
                            summary.add(writing.result())
                        writing = queued
                    if writing is not None:
                        summary.add(writing.result())
            finally:
                wait(applying)  # whatever happened, what was committed is applied and synced
        for future in applying:
            future.result()
        return summary

    def delete(self, product_ids: Sequence[str]) -> DeleteSummary:
        self._require_loaded()
        with self._writer:
            write = self.catalog.delete(product_ids)
            keys = np.array([key for key, _ in write.deleted], dtype=np.int64)
            applied = self._applier.submit(self.mirror.remove, write.version, keys)
        if write.deleted:
            applied.result()
        return DeleteSummary(len(write.deleted), write.not_found, write.version)

    async def _prepare(
        self, batch: list[UpsertItem], summary: UpsertSummary
    ) -> list[tuple[Product, np.ndarray]]:
        """Check a batch, skip unchanged images, fill model ids, encode images (failures noted)."""
        ready: list[tuple[Product, np.ndarray]] = []
        images: list[tuple[Product, bytes]] = []
        for item in checked_items(batch, summary):
            if item.image is None:
                ready.append((item.product, item.vector))
            elif self._unchanged_image(item.product):
                summary.unchanged += 1
            else:
                images.append((item.product, item.image))
        if any(not product.model_id for product, _ in ready):
            ready = await self._with_encoder_model(ready, summary)
        if images:
            ready.extend(await self._encode(images, summary))
        return ready

    def _commit(
        self, rows: Rows, applying: list[Future], reserve: int = 0, durable: bool = True
    ) -> UpsertSummary:
        """Commit checked (product, unit vector) pairs with distinct ids in one transaction,
        and queue their application to the mirror (appended to `applying`), making
        room in the index for `reserve` vectors first.

        The writer lock orders commits; the single applier thread applies them in
        that order, so the next batch commits while this one is applied.
        `durable=False`: the commit need not reach the disk before the next one
        starts; a sync of the catalog is queued instead (appended to `applying`
        too), so the caller must wait for `applying` before it acknowledges.
        SQLite at synchronous FULL thus fsyncs its log on the sync thread, beside
        the next commit, not inside each commit (+5 to 12% products/s, measured).
        """
        if not rows:
            return UpsertSummary(catalog_version=self.mirror.version)
        with self._writer:
            write = self.catalog.upsert(rows, durable)
            if write.committed:
                applying.append(self._applier.submit(self._apply, rows, write, reserve))
                if not durable:
                    applying.append(self._syncer.submit(self.catalog.sync))
        kinds = Counter(outcome.kind for outcome in write.outcomes)
        failures = [
            ItemFailure(product.id, outcome.error.code, outcome.error.message)
            for (product, _vector), outcome in zip(rows.items, write.outcomes, strict=True)
            if outcome.error is not None
        ]
        return UpsertSummary(
            kinds["inserted"], kinds["updated"], kinds["unchanged"], failures, write.version
        )

    def _apply(self, rows: Rows, write: UpsertWrite, reserve: int = 0) -> None:
        """Bring a committed upsert's inserted and updated products into the mirror."""
        changes: list[Change] = [
            (outcome.key, product, vector if outcome.vector_changed else None)
            for (product, vector), outcome in zip(rows.items, write.outcomes, strict=True)
            if outcome.kind in ("inserted", "updated")
        ]
        vectors = None
        if rows.matrix is not None:  # the changed vectors as rows of it, not stacked anew
            changed = [i for i, outcome in enumerate(write.outcomes) if outcome.vector_changed]
            vectors = rows.matrix if len(changed) == len(rows) else rows.matrix[changed]
        self.mirror.apply(write.version, changes, write.model_id, write.dim, reserve, vectors)

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise Unavailable("the search service is still loading its catalog and index")

    # -- encoding ------------------------------------------------------------------------

    async def _embed(self, data: bytes | str, field: str) -> np.ndarray:
        if not data or (isinstance(data, str) and not data.strip()):
            raise InvalidArgument(f"{field}: must not be empty")
        if isinstance(data, bytes):
            embedding = await self.embedder.embed_image(data, field)
        else:
            embedding = await self.embedder.embed_text(data, field)
        model_id = self.mirror.model_id if self.mirror.records else None
        if model_id is not None and embedding.model_id != model_id:
            raise FailedPrecondition(
                f"{field}: the encoders run model {embedding.model_id!r}, but the catalog "
                f"holds vectors of model {model_id!r}"
            )
        return embedding.vector

    def _unchanged_image(self, product: Product) -> bool:
        """Same image, metadata and model as stored: nothing to encode or write."""
        mirror = self.mirror
        with mirror.lock.read():
            key = mirror.keys.get(product.id)
            stored = mirror.records.get(key) if key is not None else None
        return (
            stored is not None and dataclasses.replace(product, model_id=stored.model_id) == stored
        )

    async def _with_encoder_model(
        self, items: list[tuple[Product, np.ndarray]], summary: UpsertSummary
    ) -> list[tuple[Product, np.ndarray]]:
        """Products sent without a model id take the encoders' model, as the contract says."""
        try:
            model_id, failure = await self.embedder.model_id("model_id"), None
        except VpmError as err:
            model_id, failure = None, err
        kept = []
        for product, vector in items:
            if product.model_id:
                kept.append((product, vector))
            elif failure is not None:
                summary.failures.append(ItemFailure(product.id, failure.code, failure.message))
            else:
                kept.append((dataclasses.replace(product, model_id=model_id), vector))
        return kept

    async def _encode(
        self, images: list[tuple[Product, bytes]], summary: UpsertSummary
    ) -> list[tuple[Product, np.ndarray]]:
        try:
            outcomes = await self.embedder.embed_images([(p.id, data) for p, data in images])
        except VpmError as err:
            outcomes = [err] * len(images)
        encoded = []
        for (product, _data), outcome in zip(images, outcomes, strict=True):
            if isinstance(outcome, VpmError):
                summary.failures.append(ItemFailure(product.id, outcome.code, outcome.message))
            else:
                encoded.append(
                    (dataclasses.replace(product, model_id=outcome.model_id), outcome.vector)
                )
        return encoded


def _batches(ids: Sequence[str], size: int) -> Iterator[slice]:
    """Runs of at most `size` positions with distinct ids, cut before a repeated one."""
    start, seen = 0, set()
    for position, product_id in enumerate(ids):
        if product_id in seen or position - start >= size:
            yield slice(start, position)
            start, seen = position, set()
        seen.add(product_id)
    if start < len(ids):
        yield slice(start, len(ids))


def _pages(items: Iterable, size: int) -> Iterable[list]:
    page = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page
