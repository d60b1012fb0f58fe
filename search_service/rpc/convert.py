"""Protobuf messages to domain objects and back: the only place both kinds meet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

import numpy as np

from search_service.models import (
    DeleteSummary,
    FacetQuery,
    FacetResult,
    IndexTuning,
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
from vpm.v1 import search_pb2
from vpm_common.errors import InvalidArgument
from vpm_common.matrix import pack, unpack


def search_query(request: search_pb2.SearchRequest) -> SearchQuery:
    kind = request.WhichOneof("query")
    return SearchQuery(
        image=request.image if kind == "image" else None,
        text=request.text if kind == "text" else None,
        product_id=request.product_id if kind == "product_id" else None,
        vector=np.asarray(request.vector.values, dtype=np.float32) if kind == "vector" else None,
        top_k=request.top_k,
        offset=request.offset,
        min_score=request.min_score if request.HasField("min_score") else None,
        filters=dict(request.filters),
    )


def search_response(result: SearchResult) -> search_pb2.SearchResponse:
    response = search_pb2.SearchResponse(model_id=result.model_id)
    for match in result.matches:
        added = response.matches.add(score=match.score)
        added.product.MergeFromString(_product_bytes(match.product))
    return response


# Products answered lately, serialized, by identity (the object kept, so its id is not
# reused while here): a search answers the same catalog records again and again, and
# building a Product message field by field was a tenth of the Search RPC's Python time
# in a profile; merging its bytes costs a quarter of that. Records are replaced, never
# changed, so a record found here is the one serialized. Cleared when full.
PRODUCT_CACHE_ENTRIES = 65_536
_serialized: dict[int, tuple[Product, bytes]] = {}


def _product_bytes(item: Product) -> bytes:
    cached = _serialized.get(id(item))
    if cached is not None and cached[0] is item:
        return cached[1]
    data = product_message(item).SerializeToString()
    if len(_serialized) >= PRODUCT_CACHE_ENTRIES:
        _serialized.clear()
    _serialized[id(item)] = (item, data)
    return data


def product(message: search_pb2.Product, model_id: str = "") -> Product:
    """The product's metadata; its own model id, or else `model_id` (its batch's)."""
    # Field by field rather than a loop over METADATA_FIELDS: this runs once per
    # product of a bulk upsert, where getattr by name cost a third more.
    return Product(
        id=message.id,
        name=message.name,
        gender=message.gender,
        master_category=message.master_category,
        sub_category=message.sub_category,
        article_type=message.article_type,
        base_colour=message.base_colour,
        season=message.season,
        year=message.year,
        usage=message.usage,
        category=message.category,
        # dict() of an empty map cost a third of this function (BENCHMARKS.md, issue 15).
        attributes=dict(message.attributes) if message.attributes else {},
        image_sha256=message.image_sha256,
        model_id=message.model_id or model_id,
    )


def upsert_item(message: search_pb2.Product, model_id: str = "") -> UpsertItem:
    vector = np.asarray(message.vector, dtype=np.float32) if len(message.vector) else None
    # proto3 bytes have no presence: empty means "no image".
    return UpsertItem(product(message, model_id), vector=vector, image=message.image or None)


async def upsert_items(messages: AsyncIterable[search_pb2.Product]) -> AsyncIterator[UpsertItem]:
    async for message in messages:
        yield upsert_item(message)


async def upsert_entries(
    messages: AsyncIterable[search_pb2.ProductBatch],
) -> AsyncIterator[UpsertEntry]:
    """Each ProductBatch as a VectorBatch when it carries a matrix, else as its products'
    UpsertItems; InvalidArgument naming the field for a message that does not add up."""
    async for message in messages:
        matrix = unpack(message.vectors, "vectors") if message.HasField("vectors") else None
        if matrix is None or not len(matrix):
            for item in message.products:
                yield upsert_item(item, message.model_id)
            continue
        # In a worker thread, as the checks that follow: the event loop goes on serving searches.
        products = await asyncio.to_thread(_batch_products, message)
        yield VectorBatch(products, matrix, message.stream_products)


def _batch_products(message: search_pb2.ProductBatch) -> list[Product]:
    products = []
    for position, item in enumerate(message.products):
        if item.image or len(item.vector):
            raise InvalidArgument(
                f"products[{position}]: carries a vector or an image in a batch with "
                "vectors (its row is its vector)"
            )
        products.append(product(item, message.model_id))
    return products


def product_message(item: Product, vector: np.ndarray | None = None) -> search_pb2.Product:
    message = search_pb2.Product(
        id=item.id,
        name=item.name,
        gender=item.gender,
        master_category=item.master_category,
        sub_category=item.sub_category,
        article_type=item.article_type,
        base_colour=item.base_colour,
        season=item.season,
        year=item.year,
        usage=item.usage,
        category=item.category,
        attributes=item.attributes,
        image_sha256=item.image_sha256,
        model_id=item.model_id,
    )
    if vector is not None:
        message.vector.extend(vector.tolist())
    return message


def product_batch(page: list[tuple[Product, np.ndarray | None]]) -> search_pb2.ProductBatch:
    """A page of a listing: the products, and their vectors as one matrix when read."""
    batch = search_pb2.ProductBatch(products=[product_message(product) for product, _ in page])
    if page and page[0][1] is not None:
        batch.vectors.CopyFrom(pack(np.stack([vector for _, vector in page])))
    return batch


def upsert_summary(summary: UpsertSummary) -> search_pb2.UpsertSummary:
    return search_pb2.UpsertSummary(
        inserted=summary.inserted,
        updated=summary.updated,
        unchanged=summary.unchanged,
        failed=summary.failed,
        failures=[
            search_pb2.ItemFailure(id=f.id, code=f.code, message=f.message)
            for f in summary.failures
        ],
        catalog_version=summary.catalog_version,
    )


def delete_response(summary: DeleteSummary) -> search_pb2.DeleteProductsResponse:
    return search_pb2.DeleteProductsResponse(
        deleted=summary.deleted,
        not_found=summary.not_found,
        catalog_version=summary.catalog_version,
    )


def stats_message(stats: Stats) -> search_pb2.Stats:
    return search_pb2.Stats(
        products=stats.products,
        index_type=stats.index_type,
        index_size=stats.index_size,
        catalog_url=stats.catalog_url,
        catalog_version=stats.catalog_version,
        model_id=stats.model_id,
        dim=stats.dim,
        encoders=[
            search_pb2.EncoderStatus(
                target=e.target,
                state=e.state,
                model_id=e.model_id,
                random_weights=e.random_weights,
            )
            for e in stats.encoders
        ],
        query_cache=query_cache_message(stats.query_cache),
        index_tuning=index_tuning_message(stats.index_tuning),
    )


def index_tuning_message(tuning: IndexTuning) -> search_pb2.IndexTuning:
    return search_pb2.IndexTuning(
        status=tuning.status,
        target_recall=tuning.target_recall,
        measured_recall=tuning.measured_recall,
        parameter=tuning.parameter,
        value=tuning.value,
        reached=tuning.reached,
        k=tuning.k,
        sample_size=tuning.sample_size,
        measured_at_version=tuning.measured_at_version,
        measured_at=tuning.measured_at,
        seconds=tuning.seconds,
        exact_filter_limit=tuning.exact_filter_limit,
        filters=[
            search_pb2.FilterRecall(
                selectivity=level.selectivity,
                allowed=level.allowed,
                approximate_recall=level.approximate_recall,
                approximate_ms=level.approximate_ms,
                exact_ms=level.exact_ms,
                exact=level.exact,
            )
            for level in tuning.filters
        ],
    )


def query_cache_message(cache: QueryCacheStats) -> search_pb2.QueryCacheStats:
    return search_pb2.QueryCacheStats(
        enabled=cache.enabled,
        entries=cache.entries,
        max_entries=cache.max_entries,
        bytes=cache.bytes,
        max_bytes=cache.max_bytes,
        hits=cache.hits,
        misses=cache.misses,
        coalesced=cache.coalesced,
        evictions=cache.evictions,
        hit_ratio=cache.hit_ratio,
    )


def facet_query(request: search_pb2.GetFacetsRequest) -> FacetQuery:
    return FacetQuery(
        fields=tuple(request.fields), filters=dict(request.filters), max_values=request.max_values
    )


def facets_message(result: FacetResult) -> search_pb2.Facets:
    return search_pb2.Facets(
        facets=[
            search_pb2.Facet(
                field=facet.field,
                values=[search_pb2.FacetValue(value=v.value, count=v.count) for v in facet.values],
                other=facet.other,
            )
            for facet in result.facets
        ],
        products=result.products,
        catalog_version=result.catalog_version,
    )
