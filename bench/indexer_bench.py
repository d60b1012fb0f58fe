"""End-to-end indexing, files on disk to searchable products: ours vs a naive prototype pipeline.

  ours (1 encoder)   encoder + search as real processes, `python -m indexer` streaming
  ours (2 encoders)  the same with two encoder processes on this machine, and how the
                     images were spread between them
  naive              per-file PIL load + open_clip preprocess + PyTorch eager at batch 32,
                     then one INSERT + commit per product into SQLite, one process

All on the real ViT-B-32 architecture (seeded random weights), 640x480 JPEGs.
On a 2-core machine two encoder processes cannot add arithmetic, so no gain
is expected from the second one: the point there is the mechanism.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.common import record, table
from tests import images
from tests.support import ROOT, ServiceProcess, free_port
from vpm.v1 import search_pb2, search_pb2_grpc

MODEL = os.environ.get("VPM_BENCH_MODEL", "ViT-B-32")
# Enough images that the indexer's own start (imports, plan, catalog listing) is amortized.
IMAGES = int(os.environ.get("VPM_BENCH_INDEX_IMAGES", "240"))
CACHE = Path(os.environ.get("VPM_BENCH_CACHE", Path.home() / ".cache" / "vpm"))


def make_catalog(folder: Path, count: int) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = [
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    ]
    for index in range(count):
        (folder / "images" / f"{index}.jpg").write_bytes(images.jpeg(640, 480, seed=index))
        lines.append(f"{index},Men,Apparel,Topwear,Tshirts,Blue,Fall,2012,Casual,Product {index}")
    (folder / "styles.csv").write_text("\n".join(lines) + "\n")
    return folder


def ours(catalog: Path, work: Path, encoders: int) -> dict[str, Any]:
    """Index with `encoders` encoder processes, timed from the indexer's start to its end."""
    ports = [free_port() for _ in range(encoders)]
    started = []
    try:
        for index, port in enumerate(ports):
            process = ServiceProcess(
                "encoder_service",
                ["--model", MODEL, "--pretrained", "none", "--port", str(port),
                 "--metrics-port", "0", "--cache-dir", str(CACHE)],
                work / f"encoder-{encoders}-{index}.log",
            )  # fmt: skip
            started.append(process)
        for process, port in zip(started, ports, strict=True):
            process.wait_serving(f"127.0.0.1:{port}", "vpm.v1.Encoder", timeout_s=600)
        search_port = free_port()
        data = work / f"search-{encoders}"
        search = ServiceProcess(
            "search_service",
            ["--port", str(search_port), "--data-dir", str(data), "--catalog-url", f"sqlite:///{data}/catalog.db",
             "--metrics-port", "0"],
            work / f"search-{encoders}.log",
        )  # fmt: skip
        started.append(search)
        search.wait_serving(f"127.0.0.1:{search_port}", "vpm.v1.Search")
        summary_path = work / f"summary-{encoders}.json"
        begin = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "indexer", "--styles", str(catalog / "styles.csv"),
             "--images", str(catalog / "images"), "--progress", "off", "--log-level", "WARNING",
             "--encoder", ",".join(f"127.0.0.1:{port}" for port in ports),
             "--search", f"127.0.0.1:{search_port}", "--summary-json", str(summary_path)],
            cwd=ROOT, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - begin
        summary = json.loads(summary_path.read_text())
        stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{search_port}"))
        searchable = stub.GetStats(search_pb2.GetStatsRequest(), timeout=10).products
        assert summary["encoded"] == IMAGES and searchable == IMAGES, (summary, searchable)
        return {
            "seconds": seconds,
            "images_per_s": IMAGES / seconds,
            "spread": summary["encoder_spread"],
        }
    finally:
        for process in started:
            process.stop()


def naive(catalog: Path, work: Path) -> dict[str, Any]:
    """The prototype's way, in one process: PIL per file, batch 32, a commit per row."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    model.eval()
    database = sqlite3.connect(work / "naive.db")
    database.execute("CREATE TABLE products (id TEXT PRIMARY KEY, name TEXT, vector BLOB)")
    paths = sorted((catalog / "images").glob("*.jpg"))
    begin = time.perf_counter()
    vectors = []
    with torch.no_grad():
        for start in range(0, len(paths), 32):
            chunk = paths[start : start + 32]
            pixels = torch.stack(
                [preprocess(Image.open(io.BytesIO(p.read_bytes())).convert("RGB")) for p in chunk]
            )
            features = model.encode_image(pixels)
            features = features / features.norm(dim=-1, keepdim=True)
            for path, vector in zip(chunk, features.numpy(), strict=True):
                database.execute(
                    "INSERT INTO products VALUES (?, ?, ?)",
                    (path.stem, path.stem, vector.tobytes()),
                )
                database.commit()
                vectors.append(vector)
    index = np.stack(vectors)  # the prototype's "index": a numpy matrix
    seconds = time.perf_counter() - begin
    database.close()
    assert index.shape[0] == IMAGES
    return {"seconds": seconds, "images_per_s": IMAGES / seconds}


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vpm-index-bench-") as tmp:
        work = Path(tmp)
        catalog = make_catalog(work / "catalog", IMAGES)
        one = ours(catalog, work, 1)
        two = ours(catalog, work, 2)
        baseline = naive(catalog, work)
    rows = [
        [
            "ours, 1 encoder process",
            one["seconds"],
            one["images_per_s"],
            one["images_per_s"] / baseline["images_per_s"],
        ],
        [
            "ours, 2 encoder processes",
            two["seconds"],
            two["images_per_s"],
            two["images_per_s"] / baseline["images_per_s"],
        ],
        [
            "naive: PIL, batch 32, INSERT+commit per row",
            baseline["seconds"],
            baseline["images_per_s"],
            1.0,
        ],
    ]
    print(table(f"Indexing {IMAGES} JPEGs 640x480 ({MODEL}), files on disk to searchable",
                ["pipeline", "seconds", "images/s", "vs naive"], rows))  # fmt: skip
    spread = ", ".join(f"{target}: {count}" for target, count in two["spread"].items())
    print(
        f"2 encoders vs 1: {two['images_per_s'] / one['images_per_s']:.2f}x; "
        f"images per encoder: {spread}"
    )
    figures = {
        "model": MODEL,
        "images": IMAGES,
        "one_encoder": one,
        "two_encoders": two,
        "naive": baseline,
    }
    record("indexer", figures)
    return figures


if __name__ == "__main__":
    run()
