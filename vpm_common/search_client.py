"""The one client of the search service, used by the indexer and the search page.

One aio channel (plaintext, TLS or a token, as the caller's security says), a deadline
on every call, and retries: a call that fails with a status saying "try again"
(UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) is made again after a pause
(0.5 s, doubling up to 8 s) until `retry_s` have passed since its first failure. The
indexer waits out a search service that restarts (its --stall-s); the page retries
nothing (a person is waiting) and turns each failure into its own error with `error`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from grpc import aio

from vpm.v1 import search_pb2, search_pb2_grpc
from vpm_common.security import PLAINTEXT, ClientSecurity

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
# Batches of products with their vectors, a query photo: replies are far smaller.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 8.0


class SearchClient:
    """Calls to vpm.v1.Search at `target`, each with a deadline of `timeout_s`."""

    def __init__(
        self,
        target: str,
        timeout_s: float,
        security: ClientSecurity = PLAINTEXT,
        retry_s: float = 0.0,
        error: Callable[[aio.AioRpcError], Exception] | None = None,
    ) -> None:
        """`retry_s`: how long after its first failure a call is still made again (0: never).
        `error`: what a failed call raises, made from its RpcError (default: the RpcError)."""
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.target = target
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._error = error
        self.channel = security.aio_channel(target, options)
        self.stub = search_pb2_grpc.SearchStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def stats(self) -> search_pb2.Stats:
        return await self.call(
            lambda: self.stub.GetStats(search_pb2.GetStatsRequest(), timeout=self.timeout_s)
        )

    async def search(self, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        return await self.call(lambda: self.stub.Search(request, timeout=self.timeout_s))

    async def facets(self, request: search_pb2.GetFacetsRequest) -> search_pb2.Facets:
        return await self.call(lambda: self.stub.GetFacets(request, timeout=self.timeout_s))

    async def product(self, product_id: str, include_vector: bool = False) -> search_pb2.Product:
        request = search_pb2.GetProductRequest(id=product_id, include_vector=include_vector)
        return await self.call(lambda: self.stub.GetProduct(request, timeout=self.timeout_s))

    def product_batches(
        self, include_vectors: bool = False
    ) -> AsyncIterator[search_pb2.ProductBatch]:
        """Every product, a page a message (ListProductBatches), under a deadline of ten
        calls' time; not retried here, since part of it may have arrived (retry the whole
        with `call`)."""
        request = search_pb2.ListProductsRequest(include_vectors=include_vectors)
        return self.stub.ListProductBatches(request, timeout=self.timeout_s * 10)

    async def delete(self, ids: Sequence[str]) -> search_pb2.DeleteProductsResponse:
        request = search_pb2.DeleteProductsRequest(ids=ids)
        return await self.call(lambda: self.stub.DeleteProducts(request, timeout=self.timeout_s))

    async def upsert(self, batch: search_pb2.ProductBatch) -> search_pb2.UpsertSummary:
        """One batch in one UpsertProductBatches call: durable once this returns. Upserts
        are idempotent by id, so a batch whose answer was lost is simply sent again."""
        return await self.call(
            lambda: self.stub.UpsertProductBatches(iter([batch]), timeout=self.timeout_s)
        )

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """attempt(), made again as the module says while it fails with a RETRY_CODES status."""
        pause, give_up_at = FIRST_PAUSE_S, None
        while True:
            try:
                return await attempt()
            except aio.AioRpcError as error:
                now = time.monotonic()
                give_up_at = give_up_at or now + self.retry_s
                if error.code() not in RETRY_CODES or now + pause > give_up_at:
                    raise error if self._error is None else self._error(error) from None
                logger.warning(
                    "search %s: %s (%s); retrying in %.1f s",
                    self.target,
                    error.code().name,
                    error.details(),
                    pause,
                )
            await asyncio.sleep(pause)
            pause = min(2 * pause, LONGEST_PAUSE_S)
