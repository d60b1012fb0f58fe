"""Search service: bulk ingest, search latency and throughput, HNSW recall, measured in one run.

ingest    42,700 products with 512-d vectors supplied, into catalog (SQLite) + index:
          the engine alone (domain), into SQLite and, when the machine's PostgreSQL
          answers (VPM_BENCH_POSTGRES), into a new PostgreSQL database; a real service
          process fed by UpsertProductBatches
          (metadata plus one packed float32 matrix a message), a fresh process each
          round beside the engine's own run, so that their ratio is measured side by
          side; and one UpsertProducts stream (a message a product) for comparison,
          beside the original prototype's way (one INSERT and one COMMIT per product,
          one index add per product), measured on a subset and extrapolated, and
          the ceiling: SQLite alone writing the same rows into the same schema with
          the catalog's settings and statements (multi-row INSERTs in 5,000-row
          transactions, synced as the engine syncs them, no FAISS, no checks);
          the engine and the ceiling in VPM_BENCH_ROUNDS (3) interleaved rounds, medians
          reported; and the checkpoint the engine's commits leave for the
          service's upkeep, timed after the upsert
latency   Search by vector and by product id over those 42,700 products through the
          real service process at concurrency 1, 8 and 32 (exact Flat index)
recall    HNSW32 recall@10 against exact search on 100,000 vectors
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import POSTGRES, closed_loop, median, percentile, record, table, timed
from search_service.engine import SearchEngine
from search_service.index.vector_index import VectorIndex, single_threaded
from search_service.models import Product
from search_service.settings import SearchSettings
from search_service.storage.catalog import (
    ROW_COLUMNS,
    SQLITE_PARAMETERS,
    WAL_AUTOCHECKPOINT_BYTES,
    Catalog,
    row_values,
    scratch_database,
)
from tests.support import free_port
from vpm.v1 import search_pb2, search_pb2_grpc
from vpm_common.matrix import pack

PRODUCTS = int(os.environ.get("VPM_BENCH_PRODUCTS", "42700"))
DIM = 512
NAIVE_SUBSET = 1000
# Products a ProductBatch message in the batched RPC's figure: the service's commit size.
RPC_BATCH = SearchSettings().batch_size
# Interleaved rounds of the bulk ingest paths: medians, and the per-round ratio to SQLite alone.
ROUNDS = int(os.environ.get("VPM_BENCH_ROUNDS", "3"))
RECALL_VECTORS = int(os.environ.get("VPM_BENCH_RECALL_VECTORS", "100000"))
REPO = Path(__file__).resolve().parents[2]
GENDERS = ("Men", "Women", "Boys", "Girls", "Unisex")
MASTERS = ("Apparel", "Accessories", "Footwear", "Personal Care", "Free Items")
COLOURS = ("Black", "White", "Blue", "Brown", "Grey", "Red", "Green", "Pink", "Navy Blue")


def catalog(count: int, seed: int = 0) -> tuple[list[Product], np.ndarray]:
    """Fashion-like metadata and random unit vectors."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = [
        Product(
            id=str(10_000 + i),
            name=f"Product {i}",
            gender=GENDERS[i % 5],
            master_category=MASTERS[i % 5],
            sub_category=f"Sub{i % 45}",
            article_type=f"Type{i % 143}",
            base_colour=COLOURS[i % 9],
            season=("Summer", "Winter", "Fall", "Spring")[i % 4],
            year=2008 + i % 12,
            usage=("Casual", "Formal", "Sports")[i % 3],
            model_id="bench-model",
        )
        for i in range(count)
    ]
    return products, vectors


# -- ingest ----------------------------------------------------------------------------


def engine_ingest(catalog: Catalog, folder: Path, products: list, vectors: np.ndarray) -> float:
    """Products/s of SearchEngine.upsert_products into the empty `catalog` and a Flat index."""
    engine = SearchEngine(catalog, folder)
    engine.load()
    seconds, summary = timed(lambda: engine.upsert_products(products, vectors))
    assert summary.inserted == len(products), summary
    return len(products) / seconds


def ingest_domain(
    folder: Path, products: list, vectors: np.ndarray, sync: str
) -> tuple[float, float]:
    """Products/s of the engine into a fresh SQLite catalog, and the seconds of the
    checkpoint the service's upkeep runs once writes pause."""
    catalog = Catalog.open(f"sqlite:///{folder}/domain-{sync}.db", sync)
    rate = engine_ingest(catalog, folder, products, vectors)
    checkpoint_s, (frames, copied) = timed(catalog.checkpoint)
    assert frames == copied > 0, (frames, copied)
    catalog.close()
    return rate, checkpoint_s


