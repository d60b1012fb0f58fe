"""Search processes sharing one PostgreSQL catalog: how soon a write through one is seen by another.

Process A takes the writes; B1 and B2 follow the catalog's change log every
1 s (the default --catch-up-interval-s) and every 0.2 s. Each round upserts
100 products through A (one UpsertProducts call, 512-d vectors) and times,
from A's reply, until GetProduct of the last one answers on B1 and on B2;
then the same for a deletion. Rounds start at random moments, so the delay
spans the whole catch-up interval. Needs the machine's PostgreSQL
(VPM_BENCH_POSTGRES); skipped, saying so, without it.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import sqlalchemy as sa

from bench.common import POSTGRES, median, percentile, record, table
from search_service.storage.catalog import scratch_database
from tests.support import ServiceProcess, free_port
from vpm.v1 import search_pb2, search_pb2_grpc

ROUNDS = int(os.environ.get("VPM_BENCH_SHARED_ROUNDS", "20"))
BATCH = 100
DIM = 512
INTERVALS = (1.0, 0.2)


def start(work: Path, name: str, url: str, interval_s: float) -> tuple[ServiceProcess, Any]:
    port = free_port()
    process = ServiceProcess(
        "search_service",
        ["--port", str(port), "--data-dir", str(work / name), "--catalog-url", url,
         "--metrics-port", "0", "--catch-up-interval-s", str(interval_s)],
        work / f"{name}.log",
    )  # fmt: skip
    process.wait_serving(f"127.0.0.1:{port}", "vpm.v1.Search")
    return process, search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{port}"))


def present(stub: Any, product_id: str) -> bool:
    try:
        stub.GetProduct(search_pb2.GetProductRequest(id=product_id), timeout=5)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False
    return True


def delays(followers: list[Any], product_id: str, wanted: bool) -> list[float]:
    """Seconds until each follower shows `product_id` present (or absent), polled every 5 ms."""
    started = time.perf_counter()
    seen: list[float | None] = [None] * len(followers)
    while None in seen:
        for i, stub in enumerate(followers):
            if seen[i] is None and present(stub, product_id) == wanted:
                seen[i] = time.perf_counter() - started
        if time.perf_counter() - started > 30:
            raise TimeoutError(f"{product_id} did not propagate within 30 s")
        time.sleep(0.005)
    return [s for s in seen if s is not None]


def batch(round_: int) -> list[search_pb2.Product]:
    rng = np.random.default_rng(round_)
    vectors = rng.standard_normal((BATCH, DIM), dtype=np.float32)
    return [
        search_pb2.Product(id=f"r{round_}-{j}", vector=v.tolist(), model_id="bench-model")
        for j, v in enumerate(vectors)
    ]


def measure(url: str, work: Path) -> dict[str, Any]:
    started: list[ServiceProcess] = []
    try:
        writer, a = start(work, "a", url, 1.0)
        started.append(writer)
        followers = []
        for interval in INTERVALS:
            process, stub = start(work, f"b-{interval}", url, interval)
            started.append(process)
            followers.append(stub)
        upserts: list[list[float]] = [[] for _ in INTERVALS]
        deletes: list[list[float]] = [[] for _ in INTERVALS]
        rng = random.Random(0)
        for round_ in range(ROUNDS):
            time.sleep(rng.uniform(0, max(INTERVALS)))
            a.UpsertProducts(iter(batch(round_)), timeout=60)
            for i, seconds in enumerate(delays(followers, f"r{round_}-{BATCH - 1}", True)):
                upserts[i].append(seconds)
            time.sleep(rng.uniform(0, max(INTERVALS)))
            a.DeleteProducts(search_pb2.DeleteProductsRequest(ids=[f"r{round_}-0"]), timeout=60)
            for i, seconds in enumerate(delays(followers, f"r{round_}-0", False)):
                deletes[i].append(seconds)
    finally:
        for process in reversed(started):
            process.stop()
    results = {}
    for i, interval in enumerate(INTERVALS):
        for kind, samples in (("upsert", upserts[i]), ("delete", deletes[i])):
            results[f"{kind} interval={interval}"] = {
                "p50_ms": 1000 * median(samples),
                "p95_ms": 1000 * percentile(samples, 95),
                "max_ms": 1000 * max(samples),
            }
    return results


def run() -> dict[str, Any]:
    with ExitStack() as stack:
        try:
            url = stack.enter_context(scratch_database(f"{POSTGRES}/postgres", "vpm_bench"))
        except sa.exc.OperationalError as err:
            print(f"skipped: PostgreSQL at {POSTGRES} is unreachable ({err.orig})")
            return {}
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="vpm-shared-bench-"))
        figures = {"rounds": ROUNDS, "batch": BATCH, "delays": measure(url, Path(tmp))}
    print_tables(figures)
    record("shared_catalog", figures)
    return figures


def print_tables(figures: dict[str, Any]) -> None:
    title = (
        f"A write through one search process, seen through another sharing PostgreSQL "
        f"({figures['rounds']} rounds of {figures['batch']} products)"
    )
    header = ["change, follower's catch-up interval (s)", "p50 ms", "p95 ms", "max ms"]
    rows = [[name, r["p50_ms"], r["p95_ms"], r["max_ms"]] for name, r in figures["delays"].items()]
    print(table(title, header, rows))
