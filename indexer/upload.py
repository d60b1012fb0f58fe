"""The indexer's side of the search service: what the catalog holds, and batched, retried upserts.

Each UpsertProductBatches call carries one batch: the products' metadata and
their vectors as one packed float32 matrix. Its summary is the service's
acknowledgement that the batch is durable. Upserts are idempotent by id, so
a batch whose answer was lost (the service restarting) is simply sent again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc import aio

from indexer.plan import METADATA_FIELDS, Stored
from vpm.v1 import search_pb2, search_pb2_grpc
from vpm_common.matrix import pack
from vpm_common.security import PLAINTEXT, ClientSecurity

logger = logging.getLogger(__name__)

RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class SearchUnavailable(RuntimeError):
    """The search service did not take a batch after every retry."""


@dataclass
class UploadTotals:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    # (product id, reason) for every product the service refused
    failures: list[tuple[str, str]] = field(default_factory=list)


class SearchClient:
    def __init__(
        self,
        target: str,
        timeout_s: float = 120.0,
        attempts: int = 6,
        security: ClientSecurity = PLAINTEXT,
    ) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.target = target
        self.channel = security.aio_channel(target, options)
        self.stub = search_pb2_grpc.SearchStub(self.channel)
        self.timeout_s = timeout_s
        self.attempts = attempts

    async def close(self) -> None:
        await self.channel.close()

    async def stats(self) -> search_pb2.Stats:
        return await self._retrying(
            lambda: self.stub.GetStats(
                search_pb2.GetStatsRequest(), timeout=self.timeout_s, wait_for_ready=True
            )
        )

    async def stored(self) -> dict[str, Stored]:
        """Every product's image hash, model and metadata, by id."""

        async def listing() -> dict[str, Stored]:
            stored = {}
            async for product in self.stub.ListProducts(
                search_pb2.ListProductsRequest(), timeout=self.timeout_s * 10
            ):
                stored[product.id] = Stored(
                    product.image_sha256, product.model_id, metadata_of(product)
                )
            return stored

        return await self._retrying(listing)

    async def vectors(self, ids: list[str], concurrency: int = 16) -> dict[str, np.ndarray]:
        """Stored vectors of `ids` (for products whose metadata alone changed)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(product_id: str) -> tuple[str, np.ndarray]:
            async with gate:
                request = search_pb2.GetProductRequest(id=product_id, include_vector=True)
                product = await self._retrying(
                    lambda: self.stub.GetProduct(request, timeout=self.timeout_s)
                )
                return product_id, np.asarray(product.vector, dtype=np.float32)

        return dict(await asyncio.gather(*(one(product_id) for product_id in ids)))

    async def delete(self, ids: list[str], chunk: int = 1000) -> int:
        deleted = 0
        for start in range(0, len(ids), chunk):
            request = search_pb2.DeleteProductsRequest(ids=ids[start : start + chunk])
            reply = await self._retrying(
                lambda r=request: self.stub.DeleteProducts(r, timeout=self.timeout_s)
            )
            deleted += reply.deleted
        return deleted

    async def upsert(self, batch: search_pb2.ProductBatch) -> search_pb2.UpsertSummary:
        """One batch in one UpsertProductBatches call: durable once this returns."""
        return await self._retrying(
            lambda: self.stub.UpsertProductBatches(iter([batch]), timeout=self.timeout_s)
        )

    async def _retrying(self, call: Callable):  # noqa: ANN202 - returns what the call returns
        pause = 0.5
        for attempt in range(1, self.attempts + 1):
            try:
                return await call()
            except aio.AioRpcError as error:
                if error.code() not in RETRY_CODES or attempt == self.attempts:
                    raise
                logger.warning(
                    "search %s: %s (%s); retrying in %.1f s",
                    self.target,
                    error.code().name,
                    error.details(),
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(2 * pause, 8.0)
        raise AssertionError("unreachable")


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

    async def add(self, product: search_pb2.Product, vector: np.ndarray, model_id: str) -> None:
        """Queue `product` (metadata only) with its `vector`, made by `model_id`."""
        if self._batch.products and model_id != self._batch.model_id:
            await self._hand_over()  # a batch names one model: vectors of another start the next
        self._batch.add(product, vector, model_id)
        if len(self._batch.products) >= self.batch_size:
            await self._hand_over()

    async def close(self) -> UploadTotals:
        """Send what is left and wait until every batch is acknowledged (or raise)."""
        if self._batch.products:
            await self._hand_over()
        await self._queue.put(None)
        await self._sender
        return self.totals

    async def _hand_over(self) -> None:
        if self._sender.done():
            self._sender.result()  # the sender failed: raise its error here
        batch, self._batch = self._batch, _Batch()
        await self._queue.put(batch.message())

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

    def add(self, product: search_pb2.Product, vector: np.ndarray, model_id: str) -> None:
        self.products.append(product)
        self.vectors.append(vector)
        self.model_id = model_id

    def message(self) -> search_pb2.ProductBatch:
        return search_pb2.ProductBatch(
            products=self.products,
            vectors=pack(np.stack(self.vectors).astype(np.float32, copy=False)),
            model_id=self.model_id,
        )


def metadata_of(product: search_pb2.Product) -> tuple[tuple[str, str | int], ...]:
    return tuple((name, getattr(product, name)) for name in METADATA_FIELDS)
