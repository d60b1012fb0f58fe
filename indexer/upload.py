"""The indexer's side of the search service: what the catalog holds, and batched uploads.

Each UpsertProductBatches call carries one batch: the products' metadata and
their vectors as one packed float32 matrix (or, for products whose metadata
alone changed, no matrix: the service keeps their stored vectors). Its
summary is the service's acknowledgement that the batch is durable. Calls go
through the one search client (vpm_common.search_client), which sends a batch
again while the service restarts: upserts are idempotent by id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from grpc import aio

from indexer.plan import METADATA_FIELDS, Stored
from indexer.sources import IMAGE_PATH_ATTRIBUTE
from vpm.v1 import search_pb2
from vpm_common.matrix import pack
from vpm_common.search_client import SearchClient


class SearchUnavailable(RuntimeError):
    """The search service did not take a batch after every retry."""


@dataclass
class UploadTotals:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    # (product id, reason) for every product the service refused
    failures: list[tuple[str, str]] = field(default_factory=list)


async def stored_products(search: SearchClient) -> dict[str, Stored]:
    """Every product's image hash, model and metadata, by id (the listing retried whole)."""

    async def listing() -> dict[str, Stored]:
        stored = {}
        async for batch in search.product_batches():
            for product in batch.products:
                stored[product.id] = Stored(
                    product.image_sha256,
                    product.model_id,
                    metadata_of(product),
                    product.attributes.get(IMAGE_PATH_ATTRIBUTE, ""),
                )
        return stored

    return await search.call(listing)


async def delete_products(search: SearchClient, ids: list[str], chunk: int = 1000) -> int:
    """Delete `ids`, `chunk` a call: how many were there."""
    deleted = 0
    for start in range(0, len(ids), chunk):
        try:
            deleted += (await search.delete(ids[start : start + chunk])).deleted
        except aio.AioRpcError as error:
            raise SearchUnavailable(
                f"search {search.target} did not delete {len(ids) - start} products "
                f"(--prune; {deleted} deleted): {error.code().name}: {error.details()}"
            ) from None
    return deleted


class Uploader:
    """Collects products into batches and sends each as one UpsertProductBatches call
    (metadata, plus the vectors as one float32 matrix), in background."""

    def __init__(
        self,
        client: SearchClient,
        batch_size: int,
        on_acknowledged: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.batch_size = batch_size
        self.totals = UploadTotals()
        self._on_acknowledged = on_acknowledged
        self._batch = _Batch()
        # Two batches may wait while one is sent: encoding runs ahead, memory stays bounded.
        self._queue: asyncio.Queue[search_pb2.ProductBatch | None] = asyncio.Queue(maxsize=2)
        self._sender = asyncio.create_task(self._send_batches())

    async def add(
        self, product: search_pb2.Product, vector: np.ndarray | None, model_id: str
    ) -> None:
        """Queue `product` (metadata only) with its `vector`, made by `model_id`; without a
        vector, the product is in the catalog and its metadata alone changes (the service
        keeps its stored vector)."""
        kind = (model_id, vector is None)
        if self._batch.products and kind != (self._batch.model_id, self._batch.keeps_vectors):
            # A batch names one model and carries a matrix or none: another starts the next.
            await self._hand_over()
        self._batch.add(product, vector, model_id)
        if len(self._batch.products) >= self.batch_size:
            await self._hand_over()

    async def close(self) -> UploadTotals:
        """Send what is left and wait until every batch is acknowledged (or raise)."""
        if self._batch.products:
            await self._hand_over()
        await self._put(None)
        await self._sender
        return self.totals

    async def _hand_over(self) -> None:
        batch, self._batch = self._batch, _Batch()
        await self._put(batch.message())

    async def _put(self, message: search_pb2.ProductBatch | None) -> None:
        """Queue `message` for the sender, or raise the sender's error: once it has failed,
        nothing reads a full queue again, and waiting on the queue alone waits for ever."""
        if self._sender.done():
            self._sender.result()
        put = asyncio.ensure_future(self._queue.put(message))
        try:
            await asyncio.wait({put, self._sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            put.cancel()  # a no-op once it is done
        if not put.done() or put.cancelled():
            self._sender.result()

    async def _send_batches(self) -> None:
        while (batch := await self._queue.get()) is not None:
            try:
                summary = await self.client.upsert(batch)
            except aio.AioRpcError as error:
                raise SearchUnavailable(
                    f"search {self.client.target} did not take a batch of "
                    f"{len(batch.products)}: {error.code().name}: {error.details()}"
                ) from None
            self.totals.inserted += summary.inserted
            self.totals.updated += summary.updated
            self.totals.unchanged += summary.unchanged
            self.totals.failures += [(failure.id, failure.message) for failure in summary.failures]
            if self._on_acknowledged:
                self._on_acknowledged(len(batch.products) - len(summary.failures))


@dataclass
class _Batch:
    """Products gathered for one call, their vectors beside them, and the model of those."""

    products: list[search_pb2.Product] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    model_id: str = ""
    keeps_vectors: bool = False  # metadata only: no matrix, the stored vectors stay

    def add(self, product: search_pb2.Product, vector: np.ndarray | None, model_id: str) -> None:
        self.products.append(product)
        self.keeps_vectors = vector is None
        if vector is not None:
            self.vectors.append(vector)
        self.model_id = model_id

    def message(self) -> search_pb2.ProductBatch:
        if self.keeps_vectors:
            return search_pb2.ProductBatch(products=self.products)
        return search_pb2.ProductBatch(
            products=self.products,
            vectors=pack(np.stack(self.vectors).astype(np.float32, copy=False)),
            model_id=self.model_id,
        )


def metadata_of(product: search_pb2.Product) -> tuple[tuple[str, str | int], ...]:
    return tuple((name, getattr(product, name)) for name in METADATA_FIELDS)
