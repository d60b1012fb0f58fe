"""`python -m bench recall`: recall@10 against p50 latency of HNSW32 and IVF at several values
of their search parameter, on three data sets made here, and what --target-recall picks.

The data sets: isotropic (unit vectors drawn uniformly on the 512-d sphere), clustered
(300 centres plus noise, as catalog embeddings of similar products cluster), and
near-duplicates (augmented copies of the suite's generated pictures through the real
ViT-B-32 architecture with seeded random weights, `pretrained=None`). Queries are
catalog vectors, each left out of its own results, as the service measures; recall
is against numpy brute force. Latency: one query at a time through VectorIndex.search
(the service's path), one thread.

VPM_BENCH_RECALL_SIZE: vectors of the isotropic and clustered sets (default 20,000).
VPM_BENCH_RECALL_PHOTOS: base pictures of the near-duplicate set (default 32, 12 copies each).
"""

from __future__ import annotations

import io
import os
import time

import numpy as np

from bench.common import median, record, table
from search_service.index.tuning import (
    K,
    choose_value,
    exact_neighbours,
    recall_of,
    without_self,
)
from search_service.index.vector_index import VectorIndex, all_cores, single_threaded

DIM = 512
SIZE = int(os.environ.get("VPM_BENCH_RECALL_SIZE", "20000"))
PHOTOS = int(os.environ.get("VPM_BENCH_RECALL_PHOTOS", "32"))
COPIES = 12
QUERIES = 200  # measured, per value
TUNING_QUERIES = 500  # what the tuner sees (other catalog vectors than the measured ones)
TARGET = 0.95
EF_SEARCH = (16, 32, 64, 128, 256, 512)


def unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def isotropic(count: int, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((count, DIM)))


def clustered(count: int, centres: int = 300, spread: float = 1.0, seed: int = 1) -> np.ndarray:
    """Unit centres, each vector one of them plus isotropic noise of `spread` its norm."""
    rng = np.random.default_rng(seed)
    middle = isotropic(centres, seed + 1)
    noise = unit(rng.standard_normal((count, DIM))) * spread
    return unit(middle[rng.integers(0, centres, count)] + noise)


def near_duplicates(photos: int, copies: int = COPIES, seed: int = 2) -> np.ndarray:
    """ViT-B-32 (random weights, seeded) embeddings of `copies` augmented copies of each of
    `photos` generated pictures: crops, flips, colour changes, JPEG recompression."""
    import torch
    from PIL import Image, ImageEnhance, ImageOps

    from encoder_service.model import ModelConfig, load_model
    from tests.images import picture

    loaded = load_model(ModelConfig(pretrained="none", seed=seed))
    rng = np.random.default_rng(seed)
    images = []
    for number in range(photos):
        base = picture(480, 360, seed=1000 + number)
        for _ in range(copies):
            left, top = rng.integers(0, 80), rng.integers(0, 60)
            copy = base.crop((left, top, left + 400, top + 300))
            if rng.random() < 0.5:
                copy = ImageOps.mirror(copy)
            copy = ImageEnhance.Color(copy).enhance(rng.uniform(0.6, 1.4))
            copy = ImageEnhance.Brightness(copy).enhance(rng.uniform(0.8, 1.2))
            buffer = io.BytesIO()
            copy.save(buffer, "JPEG", quality=int(rng.integers(50, 95)))
            images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(images), 32):
            batch = torch.stack([loaded.preprocess(image) for image in images[start : start + 32]])
            vectors.append(loaded.model.encode_image(batch).float().numpy())
    return unit(np.concatenate(vectors))


def ivf_factory(count: int) -> str:
    """IVF256,Flat, or fewer lists where the set is too small to train 256 (39 per list)."""
    lists = 256
    while lists > 4 and 39 * lists > count:
        lists //= 2
    return f"IVF{lists},Flat"


def curve(
    index: VectorIndex, vectors: np.ndarray, rows: np.ndarray, truth: np.ndarray, values
) -> list[tuple]:
    """(value, recall@K, p50 ms) for each value, searching one query at a time."""
    keys = rows.astype(np.int64)
    points = []
    for value in values:
        if value is not None:
            index.set_search_value(value)
        found = np.full((len(rows), K + 1), -1, np.int64)
        times = []
        for number, row in enumerate(rows.tolist()):
            started = time.perf_counter()
            hits, _ = index.search(vectors[row], K + 1)
            times.append(time.perf_counter() - started)
            found[number, : len(hits)] = hits
        recall = recall_of(without_self(found, keys, K), truth)
        points.append((value, recall, 1e3 * median(times)))
    return points


def bench_set(name: str, vectors: np.ndarray) -> dict:
    count = len(vectors)
    keys = np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(3)
    order = rng.permutation(count)
    measured = order[: min(QUERIES, count // 2)]
    tuned = order[len(measured) : len(measured) + TUNING_QUERIES]
    pages = [(keys, vectors)]
    truth = exact_neighbours(vectors[measured], keys[measured], pages, K, [None])[0]
    tuning_truth = exact_neighbours(vectors[tuned], keys[tuned], pages, K, [None])[0]
    figures = {"vectors": count}
    rows = []
    flat = VectorIndex(DIM, scan_threads=1)
    flat.put(keys, vectors)
    ((_, flat_recall, flat_ms),) = curve(flat, vectors, measured, truth, [None])
    rows.append(("Flat", "-", flat_recall, flat_ms, "", ""))
    for factory in ("HNSW32", ivf_factory(count)):
        index = VectorIndex(DIM, factory)
        started = time.perf_counter()
        with all_cores():
            index.train(vectors)
            index.put(keys, vectors)
        build_s = time.perf_counter() - started
        values = EF_SEARCH if factory.startswith("HNSW") else index.search_values
        points = curve(index, vectors, measured, truth, values)
        choice = choose_value(index, vectors[tuned], keys[tuned], tuning_truth, TARGET)
        ((_, held_out, chosen_ms),) = curve(index, vectors, measured, truth, [choice.value])
        for value, recall, p50 in points:
            rows.append((factory, f"{index.search_parameter}={value}", recall, p50, "", ""))
        pick = f"{index.search_parameter}={choice.value}"
        verdict = "reached" if choice.reached else f"not reached (best {choice.recall:.3f})"
        rows.append((factory, f"picked {pick}", held_out, chosen_ms, f"{build_s:.1f}", verdict))
        figures[factory] = {
            "build_s": build_s,
            "curve": [{"value": v, "recall": r, "p50_ms": p} for v, r, p in points],
            "picked": {"value": choice.value, "reached": choice.reached, "recall": held_out},
        }
    figures["Flat"] = {"recall": flat_recall, "p50_ms": flat_ms}
    header = ("index", "search parameter", f"recall@{K}", "p50 ms", "build s", f"at {TARGET}")
    print(table(f"{name}: {count} vectors of dim {DIM}, {len(measured)} queries", header, rows))
    return figures


def run() -> dict:
    single_threaded()
    started = time.perf_counter()
    photos = near_duplicates(PHOTOS)
    photo_s = time.perf_counter() - started
    print(f"near-duplicate set: {len(photos)} ViT-B-32 embeddings in {photo_s:.0f} s")
    figures = {
        "isotropic": bench_set("isotropic", isotropic(SIZE)),
        "clustered": bench_set("clustered (300 centres)", clustered(SIZE)),
        "near-duplicates": bench_set(f"near-duplicates ({PHOTOS} pictures x {COPIES})", photos),
    }
    record("recall", figures)
    return figures
