"""`make loadtest`: a realistic query mix against real encoder + search processes, bounded in time.

Clients on loopback issue 70% product-id, 20% image and 10% text searches
for a fixed time at several concurrencies, then once far beyond what the
machine can serve. Reported per phase: throughput, p50/p95/p99 latency by
query kind, errors by status code, and the services' memory (RSS) at the
start and end of the run. What to see: no errors and flat memory at the
sustainable rate; beyond it, load shed with RESOURCE_EXHAUSTED, not by
deadlines expiring and memory growing.

Environment: VPM_LOAD_SECONDS (per phase, default 15), VPM_LOAD_PRODUCTS
(default 10000), VPM_LOAD_MODEL (default ViT-B-32), VPM_LOAD_LEVELS
(concurrencies, default 1,4,16), VPM_LOAD_OVERLOAD (default 128),
VPM_LOAD_REPEATED (share of image/text queries from a popular set, default 0.5).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

from bench.common import percentile, record, table
from tests import images
from tests.support import ServiceProcess, free_port
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2, search_pb2_grpc

SECONDS = float(os.environ.get("VPM_LOAD_SECONDS", "15"))
PRODUCTS = int(os.environ.get("VPM_LOAD_PRODUCTS", "10000"))
MODEL = os.environ.get("VPM_LOAD_MODEL", "ViT-B-32")
LEVELS = [int(n) for n in os.environ.get("VPM_LOAD_LEVELS", "1,4,16").split(",")]
OVERLOAD = int(os.environ.get("VPM_LOAD_OVERLOAD", "128"))
# The share of image and text queries repeated from a small popular set (the query cache
# answers those); the rest are new to the service and cost a model pass.
REPEATED = float(os.environ.get("VPM_LOAD_REPEATED", "0.5"))
FRESH = itertools.count(20)  # pictures 20.. are each sent once, across all levels (1000 made)
DEADLINE_S = 5.0
MIX = (("product_id", 0.7), ("image", 0.2), ("text", 0.1))
TEXTS = ("white sneakers", "red summer dress", "leather handbag", "navy blue jeans", "black watch")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def populate(target: str, model_id: str, dim: int) -> None:
    rng = np.random.default_rng(0)
    async with aio.insecure_channel(target) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        for start in range(0, PRODUCTS, 2000):
            vectors = rng.standard_normal((min(2000, PRODUCTS - start), dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            batch = [
                search_pb2.Product(
                    id=f"p{start + i}",
                    name=f"product {start + i}",
                    vector=vector.tolist(),
                    model_id=model_id,
                    gender=("Men", "Women")[i % 2],
                )  # fmt: skip
                for i, vector in enumerate(vectors)
            ]
            await stub.UpsertProducts(iter(batch), timeout=300)


async def phase(
    target: str, concurrency: int, seconds: float, pictures: list[bytes]
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = defaultdict(list)
    codes: Counter[str] = Counter()
    stop_at = time.monotonic() + seconds
    rng = random.Random(concurrency)

    async def client(stub: search_pb2_grpc.SearchStub) -> None:
        while time.monotonic() < stop_at:
            kind = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX])[0]
            if kind == "product_id":
                request = search_pb2.SearchRequest(
                    product_id=f"p{rng.randrange(PRODUCTS)}", top_k=10
                )
            elif kind == "image":
                # Half popular pictures (the query cache answers them), half never seen.
                popular = rng.random() < REPEATED
                picture = (
                    rng.choice(pictures[:20]) if popular else pictures[next(FRESH) % len(pictures)]
                )
                request = search_pb2.SearchRequest(image=picture, top_k=10)
            else:
                text = rng.choice(TEXTS)
                if rng.random() >= REPEATED:
                    text += f" size {rng.randrange(10**6)}"
                request = search_pb2.SearchRequest(text=text, top_k=10)
            started = time.monotonic()
            try:
                await stub.Search(request, timeout=DEADLINE_S)
                codes["OK"] += 1
                latencies[kind].append(time.monotonic() - started)
            except aio.AioRpcError as error:
                codes[error.code().name] += 1
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.05)  # a polite client backs off when shed

    async with aio.insecure_channel(target) as channel:
        stub = search_pb2_grpc.SearchStub(channel)
        began = time.monotonic()
        await asyncio.gather(*(client(stub) for _ in range(concurrency)))
        elapsed = time.monotonic() - began
    return {
        "concurrency": concurrency,
        "ok_per_s": codes["OK"] / elapsed,
        "codes": dict(codes),
        "latency_ms": {
            kind: {q: percentile(values, q) * 1000 for q in (50, 95, 99)}
            for kind, values in latencies.items()
        },
    }


async def model_of(target: str) -> encoder_pb2.ModelInfo:
    async with aio.insecure_channel(target) as channel:
        return await encoder_pb2_grpc.EncoderStub(channel).GetModelInfo(
            encoder_pb2.GetModelInfoRequest(), timeout=10
        )


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vpm-load-") as tmp:
        work = Path(tmp)
        encoder_port, search_port = free_port(), free_port()
        encoder = ServiceProcess(
            "encoder_service",
            [
                "--model",
                MODEL,
                "--pretrained",
                "none",
                "--port",
                str(encoder_port),
                "--metrics-port",
                "0",
            ],
            work / "encoder.log",
        )
        search = None
        try:
            encoder.wait_serving(f"127.0.0.1:{encoder_port}", "vpm.v1.Encoder", timeout_s=600)
            search = ServiceProcess(
                "search_service",
                ["--port", str(search_port), "--data-dir", str(work / "data"),
                 "--catalog-url", f"sqlite:///{work}/catalog.db",
                 "--encoder", f"127.0.0.1:{encoder_port}", "--metrics-port", "0"],
                work / "search.log",
            )  # fmt: skip
            target = f"127.0.0.1:{search_port}"
            search.wait_serving(target, "vpm.v1.Search")
            info = asyncio.run(model_of(f"127.0.0.1:{encoder_port}"))
            asyncio.run(populate(target, info.model_id, info.dim))
            pictures = [images.jpeg(640, 480, seed=i) for i in range(1000)]
            rss_before = {
                "search": rss_mb(search.process.pid),
                "encoder": rss_mb(encoder.process.pid),
            }
            results = [asyncio.run(phase(target, level, SECONDS, pictures)) for level in LEVELS]
            rss_after = {
                "search": rss_mb(search.process.pid),
                "encoder": rss_mb(encoder.process.pid),
            }
            overload = asyncio.run(phase(target, OVERLOAD, SECONDS, pictures))
            rss_overload = {
                "search": rss_mb(search.process.pid),
                "encoder": rss_mb(encoder.process.pid),
            }
        finally:
            if search is not None:
                search.stop()
            encoder.stop()
    rows = []
    for result in [*results, overload]:
        errors = {code: n for code, n in result["codes"].items() if code != "OK"}
        for kind, q in sorted(result["latency_ms"].items()):
            rows.append([result["concurrency"], kind, q[50], q[95], q[99]])
        rows.append(
            [
                result["concurrency"],
                "all: ok/s",
                result["ok_per_s"],
                "errors:",
                str(errors or "none"),
            ]
        )
    title = f"Load: {PRODUCTS} products, {MODEL}, 70% id/20% image/10% text, {SECONDS:.0f} s each"
    print(table(title, ["clients", "query", "p50 ms", "p95 ms", "p99 ms"], rows))
    for name in ("search", "encoder"):
        growth = (rss_after[name] - rss_before[name]) / rss_before[name] * 100
        print(
            f"{name} RSS: {rss_before[name]:.0f} MB -> {rss_after[name]:.0f} MB over the "
            f"sustainable levels ({growth:+.1f}%), {rss_overload[name]:.0f} MB after overload"
        )
    figures = {"levels": results, "overload": overload, "rss_mb": {
        "before": rss_before, "after": rss_after, "after_overload": rss_overload}}  # fmt: skip
    record("loadtest", figures)
    return figures


if __name__ == "__main__":
    run()
