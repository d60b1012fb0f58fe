"""Measure what one product costs: catalog bytes on disk and search-service memory per index.

    .venv/bin/python deploy/sizing.py --count 50000 --index Flat,HNSW32 \
        --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

Fills a fresh catalog (SQLite, and PostgreSQL when --postgres names a server
where a scratch database may be created and dropped) with fashion-like
products and random unit vectors of 512 dimensions through the catalog's own
upsert, then loads the search engine over it in a fresh process per index
type and reports the resident memory it added, per product, and what the
vector index alone adds (the rest is the product records the service keeps in
memory for filters and replies). deploy/README.md quotes the figures ("Sizing").
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 512
MODEL_ID = "open_clip:ViT-B-32:laion2b_s34b_b79k:512"
ARTICLES = ("Tshirts", "Shirts", "Casual Shoes", "Watches", "Handbags", "Jeans", "Tops", "Kurtas")
COLOURS = ("Black", "White", "Blue", "Red", "Green", "Navy Blue", "Grey", "Brown")


def products(start: int, count: int, rng: np.random.Generator) -> list[tuple]:
    from search_service.models import Product

    vectors = rng.standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = []
    for offset in range(count):
        i = start + offset
        article, colour = ARTICLES[i % len(ARTICLES)], COLOURS[i % len(COLOURS)]
        product = Product(
            id=str(10000 + i),
            name=f"Brand {i % 500} Men {colour} {article} {i}",
            gender=("Men", "Women", "Unisex")[i % 3],
            master_category="Apparel",
            sub_category="Topwear",
            article_type=article,
            base_colour=colour,
            season=("Summer", "Fall", "Winter", "Spring")[i % 4],
            year=2010 + i % 10,
            usage="Casual",
            category="Apparel",
            image_sha256=hashlib.sha256(str(i).encode()).hexdigest(),
            model_id=MODEL_ID,
        )
        items.append((product, vectors[offset]))
    return items


def fill(url: str, count: int, batch: int = 5000) -> None:
    from search_service.storage.catalog import Catalog

    catalog = Catalog.open(url, "NORMAL")
    rng = np.random.default_rng(0)
    try:
        for start in range(0, count, batch):
            catalog.upsert(products(start, min(batch, count - start), rng))
    finally:
        catalog.close()


def postgres_bytes(url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        size = conn.exec_driver_sql(
            "SELECT pg_total_relation_size('products') + pg_total_relation_size('deletions')"
        ).scalar_one()
    engine.dispose()
    return int(size)


def resident_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, as a steady state would
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_index(count: int, factory: str) -> dict:
    """In this process: resident memory the vector index alone adds for `count` vectors."""
    from search_service.index.vector_index import VectorIndex

    rng = np.random.default_rng(0)
    before = resident_bytes()
    index = VectorIndex(DIM, factory)
    for start in range(0, count, 5000):
        batch = min(5000, count - start)
        vectors = rng.standard_normal((batch, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index.put(np.arange(start, start + batch, dtype=np.int64), vectors)
    del vectors
    after = resident_bytes()
    return {"factory": factory, "products": len(index), "added_bytes": after - before}


def measure_engine(url: str, factory: str) -> dict:
    """In this process: resident memory before and after loading an engine over `url`."""
    from search_service.engine import SearchEngine
    from search_service.storage.catalog import Catalog

    catalog = Catalog.open(url, "NORMAL")
    with tempfile.TemporaryDirectory() as data_dir:
        engine = SearchEngine(catalog, Path(data_dir), index_factory=factory, search_threads=1)
        before = resident_bytes()
        engine.load()
        after = resident_bytes()
        count = len(engine.mirror.records)
        engine.save_snapshot()
        snapshot = sum(p.stat().st_size for p in Path(data_dir).iterdir() if p.is_file())
        engine.close()
    return {
        "factory": factory,
        "products": count,
        "added_bytes": after - before,
        "snapshot_bytes": snapshot,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--index", default="Flat,HNSW32")
    parser.add_argument("--postgres", default="", help="admin URL of a PostgreSQL server")
    parser.add_argument("--engine-only", nargs=2, help=argparse.SUPPRESS)  # URL FACTORY
    parser.add_argument("--index-only", nargs=2, help=argparse.SUPPRESS)  # COUNT FACTORY
    args = parser.parse_args()
    if args.engine_only:
        print(json.dumps(measure_engine(*args.engine_only)))
        return 0
    if args.index_only:
        print(json.dumps(measure_index(int(args.index_only[0]), args.index_only[1])))
        return 0
    report: dict = {"count": args.count, "dim": DIM}
    with tempfile.TemporaryDirectory() as work:
        sqlite = f"sqlite:///{work}/catalog.db"
        fill(sqlite, args.count)
        report["sqlite_bytes_per_product"] = round(
            (Path(work) / "catalog.db").stat().st_size / args.count
        )
        if args.postgres:
            report["postgres_bytes_per_product"] = round(_postgres(args.postgres, args.count))
        for factory in args.index.split(","):
            engine = _in_fresh_process("--engine-only", sqlite, factory)
            index = _in_fresh_process("--index-only", str(args.count), factory)
            report[factory] = {
                "memory_bytes_per_product": round(engine["added_bytes"] / engine["products"]),
                "index_memory_bytes_per_product": round(index["added_bytes"] / index["products"]),
                "snapshot_bytes_per_product": round(engine["snapshot_bytes"] / engine["products"]),
            }
    print(json.dumps(report, indent=2))
    return 0


def _in_fresh_process(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _postgres(admin_url: str, count: int) -> float:
    from search_service.storage.catalog import scratch_database

    with scratch_database(admin_url, "vpm_sizing") as url:
        fill(url, count)
        return postgres_bytes(url) / count


if __name__ == "__main__":
    sys.exit(main())
