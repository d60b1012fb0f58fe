"""The search page: its JSON API against the Search RPC directly, and its thumbnails.

One search service process over random vectors (product-id queries: no encoder
in the way) and one `python -m web` process in front of it. The same queries
go to both in alternating turns, so the machine's noise falls on both alike:
the RPC through a gRPC channel, the page's API through one kept-alive HTTP
connection. Thumbnails: the first request for a 1080x1440 JPEG (decoded,
resized and encoded once), then the cached one, then a revalidation (304).
"""

from __future__ import annotations

import http.client
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import median, percentile, record, table, timed
from tests import images
from tests.support import ServiceProcess, free_port
from vpm.v1 import search_pb2, search_pb2_grpc

PRODUCTS = int(os.environ.get("VPM_BENCH_WEB_PRODUCTS", "10000"))
ROUNDS = int(os.environ.get("VPM_BENCH_WEB_ROUNDS", "300"))
PHOTOS = int(os.environ.get("VPM_BENCH_WEB_PHOTOS", "8"))
DIM, TOP_K = 512, 24
MODEL_ID = "bench-model"


def fill(stub: Any) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((PRODUCTS, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    messages = (
        search_pb2.Product(
            id=f"p{i}", name=f"Product {i}", gender=("Men", "Women")[i % 2], vector=v.tolist(),
            model_id=MODEL_ID, attributes={"image_path": f"photo-{i % PHOTOS}.jpg"},
        )
        for i, v in enumerate(vectors)
    )  # fmt: skip
    summary = stub.UpsertProducts(messages, timeout=600)
    assert summary.inserted == PRODUCTS, summary


def get(connection: http.client.HTTPConnection, path: str, **headers: str) -> tuple[int, bytes]:
    connection.request("GET", path, headers=headers)
    reply = connection.getresponse()
    return reply.status, reply.read()


def searches(stub: Any, page: http.client.HTTPConnection) -> dict[str, float]:
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in rng.integers(0, PRODUCTS, ROUNDS)]
    rpc_s, api_s = [], []
    for product_id in ids[:10]:  # warm both paths
        stub.Search(search_pb2.SearchRequest(product_id=product_id, top_k=TOP_K), timeout=30)
        get(page, f"/api/search?id={product_id}&top_k={TOP_K}")
    for product_id in ids:
        request = search_pb2.SearchRequest(product_id=product_id, top_k=TOP_K)
        rpc_s.append(timed(lambda r=request: stub.Search(r, timeout=30))[0])
        seconds, (status, _body) = timed(
            lambda p=product_id: get(page, f"/api/search?id={p}&top_k={TOP_K}")
        )
        assert status == 200, status
        api_s.append(seconds)
    return {
        "rpc_p50_ms": 1000 * median(rpc_s),
        "rpc_p99_ms": 1000 * percentile(rpc_s, 99),
        "api_p50_ms": 1000 * median(api_s),
        "api_p99_ms": 1000 * percentile(api_s, 99),
        "added_p50_ms": 1000 * (median(api_s) - median(rpc_s)),
        "ratio": median(api_s) / median(rpc_s),
    }


def thumbnails(page: http.client.HTTPConnection) -> dict[str, float]:
    first = []
    for i in range(PHOTOS):
        seconds, (status, body) = timed(lambda i=i: get(page, f"/thumbnails/photo-{i}.jpg"))
        assert status == 200 and body, status
        first.append(seconds)
    cached = []
    for _ in range(ROUNDS):
        seconds, (status, _body) = timed(lambda: get(page, "/thumbnails/photo-0.jpg"))
        cached.append(seconds)
    page.request("GET", "/thumbnails/photo-0.jpg")
    reply = page.getresponse()
    reply.read()
    etag = reply.getheader("etag")
    revalidated = [
        timed(lambda: get(page, "/thumbnails/photo-0.jpg", **{"If-None-Match": etag}))[0]
        for _ in range(ROUNDS)
    ]
    return {
        "first_p50_ms": 1000 * median(first),
        "first_max_ms": 1000 * max(first),
        "cached_p50_ms": 1000 * median(cached),
        "cached_p99_ms": 1000 * percentile(cached, 99),
        "not_modified_p50_ms": 1000 * median(revalidated),
    }


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {"products": PRODUCTS, "rounds": ROUNDS, "top_k": TOP_K}
    with tempfile.TemporaryDirectory(prefix="vpm-web-bench-") as tmp:
        work = Path(tmp)
        photos = work / "photos"
        photos.mkdir()
        for i in range(PHOTOS):
            (photos / f"photo-{i}.jpg").write_bytes(images.jpeg(1080, 1440, seed=i, quality=90))
        figures["photo_bytes"] = (photos / "photo-0.jpg").stat().st_size
        search_port, web_port = free_port(), free_port()
        started = [
            ServiceProcess(
                "search_service",
                ["--port", str(search_port), "--data-dir", str(work / "data"),
                 "--catalog-url", f"sqlite:///{work}/catalog.db", "--metrics-port", "0",
                 "--log-level", "WARNING"],
                work / "search.log",
            )
        ]  # fmt: skip
        try:
            started[0].wait_serving(f"127.0.0.1:{search_port}", "vpm.v1.Search")
            stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{search_port}"))
            fill(stub)
            started.append(
                ServiceProcess(
                    "web",
                    ["--port", str(web_port), "--search", f"127.0.0.1:{search_port}",
                     "--images", str(photos), "--log-level", "WARNING"],
                    work / "web.log",
                )
            )  # fmt: skip
            page = http.client.HTTPConnection("127.0.0.1", web_port, timeout=60)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if get(page, "/healthz")[0] == 200:
                        break
                except OSError:
                    page.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            figures["search"] = searches(stub, page)
            figures["thumbnails"] = thumbnails(page)
            page.close()
        finally:
            for process in reversed(started):
                process.stop()
    print_tables(figures)
    record("web", figures)
    return figures


def print_tables(figures: dict[str, Any]) -> None:
    s = figures["search"]
    print(
        table(
            f"Search, top {figures['top_k']} of {figures['products']:,} by product id: the page's "
            "JSON API vs the Search RPC, alternating (target: p50 within +5 ms)",
            ["path", "p50 ms", "p99 ms"],
            [
                ["Search RPC (gRPC)", s["rpc_p50_ms"], s["rpc_p99_ms"]],
                ["GET /api/search (HTTP, JSON)", s["api_p50_ms"], s["api_p99_ms"]],
            ],
        )  # fmt: skip
    )
    print(f"the page adds {s['added_p50_ms']:+.2f} ms at p50 (x{s['ratio']:.2f})")
    t = figures["thumbnails"]
    print(
        table(
            f"Thumbnails of a 1080x1440 JPEG ({figures['photo_bytes'] // 1024} KB) "
            "(target: cached p50 <= 5 ms)",
            ["request", "p50 ms", "other"],
            [
                [
                    "first (decode, resize, encode)",
                    t["first_p50_ms"],
                    f"max {t['first_max_ms']:.1f}",
                ],
                ["cached", t["cached_p50_ms"], f"p99 {t['cached_p99_ms']:.2f}"],
                ["revalidated (304)", t["not_modified_p50_ms"], ""],
            ],
        )  # fmt: skip
    )
