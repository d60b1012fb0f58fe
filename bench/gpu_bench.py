"""GPU benchmark (issue 7): the model, the device pipeline, the engine and the service, one run.

Meant for bench/gpu.sh on a machine with an NVIDIA GPU: ViT-B-32 (seeded random
weights: the arithmetic of trained ones), 640x480 JPEGs. Sections:

  model only     images/s by batch size and precision (fp16/bf16 cast, fp16 autocast,
                 fp32), CUDA graphs at small batches, torch.compile at one batch
  device path    nvJPEG decode, resize/normalize and the model on one batch, apart;
                 and Pillow decode + preprocess on every core, for comparison
  engine         EncoderEngine without gRPC: --decode cpu vs gpu (1 or 2 batches in flight)
  service        JPEG bytes over gRPC from several client processes: --decode cpu vs gpu
                 (and gpu with CUDA graphs and a 1 ms delay, and 3 encoder processes
                 on the one GPU); the 42,700-image catalog end to end; single-image
                 latency p50/p99; GPU memory

Without a GPU it says "no CUDA device" and runs a smoke version (tiny model, the
CPU, small sizes) through the same code. Figures go to $OUT/gpu.json when OUT
is set, and to data/bench/gpu.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import median, record, table
from bench.gpu_service import engine_rates, peak_memory_mb, release, service_runs

logger = logging.getLogger(__name__)

# No section starts after this many seconds, so the run stays within about 6 minutes.
BUDGET_S = float(os.environ.get("VPM_GPU_BENCH_BUDGET_S", "300"))
COMPILE_MAX_S = 150.0  # torch.compile gets what is left of the budget, at most this
COMPILE_MIN_S = 60.0  # and is skipped with less


@dataclass(frozen=True)
class Plan:
    """What to measure, and how much: FULL on a GPU, SMOKE anywhere."""

    model: str
    device: str
    distinct_jpegs: int
    precisions: dict[str, tuple[int, ...]]
    graph_batches: tuple[int, ...]
    pipeline_batch: int
    pillow_images: int
    engine_images: dict[str, int]
    streams: int
    service_images: dict[str, int]  # per decode path, for images/s
    catalog: int  # encoded end to end once, with --decode gpu
    latency_requests: int
    service_timeout_s: float
    # encoder process counts sharing the device, one service configuration each
    processes: tuple[int, ...]
    compile_batch: int
    settings: dict[str, Any] = field(default_factory=dict)


FULL = Plan(
    model="ViT-B-32",
    device="cuda",
    distinct_jpegs=256,
    precisions={
        "fp16": (64, 128, 256, 512, 1024),
        "bf16": (64, 128, 256, 512, 1024),
        "fp16 autocast": (256, 1024),
        "fp32": (64, 256),
    },
    graph_batches=(1, 8, 64, 256),
    pipeline_batch=256,
    pillow_images=1024,
    engine_images={"cpu": 4000, "gpu": 20_000},
    streams=8,
    service_images={"cpu": 8000, "gpu": 16_000},
    catalog=42_700,
    latency_requests=200,
    service_timeout_s=45.0,
    processes=(3,),
    compile_batch=512,
)
SMOKE = Plan(
    model="VPM-Tiny",
    device="cpu",
    distinct_jpegs=12,
    precisions={"fp32": (8, 32)},
    graph_batches=(),
    pipeline_batch=16,
    pillow_images=32,
    engine_images={"cpu": 48, "gpu": 48},
    streams=2,
    service_images={"cpu": 64, "gpu": 64},
    catalog=96,
    latency_requests=10,
    service_timeout_s=60.0,
    processes=(2,),
    compile_batch=8,
    settings={"runtime": "torch", "device": "cpu"},
)


def _torch():  # noqa: ANN202 - the torch module
    import torch

    return torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        _torch().cuda.synchronize()


def images_per_second(run: Any, batch: int, device: str, min_s: float = 0.5) -> float:
    """Rate of `run()` (one batch) after two warm-up calls, over at least `min_s` seconds."""
    run()
    run()
    _sync(device)
    started = time.perf_counter()
    run()
    _sync(device)
    once = max(time.perf_counter() - started, 1e-6)
    rounds = max(3, math.ceil(min_s / once))
    started = time.perf_counter()
    for _ in range(rounds):
        run()
    _sync(device)
    return rounds * batch / (time.perf_counter() - started)


# -- model only --------------------------------------------------------------------------


def model_only(plan: Plan) -> dict[str, Any]:
    from encoder_service.model import ModelConfig, load_model

    torch = _torch()
    loaded = load_model(ModelConfig(plan.model, "none"))
    size = loaded.image_size
    base = loaded.model.to(plan.device).eval()
    rates: dict[str, dict[int, float]] = {}
    for name, batches in plan.precisions.items():
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name, torch.float32)
        model = copy.deepcopy(base).to(dtype) if dtype != torch.float32 else base
        autocast = name.endswith("autocast")
        rates[name] = {}
        for batch in batches:
            pixels = torch.randn(batch, 3, size, size, device=plan.device, dtype=dtype)

            def run(model=model, pixels=pixels, autocast=autocast) -> None:
                with torch.inference_mode(), _autocast(autocast):
                    model.encode_image(pixels)

            rates[name][batch] = images_per_second(run, batch, plan.device)
        del model
    graphs = cuda_graph_rates(plan, base, size) if plan.graph_batches else {}
    peak = peak_memory_mb(plan.device)
    rows = [[name, b, rate] for name, by in rates.items() for b, rate in by.items()]
    rows += [[f"fp16 {kind}", b, rate] for kind, by in graphs.items() for b, rate in by.items()]
    print(
        table(f"Model only: {plan.model} on {plan.device}", ["precision", "batch", "img/s"], rows)
    )
    best = max(rates.get("fp16", next(iter(rates.values()))).items(), key=lambda kv: kv[1])
    return {
        "images_per_s": rates,
        "cuda_graphs_images_per_s": graphs,
        "best_fp16": {"batch": best[0], "images_per_s": best[1]},
        "peak_allocated_mb": peak,
    }


def _autocast(enabled: bool) -> Any:
    torch = _torch()
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16)


def cuda_graph_rates(plan: Plan, base: Any, size: int) -> dict[str, dict[int, float]]:
    """fp16 eager vs the same batches replayed as CUDA graphs (what --cuda-graphs does)."""
    from encoder_service.cuda_graphs import GraphedTower

    torch = _torch()
    model = copy.deepcopy(base).half()
    tower = GraphedTower.capture(
        model.encode_image, list(plan.graph_batches), size, torch.float16, plan.device
    )
    rates: dict[str, dict[int, float]] = {"eager": {}, "graphs": {}}
    for batch in plan.graph_batches:
        pixels = torch.randn(batch, 3, size, size, device=plan.device, dtype=torch.float16)
        with torch.inference_mode():
            rates["eager"][batch] = images_per_second(
                lambda p=pixels: model.encode_image(p), batch, plan.device, 0.3
            )
            if tower is not None:
                rates["graphs"][batch] = images_per_second(
                    lambda p=pixels: tower(p), batch, plan.device, 0.3
                )
    return rates


def compiled_rate(plan: Plan) -> dict[str, Any]:
    """torch.compile at one batch size, in a child process that may be cut off at a timeout."""
    command = [sys.executable, "-m", "bench.gpu_bench", "--compile-probe", plan.model]
    command += [plan.device, str(plan.compile_batch)]
    started = time.perf_counter()
    timeout = min(COMPILE_MAX_S, BUDGET_S + 30 - (started - STARTED))
    if timeout < COMPILE_MIN_S:
        return {"skipped": f"only {timeout:.0f} s of the budget left"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:300]}"}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def compile_probe(model_name: str, device: str, batch: int) -> None:
    """Child process: compile the fp16 image tower, print its compile time and rate as JSON."""
    from encoder_service.model import ModelConfig, load_model

    torch = _torch()
    loaded = load_model(ModelConfig(model_name, "none"))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = loaded.model.to(device=device, dtype=dtype).eval()
    size = loaded.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    compiled = torch.compile(model.encode_image, dynamic=False)
    with torch.inference_mode():
        started = time.perf_counter()
        compiled(pixels)
        _sync(device)
        compile_s = time.perf_counter() - started
        compiled_rate = images_per_second(lambda: compiled(pixels), batch, device)
        eager_rate = images_per_second(lambda: model.encode_image(pixels), batch, device)
    result = {"batch": batch, "compile_s": compile_s, "images_per_s": compiled_rate}
    print(json.dumps({**result, "eager_images_per_s": eager_rate}))


# -- the device pipeline, stage by stage ----------------------------------------------------


def device_pipeline(plan: Plan, files: list[bytes]) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from encoder_service.gpu_pipeline import TensorImagePipeline, TensorTransform
    from encoder_service.images import ImageLimits, ImagePreprocessor
    from encoder_service.model import ModelConfig, load_model
    from encoder_service.runtimes import TorchRuntime

    loaded = load_model(ModelConfig(plan.model, "none"))
    runtime = TorchRuntime(loaded, plan.device, "float16" if plan.device == "cuda" else "float32")
    transform = TensorTransform.from_preprocess(loaded.preprocess)
    pipeline = TensorImagePipeline(transform, ImageLimits(), plan.device, runtime.input_dtype)
    decoder_works = pipeline.check_device_decoder(files[0])
    batch = [files[i % len(files)] for i in range(plan.pipeline_batch)]
    started = time.perf_counter()
    payloads = [pipeline.admit(data)[0] for data in batch]
    admit_us = (time.perf_counter() - started) / len(batch) * 1e6

    def stages() -> tuple[float, float, float]:
        """(device decode, resize + normalize, model) seconds for the batch, each waited for."""
        started = time.perf_counter()
        prepared = pipeline.prepare(payloads)
        assert not prepared.errors, prepared.errors
        _sync(plan.device)
        prepared_s = time.perf_counter() - started
        started = time.perf_counter()
        runtime.encode_images_on_device(prepared.pixels)
        _sync(plan.device)
        return prepared.decode_s, prepared_s - prepared.decode_s, time.perf_counter() - started

    stages()  # warm-up: decoder handles, kernels
    runs = [stages() for _ in range(5)]
    decode_s, preprocess_s, model_s = (median([run[i] for run in runs]) for i in range(3))
    n = len(payloads)
    preprocessor = ImagePreprocessor(loaded.preprocess, ImageLimits())
    pillow_files = [files[i % len(files)] for i in range(plan.pillow_images)]
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(preprocessor, pillow_files[:threads]))
        started = time.perf_counter()
        list(pool.map(preprocessor, pillow_files))
        pillow_rate = len(pillow_files) / (time.perf_counter() - started)
    runtime.close()
    figures = {
        "batch": n,
        "device_jpeg_decoder_works": decoder_works,
        "header_read_us_per_image": admit_us,
        "decode_images_per_s": n / decode_s,
        "preprocess_images_per_s": n / preprocess_s,
        "model_images_per_s": n / model_s,
        "serial_images_per_s": n / (decode_s + preprocess_s + model_s),
        "pillow_decode_preprocess_images_per_s": pillow_rate,
        "pillow_threads": threads,
    }
    rows = [
        ["header read (worker thread, per image)", f"{admit_us:.0f} us", ""],
        [f"device decode ({plan.device})", f"{decode_s * 1000:.1f} ms", n / decode_s],
        ["resize + crop + normalize", f"{preprocess_s * 1000:.1f} ms", n / preprocess_s],
        ["model", f"{model_s * 1000:.1f} ms", n / model_s],
        ["all three in turn", "", figures["serial_images_per_s"]],
        [f"Pillow decode + preprocess, {threads} threads", "", pillow_rate],
    ]
    title = f"Device path, one batch of {n} JPEGs 640x480"
    if not decoder_works:
        title += " (NO DEVICE JPEG DECODER: JPEGs went through Pillow)"
    print(table(title, ["stage", "time", "img/s"], rows))
    return figures


# -- the run ---------------------------------------------------------------------------------

STARTED = time.perf_counter()


def plan_for_here() -> Plan:
    torch = _torch()
    if torch.cuda.is_available() and os.environ.get("VPM_GPU_BENCH_SMOKE") != "1":
        return _with_overrides(FULL)
    if not torch.cuda.is_available():
        print("no CUDA device: running the smoke version (tiny model on the CPU, small sizes)")
    smoke = SMOKE
    if torch.cuda.is_available():
        smoke = Plan(**{**SMOKE.__dict__, "device": "cuda", "settings": {"runtime": "torch"}})
    return smoke


def _with_overrides(plan: Plan) -> Plan:
    """VPM_GPU_BENCH_STREAMS and VPM_GPU_BENCH_PROCESSES (a comma list) resize a focused rerun."""
    streams = int(os.environ.get("VPM_GPU_BENCH_STREAMS", plan.streams))
    processes = os.environ.get("VPM_GPU_BENCH_PROCESSES")
    counts = tuple(int(n) for n in processes.split(",")) if processes else (plan.processes,)
    return Plan(**{**plan.__dict__, "streams": streams, "processes": counts})


def make_jpegs(count: int) -> list[bytes]:
    from tests import images

    return [images.jpeg(640, 480, seed=seed, quality=90) for seed in range(count)]


def run() -> dict[str, Any]:
    global STARTED
    STARTED = time.perf_counter()
    torch = _torch()
    plan = plan_for_here()
    figures: dict[str, Any] = {"plan": plan.model + " on " + plan.device}
    figures["versions"] = _versions()
    if plan.device == "cuda":
        figures["gpu"] = torch.cuda.get_device_name()
    print(f"GPU benchmark: {figures.get('gpu', 'no GPU')}; {figures['versions']}", flush=True)
    files = make_jpegs(plan.distinct_jpegs)
    figures["jpeg_kb_mean"] = sum(map(len, files)) / len(files) / 1024
    with tempfile.TemporaryDirectory(prefix="vpm-gpu-bench-") as scratch:
        from bench import gpu_load

        files_path = gpu_load.save_files(files, Path(scratch) / "jpegs.pickle")
        cache = Path(scratch) / "cache"
        sections = [
            ("model_only", lambda: model_only(plan)),
            ("device_pipeline", lambda: device_pipeline(plan, files)),
            ("engine", lambda: engine_rates(plan, files, cache)),
            ("service", lambda: service_runs(plan, files_path, cache, STARTED + BUDGET_S)),
        ]
        if plan.device == "cuda" and os.environ.get("VPM_GPU_BENCH_COMPILE", "1") == "1":
            sections.append(("torch_compile", lambda: compiled_rate(plan)))
        wanted = os.environ.get("VPM_GPU_BENCH_SECTIONS")  # e.g. "service" for a focused rerun
        if wanted:
            sections = [(name, work) for name, work in sections if name in wanted.split(",")]
        for name, section in sections:
            figures[name] = _section(name, section)
            release(plan.device)
    figures["seconds"] = time.perf_counter() - STARTED
    _summary(figures, plan)
    _write(figures)
    return figures


def _section(name: str, work: Any) -> dict[str, Any]:
    """Run one section; a failure is reported and recorded, and the next section still runs."""
    elapsed = time.perf_counter() - STARTED
    if elapsed > BUDGET_S:
        print(f"\n[{name}] skipped: {elapsed:.0f} s spent of a {BUDGET_S:.0f} s budget")
        return {"skipped": "over the time budget"}
    print(f"\n[{name}] at {elapsed:.0f} s", flush=True)
    try:
        return work()
    except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
        logger.exception("section %s failed", name)
        return {"error": f"{type(error).__name__}: {error}"}


def _versions() -> dict[str, str]:
    import grpc
    import open_clip
    import torch
    import torchvision
    from google import protobuf

    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
        "grpcio": grpc.__version__,
        "protobuf": protobuf.__version__,
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


def _summary(figures: dict[str, Any], plan: Plan) -> None:
    service = figures.get("service", {})
    gpu = service.get("gpu", {}) if isinstance(service, dict) else {}
    model = figures.get("model_only", {}).get("best_fp16", {})
    rows = [
        ["model only, fp16, best batch", model.get("images_per_s", "n/a"), ">= 30,000 img/s"],
        ["service, --decode gpu", gpu.get("images_per_s", "n/a"), ">= 10,000 img/s"],
        [f"catalog of {plan.catalog} images", gpu.get("catalog_s", "n/a"), "< 10 s"],
        ["single-image latency p50 (ms)", gpu.get("latency_ms", {}).get("p50", "n/a"), "<= 10 ms"],
    ]
    title = f"Issue 7 targets ({figures.get('gpu', 'no GPU: smoke sizes, not comparable')})"
    print("\n" + table(title, ["figure", "measured", "target"], rows))
    print(f"(gpu bench: {figures['seconds']:.0f} s)")


def _write(figures: dict[str, Any]) -> None:
    path = record("gpu", figures)
    print(f"figures: {path}")
    out = os.environ.get("OUT")
    if out:
        target = Path(out) / "gpu.json"
        target.write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures: {target}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    # Every model here has random weights on purpose; one loud warning per build is noise.
    logging.getLogger("encoder_service.model").setLevel(logging.ERROR)
    if argv[:1] == ["--compile-probe"]:
        compile_probe(argv[1], argv[2], int(argv[3]))
        return 0
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
