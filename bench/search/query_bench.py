"""`python -m bench query`: Search RPC queries/s and latency against FAISS answering the same
queries in-process (the ceiling), and the service's CPU per query outside the index search.

Data: VPM_BENCH_QUERY_PRODUCTS (default 42,700) clustered 512-d unit vectors (300 centres
plus noise, as recall_bench's `clustered`) with fashion-like metadata, and QUERIES more
drawn the same way (not in the catalog); top 10, the same queries for every way.

Ways, side by side in one run, at concurrency 1, 8 and 32:
  service    a real `python -m search_service` process, fed by UpsertProductBatches,
             queried by vector; the clients run in CLIENT_PROCESSES processes of
             their own (grpc.aio, the calls split between them), so their CPU is
             not the service's; the service's CPU is its utime + stime (/proc)
             across the timed window
  ceiling    FAISS in this process on the same index (the service's own snapshot
             for HNSW32), as many threads as the concurrency, one OpenMP thread each,
             one query a call, as the service's search threads call it; Flat at
             concurrency 1 on --scan-threads shards (IndexShards), as the service
             splits a lone query
HNSW32 runs at the smallest efSearch whose recall@10 on these queries reaches TARGET_RECALL
(measured here on the service's snapshot, then set with --index-params, no rebuild).
Outside the index: the service's CPU per query less the ceiling's at the same concurrency.

Also: the process that took the upsert (its HNSW graph built by incremental adds) against
the same index loaded from its snapshot after a restart, at the same efSearch.

VPM_BENCH_QUERY_PRODUCTS, VPM_BENCH_QUERY_SECONDS (per window, default 3) size the run.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from bench.common import (
    closed_loop,
    median,
    percentile,
    process_cpu_s,
    record,
    table,
    verdict,
)
from bench.search.recall_bench import clustered
from bench.search.search_bench import ServiceProcess, catalog, ingest_batches, plain_flat
from search_service.index.mirror import SNAPSHOT_NAME
from search_service.index.search_params import EF_SEARCH_LADDER
from search_service.index.vector_index import single_threaded
from search_service.settings import SearchSettings
from vpm.v1 import search_pb2, search_pb2_grpc

PRODUCTS = int(os.environ.get("VPM_BENCH_QUERY_PRODUCTS", "42700"))
SECONDS = float(os.environ.get("VPM_BENCH_QUERY_SECONDS", "3"))
QUERIES = 500
K = 10
CONCURRENCY = (1, 8, 32)
CLIENT_PROCESSES = 2
TARGET_RECALL = 0.95
TARGET_P50_MS = 1.0
TARGET_QPS = 2500.0
TARGET_OUTSIDE_MS = 0.6
# How long the clients get to connect and warm up before a window opens.
LEAD_S = 1.5


# -- clients (in processes of their own) ------------------------------------------------


def _client(
    target: str, queries_path: str, first: int, tasks: int, stride: int, window: tuple
) -> tuple[list[tuple[float, float]], float]:
    """(started, seconds) of each call this process made in `window` (wall-clock times),
    `tasks` calls at a time (task t sends queries first + t, + stride, ...), and the CPU
    seconds this process spent from the window's start."""
    from grpc import aio

    queries = np.load(queries_path)
    requests = [
        search_pb2.SearchRequest(vector=search_pb2.Vector(values=q.tolist()), top_k=K)
        for q in queries
    ]
    start_at, stop_at = window

    async def main() -> tuple[list[tuple[float, float]], float]:
        async with aio.insecure_channel(target) as channel:
            stub = search_pb2_grpc.SearchStub(channel)
            for request in requests[:20]:
                await stub.Search(request, timeout=30)  # warm-up: channel, first calls
            await asyncio.sleep(max(0.0, start_at - time.time()))
            cpu = time.process_time()

            async def task(number: int) -> list[tuple[float, float]]:
                calls = []
                i = first + number
                while (began := time.time()) < stop_at:
                    clock = time.perf_counter()
                    await stub.Search(requests[i % len(requests)], timeout=30)
                    calls.append((began, time.perf_counter() - clock))
                    i += stride
                return calls

            parts = await asyncio.gather(*(task(n) for n in range(tasks)))
            cpu = time.process_time() - cpu
        return [call for part in parts for call in part], cpu

    return asyncio.run(main())