def ingest_postgres(folder: Path, products: list, vectors: np.ndarray) -> float:
    """Products/s of the engine into a new PostgreSQL database (dropped afterwards)."""
    with scratch_database(f"{POSTGRES}/postgres", "vpm_bench_ingest") as url:
        catalog = Catalog.open(url)
        rate = engine_ingest(catalog, folder, products, vectors)
        catalog.close()
    return rate


def postgres_answers() -> bool:
    try:
        with scratch_database(f"{POSTGRES}/postgres", "vpm_bench_probe"):
            return True
    except sa.exc.OperationalError as err:
        print(f"ingest into PostgreSQL skipped: {POSTGRES} is unreachable ({err.orig})")
        return False


def ingest_naive(folder: Path, products: list, vectors: np.ndarray) -> float:
    """Products/s the prototype's way: one INSERT and one COMMIT per product, one add each."""
    connection = sqlite3.connect(folder / "naive.db")
    connection.execute(
        "CREATE TABLE products (id TEXT PRIMARY KEY, name TEXT, gender TEXT, "
        "master_category TEXT, article_type TEXT, base_colour TEXT, year INTEGER, vector BLOB)"
    )
    index = faiss.IndexFlatIP(DIM)
    started = time.perf_counter()
    for product, vector in zip(products, vectors, strict=True):
        connection.execute(
            "INSERT INTO products VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                product.id,
                product.name,
                product.gender,
                product.master_category,
                product.article_type,
                product.base_colour,
                product.year,
                vector.tobytes(),
            ),
        )
        connection.commit()
        index.add(vector.reshape(1, -1))
    seconds = time.perf_counter() - started
    connection.close()
    return len(products) / seconds


