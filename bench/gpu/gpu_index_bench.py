"""The index on a GPU against the index on this machine's CPU cores, side by side in one run.

For each catalog size (1M and 10M 512-d unit vectors by default) and kind (random,
clustered), one device after the other: build time and GPU memory; exact top-10
checked against a brute-force oracle (torch on the GPU, else numpy); p50 latency at
concurrency 1 and queries/s at concurrency 64 through the Search RPC of an
in-process server (client processes of their own, so they share no interpreter
lock with it). Then where the GPU stops paying: p50 of one search straight on the
index for small catalogs, both devices.

The RPC server's engine gets its mirror filled directly, not through a catalog (10M
rows of SQL would take the whole time box); its products share a few metadata
records, which costs a reply what a real one costs.

    python -m bench.gpu.gpu_index_bench [--smoke] [--sizes 1000000,10000000] [--budget-s 240]

--smoke: tiny sizes, a few queries; without a GPU FAISS, "cuda" runs on CPU indexes standing
in for the GPU ones (as in tests/search/index/test_index_device.py), so the script and the cuda code
path through the RPC are proven end to end anywhere; its figures then mean nothing.
JSON goes to $OUT/gpu_index.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, percentile, table

DIM = 512
K = 10
CONCURRENCY = 64
CLIENT_PROCESSES = 4


# -- vectors and the oracle --------------------------------------------------------------------


def make_vectors(count: int, kind: str, seed: int = 0) -> np.ndarray:
    """Unit vectors, made on the GPU with torch when there is one (10M in seconds), else numpy."""
    out = np.empty((count, DIM), dtype=np.float32)
    chunk = 1_000_000
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        generator = torch.Generator(device="cuda").manual_seed(seed)
        centres = torch.randn(1000, DIM, device="cuda", generator=generator)
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            rows = torch.randn(n, DIM, device="cuda", generator=generator)
            if kind == "clustered":
                pick = torch.randint(0, 1000, (n,), device="cuda", generator=generator)
                rows = centres[pick] + 0.3 * rows
            rows /= rows.norm(dim=1, keepdim=True)
            out[start : start + n] = rows.cpu().numpy()
        return out
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIM), dtype=np.float32)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        rows = rng.standard_normal((n, DIM), dtype=np.float32)
        if kind == "clustered":
            rows = centres[rng.integers(0, 1000, n)] + 0.3 * rows
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start : start + n] = rows
    return out


def oracle(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The true best k rows per query, by float32 brute force (torch on the GPU, else numpy)."""
    try:
        import torch

        if torch.cuda.is_available():
            q = torch.from_numpy(queries).cuda()
            best_s, best_i = None, None
            for start in range(0, len(vectors), 2_000_000):
                part = torch.from_numpy(vectors[start : start + 2_000_000]).cuda()
                s, i = torch.topk(q @ part.T, k, dim=1)
                i += start
                if best_s is not None:
                    s, order = torch.topk(torch.cat([best_s, s], 1), k, dim=1)
                    i = torch.gather(torch.cat([best_i, i], 1), 1, order)
                best_s, best_i = s, i
            return best_i.cpu().numpy()
    except ImportError:
        pass
    scores = queries @ vectors.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def gpu_memory_used_mib() -> float | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return float(out.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


# -- the index and the in-process server ---------------------------------------------------------


def build_index(vectors: np.ndarray, device: str) -> Any:
    from search_service.index.vector_index import VectorIndex, all_cores

    scan_threads = min(16, os.cpu_count() or 1) if device == "cpu" else 1
    index = VectorIndex(DIM, scan_threads=scan_threads, device=device)
    index.reserve(len(vectors))
    with all_cores():
        for start in range(0, len(vectors), 500_000):
            part = vectors[start : start + 500_000]
            index.put(np.arange(start, start + len(part), dtype=np.int64), part)
    return index


class InProcessService:
    """A real Search server on a free port over an engine whose mirror holds `index`."""

    def __init__(self, index: Any, count: int, tmp: Path) -> None:
        from search_service.engine import SearchEngine
        from search_service.models import Product
        from search_service.rpc.server import SearchApp, create_server
        from search_service.settings import SearchSettings
        from search_service.storage.catalog import Catalog
        from tests.support import ServerThread

        catalog = Catalog.open(f"sqlite:///{tmp / 'catalog.db'}", "NORMAL", 1)
        engine = SearchEngine(catalog, tmp, search_threads=CONCURRENCY)
        shared = [
            Product(id=f"p{i}", name=f"Product {i}", model_id="bench", article_type="Tshirts")
            for i in range(16)
        ]
        mirror = engine.mirror
        mirror.index, mirror.dim, mirror.model_id = index, DIM, "bench"
        mirror.records = {key: shared[key % 16] for key in range(count)}
        engine.loaded = True
        settings = SearchSettings(host="127.0.0.1", port=0, metrics_port=0)

        async def build():  # noqa: ANN202 - ServerThread's builder
            return await create_server(settings, SearchApp(engine))

        self.engine, self.catalog = engine, catalog
        self.thread = ServerThread(build)
        self.thread.start()

    def close(self) -> None:
        self.thread.stop(0)
        self.engine.mirror.records = {}
        self.catalog.close()


def _client(
    target: str, queries: np.ndarray, threads: int, per_thread: int, seconds: float
) -> list[float]:
    """In a client process: `threads` callers, each making `per_thread` Search calls by vector
    or as many as fit in `seconds` (3 at least); the latency of each call, in seconds."""
    import grpc

    from vpm.v1 import search_pb2, search_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = search_pb2_grpc.SearchStub(channel)
    requests = [
        search_pb2.SearchRequest(vector=search_pb2.Vector(values=q.tolist()), top_k=K)
        for q in queries
    ]
    stub.Search(requests[0], timeout=60)  # connected
    latencies: list[float] = []
    lock = threading.Lock()

    stop_at = time.perf_counter() + seconds

    def caller(number: int) -> None:
        mine: list[float] = []
        for i in range(per_thread):
            if i >= 3 and time.perf_counter() > stop_at:
                break
            started = time.perf_counter()
            stub.Search(requests[(number * per_thread + i) % len(requests)], timeout=120)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(caller, range(threads)))
    channel.close()
    return latencies