def _ready() -> bool:
    return True


def over_rpc(pool: Any, service: ServiceProcess, queries_path: Path, concurrency: int) -> dict:
    """p50/p99 ms, queries/s and the service's CPU ms per query over one timed window."""
    processes = min(CLIENT_PROCESSES, concurrency)
    start_at = time.time() + LEAD_S
    window = (start_at, start_at + SECONDS)
    jobs = []
    first = 0
    for number in range(processes):
        tasks = concurrency // processes + (number < concurrency % processes)
        target = f"127.0.0.1:{service.port}"
        jobs.append((target, str(queries_path), first, tasks, concurrency, window))
        first += tasks
    pending = pool.starmap_async(_client, jobs)
    pid = service.process.pid
    time.sleep(max(0.0, window[0] - time.time()))
    cpu = process_cpu_s(pid)
    time.sleep(max(0.0, window[1] - time.time()))
    cpu = process_cpu_s(pid) - cpu
    parts = pending.get()
    calls = [call for part, _ in parts for call in part if call[0] >= window[0]]
    figures = _figures([seconds for _, seconds in calls], SECONDS, cpu)
    figures["client_cpu_ms_per_query"] = 1e3 * sum(cpu for _, cpu in parts) / len(calls)
    return figures


def _figures(latencies: list[float], seconds: float, cpu_s: float) -> dict:
    return {
        "p50_ms": 1e3 * median(latencies),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "qps": len(latencies) / seconds,
        "cpu_ms_per_query": 1e3 * cpu_s / len(latencies),
        "queries": len(latencies),
    }


# -- the ceiling: FAISS in this process ----------------------------------------------------


def in_process(search: Any, queries: np.ndarray, concurrency: int) -> dict:
    """`search(query)` on `concurrency` threads (one OpenMP thread each) for SECONDS."""
    with ThreadPoolExecutor(concurrency, initializer=single_threaded) as pool:
        list(pool.map(search, queries[:20]))  # warm-up
        cpu = time.process_time()
        latencies = closed_loop(search, queries, concurrency, SECONDS, pool)
        cpu = time.process_time() - cpu
    return _figures(latencies, SECONDS, cpu)


def flat_ceiling(vectors: np.ndarray, concurrency: int, threads: int) -> Any:
    """Plain IndexFlatIP: a lone query on `threads` shards, as the service splits one; with
    more queries at once, one index a query (the service then scans its shards in turn)."""
    keys = np.arange(len(vectors), dtype=np.int64)
    index = plain_flat(vectors, keys, threads if concurrency == 1 else 1)
    return lambda q: index.search(q.reshape(1, -1), K)


