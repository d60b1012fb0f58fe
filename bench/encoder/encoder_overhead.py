"""Service CPU per image outside decode and model: engine alone vs per-item RPC vs batched RPC.

VPM-Tiny on small JPEGs (64x64 to 96x96), where decode and model are cheap, so
what the service adds around them shows. Every way gets the same images and
the same engine settings (runtime, workers, threads, max batch, queue size),
in ROUNDS interleaved rounds (each figure is its median over the rounds):

  decode + model    the engine's own decode function and runtime called directly,
                    one thread, batches of max_batch: the work every way must do
  engine alone      EncoderEngine.submit_images in this process, requests of
                    max_batch images, as many in flight as the RPCs keep
  per-item RPC      EncodeImages, STREAMS client streams, against a real
                    `python -m encoder_service` process
  batched RPC       EncodeImageBatches, STREAMS client streams of requests of
                    max_batch images, against that same process

The clients run in processes of their own, so their CPU is not counted. The
service's CPU is the encoder process's utime + stime (/proc) across the run;
its overhead per image is that, less the decode + model CPU of the same round,
divided by the images.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import median, process_cpu_s, table, verdict
from tests import images
from tests.support import ServiceProcess, free_port


def _default_workers() -> int:
    from encoder_service.settings import EncoderSettings

    return EncoderSettings().worker_count()


MODEL = "VPM-Tiny"
IMAGES = int(os.environ.get("VPM_BENCH_OVERHEAD_IMAGES", "6000"))
ROUNDS = int(os.environ.get("VPM_BENCH_ROUNDS", "3"))
CACHE = Path(os.environ.get("VPM_BENCH_CACHE", Path.home() / ".cache" / "vpm"))
SIZES = ((64, 64), (80, 80), (96, 72), (96, 96))
DISTINCT = 256  # distinct files, cycled
MAX_BATCH = 32
# The service's default (a decode thread per core but one); VPM_BENCH_OVERHEAD_WORKERS sets it.
WORKERS = int(os.environ.get("VPM_BENCH_OVERHEAD_WORKERS", "0")) or _default_workers()
THREADS = 2
STREAMS = 4
# Every stream's window (2 x max batch) fits: the RPCs never see RESOURCE_EXHAUSTED.
QUEUE = STREAMS * 2 * MAX_BATCH
TARGET_US = 50.0
TARGET_RATIO = 5.0
TIMEOUT_S = 600.0

FLAGS = {
    "model": MODEL,
    "pretrained": "none",
    "runtime": "onnx",
    "max_batch": MAX_BATCH,
    "workers": WORKERS,
    "threads": THREADS,
    "queue_size": QUEUE,
}


def make_files() -> list[bytes]:
    return [images.jpeg(*SIZES[i % len(SIZES)], seed=i, quality=90) for i in range(DISTINCT)]


def _settings() -> Any:
    from encoder_service.settings import EncoderSettings

    return EncoderSettings(host="127.0.0.1", port=0, metrics_port=0, cache_dir=CACHE, **FLAGS)


class PureWork:
    """Decode + preprocess + model + normalize, called directly in one thread, no engine."""

    def __init__(self, engine: Any) -> None:
        from encoder_service.model import ModelConfig, load_model
        from encoder_service.preprocess.cpu_transform import cpu_transform
        from encoder_service.preprocess.images import ImageLimits, ImagePreprocessor

        settings = _settings()
        loaded = load_model(ModelConfig(MODEL, "none"))
        limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.preprocess = ImagePreprocessor(cpu_transform(loaded.preprocess), limits)
        self.runtime = engine.runtime  # the engine's own, idle meanwhile: same threads

    def run(self, files: list[bytes], count: int) -> dict[str, float]:
        import torch

        from encoder_service.encoded import unit_rows

        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, count, MAX_BATCH):
            chunk = [files[i % len(files)] for i in range(start, min(start + MAX_BATCH, count))]
            pixels = torch.stack([self.preprocess(data)[0] for data in chunk])
            unit_rows(self.runtime.encode_images(pixels))
        return _figures(count, time.perf_counter() - wall, time.process_time() - cpu)


def engine_alone(engine: Any, files: list[bytes], count: int) -> dict[str, float]:
    """Requests of MAX_BATCH images, QUEUE images in flight, as the RPC streams keep."""
    from encoder_service.batcher import Caller

    slots = threading.Semaphore(QUEUE // MAX_BATCH)
    done = threading.Semaphore(0)
    failures: list[BaseException] = []

    def finished(future: Any) -> None:
        if future.exception() is not None:
            failures.append(future.exception())
        elif future.result().errors:
            failures.extend(future.result().errors.values())
        slots.release()
        done.release()

    requests = range(0, count, MAX_BATCH)
    cpu, wall = time.process_time(), time.perf_counter()
    for start in requests:
        slots.acquire()
        chunk = [files[i % len(files)] for i in range(start, min(start + MAX_BATCH, count))]
        engine.submit_images(chunk, Caller()).add_done_callback(finished)
    for _ in requests:
        done.acquire()
    figures = _figures(count, time.perf_counter() - wall, time.process_time() - cpu)
    if failures:
        raise RuntimeError(f"engine alone: {len(failures)} failures, first {failures[0]!r}")
    return figures


def over_rpc(
    clients: Any, process: ServiceProcess, target: str, files_path: Path, count: int, batched: bool
) -> dict[str, float]:
    """`count` images over STREAMS client streams; the encoder process's CPU meanwhile."""
    from bench.gpu import gpu_load

    share = math.ceil(count / STREAMS)
    if batched:
        jobs = [
            (target, str(files_path), share, i * 7919, TIMEOUT_S, MAX_BATCH, 4)
            for i in range(STREAMS)
        ]
        work = gpu_load.stream_batches
    else:
        jobs = [(target, str(files_path), share, i * 7919, TIMEOUT_S) for i in range(STREAMS)]
        work = gpu_load.stream_images
    pid = process.process.pid
    before = process_cpu_s(pid)
    parts = clients.starmap(work, jobs)
    cpu = process_cpu_s(pid) - before
    failed = [p for p in parts if p.errors or p.first_error]
    if failed:
        raise RuntimeError(f"{'batched' if batched else 'per-item'} RPC: {failed[0].first_error}")
    seconds = max(p.finished for p in parts) - min(p.started for p in parts)
    return _figures(sum(p.ok for p in parts), seconds, cpu)