def through_rpc(
    target: str, queries: np.ndarray, solo: int, loaded: int, seconds: float
) -> dict[str, float]:
    """p50 at concurrency 1 (`solo` calls) and queries/s at concurrency 64 (`loaded` calls),
    each for `seconds` at most."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(CLIENT_PROCESSES, mp_context=context) as pool:
        one = pool.submit(_client, target, queries, 1, solo, seconds).result()
        threads = CONCURRENCY // CLIENT_PROCESSES
        per_thread = max(1, loaded // CONCURRENCY)
        started = time.perf_counter()
        parts = [
            pool.submit(_client, target, queries, threads, per_thread, seconds)
            for _ in range(CLIENT_PROCESSES)
        ]
        many = [latency for part in parts for latency in part.result()]
        elapsed = time.perf_counter() - started
    return {
        "p50_ms_c1": 1000 * percentile(one, 50),
        "p99_ms_c1": 1000 * percentile(one, 99),
        "qps_c64": len(many) / elapsed,
        "p50_ms_c64": 1000 * percentile(many, 50),
    }


# -- the runs -------------------------------------------------------------------------------------


def measure(
    vectors: np.ndarray, device: str, queries: np.ndarray, truth: np.ndarray, args: Any
) -> dict[str, Any]:
    gc.collect()
    memory_before = gpu_memory_used_mib() if device == "cuda" else None
    started = time.perf_counter()
    index = build_index(vectors, device)
    result: dict[str, Any] = {"build_s": time.perf_counter() - started}
    if memory_before is not None:
        after = gpu_memory_used_mib()
        result["gpu_memory_mib"] = None if after is None else after - memory_before
    exact = 0
    for query, expected in zip(queries[: len(truth)], truth, strict=True):
        found, _ = index.search(query, K)
        exact += int(set(found.tolist()) == set(expected.tolist()))
    result["exact_top10"] = f"{exact}/{len(truth)}"
    with tempfile.TemporaryDirectory() as tmp:
        service = InProcessService(index, len(vectors), Path(tmp))
        try:
            result |= through_rpc(
                service.thread.target, queries, args.queries, args.load_queries, args.rpc_s
            )
        finally:
            service.close()
    replica = getattr(index, "_replica", None)
    if replica is not None:
        result["gpu_batches"] = replica.search.batches
        result["gpu_queries"] = replica.search.queries
    del index
    gc.collect()
    return result


def crossover(vectors: np.ndarray, devices: list[str], sizes: list[int], queries: np.ndarray):
    """p50 of one search straight on the index, per size and device: where the GPU stops paying."""
    from search_service.index.vector_index import single_threaded

    single_threaded()  # as on the service's search threads
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"size": size}
        for device in devices:
            index = build_index(vectors[:size], device)
            for query in queries[:5]:
                index.search(query, K)  # warm
            samples = []
            for query in queries:
                started = time.perf_counter()
                index.search(query, K)
                samples.append(time.perf_counter() - started)
            row[f"{device}_p50_ms"] = 1000 * percentile(samples, 50)
            del index
        rows.append(row)
    return rows


def stand_in_for_gpu() -> None:
    """Smoke runs without a GPU: CPU indexes answer the device layer's calls."""
    import faiss

    from search_service.index import gpu

    gpu.new_flat_replica = lambda dim: faiss.IndexScalarQuantizer(
        dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    gpu.copy_to_gpu = faiss.clone_index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; CPU alone without a GPU")
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--kinds", default="random,clustered")
    parser.add_argument("--queries", type=int, default=200, help="calls at concurrency 1")
    parser.add_argument("--load-queries", type=int, default=3200, help="calls at concurrency 64")
    parser.add_argument("--checked", type=int, default=10, help="queries checked by the oracle")
    parser.add_argument("--rpc-s", type=float, default=6, help="seconds per concurrency level")
    parser.add_argument("--crossover", default="10000,30000,100000,300000,1000000")
    parser.add_argument("--budget-s", type=float, default=240, help="steps past it are skipped")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.crossover = "20000", "2000,20000"
        args.queries, args.load_queries, args.checked = 20, 256, 5
    deadline = time.monotonic() + args.budget_s

    from search_service.index.gpu import gpu_missing

    missing = gpu_missing()
    figures: dict[str, Any] = {"machine": machine(), "gpu_missing": missing, "runs": []}
    if missing is not None and not args.smoke:
        print(f"gpu_index_bench: no GPU FAISS here ({missing}); nothing to compare", flush=True)
        return write(figures)
    if missing is not None:
        stand_in_for_gpu()
        figures["gpu_missing"] = f"{missing}: cuda ran on CPU stand-ins"
    devices = ["cpu", "cuda"]
    # The crossover first: it is cheap, and says where the GPU stops paying.
    sweep = [int(size) for size in args.crossover.split(",")]
    vectors = make_vectors(max(sweep), "random", seed=3)
    figures["crossover"] = crossover(vectors, devices, sweep, vectors[:50] * 0.99)
    write(figures)
    del vectors
    sizes = [int(size) for size in args.sizes.split(",")]
    rng = np.random.default_rng(1)
    for size in sizes:
        for kind in args.kinds.split(","):
            # A 10M step (vectors, oracle, both devices) takes about 100 s on an H200 machine.
            if deadline - time.monotonic() < 10 + 100 * size / 10_000_000:
                figures["runs"].append({"size": size, "kind": kind, "skipped": "budget"})
                continue
            vectors = make_vectors(size, kind)
            queries = vectors[rng.integers(0, size, max(args.queries, 64))].copy()
            queries += rng.standard_normal(queries.shape).astype(np.float32) * 0.05
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            truth = oracle(vectors, queries[: args.checked], K)
            for device in devices:
                if time.monotonic() > deadline:
                    figures["runs"].append({"size": size, "kind": kind, "device": device,
                                            "skipped": "budget"})  # fmt: skip
                    continue
                run = {"size": size, "kind": kind, "device": device}
                run |= measure(vectors, device, queries, truth, args)
                figures["runs"].append(run)
                print(json.dumps(run), flush=True)
                write(figures)  # a step killed later leaves these
            del vectors
            gc.collect()
    done = [run for run in figures["runs"] if "skipped" not in run]
    columns = ["size", "kind", "device", "build_s", "gpu_memory_mib", "exact_top10",
               "p50_ms_c1", "qps_c64", "p50_ms_c64"]  # fmt: skip
    print(table("exact top-10 through the Search RPC", columns,
                [[run.get(c, "-") for c in columns] for run in done]))  # fmt: skip
    if figures.get("crossover"):
        keys = list(figures["crossover"][0])
        print(table("one search on the index, p50 ms", keys,
                    [[row[k] for k in keys] for row in figures["crossover"]]))  # fmt: skip
    write(figures)
    if os.environ.get("OUT"):
        print(f"wrote {os.environ['OUT']}/gpu_index.json")
    return 0


def write(figures: dict[str, Any]) -> int:
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_index.json"
        path.write_text(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
