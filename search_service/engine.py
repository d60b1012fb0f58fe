"""The search domain: SearchEngine checks requests, calls the encoders, writes, and searches.

No gRPC here. Writes go to the catalog first (one transaction per batch) and
then to the in-memory mirror, one batch at a time, in catalog version order.
Searches read the mirror under its read lock in worker threads (FAISS releases
the GIL), so they run alongside each other and alongside catalog writes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import statistics
import threading
import time
from collections import Counter
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from search_service.checks import checked_items, checked_rows, query_options, row_matrix
from search_service.collector import full_collections_paused
from search_service.encoders.embedder import QueryEmbedder
from search_service.encoders.query_cache import CachingEmbedder, Embedder
from search_service.index.facets import count_facets, facet_fields, max_values_of
from search_service.index.filters import Term, parse_filters
from search_service.index.mirror import CatalogMirror, CaughtUp, Change
from search_service.index.tuning import IndexTuner
from search_service.index.vector_index import FLAT, single_threaded
from search_service.models import (
    DEFAULT_TOP_K,
    DeleteSummary,
    FacetQuery,
    FacetResult,
    ItemFailure,
    Match,
    Product,
    QueryCacheStats,
    SearchQuery,
    SearchResult,
    Stats,
    UpsertEntry,
    UpsertItem,
    UpsertSummary,
    VectorBatch,
)
from search_service.storage.catalog import Catalog, Rows, UpsertWrite
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
# While the searches run on the event loop take less than this (the median of the last
# ones: an HNSW or a small Flat index), an unfiltered search runs there when the index is
# free, rather than in a search thread: the hand-off to a thread and back cost more
# service CPU than such a search (issue 17's query figures in BENCHMARKS.md). Longer ones
# keep the loop free (see InlineSearches).
INLINE_SEARCH_S = 500e-6
# Products a page of a listing: one ListProductBatches message (~2 MB with 512-d vectors,
# under gRPC's default 4 MB a message that other clients receive).
LIST_PAGE = 1000
# Most vectors an upsert's stream_products makes room for at once (~4 GB of 512-d float32
# in a Flat index); past it the index grows as vectors come, as without the hint.
MAX_RESERVED = 2_000_000

T = TypeVar("T")


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
        index_device: str = "cpu",
        target_recall: float = 0.0,
    ) -> None:
        self.catalog = catalog
        self.embedder: Embedder = embedder or QueryEmbedder(None)
        self.batch_size = batch_size
        self.index_factory = index_factory
        self.mirror = CatalogMirror(
            catalog, data_dir, index_factory, index_params, scan_threads, index_device
        )
        # Measures an approximate index's recall off the request path (see upkeep).
        self.tuner = IndexTuner(self.mirror, target_recall)
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
        self._inline = InlineSearches()
        self._loop_thread = threading.local()  # .single: FAISS set to one thread there
        # Commits an upsert's batches, each queued behind the one under way (see _Commits).
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="commit")
        # Makes an upsert's batches durable beside its next commits (see _commit).
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="sync")
        self._upserts = 0  # upsert calls under way (catch_up waits for them)
        self._upserts_lock = threading.Lock()
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
        own writes and the mirror stays in catalog version order. While this
        process's own upserts are under way it does nothing: it would read back
        from the catalog the batches they committed and have yet to apply (the
        catalog's cost, not the index's), and their applies catch up anyway when
        another writer's version comes between two of theirs.
        """
        with self._upserts_lock:
            if self._upserts:
                version = self.mirror.version
                return CaughtUp(version, version)
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
            self._committer.shutdown(wait=True)
            self._applier.shutdown(wait=True)
            self._syncer.shutdown(wait=True)
            self._executor.shutdown(wait=True)
            self.catalog.close()

    # -- queries -------------------------------------------------------------------------

    async def search(self, query: SearchQuery) -> SearchResult:
        """Validate, encode an image or text query when given one, and search: on the event
        loop when recent searches were short, the index is free and no filter is given, else
        in a search thread (see INLINE_SEARCH_S)."""
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
        mirror = self.mirror
        search = functools.partial(
            _search_held,
            mirror,
            vector,
            product_id=query.product_id,
            top_k=top_k,
            offset=query.offset,
            min_score=query.min_score,
            terms=terms,
        )
        # A filter may make the index scan the passing products exactly (see tuning), and a
        # product's vector that the index does not keep (PQ) is read from the catalog (SQL,
        # maybe over a network): neither runs on the event loop.
        if not terms and self._inline.wanted():
            if not getattr(self._loop_thread, "single", False):
                single_threaded()  # one OpenMP thread, as in the search threads
                self._loop_thread.single = True
            with mirror.lock.read_if_free() as free:
                if free and (query.product_id is None or mirror.holds_vectors):
                    return self._inline.run(search)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _search_in_thread, mirror, search)

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
            return _search_held(
                mirror,
                vector,
                product_id=product_id,
                top_k=top_k,
                offset=offset,
                min_score=min_score,
                terms=terms,
            )

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
        """Every catalog product (and vector, when asked), one at a time."""
        async for page in self.product_pages(include_vectors):
            for product, vector in page:
                yield product, vector

    async def product_pages(
        self, include_vectors: bool = False
    ) -> AsyncIterator[list[tuple[Product, np.ndarray | None]]]:
        """Every catalog product (and vector, when asked), a page of LIST_PAGE at a time,
        each read in a worker thread."""
        self._require_loaded()
        pages = _pages(self.catalog.products(include_vectors), LIST_PAGE)
        while True:
            page = await asyncio.to_thread(next, pages, None)
            if page is None:
                return
            yield [(product, vector) for _key, product, vector in page]

    async def stats(self) -> Stats:
        # Not an empty catalog's figures while the real one loads: callers would act on them.
        self._require_loaded()
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
                index_tuning=self.tuner.tuning,
            )

    def facets(self, query: FacetQuery) -> FacetResult:
        """The values of some fields among the products the filters match, with their counts."""
        self._require_loaded()
        fields = facet_fields(query.fields)
        max_values = max_values_of(query.max_values)
        terms = parse_filters(query.filters)
        mirror = self.mirror
        with mirror.lock.read():
            records = mirror.records
            if terms:
                products = [records[key] for key in mirror.filters.matching(terms).tolist()]
            else:
                products = list(records.values())
            return FacetResult(
                count_facets(products, fields, max_values), len(products), mirror.version
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

    async def upsert(
        self, entries: AsyncIterable[UpsertEntry], expected_new: int = 0
    ) -> UpsertSummary:
        """The one ingest path: products one by one (UpsertItem, with a vector or an image)
        or many at once (VectorBatch, with a matrix); the summary comes once all are
        committed, applied and synced (see `_commit`'s durable).

        Single items are gathered into batches of `batch_size`; a VectorBatch is
        checked as it comes, its rows as one matrix. What passes is cut into
        commits of at most `batch_size` with distinct ids (cut before a repeat, so
        the last one wins and every occurrence is counted; small batches are
        joined), pipelined as `_Commits` says. `expected_new`: how many new ids the
        caller knows will come, for room in the index made in one step (see
        VectorIndex.reserve). Full garbage collections are held off meanwhile (see
        `full_collections_paused`).
        """
        self._require_loaded()
        summary = UpsertSummary(catalog_version=self.mirror.version)
        commits = _Commits(self, summary, expected_new)
        cutter = _Cutter(self.batch_size)
        items: list[UpsertItem] = []
        sent: set[str] = set()  # the single items' ids (see _prepare)

        async def commit(products: list[Product], vectors: np.ndarray | list) -> None:
            # Rows are built in a worker thread: the event loop goes on serving searches.
            for rows in await asyncio.to_thread(cutter.add, products, vectors):
                await commits.put(rows)

        with full_collections_paused(), self._upserting():
            try:
                async for entry in entries:
                    if isinstance(entry, UpsertItem):
                        items.append(entry)
                        if len(items) < self.batch_size:
                            continue
                    if items:  # before a VectorBatch too: the order is the caller's
                        await commit(*await self._prepare(items, summary, sent))
                        items = []
                    if isinstance(entry, VectorBatch):
                        if entry.stream_products and commits.writing is None:
                            commits.reserve = self._new_share(entry)
                        await commit(*await self._prepare_vectors(entry, summary))
                if items:
                    await commit(*await self._prepare(items, summary, sent))
                if (rows := cutter.rest()) is not None:
                    await commits.put(rows)
                await commits.finish()
            finally:
                await commits.settle()
        return summary

    def _new_share(self, first: VectorBatch) -> int:
        """Room to make for a stream of `first.stream_products`: as many as the share of
        new ids in its first batch says (an update reuses its own room), at most
        MAX_RESERVED: the count is the caller's hint, and a wrong one must not take the
        memory of a catalog it will never send."""
        if not first.products:
            return 0
        with self.mirror.lock.read():
            new = sum(product.id not in self.mirror.keys for product in first.products)
        share = -(-first.stream_products * new // len(first.products))
        return min(max(share, 0), MAX_RESERVED)

    @contextlib.contextmanager
    def _upserting(self) -> Iterator[None]:
        with self._upserts_lock:
            self._upserts += 1
        try:
            yield
        finally:
            with self._upserts_lock:
                self._upserts -= 1

    def upsert_products(self, products: Sequence[Product], vectors: np.ndarray) -> UpsertSummary:
        """`upsert` for callers without an event loop (tests, benchmarks): the products,
        each naming its model, with their vectors as rows, in VectorBatches of
        `batch_size`, and room made in the index for the new ids among them."""
        self._require_loaded()
        products = list(products)
        matrix = row_matrix(vectors, len(products))
        with self.mirror.lock.read():  # room only for new ids: an update reuses its own
            new = sum(product.id not in self.mirror.keys for product in products)
        size = self.batch_size

        async def batches() -> AsyncIterator[VectorBatch]:
            for start in range(0, len(products), size):
                yield VectorBatch(products[start : start + size], matrix[start : start + size])

        return asyncio.run(self.upsert(batches(), expected_new=new))

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
        self, batch: list[UpsertItem], summary: UpsertSummary, sent: set[str]
    ) -> tuple[list[Product], list[np.ndarray | None]]:
        """Check single items, skip unchanged images, fill model ids, encode images
        (failures noted): the products that remain, in the order they came, so that of an
        id sent twice the last still wins, and their unit vectors, None for a product sent
        with neither vector nor image (its stored vector stays; see Catalog.upsert).

        `sent`: the ids of the call's single items so far (this batch's are added): an
        image is skipped as unchanged only for an id not sent before in the call, whose
        earlier item may not be committed yet.
        """
        slots: list[tuple[Product, np.ndarray | None] | None] = []
        with_vectors: list[int] = []
        images: list[tuple[int, Product, bytes]] = []
        for item in checked_items(batch, summary):
            product = item.product
            if item.image is not None:
                if product.id not in sent and self._unchanged_image(product):
                    summary.unchanged += 1
                    sent.add(product.id)
                    continue
                images.append((len(slots), product, item.image))
            elif item.vector is not None:
                with_vectors.append(len(slots))
            sent.add(product.id)
            slots.append((product, item.vector))
        named, kept = await self._with_encoder_model([slots[i][0] for i in with_vectors], summary)
        named_at = dict(zip(kept, named, strict=True))
        for position, i in enumerate(with_vectors):
            product = named_at.get(position)  # None: no encoder named its model (noted)
            slots[i] = None if product is None else (product, slots[i][1])
        if images:
            encoded = await self._encode([(product, data) for _, product, data in images], summary)
            for (i, _product, _data), outcome in zip(images, encoded, strict=True):
                slots[i] = outcome
        products = [slot[0] for slot in slots if slot is not None]
        return products, [slot[1] for slot in slots if slot is not None]

    async def _prepare_vectors(
        self, batch: VectorBatch, summary: UpsertSummary
    ) -> tuple[list[Product], np.ndarray]:
        """Check a VectorBatch (its rows as one matrix) and fill model ids (failures
        noted): the products that remain and their unit vectors as rows."""
        matrix = row_matrix(batch.vectors, len(batch.products))
        products, unit = await asyncio.to_thread(checked_rows, batch.products, matrix, summary)
        products, kept = await self._with_encoder_model(products, summary)
        return products, unit if len(kept) == len(unit) else unit[kept]

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
        self, products: list[Product], summary: UpsertSummary
    ) -> tuple[list[Product], list[int]]:
        """Products sent without a model id take the encoders' model, as the contract says:
        the products, and the positions of those kept (all but those no encoder named)."""
        missing = [i for i, product in enumerate(products) if not product.model_id]
        if not missing:
            return products, list(range(len(products)))
        try:
            model_id, failure = await self.embedder.model_id("model_id"), None
        except VpmError as err:
            model_id, failure = None, err
        products = list(products)
        for i in missing:
            if failure is None:
                products[i] = dataclasses.replace(products[i], model_id=model_id)
            else:
                summary.failures.append(ItemFailure(products[i].id, failure.code, failure.message))
        if failure is None:
            return products, list(range(len(products)))
        kept = sorted(set(range(len(products))) - set(missing))
        return [products[i] for i in kept], kept

    async def _encode(
        self, images: list[tuple[Product, bytes]], summary: UpsertSummary
    ) -> list[tuple[Product, np.ndarray] | None]:
        """Each image's product (named by its vector's model) and vector, in order; None
        for one that failed (noted)."""
        try:
            outcomes = await self.embedder.embed_images([(p.id, data) for p, data in images])
        except VpmError as err:
            outcomes = [err] * len(images)
        encoded: list[tuple[Product, np.ndarray] | None] = []
        for (product, _data), outcome in zip(images, outcomes, strict=True):
            if isinstance(outcome, VpmError):
                summary.failures.append(ItemFailure(product.id, outcome.code, outcome.message))
                encoded.append(None)
            else:
                product = dataclasses.replace(product, model_id=outcome.model_id)
                encoded.append((product, outcome.vector))
        return encoded