def snapshot_hnsw(folder: Path, vectors: np.ndarray) -> faiss.Index:
    """The HNSW32 index the service saved, as plain FAISS; its labels are `vectors`' rows."""
    with np.load(folder / SNAPSHOT_NAME, allow_pickle=False) as archive:
        index = faiss.deserialize_index(archive["index"])
        label_keys = archive["label_keys"]
    stored = index.reconstruct_n(0, index.ntotal)
    # Labels are rows in upsert order, and the upsert sent the vectors in order.
    assert len(label_keys) == len(vectors) and np.allclose(stored, vectors, atol=1e-5)
    return index


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def choose_ef(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> list[tuple]:
    """(efSearch, recall@K) up the ladder until TARGET_RECALL is reached."""
    hnsw = faiss.downcast_index(index)
    points = []
    for value in EF_SEARCH_LADDER:
        hnsw.hnsw.efSearch = value
        _, found = index.search(queries, K)
        points.append((value, recall(found, truth)))
        if points[-1][1] >= TARGET_RECALL:
            break
    return points


def service_recall(service: ServiceProcess, queries: np.ndarray, truth: np.ndarray) -> float:
    """recall@K of the service's replies, which also must carry every match's metadata."""
    found = []
    for query in queries:
        request = search_pb2.SearchRequest(vector=search_pb2.Vector(values=query.tolist()), top_k=K)
        reply = service.stub.Search(request, timeout=30)
        assert all(m.product.name and m.product.gender for m in reply.matches), reply
        found.append([int(m.product.id) - 10_000 for m in reply.matches])
    return recall(np.array(found), truth)


# -- the run ---------------------------------------------------------------------------


def run() -> dict[str, Any]:
    everything = clustered(PRODUCTS + QUERIES)
    vectors, queries = everything[:PRODUCTS], everything[PRODUCTS:]
    products, _ = catalog(PRODUCTS)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :K]
    threads = SearchSettings().scan_threads
    figures: dict[str, Any] = {"products": PRODUCTS, "queries": QUERIES, "seconds": SECONDS}
    rows: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="vpm-query-bench-") as tmp,
        context.Pool(CLIENT_PROCESSES) as pool,
    ):
        work = Path(tmp)
        queries_path = work / "queries.npy"
        np.save(queries_path, queries)
        pool.starmap(_ready, [()] * CLIENT_PROCESSES)  # the clients' imports, before any window

        def measure(service: ServiceProcess, name: str, levels=CONCURRENCY) -> None:
            for concurrency in levels:
                rows[f"{name} c={concurrency}"] = over_rpc(pool, service, queries_path, concurrency)

        flat_dir, hnsw_dir = work / "flat", work / "hnsw"
        flat_dir.mkdir()
        hnsw_dir.mkdir()
        service = ServiceProcess(flat_dir)
        try:
            ingest_batches(service, products, vectors)
            figures["flat_recall"] = service_recall(service, queries[:100], truth[:100])
            measure(service, "service Flat")
        finally:
            service.stop()
        for concurrency in CONCURRENCY:
            search = flat_ceiling(vectors, concurrency, threads)
            rows[f"FAISS Flat c={concurrency}"] = in_process(search, queries, concurrency)

        # The process that takes the upsert, at the service's default efSearch ...
        service = ServiceProcess(hnsw_dir, "--index-factory=HNSW32")
        try:
            started = time.perf_counter()
            ingest_batches(service, products, vectors)
            figures["hnsw_upsert_s"] = time.perf_counter() - started
            measure(service, "HNSW32 just upserted, default efSearch", (1, 8))
        finally:
            service.stop()
        # ... and the same index from its snapshot, after a restart.
        service = ServiceProcess(hnsw_dir, "--index-factory=HNSW32")
        try:
            measure(service, "HNSW32 restarted, default efSearch", (1, 8))
        finally:
            service.stop()

        index = snapshot_hnsw(hnsw_dir, vectors)
        curve = figures["ef_curve"] = choose_ef(index, queries, truth)
        ef, ceiling_recall = curve[-1]
        figures["ef_search"], figures["ceiling_recall"] = ef, ceiling_recall
        service = ServiceProcess(
            hnsw_dir, "--index-factory=HNSW32", f"--index-params=efSearch={ef}"
        )
        try:
            figures["hnsw_recall"] = service_recall(service, queries, truth)
            measure(service, "service HNSW32")
        finally:
            service.stop()
        faiss.downcast_index(index).hnsw.efSearch = ef
        for concurrency in CONCURRENCY:
            search = lambda q: index.search(q.reshape(1, -1), K)  # noqa: E731
            rows[f"FAISS HNSW32 c={concurrency}"] = in_process(search, queries, concurrency)
    figures["rows"] = rows
    report(figures)
    record("query", figures)
    return figures


