"""GPU benchmark (issue 15): the encoder's batched RPC and the indexer end to end, one run.

Meant for bench/gpu.sh on a machine with an NVIDIA GPU, in at most about 6 minutes:
ViT-B-32 (seeded random weights: the arithmetic of trained ones), fp16, images
decoded on the device (nvJPEG), 640x480 JPEGs of about 70 KB (the fashion set's size).

  one process      one `python -m encoder_service` through EncodeImageBatches (client
                   processes, requests of max_batch images) vs the engine alone in this
                   process with the same settings on the same files: interleaved rounds
  processes        several encoder processes on the card together, the same clients
  indexer          `python -m indexer` over a 42,700-image catalog on disk, through those
                   encoders into a running `python -m search_service`: wall clock, then
                   every product searchable (GetStats, searches by id and by image)
  parity           the fp16 vectors the service returns for the parity corpus
                   (tests/encoder/test_parity.py) vs the CPU fp32 reference
  cuda tests       pytest on the test files that hold CUDA-only tests

Without a GPU it says "no CUDA device" and runs a smoke version (tiny model, the
CPU, small sizes) through the same code; VPM_GPU_BENCH_SMOKE=1 does the same on a
GPU. For a focused rerun: VPM_GPU_BENCH_SECTIONS (e.g. "indexer,parity"),
VPM_GPU_BENCH_CATALOG (images), VPM_GPU_BENCH_PROCESSES, VPM_GPU_BENCH_BUDGET_S.
Every table is printed as it is made; the figures go to $OUT/gpu-encoder.json when
OUT is set, and to data/bench/gpu-encoder.json; the services' logs to
$OUT/gpu-encoder-logs/.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.common import median, record, table, verdict, write_catalog
from bench.gpu.gpu_service import (
    Processes,
    build_engine_here,
    device_memory_used_mb,
    engine_alone,
    release,
    run_indexer,
    searchable,
    stream,
)

logger = logging.getLogger(__name__)

# No section starts after BUDGET_S seconds, and the last (the CUDA tests, which always run)
# is cut at END_S, so that the run ends within bench/gpu.sh's 6 minutes.
BUDGET_S = float(os.environ.get("VPM_GPU_BENCH_BUDGET_S", "270"))
END_S = BUDGET_S + 60


@dataclass(frozen=True)
class Plan:
    """What to measure, and how much: FULL on a GPU, SMOKE anywhere."""

    model: str
    device: str
    max_batch: int  # also the images per request, client and engine alike
    size: tuple[int, int]  # of the JPEGs
    distinct_jpegs: int
    images: int  # per measured run
    rounds: int
    streams_one: int  # client streams on the one process
    processes: int
    streams_many: int  # client streams spread over the processes
    catalog: int
    catalog_writers: int
    indexer_workers: int
    timeout_s: float
    test_selection: tuple[str, ...]  # extra pytest arguments
    settings: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)


CORES = os.cpu_count() or 1
FULL = Plan(
    model="ViT-B-32",
    device="cuda",
    max_batch=256,  # 256 x 70 KB stays under the encoder's 20 MB message limit
    size=(640, 480),
    distinct_jpegs=256,
    images=24_000,
    rounds=2,
    streams_one=4,
    processes=4,
    streams_many=8,
    catalog=42_700,
    catalog_writers=CORES,
    indexer_workers=min(16, CORES),
    timeout_s=90.0,
    test_selection=(),
    targets={"one": 8000, "one_vs_engine": 0.9, "many": 15_000, "indexer_s": 15, "cos": 0.995},
)
SMOKE = Plan(
    model="VPM-Tiny",
    device="cpu",
    max_batch=16,
    size=(160, 120),
    distinct_jpegs=16,
    images=256,
    rounds=1,
    streams_one=2,
    processes=2,
    streams_many=2,
    catalog=200,
    catalog_writers=1,
    indexer_workers=2,
    timeout_s=120.0,
    # The CUDA tests skip here: the run shows they are found and the step works.
    test_selection=("-m", "not slow", "-k", "cuda or nvjpeg"),
    settings={"runtime": "torch", "device": "cpu", "workers": 2, "threads": 1},
    targets=FULL.targets,
)


def plan_for_here() -> Plan:
    import torch

    if torch.cuda.is_available() and os.environ.get("VPM_GPU_BENCH_SMOKE") != "1":
        plan = FULL
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: running the smoke version (tiny model on the CPU, small sizes)")
        plan = SMOKE
        if torch.cuda.is_available():
            plan = replace(SMOKE, device="cuda", settings={"runtime": "torch"})
    catalog = os.environ.get("VPM_GPU_BENCH_CATALOG")  # a smaller catalog for a focused rerun
    processes = os.environ.get("VPM_GPU_BENCH_PROCESSES")
    if catalog:
        plan = replace(plan, catalog=int(catalog))
    if processes:
        plan = replace(plan, processes=int(processes))
    return plan


STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def run() -> dict[str, Any]:
    global STARTED
    STARTED = time.perf_counter()
    plan = plan_for_here()
    figures: dict[str, Any] = {"plan": f"{plan.model} on {plan.device}", "versions": _versions()}
    if plan.device == "cuda":
        import torch

        figures["gpu"] = torch.cuda.get_device_name()
    print(f"GPU benchmark: {figures.get('gpu', 'no GPU')}; {figures['versions']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpm-gpu-bench-") as scratch:
        work = Path(scratch)
        logs = Path(os.environ.get("OUT") or work) / "gpu-encoder-logs"
        logs.mkdir(parents=True, exist_ok=True)
        processes = Processes(logs)
        stopped: SystemExit | None = None
        try:
            _measure(plan, work, processes, figures)
        except SystemExit as signalled:  # SIGTERM: report what was measured, then exit
            stopped = signalled
            figures["error"] = f"stopped (exit {signalled.code}) at {elapsed():.0f} s"
        except Exception as error:  # noqa: BLE001 - what was measured is still reported
            logger.exception("the run stopped")
            figures["error"] = f"{type(error).__name__}: {error}"
        finally:
            processes.stop()
    figures["seconds"] = elapsed()
    _summary(figures, plan)
    _write(figures)
    if stopped is not None:
        raise stopped
    return figures


SECTIONS = ("one", "processes", "indexer", "parity", "tests")


def wanted_sections() -> set[str]:
    """VPM_GPU_BENCH_SECTIONS (a comma list of SECTIONS) picks sections for a focused rerun."""
    chosen = os.environ.get("VPM_GPU_BENCH_SECTIONS")
    picked = set(chosen.split(",")) if chosen else set(SECTIONS)
    unknown = picked - set(SECTIONS)
    if unknown:
        raise SystemExit(f"VPM_GPU_BENCH_SECTIONS: unknown {sorted(unknown)}; known {SECTIONS}")
    return picked


def _measure(plan: Plan, work: Path, processes: Processes, figures: dict[str, Any]) -> None:
    import multiprocessing

    from bench.gpu import gpu_load
    from tests import images

    wanted = wanted_sections()
    cache = work / "cache"
    # The catalog is written while the encoders start: both take seconds, neither is measured.
    catalog = work / "catalog"
    writing = (
        _in_thread(lambda: write_catalog(catalog, plan.catalog, [plan.size], plan.catalog_writers))
        if "indexer" in wanted
        else lambda: 0.0
    )
    targets = processes.encoders(plan, cache, plan.processes)
    files = [images.jpeg(*plan.size, seed=i, quality=90) for i in range(plan.distinct_jpegs)]
    figures["jpeg_kb_mean"] = sum(map(len, files)) / len(files) / 1024
    files_path = gpu_load.save_files(files, work / "jpegs.pickle")
    engine = build_engine_here(plan, cache) if "one" in wanted else None
    for target in targets:
        processes.wait_serving(target, "vpm.v1.Encoder")
    figures["catalog_written_s"] = writing()
    print(
        f"{plan.processes} encoder processes serving, catalog of {plan.catalog:,} JPEGs written, "
        f"at {elapsed():.0f} s",
        flush=True,
    )
    clients = multiprocessing.get_context("spawn").Pool(max(plan.streams_one, plan.streams_many))
    try:
        if engine is not None:
            figures["one_process"] = _section(
                "one process",
                lambda: one_process(plan, engine, files, clients, targets[0], files_path),
            )
            engine.close(drain=False)
            release(plan.device)
        if "processes" in wanted:
            figures["processes"] = _section(
                "processes", lambda: many_processes(plan, clients, targets, files_path)
            )
    finally:
        clients.terminate()
    if "indexer" in wanted:
        figures["indexer"] = _section(
            "indexer", lambda: indexer(plan, work, processes, targets, catalog)
        )
    if "parity" in wanted:
        figures["parity"] = _section("parity", lambda: parity(plan, targets[0]))
    if "tests" in wanted:
        figures["cuda_tests"] = _section("cuda tests", lambda: cuda_tests(plan), always=True)


def _in_thread(work: Any) -> Any:
    """Start work() on a thread; the returned function waits for it and gives its seconds."""
    started = time.perf_counter()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised by the waiter
            outcome["error"] = error
        outcome["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def wait() -> float:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["seconds"]

    return wait


def _section(name: str, work: Any, always: bool = False) -> dict[str, Any]:
    """Run one section; a failure is reported and recorded, and the next section still runs."""
    if elapsed() > BUDGET_S and not always:
        print(f"\n[{name}] skipped: {elapsed():.0f} s spent of a {BUDGET_S:.0f} s budget")
        return {"skipped": "over the time budget"}
    print(f"\n[{name}] at {elapsed():.0f} s", flush=True)
    try:
        return work()
    except Exception as error:  # noqa: BLE001 - one broken section must not lose the others
        logger.exception("section %s failed", name)
        return {"error": f"{type(error).__name__}: {error}"}


# -- the sections --------------------------------------------------------------------------


def one_process(
    plan: Plan, engine: Any, files: list[bytes], clients: Any, target: str, files_path: Path
) -> dict[str, Any]:
    """One encoder process over the batched RPC vs the engine alone, interleaved rounds."""
    request = plan.max_batch
    rpc = lambda n: stream(  # noqa: E731
        clients, [target], files_path, n, plan.streams_one, request, plan.timeout_s
    )
    alone = lambda n: engine_alone(engine, files, n, request)  # noqa: E731
    warm = min(plan.images, 8 * request)
    alone(warm)  # first batches, channels, client processes
    rpc(warm)
    samples: dict[str, list[dict[str, Any]]] = {"engine alone": [], "batched RPC": []}
    for _ in range(plan.rounds):
        samples["engine alone"].append(alone(plan.images))
        samples["batched RPC"].append(rpc(plan.images))
    ratios = [
        r["images_per_s"] / a["images_per_s"]
        for a, r in zip(samples["engine alone"], samples["batched RPC"], strict=True)
    ]
    rates = {name: median([s["images_per_s"] for s in runs]) for name, runs in samples.items()}
    errors = sum(s["errors"] for runs in samples.values() for s in runs)
    rows = [[name, plan.images, rates[name], errors if "RPC" in name else ""] for name in rates]
    print(
        table(
            f"One encoder process, {plan.model} {_dtype(plan)}, max batch {plan.max_batch}, "
            f"device decode; requests of {request} images, {plan.streams_one} client streams; "
            f"median of {plan.rounds} interleaved rounds",
            ["path", "images", "img/s", "errors"],
            rows,
        )
    )
    print(f"batched RPC / engine alone, round by round: {', '.join(f'{r:.2f}' for r in ratios)}")
    return {
        "samples": samples,
        "images_per_s": rates["batched RPC"],
        "engine_alone_images_per_s": rates["engine alone"],
        "vs_engine_alone": median(ratios),
        "vs_engine_alone_by_round": ratios,
        "errors": errors,
        "first_error": next(
            (s["first_error"] for rs in samples.values() for s in rs if s["first_error"]), ""
        ),
    }


def many_processes(
    plan: Plan, clients: Any, targets: list[str], files_path: Path
) -> dict[str, Any]:
    count = plan.images * 2
    stream(clients, targets, files_path, 4 * plan.max_batch * len(targets), plan.streams_many,
           plan.max_batch, plan.timeout_s)  # fmt: skip
    runs = [
        stream(clients, targets, files_path, count, plan.streams_many, plan.max_batch,
               plan.timeout_s)
        for _ in range(plan.rounds)
    ]  # fmt: skip
    rate = median([r["images_per_s"] for r in runs])
    errors = sum(r["errors"] for r in runs)
    print(
        table(
            f"{len(targets)} encoder processes on the one device, {plan.streams_many} client "
            f"streams spread over them; median of {plan.rounds} runs",
            ["processes", "images", "img/s", "errors"],
            [[len(targets), count, rate, errors]],
        )
    )
    return {
        "processes": len(targets),
        "runs": runs,
        "images_per_s": rate,
        "errors": errors,
        "device_memory_used_mb": device_memory_used_mb(plan.device),
    }


def indexer(
    plan: Plan, work: Path, processes: Processes, targets: list[str], catalog: Path
) -> dict[str, Any]:
    search = processes.search(work / "search", targets)
    processes.wait_serving(search, "vpm.v1.Search", timeout_s=120)
    left = max(60.0, END_S - 30 - elapsed())
    figures = run_indexer(
        catalog, targets, search, work / "summary.json", plan.indexer_workers, left
    )
    figures.update(searchable(search, catalog, plan.catalog))
    print(
        table(
            f"Indexer: {plan.catalog:,} JPEGs {plan.size[0]}x{plan.size[1]} on disk, "
            f"{len(targets)} encoder processes, into a running search service",
            [
                "wall clock s",
                "indexer's own s",
                "img/s",
                "encoded",
                "failed",
                "in the catalog",
                "image finds itself",
            ],
            [
                [
                    figures["wall_s"],
                    figures["elapsed_s"],
                    figures["images_per_s"],
                    figures["encoded"],
                    figures["failed"],
                    figures["products"],
                    figures["image_finds_itself"],
                ]
            ],
        )  # fmt: skip
    )
    return figures


def parity(plan: Plan, target: str) -> dict[str, Any]:
    """The service's fp16 vectors (FLOAT16 on the wire) vs the CPU fp32 reference."""
    import io

    import grpc
    import numpy as np
    import torch
    from PIL import Image

    from encoder_service.model import ModelConfig, load_model
    from tests.encoder.test_parity import corpus
    from vpm.v1 import encoder_pb2, encoder_pb2_grpc, vectors_pb2
    from vpm_common.matrix import unpack

    files = corpus()
    loaded = load_model(ModelConfig(plan.model, "none"))  # the processes' seed: same weights
    with torch.inference_mode():
        pixels = torch.stack(
            [
                loaded.preprocess(upright if upright is not None else Image.open(io.BytesIO(data)))
                for data, upright in files.values()
            ]
        )
        reference = torch.nn.functional.normalize(loaded.model.eval().encode_image(pixels), dim=1)
    stub = encoder_pb2_grpc.EncoderStub(
        grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    )
    request = encoder_pb2.ImageBatch(
        id="parity", images=[data for data, _ in files.values()], dtype=vectors_pb2.FLOAT16
    )
    (reply,) = stub.EncodeImageBatches(iter([request]), timeout=120)
    if reply.errors:
        raise RuntimeError(f"parity corpus: {[e.error.message for e in reply.errors]}")
    cosines = (unpack(reply.vectors) * reference.numpy()).sum(axis=1)
    by_file = dict(zip(files, cosines.tolist(), strict=True))
    worst = min(by_file, key=by_file.get)
    print(
        f"parity, {len(by_file)} files of the corpus, service ({_dtype(plan)}, device decode, "
        f"FLOAT16 on the wire) vs {plan.model} fp32 on the CPU: lowest cosine "
        f"{by_file[worst]:.5f} ({worst}), median {float(np.median(cosines)):.5f}"
    )
    return {"min_cosine": by_file[worst], "worst": worst, "cosines": by_file}