def _search_in_thread(mirror: CatalogMirror, search: Callable[[], SearchResult]) -> SearchResult:
    with mirror.lock.read():
        return search()


def _search_held(
    mirror: CatalogMirror,
    vector: np.ndarray | Sequence[float] | None,
    *,
    product_id: str | None,
    top_k: int,
    offset: int,
    min_score: float | None,
    terms: Sequence[Term],
) -> SearchResult:
    """SearchEngine.search_vector's work, with a read slot of `mirror.lock` held."""
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


class InlineSearches:
    """Whether a search runs on the event loop: yes while the median of the last RECENT run
    there took less than INLINE_SEARCH_S (one slow search among fast ones moves nothing);
    otherwise one in PROBE_EVERY still does, so that the median follows the index as it
    changes. Used from the event loop's thread only; it times how long the loop was held.
    """

    RECENT = 15
    PROBE_EVERY = 100

    def __init__(self) -> None:
        # Counted as fast until measured: a first search slowed by cold caches moves nothing.
        self.recent = collections.deque([0.0] * self.RECENT, maxlen=self.RECENT)
        self.median = 0.0  # of `recent`, found when a search adds to it, not at each ask
        self._passed = 0

    def wanted(self) -> bool:
        if self.median < INLINE_SEARCH_S:
            return True
        self._passed += 1
        if self._passed < self.PROBE_EVERY:
            return False
        self._passed = 0
        return True

    def run(self, search: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return search()
        finally:
            self.recent.append(time.perf_counter() - started)
            self.median = statistics.median(self.recent)


class _Cutter:
    """Checked products and unit vectors cut into commits: at most `size` each, with
    distinct ids (cut before a repeated one, so that the last wins); what is left
    waits for more."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._parts: list[tuple[list[Product], np.ndarray | list[np.ndarray]]] = []
        self._ids: set[str] = set()

    def add(self, products: list[Product], vectors: np.ndarray | list[np.ndarray]) -> list[Rows]:
        """The commits that `products` complete, in order."""
        full = []
        ids, start = self._ids, 0
        for position, product in enumerate(products):
            if product.id in ids:  # the repeat starts the next commit
                self._parts.append((products[start:position], vectors[start:position]))
                full.append(self._take())
                ids, start = self._ids, position
            ids.add(product.id)
            if len(ids) == self.size:  # full: committed now, not when more comes
                self._parts.append((products[start : position + 1], vectors[start : position + 1]))
                full.append(self._take())
                ids, start = self._ids, position + 1
        if start < len(products):
            self._parts.append((products[start:], vectors[start:]))
        return full

    def rest(self) -> Rows | None:
        """The last commit, once nothing more comes."""
        return self._take() if self._parts else None

    def _take(self) -> Rows:
        parts, self._parts, self._ids = [p for p in self._parts if len(p[0])], [], set()
        if len(parts) == 1:
            products, vectors = parts[0]
        else:
            products = [product for part, _ in parts for product in part]
            matrices = [part for _, part in parts if isinstance(part, np.ndarray)]
            if len(matrices) == len(parts) and len({m.shape[1] for m in matrices}) == 1:
                vectors = np.concatenate(matrices)
            else:
                vectors = [vector for _, part in parts for vector in part]
        # A matrix goes on to the index as it is, rather than stacked again there.
        matrix = vectors if isinstance(vectors, np.ndarray) else None
        return Rows(zip(products, vectors, strict=True), matrix)


class _Commits:
    """One upsert's commits: each queued behind the one under way, then awaited.

    A checked batch waits in the committer's queue, so the committer goes on to
    it as soon as a commit ends rather than when the upsert gets to hand it over
    (gaps of ~15 ms a batch otherwise, measured), while the batch before is
    applied to the index. Hence when a commit fails, the batch queued behind it
    may still commit before the error is raised: a re-send converges either way.
    """

    def __init__(self, engine: SearchEngine, summary: UpsertSummary, reserve: int) -> None:
        self.engine = engine
        self.summary = summary
        self.reserve = reserve  # room to make at the first apply (see VectorIndex.reserve)
        self.applying: list[Future] = []  # what the commits queued: applies, syncs
        self.writing: Future | None = None  # the last commit queued

    async def put(self, rows: Rows) -> None:
        """Queue a commit, then wait for the one before it."""
        engine = self.engine
        queued = engine._committer.submit(
            engine._commit, rows, self.applying, self.reserve, durable=False
        )
        self.reserve = 0
        before, self.writing = self.writing, queued
        if before is not None:
            self.summary.add(await asyncio.wrap_future(before))

    async def finish(self) -> None:
        """Wait for the last commit, and for every apply and sync (raising their error)."""
        if self.writing is not None:
            last, self.writing = self.writing, None
            self.summary.add(await asyncio.wrap_future(last))
        await self.settle()
        for future in self.applying:
            future.result()

    async def settle(self) -> None:
        """Whatever happened, a commit in flight ends and what was committed is applied
        and synced (their errors are left to `finish`; the upsert's own comes first)."""
        if self.writing is not None:
            await _ended([self.writing])
        await _ended(self.applying)


async def _ended(futures: list[Future]) -> None:
    """Wait until `futures` are done, whatever their outcome (left in them for `result`)."""
    if not futures:
        return
    waiting = [asyncio.wrap_future(future) for future in futures]
    await asyncio.wait(waiting)
    for future in waiting:  # seen here, so that asyncio does not log them as never retrieved
        if not future.cancelled():
            future.exception()


def _pages(items: Iterable, size: int) -> Iterable[list]:
    page = []
    for item in items:
        page.append(item)
        if len(page) >= size:
            yield page
            page = []
    if page:
        yield page