def report(figures: dict[str, Any]) -> None:
    rows, ef = figures["rows"], figures["ef_search"]
    print(
        "efSearch up the ladder (recall@10 on the bench's queries, in-process): "
        + ", ".join(f"{v}: {r:.3f}" for v, r in figures["ef_curve"])
    )
    print(
        f"recall@10 through the service: Flat {figures['flat_recall']:.3f} (100 queries), "
        f"HNSW32 efSearch {ef} {figures['hnsw_recall']:.3f} ({QUERIES} queries); "
        f"HNSW32 upsert of {figures['products']:,}: {figures['hnsw_upsert_s']:.1f} s"
    )
    lines = []
    for index in ("Flat", "HNSW32"):
        for concurrency in CONCURRENCY:
            ours = rows[f"service {index} c={concurrency}"]
            ceiling = rows[f"FAISS {index} c={concurrency}"]
            lines.append(
                [
                    f"{index}{f' ef {ef}' if index != 'Flat' else ''}",
                    concurrency,
                    ours["p50_ms"],
                    ours["p99_ms"],
                    ours["qps"],
                    ceiling["p50_ms"],
                    ceiling["p99_ms"],
                    ceiling["qps"],
                    ours["qps"] / ceiling["qps"],
                    ours["cpu_ms_per_query"],
                    ceiling["cpu_ms_per_query"],
                    ours["cpu_ms_per_query"] - ceiling["cpu_ms_per_query"],
                ]
            )
    header = [
        "index", "c", "p50 ms", "p99 ms", "q/s", "FAISS p50", "FAISS p99", "FAISS q/s",
        "RPC/FAISS", "svc CPU ms/q", "FAISS CPU ms/q", "outside ms/q",
    ]  # fmt: skip
    title = (
        f"Search RPC by vector, top {K} of {figures['products']:,} clustered 512-d, against FAISS "
        f"in-process on the same queries and threads ({SECONDS:.0f} s a window)"
    )
    print(table(title, header, lines))
    comparison = []
    for concurrency in (1, 8):
        upserted = rows[f"HNSW32 just upserted, default efSearch c={concurrency}"]
        restarted = rows[f"HNSW32 restarted, default efSearch c={concurrency}"]
        comparison.append(
            [
                concurrency,
                upserted["p50_ms"],
                restarted["p50_ms"],
                upserted["qps"],
                restarted["qps"],
                upserted["cpu_ms_per_query"],
                restarted["cpu_ms_per_query"],
            ]
        )
    header = ["c", "upserted p50", "restarted p50", "upserted q/s", "restarted q/s",
              "upserted CPU ms/q", "restarted CPU ms/q"]  # fmt: skip
    title = "HNSW32 (default efSearch): the process that took the upsert, then after a restart"
    print(table(title, header, comparison))
    print(
        "the clients' own CPU per query (grpc.aio, in their processes, on the same 2 cores): "
        + ", ".join(
            f"{name} {row['client_cpu_ms_per_query']:.3f} ms"
            for name, row in rows.items()
            if name.startswith("service")
        )
    )
    c8 = rows["service HNSW32 c=8"]
    outside = c8["cpu_ms_per_query"] - rows["FAISS HNSW32 c=8"]["cpu_ms_per_query"]
    checks = [
        (f"HNSW32 recall@10 >= {TARGET_RECALL}", figures["hnsw_recall"] >= TARGET_RECALL),
        (f"HNSW32 c=8 p50 {c8['p50_ms']:.2f} ms <= {TARGET_P50_MS}", c8["p50_ms"] <= TARGET_P50_MS),
        (f"HNSW32 c=8 {c8['qps']:,.0f} queries/s >= {TARGET_QPS:,.0f}", c8["qps"] >= TARGET_QPS),
        (
            f"service CPU outside the index, HNSW32 c=8: {outside:.3f} ms/query "
            f"<= {TARGET_OUTSIDE_MS}",
            outside <= TARGET_OUTSIDE_MS,
        ),
    ]
    for text, met in checks:
        print(f"{text}: {verdict(met)}")
