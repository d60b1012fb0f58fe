"""The vpm.v1.Search servicer (thin: unpack, call the engine, pack) and create_server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from grpc import aio
from grpc_health.v1 import health

from search_service.engine import SearchEngine
from search_service.metrics import PRODUCTS, QUERY_CACHE, UPSERTED, observed
from search_service.models import UpsertSummary
from search_service.rpc import convert
from search_service.settings import SearchSettings
from vpm.v1 import search_pb2, search_pb2_grpc
from vpm_common.server.deadlines import caller_deadline
from vpm_common.server.rpc import rpc_boundary
from vpm_common.server.serving import add_health_and_reflection, listen, new_server, set_serving

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name


class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine

    @observed
    @rpc_boundary
    async def Search(
        self, request: search_pb2.SearchRequest, context: aio.ServicerContext
    ) -> search_pb2.SearchResponse:
        with caller_deadline(context):  # encoder calls get no more time than our caller
            result = await self.engine.search(convert.search_query(request))
        return convert.search_response(result)

    @observed
    @rpc_boundary
    async def UpsertProducts(
        self, request_iterator: AsyncIterator[search_pb2.Product], context: aio.ServicerContext
    ) -> search_pb2.UpsertSummary:
        with caller_deadline(context):
            summary = await self.engine.upsert(convert.upsert_items(request_iterator))
        return _upserted(summary)

    @observed
    @rpc_boundary
    async def UpsertProductBatches(
        self, request_iterator: AsyncIterator[search_pb2.ProductBatch], context: aio.ServicerContext
    ) -> search_pb2.UpsertSummary:
        with caller_deadline(context):
            summary = await self.engine.upsert(convert.upsert_entries(request_iterator))
        return _upserted(summary)

    @observed
    @rpc_boundary
    async def DeleteProducts(
        self, request: search_pb2.DeleteProductsRequest, context: aio.ServicerContext
    ) -> search_pb2.DeleteProductsResponse:
        summary = await asyncio.to_thread(self.engine.delete, list(request.ids))
        return convert.delete_response(summary)

    @observed
    @rpc_boundary
    async def GetProduct(
        self, request: search_pb2.GetProductRequest, context: aio.ServicerContext
    ) -> search_pb2.Product:
        product, vector = await asyncio.to_thread(
            self.engine.get, request.id, request.include_vector
        )
        return convert.product_message(product, vector)

    @observed
    @rpc_boundary
    async def ListProducts(
        self, request: search_pb2.ListProductsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[search_pb2.Product]:
        async for product, vector in self.engine.list_products(request.include_vectors):
            yield convert.product_message(product, vector)

    @observed
    @rpc_boundary
    async def ListProductBatches(
        self, request: search_pb2.ListProductsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[search_pb2.ProductBatch]:
        async for page in self.engine.product_pages(request.include_vectors):
            yield convert.product_batch(page)

    @observed
    @rpc_boundary
    async def GetStats(
        self, request: search_pb2.GetStatsRequest, context: aio.ServicerContext
    ) -> search_pb2.Stats:
        return convert.stats_message(await self.engine.stats())

    @observed
    @rpc_boundary
    async def GetFacets(
        self, request: search_pb2.GetFacetsRequest, context: aio.ServicerContext
    ) -> search_pb2.Facets:
        result = await asyncio.to_thread(self.engine.facets, convert.facet_query(request))
        return convert.facets_message(result)


def _upserted(summary: UpsertSummary) -> search_pb2.UpsertSummary:
    """The reply to an upsert, counted in the metrics."""
    for outcome in ("inserted", "updated", "unchanged", "failed"):
        UPSERTED.labels(outcome).inc(getattr(summary, outcome))
    return convert.upsert_summary(summary)


class SearchApp:
    """What the server serves: the engine, and the health status that says it is loaded."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine
        self.health = health.aio.HealthServicer()

    async def serve(self) -> None:
        """Report SERVING: call once the engine is loaded."""
        await set_serving(self.health, [SERVICE_NAME], True)


async def create_server(settings: SearchSettings, app: SearchApp) -> tuple[aio.Server, int]:
    """A server for `app` bound to settings.host:settings.port (0: a free port); not started.

    Health says SERVING when the engine is already loaded; otherwise NOT_SERVING
    until the caller loads it and calls `app.serve()` (see __main__).
    """
    security = settings.security()
    server = new_server(
        settings.max_message_bytes,
        auth=security.auth(),
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_streams_per_connection=settings.max_streams_per_connection,
    )
    search_pb2_grpc.add_SearchServicer_to_server(SearchServicer(app.engine), server)
    add_health_and_reflection(server, [SERVICE_NAME], app.health)
    await set_serving(app.health, [SERVICE_NAME], app.engine.loaded)
    port = listen(server, f"{settings.host}:{settings.port}", security.credentials())
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port}")
    PRODUCTS.set_function(lambda: len(app.engine.mirror.records))
    QUERY_CACHE.entries.set_function(lambda: app.engine.query_cache_stats().entries)
    QUERY_CACHE.bytes.set_function(lambda: app.engine.query_cache_stats().bytes)
    QUERY_CACHE.hit_ratio.set_function(lambda: app.engine.query_cache_stats().hit_ratio)
    return server, port