def _figures(images_done: int, seconds: float, cpu_s: float) -> dict[str, float]:
    return {
        "images": images_done,
        "seconds": seconds,
        "images_per_s": images_done / seconds,
        "cpu_s": cpu_s,
        "cpu_us_per_image": cpu_s / images_done * 1e6,
    }


def start_encoder(work: Path) -> tuple[ServiceProcess, str]:
    port = free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    args += ["--cache-dir", str(CACHE), "--log-level", "WARNING"]
    for key, value in FLAGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    process = ServiceProcess("encoder_service", args, work / "encoder.log")
    target = f"127.0.0.1:{port}"
    process.wait_serving(target, "vpm.v1.Encoder", timeout_s=300)
    return process, target


def run() -> dict[str, Any]:
    from bench.gpu import gpu_load
    from encoder_service.factory import build_engine

    files = make_files()
    ways = ("decode + model", "engine alone", "per-item RPC", "batched RPC")
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="vpm-overhead-") as tmp:
        work = Path(tmp)
        files_path = gpu_load.save_files(files, work / "jpegs.pickle")
        process, target = start_encoder(work)
        engine = build_engine(_settings())
        pure = PureWork(engine)
        try:
            with multiprocessing.get_context("spawn").Pool(STREAMS) as clients:
                runs = {
                    "decode + model": lambda n: pure.run(files, n),
                    "engine alone": lambda n: engine_alone(engine, files, n),
                    "per-item RPC": lambda n: over_rpc(
                        clients, process, target, files_path, n, batched=False
                    ),
                    "batched RPC": lambda n: over_rpc(
                        clients, process, target, files_path, n, batched=True
                    ),
                }
                for way in ways:  # warm-up: channels, client processes, first batches
                    runs[way](min(IMAGES, 4 * QUEUE))
                for _ in range(ROUNDS):
                    for way in ways:
                        samples[way].append(runs[way](IMAGES))
        finally:
            engine.close(drain=False)
            process.stop()
    return report(samples, ways)


def report(samples: dict[str, list[dict[str, float]]], ways: tuple[str, ...]) -> dict[str, Any]:
    pure = [run["cpu_us_per_image"] for run in samples["decode + model"]]
    overhead = {
        way: [run["cpu_us_per_image"] - pure[r] for r, run in enumerate(samples[way])]
        for way in ways[1:]
    }
    ratios = [
        item / max(batch, 1e-9)
        for item, batch in zip(overhead["per-item RPC"], overhead["batched RPC"], strict=True)
    ]
    rows = []
    for way in ways:
        runs = samples[way]
        cost = median([run["cpu_us_per_image"] for run in runs])
        extra = median(overhead[way]) if way in overhead else 0.0
        rows.append(
            [
                way,
                median([run["images_per_s"] for run in runs]),
                cost,
                extra if way in overhead else "-",
                1e6 / extra if way in overhead and extra > 0 else "-",
            ]
        )
    print(
        table(
            f"Service CPU per image, {MODEL} on {len(SIZES)} sizes of small JPEGs "
            f"({SIZES[0][0]}x{SIZES[0][1]} to {SIZES[-1][0]}x{SIZES[-1][1]}), {IMAGES} images per "
            f"way, median of {ROUNDS} interleaved rounds; max batch {MAX_BATCH}, {WORKERS} decode "
            f"workers, {THREADS} inference threads, queue {QUEUE}, {STREAMS} client streams",
            ["way", "images/s", "CPU us/image", "outside decode+model", "headroom images/s"],
            rows,
        )
    )
    batched = median(overhead["batched RPC"])
    ratio = median(ratios)
    engine = median(overhead["engine alone"])
    print(
        f"of the batched RPC's overhead, the engine alone accounts for {engine:.1f} us and the "
        f"gRPC layer (server, messages, replies) for {batched - engine:.1f} us per image"
    )
    print(
        f"batched RPC: {batched:.1f} us of service CPU per image outside decode and model "
        f"(target <= {TARGET_US:.0f} us): {verdict(batched <= TARGET_US)}"
    )
    print(
        f"per-item / batched overhead: round by round {', '.join(f'{r:.1f}' for r in ratios)}, "
        f"median {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x): {verdict(ratio >= TARGET_RATIO)}"
    )
    return {
        "model": MODEL,
        "images": IMAGES,
        "rounds": ROUNDS,
        "settings": {**FLAGS, "streams": STREAMS, "sizes": SIZES},
        "samples": dict(samples),
        "overhead_us_per_image": {way: median(values) for way, values in overhead.items()},
        "overhead_us_per_image_by_round": overhead,
        "per_item_vs_batched": ratio,
        "per_item_vs_batched_by_round": ratios,
        "targets": {
            "batched_us_per_image": {"target": TARGET_US, "met": batched <= TARGET_US},
            "per_item_vs_batched": {"target": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
        },
    }