def cuda_tests(plan: Plan) -> dict[str, Any]:
    """pytest on every test file that holds CUDA-only tests (they skip without a device)."""
    root = Path(__file__).resolve().parents[2]
    files = sorted(
        str(path.relative_to(root))
        for path in (root / "tests").rglob("test_*.py")
        if "cuda.is_available" in path.read_text()
    )
    left = max(30.0, END_S - elapsed())
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    command += ["-rs", *plan.test_selection]
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=left, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"cuda tests: no result within {left:.0f} s")
        return {"files": files, "error": f"timed out after {left:.0f} s"}
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines[-15:]))
    last = lines[-1] if lines else ""
    skipped = int(match.group(1)) if (match := re.search(r"(\d+) skipped", last)) else 0
    # On a GPU, a CUDA test that skips has not passed (it skips here for want of one).
    passed = done.returncode == 0 and (plan.device != "cuda" or skipped == 0)
    return {"files": files, "exit": done.returncode, "skipped": skipped, "passed": passed,
            "last_line": last}  # fmt: skip


# -- the report ------------------------------------------------------------------------------


def _dtype(plan: Plan) -> str:
    return "fp16" if plan.device == "cuda" else "fp32"


def _summary(figures: dict[str, Any], plan: Plan) -> None:
    goal = plan.targets
    one, many = figures.get("one_process", {}), figures.get("processes", {})
    indexed, parity_ = figures.get("indexer", {}), figures.get("parity", {})
    tests = figures.get("cuda_tests", {})

    def check(value: Any, ok: Any) -> tuple[Any, str]:
        if value is None:
            return "n/a", "NOT MEASURED"
        return value, verdict(bool(ok(value)))

    rows = []
    for name, value, target, ok in (
        ("one process, batched RPC (img/s)", one.get("images_per_s"), f">= {goal['one']:,.0f}",
         lambda v: v >= goal["one"]),
        ("one process vs engine alone", one.get("vs_engine_alone"),
         f">= {goal['one_vs_engine']}", lambda v: v >= goal["one_vs_engine"]),
        (f"{plan.processes} processes together (img/s)", many.get("images_per_s"),
         f">= {goal['many']:,.0f}", lambda v: v >= goal["many"]),
        (f"indexer, {plan.catalog:,} images, wall clock (s)", indexed.get("wall_s"),
         f"<= {goal['indexer_s']}", lambda v: v <= goal["indexer_s"]),
        ("every product searchable after", indexed.get("all_searchable"), "yes", bool),
        ("parity: lowest cosine, fp16 vs CPU fp32", parity_.get("min_cosine"),
         f">= {goal['cos']}", lambda v: v >= goal["cos"]),
        ("CUDA tests pass", tests.get("passed"), "yes", bool),
    ):  # fmt: skip
        shown, result = check(value, ok)
        rows.append([name, shown, target, result])
    where = figures.get("gpu", "no GPU: smoke sizes, not comparable")
    print("\n" + table(f"Issue 15 targets ({where})", ["figure", "measured", "target", ""], rows))
    figures["targets"] = {row[0]: {"measured": row[1], "target": row[2], "verdict": row[3]}
                          for row in rows}  # fmt: skip
    print(f"(gpu bench: {figures['seconds']:.0f} s)")


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


def _write(figures: dict[str, Any]) -> None:
    path = record("gpu-encoder", figures)
    print(f"figures: {path}")
    out = os.environ.get("OUT")
    if out:
        target = Path(out) / "gpu-encoder.json"
        target.write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures: {target}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    # Every model here has random weights on purpose; one loud warning per build is noise.
    logging.getLogger("encoder_service.model").setLevel(logging.ERROR)
    # gpu.sh's timeout sends SIGTERM: unwind, so that the encoder and search processes stop
    # and leave the device to the next step.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
