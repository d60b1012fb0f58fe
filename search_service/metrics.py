"""Prometheus metrics of the search service, and the decorator that counts and times each RPC."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

from grpc import aio
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "vpm_search_requests",
    "Search service RPCs handled, by method and status code",
    ["method", "code"],
)
LATENCY = Histogram(
    "vpm_search_request_seconds",
    "Search service RPC latency, by method",
    ["method"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60),
)
UPSERTED = Counter(
    "vpm_search_upserted_products", "Products received by UpsertProducts, by outcome", ["outcome"]
)
PRODUCTS = Gauge("vpm_search_products", "Products in the catalog")


def observed(method: Callable[..., Any]) -> Callable[..., Any]:
    """Count and time an async servicer method (outside rpc_boundary, so aborts are seen)."""
    name = method.__name__

    def record(context: aio.ServicerContext, started: float, failed: bool) -> None:
        code = context.code() if failed else None
        label = "OK" if not failed else (code.name if code is not None else "UNKNOWN")
        REQUESTS.labels(name, label).inc()
        LATENCY.labels(name).observe(time.perf_counter() - started)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: aio.ServicerContext) -> Any:
            started, failed = time.perf_counter(), True
            try:
                async for reply in method(self, request, context):
                    yield reply
                failed = False
            finally:
                record(context, started, failed)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: aio.ServicerContext) -> Any:
        started, failed = time.perf_counter(), True
        try:
            reply = await method(self, request, context)
            failed = False
            return reply
        finally:
            record(context, started, failed)

    return unary


class _QueryCacheMetrics:
    """The query embedding cache's counters, by query kind (image, text)."""

    def __init__(self) -> None:
        self.hits = Counter(
            "vpm_search_query_cache_hits", "Queries answered from the embedding cache", ["kind"]
        )
        self.misses = Counter(
            "vpm_search_query_cache_misses",
            "Queries not in the embedding cache: one encoder call each",
            ["kind"],
        )
        self.coalesced = Counter(
            "vpm_search_query_cache_coalesced",
            "Queries that waited for an identical query's encoder call in flight",
            ["kind"],
        )
        self.evictions = Counter(
            "vpm_search_query_cache_evictions",
            "Entries evicted from the embedding cache (least recently used first)",
            ["kind"],
        )
        self.entries = Gauge("vpm_search_query_cache_entries", "Entries in the embedding cache")
        self.bytes = Gauge("vpm_search_query_cache_bytes", "Estimated bytes the cache holds")
        self.hit_ratio = Gauge(
            "vpm_search_query_cache_hit_ratio",
            "Share of image and text queries since start that cost no encoder call",
        )


QUERY_CACHE = _QueryCacheMetrics()


class _IndexTuningMetrics:
    """What the recall measurement of an approximate index found (see index.tuning)."""

    def __init__(self) -> None:
        self.target = Gauge(
            "vpm_search_index_target_recall", "Recall@10 the approximate index is held to"
        )
        self.recall = Gauge(
            "vpm_search_index_recall",
            "Recall@10 measured at the search parameter in force (leave-one-out, catalog sample)",
        )
        self.reached = Gauge(
            "vpm_search_index_recall_reached", "1 when the measured recall reaches the target"
        )
        self.value = Gauge(
            "vpm_search_index_search_parameter",
            "The search parameter the measurement chose, by name (efSearch, nprobe)",
            ["parameter"],
        )
        self.filter_recall = Gauge(
            "vpm_search_index_filter_recall",
            "Recall@10 of filtered searches through the approximate index, by selectivity",
            ["selectivity"],
        )
        self.exact_filter_limit = Gauge(
            "vpm_search_index_exact_filter_limit",
            "Filters leaving at most this many products are scored exactly",
        )
        self.seconds = Gauge(
            "vpm_search_index_tuning_seconds", "Seconds the last recall measurement took"
        )


INDEX_TUNING = _IndexTuningMetrics()