def ingest_sqlite_alone(folder: Path, products: list, vectors: np.ndarray) -> float:
    """Rows/s of sqlite3 alone into the migrated catalog schema, as the catalog writes them.

    As a bulk upsert at synchronous FULL does: commits at NORMAL, the log fsynced
    on a second thread after each, the clock stopped once the last is synced.
    """
    name = "alone.db"
    Catalog.open(f"sqlite:///{folder}/{name}").close()  # the migrations make the schema
    connection = sqlite3.connect(folder / name, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA cache_size = -65536")
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    connection.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_BYTES // page_size}")
    rows = [
        (key, *row_values(product, vector), 1 + key // 5000)
        for key, (product, vector) in enumerate(zip(products, vectors, strict=True))
    ]
    # Multi-row INSERTs of as many rows as the catalog's own (SQLITE_PARAMETERS values each).
    per_statement = SQLITE_PARAMETERS // (1 + len(ROW_COLUMNS))
    head = f"INSERT INTO products (row_key, {', '.join(ROW_COLUMNS)}) VALUES "
    group = f"({', '.join('?' * (1 + len(ROW_COLUMNS)))})"
    log = os.open(folder / f"{name}-wal", os.O_RDONLY)  # the PRAGMAs above opened the log
    started = time.perf_counter()
    with ThreadPoolExecutor(1) as syncer:
        for start in range(0, len(rows), 5000):
            batch = rows[start : start + 5000]
            connection.execute("BEGIN")
            for first in range(0, len(batch), per_statement):
                chunk = batch[first : first + per_statement]
                values = tuple(itertools.chain.from_iterable(chunk))
                connection.execute(head + ", ".join([group] * len(chunk)), values)
            connection.execute("COMMIT")
            syncer.submit(os.fsync, log)
    seconds = time.perf_counter() - started
    os.close(log)
    connection.close()
    return len(rows) / seconds


def ingest_round(
    folder: Path, products: list, vectors: np.ndarray, postgres: bool
) -> dict[str, float]:
    """One round of the bulk paths side by side: the engine's, and SQLite alone's ceiling.

    Each writes into a folder of its own, removed afterwards: with earlier runs'
    files left in place (~200 MB each), later engine runs measured ~30% slower.
    """

    def domain(sync: str) -> Any:
        def measure(scratch: Path) -> float:
            rate, figures[f"checkpoint_after_{sync.lower()}_s"] = ingest_domain(
                scratch, products, vectors, sync
            )
            return rate

        return measure

    figures: dict[str, float] = {}

    def batches(scratch: Path) -> float:
        service = ServiceProcess(scratch)
        try:
            return ingest_batches(service, products, vectors)
        finally:
            service.stop()

    paths = {
        "ingest_domain_full": domain("FULL"),
        "ingest_rpc_batches": batches,
        "ingest_domain_normal": domain("NORMAL"),
        "sqlite_alone": lambda scratch: ingest_sqlite_alone(scratch, products, vectors),
    }
    if postgres:
        paths["ingest_domain_postgres"] = lambda scratch: ingest_postgres(
            scratch, products, vectors
        )
    for name, measure in paths.items():
        scratch = folder / name
        scratch.mkdir()
        figures[name] = measure(scratch)
        shutil.rmtree(scratch)
    return figures


class ServiceProcess:
    """`python -m search_service` on a free port, its catalog and snapshots in `folder`."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.port = free_port()
        self.log = open(folder / "service.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "search_service",
                "--host=127.0.0.1",
                f"--port={self.port}",
                "--metrics-port=0",
                f"--catalog-url=sqlite:///{folder}/service.db",
                f"--data-dir={folder}",
                "--log-level=WARNING",
                *args,
            ],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[("grpc.max_send_message_length", 1 << 30)],
        )
        self.stub = search_pb2_grpc.SearchStub(self.channel)
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                request = health_pb2.HealthCheckRequest(service="vpm.v1.Search")
                if health.Check(request, timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError("the search service did not become SERVING")

    def stop(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()


def product_message(product: Product) -> search_pb2.Product:
    """A product's metadata as the RPCs carry it (no vector, no model)."""
    return search_pb2.Product(
        id=product.id,
        name=product.name,
        gender=product.gender,
        master_category=product.master_category,
        sub_category=product.sub_category,
        article_type=product.article_type,
        base_colour=product.base_colour,
        season=product.season,
        year=product.year,
        usage=product.usage,
    )


def ingest_batches(service: ServiceProcess, products: list, vectors: np.ndarray) -> float:
    """Products/s of one UpsertProductBatches call, RPC_BATCH products and one float32
    matrix a message (messages built beforehand, not timed), synchronous=FULL; the first
    says how many the stream carries, as a bulk loader does (room is made once)."""
    messages = [
        search_pb2.ProductBatch(
            products=[product_message(p) for p in products[start : start + RPC_BATCH]],
            vectors=pack(vectors[start : start + RPC_BATCH]),
            model_id=products[start].model_id,
            stream_products=len(products) if start == 0 else 0,
        )
        for start in range(0, len(products), RPC_BATCH)
    ]
    seconds, summary = timed(lambda: service.stub.UpsertProductBatches(iter(messages), timeout=600))
    assert summary.inserted == len(products), summary
    return len(products) / seconds


def ingest_rpc(service: ServiceProcess, products: list, vectors: np.ndarray) -> float:
    """Products/s of one UpsertProducts stream (messages built beforehand, not timed)."""
    messages = [
        search_pb2.Product(
            id=p.id,
            name=p.name,
            gender=p.gender,
            master_category=p.master_category,
            sub_category=p.sub_category,
            article_type=p.article_type,
            base_colour=p.base_colour,
            season=p.season,
            year=p.year,
            usage=p.usage,
            vector=v.tolist(),
            model_id=p.model_id,
        )
        for p, v in zip(products, vectors, strict=True)
    ]
    seconds, summary = timed(lambda: service.stub.UpsertProducts(iter(messages), timeout=600))
    assert summary.inserted == len(products), summary
    return len(products) / seconds


# -- latency ---------------------------------------------------------------------------


def load_test(
    call: Any, requests: list, concurrency: int, seconds: float = 4.0
) -> dict[str, float]:
    """p50 / p99 latency (ms) and throughput (requests/s) of `call` at `concurrency`."""
    for request in requests[:20]:
        call(request)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = closed_loop(call, requests, concurrency, seconds, pool)
    elapsed = time.perf_counter() - started
    return {
        "p50_ms": 1000 * median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
        "qps": len(latencies) / elapsed,
    }


def domain_latency(vectors: np.ndarray, plain: bool, threads: int) -> float:
    """p50 ms of a single exact top-10 search in-process on `threads`: ours, or plain FAISS.

    Ours splits its float16 copy in `threads` shards scanned in parallel; the
    plain baseline is FAISS's own IndexShards of as many IndexFlatIP, searched in
    parallel by FAISS's threads (a flat index alone scans one query on one
    thread, whatever OpenMP allows).
    """
    queries = vectors[np.random.default_rng(1).choice(len(vectors), 200, replace=False)]
    keys = np.arange(len(vectors), dtype=np.int64)
    if plain:
        index = plain_flat(vectors, keys, threads)
        search = lambda q: index.search(q.reshape(1, -1), 10)  # noqa: E731
    else:
        ours = VectorIndex(DIM, scan_threads=threads)
        ours.put(keys, vectors)
        search = lambda q: ours.search(q, 10)  # noqa: E731

    def measure() -> list[float]:
        return [timed(lambda q=query: search(q))[0] for query in queries]

    return 1000 * median(in_search_thread(measure))


def plain_flat(vectors: np.ndarray, keys: np.ndarray, threads: int) -> Any:
    """Plain float32 IndexFlatIP, in `threads` shards (key % threads) FAISS searches in parallel."""
    shards = [faiss.IndexIDMap2(faiss.IndexFlatIP(DIM)) for _ in range(threads)]
    for part, shard in enumerate(shards):
        mine = keys % threads == part
        shard.add_with_ids(vectors[mine], keys[mine])
    if threads == 1:
        return shards[0]
    index = faiss.IndexShards(DIM, True, False)  # threaded, ids as given
    for shard in shards:
        index.add_shard(shard)  # FAISS's wrapper keeps a reference to each shard
    return index


def in_search_thread(work: Any) -> Any:
    """Run `work` on a thread set up as the service's search threads are (one OpenMP thread)."""
    with ThreadPoolExecutor(1, initializer=single_threaded) as pool:
        return pool.submit(work).result()


# -- recall ----------------------------------------------------------------------------


def hnsw_recall(count: int) -> dict[str, float]:
    """recall@10 of HNSW32 (the service's VectorIndex, default efSearch) against exact.

    The vectors lie near a 32-dimensional subspace, as embeddings of real images
    do; isotropic random 512-d vectors are the worst case for any graph index.
    """
    rng = np.random.default_rng(7)
    latent = rng.standard_normal((count, 32), dtype=np.float32)
    vectors = latent @ rng.standard_normal((32, DIM), dtype=np.float32)
    vectors += 0.5 * rng.standard_normal((count, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(count, 200, replace=False)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape, dtype=np.float32) / DIM**0.5
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    keys = np.arange(count, dtype=np.int64)
    exact = VectorIndex(DIM)
    exact.put(keys, vectors)
    hnsw = VectorIndex(DIM, "HNSW32")
    build_s, _ = timed(lambda: hnsw.put(keys, vectors))

    def measure() -> tuple[int, list[float], list[float]]:
        hits, exact_s, hnsw_s = 0, [], []
        for query in queries:
            seconds, (truth, _) = timed(lambda q=query: exact.search(q, 10))
            exact_s.append(seconds)
            seconds, (found, _) = timed(lambda q=query: hnsw.search(q, 10))
            hnsw_s.append(seconds)
            hits += len(set(truth.tolist()) & set(found.tolist()))
        return hits, exact_s, hnsw_s

    hits, exact_s, hnsw_s = in_search_thread(measure)
    return {
        "recall_at_10": hits / (10 * len(queries)),
        "build_s": build_s,
        "exact_p50_ms": 1000 * median(exact_s),
        "hnsw_p50_ms": 1000 * median(hnsw_s),
    }


# -- the run ---------------------------------------------------------------------------


def run() -> dict[str, Any]:
    products, vectors = catalog(PRODUCTS)
    figures: dict[str, Any] = {"products": PRODUCTS, "dim": DIM}
    with tempfile.TemporaryDirectory(prefix="vpm-search-bench-") as tmp:
        folder = Path(tmp)
        rounds = []
        postgres = postgres_answers()
        for _ in range(ROUNDS):
            rounds.append(ingest_round(folder, products, vectors, postgres))
        figures["ingest_rounds"] = rounds
        for name in rounds[0]:
            figures[name] = median([round_[name] for round_ in rounds])
        figures["ingest_naive"] = ingest_naive(
            folder, products[:NAIVE_SUBSET], vectors[:NAIVE_SUBSET]
        )
        service = ServiceProcess(folder)
        try:
            figures["ingest_rpc"] = ingest_rpc(service, products, vectors)
            figures["latency"] = search_latency(service, products, vectors)
        finally:
            service.stop()
    # One query on the service's --scan-threads, ours and FAISS's plain flat scan alike;
    # the plain scan on one thread too, since on a busy machine it may do better there.
    threads = figures["scan_threads"] = SearchSettings().scan_threads
    figures["domain_p50_ms"] = domain_latency(vectors, plain=False, threads=threads)
    figures["domain_plain_flat_p50_ms"] = domain_latency(vectors, plain=True, threads=threads)
    figures["domain_plain_flat_1_thread_p50_ms"] = domain_latency(vectors, plain=True, threads=1)
    figures["hnsw"] = hnsw_recall(RECALL_VECTORS)
    print_tables(figures)
    record("search", figures)
    return figures


def search_latency(service: ServiceProcess, products: list, vectors: np.ndarray) -> dict:
    rng = np.random.default_rng(3)
    picks = rng.choice(len(products), 500, replace=False)
    by_vector = [
        search_pb2.SearchRequest(vector=search_pb2.Vector(values=vectors[i].tolist()), top_k=10)
        for i in picks
    ]
    by_id = [search_pb2.SearchRequest(product_id=products[i].id, top_k=10) for i in picks]
    results = {}
    for name, requests in (("vector", by_vector), ("product_id", by_id)):
        for concurrency in (1, 8, 32):
            results[f"{name} c={concurrency}"] = load_test(
                service.stub.Search, requests, concurrency
            )
    return results


def print_tables(figures: dict[str, Any]) -> None:
    count, naive = figures["products"], figures["ingest_naive"]
    paths = [
        ("engine (domain), SQLite synchronous=FULL", figures["ingest_domain_full"]),
        ("engine (domain), SQLite synchronous=NORMAL", figures["ingest_domain_normal"]),
        *(
            [("engine (domain), PostgreSQL (the machine's)", figures["ingest_domain_postgres"])]
            if "ingest_domain_postgres" in figures
            else []
        ),
        (
            f"service process, UpsertProductBatches ({RPC_BATCH:,} a message), FULL",
            figures["ingest_rpc_batches"],
        ),
        ("service process, one UpsertProducts stream (a message a product)", figures["ingest_rpc"]),
        (f"naive: INSERT + COMMIT per product ({NAIVE_SUBSET:,} measured, extrapolated)", naive),
        ("ceiling: SQLite alone, same rows into the same schema", figures["sqlite_alone"]),
    ]
    title = (
        f"Bulk ingest of {count:,} products with {DIM}-d vectors (target >= 50,000/s, domain); "
        f"median of {len(figures['ingest_rounds'])} interleaved rounds where measured so"
    )
    header = ["path", "products/s", f"s for {count:,}", "x naive"]
    print(table(title, header, [[name, rate, count / rate, rate / naive] for name, rate in paths]))
    checkpoint_s = median(
        [round_["checkpoint_after_full_s"] for round_ in figures["ingest_rounds"]]
    )
    print(
        f"then, off the write path: {checkpoint_s:.3f} s to checkpoint the log into the "
        "database file (the service's upkeep does it once writes pause)"
    )
    rows = [
        [
            number + 1,
            round_["ingest_domain_full"],
            round_["sqlite_alone"],
            round_["ingest_domain_full"] / round_["sqlite_alone"],
        ]
        for number, round_ in enumerate(figures["ingest_rounds"])
    ]
    header = ["round", "engine FULL /s", "SQLite alone /s", "engine / SQLite alone"]
    print(table("Bulk ingest, round by round", header, rows))
    rows = [
        [
            number + 1,
            round_["ingest_rpc_batches"],
            round_["ingest_domain_full"],
            round_["ingest_rpc_batches"] / round_["ingest_domain_full"],
        ]
        for number, round_ in enumerate(figures["ingest_rounds"])
    ]
    header = ["round", "UpsertProductBatches /s", "engine FULL /s", "RPC / engine"]
    title = "Search ingest over RPC beside the engine (targets >= 40,000/s and >= 0.7x)"
    print(table(title, header, rows))
    print()
    title = f"Search through the RPC, exact Flat, top 10 of {count:,} (target p50 <= 5 ms at c=1)"
    header = ["query, concurrency", "p50 ms", "p99 ms", "requests/s"]
    rows = [[name, r["p50_ms"], r["p99_ms"], r["qps"]] for name, r in figures["latency"].items()]
    print(table(title, header, rows))
    print(
        f"one query in-process on {figures['scan_threads']} threads, p50: "
        f"{figures['domain_p50_ms']:.2f} ms (float16 scan + float32 rescoring, exact) vs "
        f"{figures['domain_plain_flat_p50_ms']:.2f} ms (plain IndexFlatIP in as many shards; "
        f"{figures['domain_plain_flat_1_thread_p50_ms']:.2f} ms on one thread)"
    )
    print()
    hnsw = figures["hnsw"]
    title = f"HNSW32 (efSearch 128) on {RECALL_VECTORS:,} vectors (target recall@10 >= 0.95)"
    header = ["recall@10", "build s", "exact p50 ms", "HNSW p50 ms"]
    row = [hnsw["recall_at_10"], hnsw["build_s"], hnsw["exact_p50_ms"], hnsw["hnsw_p50_ms"]]
    print(table(title, header, [row]))
