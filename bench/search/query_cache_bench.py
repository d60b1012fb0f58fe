"""Query embedding cache: p50 latency of a repeated query with the cache warm vs disabled.

One encoder process (the real ViT-B-32 architecture with seeded random weights,
so "disabled" pays a real model pass) serves two search service processes
over the same 10,000 products: one with the cache (--query-cache-size 10000),
one without (--query-cache-size 0). The same 640x480 JPEG (and the same short
text) goes to both in turns, so the machine's noise falls on both alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import median, percentile, record, table, timed
from tests import images
from tests.support import ServiceProcess, free_port
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc

MODEL = os.environ.get("VPM_BENCH_MODEL", "ViT-B-32")
CACHE = Path(os.environ.get("VPM_BENCH_CACHE", Path.home() / ".cache" / "vpm"))
PRODUCTS = int(os.environ.get("VPM_BENCH_CACHE_PRODUCTS", "10000"))
ROUNDS = int(os.environ.get("VPM_BENCH_CACHE_ROUNDS", "40"))
WARM_PER_ROUND = 5
TEXT = "a pair of white leather sneakers"


def start_search(work: Path, name: str, encoder: str, cache_size: int) -> tuple[Any, Any]:
    port = free_port()
    data = work / name
    process = ServiceProcess(
        "search_service",
        ["--port", str(port), "--data-dir", str(data), "--catalog-url", f"sqlite:///{data}/catalog.db",
         "--encoder", encoder, "--metrics-port", "0", "--log-level", "WARNING",
         "--query-cache-size", str(cache_size)],
        work / f"{name}.log",
    )  # fmt: skip
    process.wait_serving(f"127.0.0.1:{port}", "vpm.v1.Search")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return process, search_pb2_grpc.SearchStub(channel)


def fill(stub: Any, model_id: str, dim: int) -> None:
    """PRODUCTS random unit vectors of the encoder's model, so queries search a real index."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((PRODUCTS, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    messages = (
        search_pb2.Product(id=str(i), name=f"Product {i}", vector=v.tolist(), model_id=model_id)
        for i, v in enumerate(vectors)
    )
    summary = stub.UpsertProducts(messages, timeout=600)
    assert summary.inserted == PRODUCTS, summary


def side_by_side(warm: Any, cold: Any, request: search_pb2.SearchRequest) -> dict[str, float]:
    """p50 / p99 ms of `request` through each service, measured in alternating turns."""
    warm(request, timeout=120)  # the cached service's one miss
    cold(request, timeout=120)
    warm_s: list[float] = []
    cold_s: list[float] = []
    for _ in range(ROUNDS):
        cold_s.append(timed(lambda: cold(request, timeout=120))[0])
        warm_s.extend(timed(lambda: warm(request, timeout=120))[0] for _ in range(WARM_PER_ROUND))
    return {
        "warm_p50_ms": 1000 * median(warm_s),
        "warm_p99_ms": 1000 * percentile(warm_s, 99),
        "disabled_p50_ms": 1000 * median(cold_s),
        "disabled_p99_ms": 1000 * percentile(cold_s, 99),
        "ratio": median(warm_s) / median(cold_s),
    }


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {"model": MODEL, "products": PRODUCTS, "rounds": ROUNDS}
    with tempfile.TemporaryDirectory(prefix="vpm-cache-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        started = [
            ServiceProcess(
                "encoder_service",
                ["--model", MODEL, "--pretrained", "none", "--port", str(port),
                 "--metrics-port", "0", "--cache-dir", str(CACHE), "--log-level", "WARNING"],
                work / "encoder.log",
            )
        ]  # fmt: skip
        try:
            started[0].wait_serving(f"127.0.0.1:{port}", "vpm.v1.Encoder", timeout_s=600)
            encoder = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            info = encoder.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=60)
            target = f"127.0.0.1:{port}"
            cached, warm = start_search(work, "cached", target, 10_000)
            started.append(cached)
            uncached, cold = start_search(work, "uncached", target, 0)
            started.append(uncached)
            for stub in (warm, cold):
                fill(stub, info.model_id, info.dim)
            image = images.jpeg(640, 480, seed=3)
            figures["image_bytes"] = len(image)
            figures["image"] = side_by_side(
                warm.Search, cold.Search, search_pb2.SearchRequest(image=image, top_k=10)
            )
            figures["text"] = side_by_side(
                warm.Search, cold.Search, search_pb2.SearchRequest(text=TEXT, top_k=10)
            )
            stats = warm.GetStats(search_pb2.GetStatsRequest()).query_cache
            figures["cache"] = {
                "hits": stats.hits,
                "misses": stats.misses,
                "hit_ratio": stats.hit_ratio,
                "bytes": stats.bytes,
            }
        finally:
            for process in reversed(started):
                process.stop()
    print_tables(figures)
    record("query_cache", figures)
    return figures


def print_tables(figures: dict[str, Any]) -> None:
    title = (
        f"Repeated query through the search service, {figures['model']} encoder on this "
        f"machine's CPUs, top 10 of {figures['products']:,} (target: warm <= 1/10 of disabled)"
    )
    header = ["query", "disabled p50 ms", "warm p50 ms", "disabled p99 ms", "warm p99 ms", "ratio"]
    rows = [
        [
            f"{kind} ({figures['image_bytes'] // 1024} KB JPEG)" if kind == "image" else kind,
            r["disabled_p50_ms"],
            r["warm_p50_ms"],
            r["disabled_p99_ms"],
            r["warm_p99_ms"],
            f"1/{1 / r['ratio']:.0f}",
        ]
        for kind in ("image", "text")
        for r in [figures[kind]]
    ]
    print(table(title, header, rows))
    cache = figures["cache"]
    print(
        f"cache after the run: {cache['hits']} hits, {cache['misses']} misses "
        f"(hit ratio {cache['hit_ratio']:.3f}), {cache['bytes']:,} bytes"
    )
