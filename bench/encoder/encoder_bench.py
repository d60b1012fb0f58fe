"""Encoder throughput and latency: the service end to end vs the runtime alone vs a naive pipeline.

All on the real ViT-B-32 architecture (seeded random weights: the arithmetic
is the same as with trained ones), 640x480 JPEGs, measured in one run, in
ROUNDS interleaved rounds (each round measures every pipeline once; each
figure is its median over the rounds), so a slow spell of the shared machine
falls on all of them alike:

  runtime alone    pre-made tensors, each runtime at several batch sizes
  service          JPEG bytes streamed over gRPC to an in-process server, vectors back
  naive            the original prototype's way: PIL open + open_clip preprocess +
                   PyTorch eager at batch 32, one thread
  latency          one image at a time through the service

Those are the `throughput` part; the `overhead` part (bench/encoder/encoder_overhead.py)
measures the service's CPU per image outside decode and model, VPM-Tiny on small
images, engine alone vs the per-item and the batched RPC. VPM_BENCH_ENCODER_PARTS
picks the parts (default "overhead,throughput").
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc

from bench.common import median, percentile, record, table, timed
from encoder_service.factory import build_engine
from encoder_service.inference.runtimes import OnnxRuntime, TorchRuntime, build_runtime
from encoder_service.model import ModelConfig, load_model
from encoder_service.server import EncoderApp, create_server
from encoder_service.settings import EncoderSettings
from tests import images
from tests.support import ServerThread
from vpm.v1 import encoder_pb2, encoder_pb2_grpc

MODEL = os.environ.get("VPM_BENCH_MODEL", "ViT-B-32")
IMAGES = int(os.environ.get("VPM_BENCH_IMAGES", "96"))
CACHE = Path(os.environ.get("VPM_BENCH_CACHE", Path.home() / ".cache" / "vpm"))
ROUNDS = int(os.environ.get("VPM_BENCH_ROUNDS", "3"))
ONNX_BATCHES = [1, 8, 16, 32]
TORCH_BATCHES = [1, 8, 32]


def runtime_alone(
    runtime: Any, image_size: int, batch_sizes: list[int], count: int
) -> dict[int, float]:
    """Images/s on pre-made tensors for each batch size (one warm-up batch first)."""
    import torch

    rates = {}
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, image_size, image_size)
        runtime.encode_images(pixels)
        rounds = max(1, count // batch)
        seconds, _ = timed(lambda: [runtime.encode_images(pixels) for _ in range(rounds)])  # noqa: B023
        rates[batch] = rounds * batch / seconds
    return rates


def service_throughput(target: str, files: list[bytes]) -> float:
    """Images/s through one per-item EncodeImages stream."""
    stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(target))
    requests = [encoder_pb2.ImageItem(id=str(i), data=data) for i, data in enumerate(files)]
    list(stub.EncodeImages(iter(requests[:8]), timeout=600))  # warm the path
    seconds, replies = timed(lambda: list(stub.EncodeImages(iter(requests), timeout=600)))
    assert all(len(r.vector) for r in replies) and len(replies) == len(files)
    return len(files) / seconds


def batched_throughput(target: str, files: list[bytes], batch: int) -> float:
    """Images/s through one EncodeImageBatches stream, requests of `batch` images."""
    stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(target))
    requests = [
        encoder_pb2.ImageBatch(id=str(start), images=files[start : start + batch])
        for start in range(0, len(files), batch)
    ]
    list(stub.EncodeImageBatches(iter(requests[:1]), timeout=600))  # warm the path
    seconds, replies = timed(lambda: list(stub.EncodeImageBatches(iter(requests), timeout=600)))
    assert sum(r.vectors.rows for r in replies) == len(files) and not any(r.errors for r in replies)
    return len(files) / seconds


def service_latency(target: str, data: bytes, count: int = 20) -> list[float]:
    stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(target))
    samples = []
    for index in range(count + 2):
        seconds, _ = timed(
            lambda: list(
                stub.EncodeImages(iter([encoder_pb2.ImageItem(id="q", data=data)]), timeout=60)
            )
        )  # noqa: B023
        if index >= 2:
            samples.append(seconds)
    return samples


class NaivePipeline:
    """The prototype: PIL open + open_clip preprocess + PyTorch eager at batch 32, one process."""

    def __init__(self, batch: int = 32) -> None:
        import open_clip
        import torch

        torch.manual_seed(0)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            MODEL, pretrained=None
        )
        self.model.eval()
        self.batch = batch

    def rate(self, files: list[bytes]) -> float:
        import torch
        from PIL import Image

        def run() -> None:
            with torch.no_grad():
                for start in range(0, len(files), self.batch):
                    chunk = files[start : start + self.batch]
                    pixels = torch.stack(
                        [self.preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in chunk]
                    )
                    self.model.encode_image(pixels)

        seconds, _ = timed(run)
        return len(files) / seconds


def run() -> dict[str, Any]:
    parts = os.environ.get("VPM_BENCH_ENCODER_PARTS", "overhead,throughput").split(",")
    figures: dict[str, Any] = {}
    if "overhead" in parts:
        from bench.encoder import encoder_overhead

        figures["overhead"] = encoder_overhead.run()
    if "throughput" in parts:
        print()
        figures.update(throughput())
    record("encoder", figures)
    return figures


def throughput() -> dict[str, Any]:
    files = [images.jpeg(640, 480, seed=i, quality=90) for i in range(IMAGES)]
    loaded = load_model(ModelConfig(MODEL, "none"))
    onnx = build_runtime(loaded, "onnx", cache_dir=CACHE)
    assert isinstance(onnx, OnnxRuntime)
    torch_rt = TorchRuntime(load_model(ModelConfig(MODEL, "none")))
    naive = NaivePipeline()

    settings = EncoderSettings(
        host="127.0.0.1", port=0, model=MODEL, pretrained="none", metrics_port=0, cache_dir=CACHE
    )
    app = EncoderApp()

    async def build():  # noqa: ANN202
        server, port = await create_server(settings, app)
        await app.serve(build_engine(settings))
        return server, port

    thread = ServerThread(build)
    thread.start()
    samples: dict[str, list[float]] = defaultdict(list)
    try:
        info = app.engine.description
        for _ in range(ROUNDS):
            for batch, rate in runtime_alone(onnx, loaded.image_size, ONNX_BATCHES, IMAGES).items():
                samples[f"onnx {batch}"].append(rate)
            samples["service"].append(service_throughput(thread.target, files))
            samples["service, batched"].append(
                batched_throughput(thread.target, files, info.max_batch)
            )
            for batch, rate in runtime_alone(
                torch_rt, loaded.image_size, TORCH_BATCHES, IMAGES
            ).items():
                samples[f"torch {batch}"].append(rate)
            samples["naive"].append(naive.rate(files))
        latencies = service_latency(thread.target, files[0])
    finally:
        thread.stop(0)
        app.engine.close(drain=False)
        onnx.close()
        torch_rt.close()
    rates = {name: median(values) for name, values in samples.items()}
    alone = {
        runtime: {batch: rates[f"{runtime} {batch}"] for batch in batches}
        for runtime, batches in (("onnx", ONNX_BATCHES), ("torch", TORCH_BATCHES))
    }
    best_runtime, best_batch = max(
        ((rt, b) for rt, by_batch in alone.items() for b in by_batch),
        key=lambda rb: alone[rb[0]][rb[1]],
    )
    best_rate = alone[best_runtime][best_batch]
    service_rate, naive_rate = rates["service"], rates["naive"]
    batched_rate = rates["service, batched"]
    # The service against the best runtime-alone figure of its own round: a slow spell
    # that spans a round weighs on both sides of its ratio.
    configs = [name for name in samples if not name.startswith(("service", "naive"))]
    round_ratios = [
        samples["service"][r] / max(samples[name][r] for name in configs) for r in range(ROUNDS)
    ]

    rows = [
        [f"runtime alone: {rt}", b, rate, rate / best_rate]
        for rt, by_batch in alone.items()
        for b, rate in by_batch.items()
    ]
    rows.append(
        [
            f"service ({info.runtime}, max batch {info.max_batch}), JPEG over gRPC",
            info.max_batch,
            service_rate,
            service_rate / best_rate,
        ]
    )
    rows.append(
        [
            f"service, batched RPC (requests of {info.max_batch} images)",
            info.max_batch,
            batched_rate,
            batched_rate / best_rate,
        ]
    )
    rows.append(["naive: PIL + preprocess + torch eager", 32, naive_rate, naive_rate / best_rate])
    print(
        table(
            f"Encoder {MODEL}, {IMAGES} JPEGs 640x480, median of {ROUNDS} interleaved rounds "
            "(images/s; ratio to the best runtime-alone figure)",
            ["pipeline", "batch", "images/s", "ratio"],
            rows,
        )
    )
    p50, p99 = median(latencies) * 1000, percentile(latencies, 99) * 1000
    print(
        f"service vs runtime alone at its best ({best_runtime}, batch {best_batch}): "
        f"{service_rate / best_rate:.2f}x of the medians; round by round "
        f"{', '.join(f'{ratio:.2f}' for ratio in round_ratios)}, median "
        f"{median(round_ratios):.2f}x (target >= 0.9)"
    )
    print(
        f"batched RPC vs per-item RPC, one stream each: {batched_rate / service_rate:.2f}x; "
        f"batched vs runtime alone at its best: {batched_rate / best_rate:.2f}x"
    )
    print(f"service vs naive pipeline: {service_rate / naive_rate:.2f}x (target > 1)")
    print(
        f"single-image latency through the service: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
        f"({len(latencies)} requests)"
    )
    figures = {
        "model": MODEL,
        "images": IMAGES,
        "rounds": ROUNDS,
        "samples_images_per_s": dict(samples),
        "runtime_alone_images_per_s": alone,
        "best_runtime_alone": {
            "runtime": best_runtime,
            "batch": best_batch,
            "images_per_s": best_rate,
        },
        "service": {
            "runtime": info.runtime,
            "max_batch": info.max_batch,
            "images_per_s": service_rate,
        },
        "naive_images_per_s": naive_rate,
        "service_batched_images_per_s": batched_rate,
        "service_vs_best_runtime": service_rate / best_rate,
        "service_vs_best_runtime_by_round": round_ratios,
        "service_vs_naive": service_rate / naive_rate,
        "latency_ms": {"p50": p50, "p99": p99},
    }
    return figures


if __name__ == "__main__":
    run()
