"""The page's client of the search service: one aio channel, a deadline per call, domain errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from grpc import aio

from vpm.v1 import search_pb2, search_pb2_grpc
from vpm_common.security import PLAINTEXT, ClientSecurity
from web.errors import from_rpc

T = TypeVar("T")
# A query photo plus its envelope; replies of top_k products are far smaller.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class SearchClient:
    """Search, GetFacets, GetStats and GetProduct: the read-only calls the page makes."""

    def __init__(
        self, target: str, timeout_s: float = 30.0, security: ClientSecurity = PLAINTEXT
    ) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self.target = target
        self.timeout_s = timeout_s
        self.channel = security.aio_channel(target, options)
        self.stub = search_pb2_grpc.SearchStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def search(self, request: search_pb2.SearchRequest) -> search_pb2.SearchResponse:
        return await self._call(self.stub.Search, request)

    async def facets(self, request: search_pb2.GetFacetsRequest) -> search_pb2.Facets:
        return await self._call(self.stub.GetFacets, request)

    async def stats(self) -> search_pb2.Stats:
        return await self._call(self.stub.GetStats, search_pb2.GetStatsRequest())

    async def product(self, product_id: str) -> search_pb2.Product:
        return await self._call(self.stub.GetProduct, search_pb2.GetProductRequest(id=product_id))

    async def _call(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        try:
            return await method(request, timeout=self.timeout_s)
        except aio.AioRpcError as error:
            raise from_rpc(error) from None
