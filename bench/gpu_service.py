"""The GPU benchmark's engine and service sections: EncoderEngine alone, then over gRPC.

The service runs in this process (as `python -m encoder_service` would, on a
ServerThread) while client processes stream JPEGs at it, so its figures are
the server's own; one configuration runs several encoder processes on the one
GPU instead, to show what a single Python process leaves on the table.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import median, percentile, table

if TYPE_CHECKING:
    from bench.gpu_bench import Plan

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0  # an encoder process: import torch, build the model, warm up


def encoder_settings(plan: Plan, cache: Path, **overrides: Any) -> Any:
    from encoder_service.settings import EncoderSettings

    values = {
        "host": "127.0.0.1",
        "port": 0,
        "model": plan.model,
        "pretrained": "none",
        "metrics_port": 0,
        "cache_dir": cache,
        **plan.settings,
    }
    values.update(overrides)
    # Every stream's window must fit in the admission limit, or streams see RESOURCE_EXHAUSTED.
    return EncoderSettings(**values)


def engine_rates(plan: Plan, files: list[bytes], cache: Path) -> dict[str, Any]:
    from encoder_service.factory import build_engine

    configs = {
        "cpu": {"decode": "cpu"},
        "gpu, 1 batch in flight": {"decode": "gpu", "device_batches": 1},
        "gpu, 2 batches in flight": {"decode": "gpu", "device_batches": 2},
    }
    rates = {}
    for name, overrides in configs.items():
        engine = build_engine(encoder_settings(plan, cache, **overrides))
        count = plan.engine_images["cpu" if name == "cpu" else "gpu"]
        rates[name] = _engine_rate(engine, files, count)
        engine.close()
    rows = [[name, r["images"], r["images_per_s"], r["errors"]] for name, r in rates.items()]
    print(table("Engine alone (no gRPC)", ["decode", "images", "img/s", "errors"], rows))
    return rates


def _engine_rate(engine: Any, files: list[bytes], count: int) -> dict[str, Any]:
    import threading

    from encoder_service.batcher import Caller

    window = threading.Semaphore(max(1, engine.config.queue_size - engine.config.max_batch))
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def finished(future: Any) -> None:
        if future.exception() is not None:
            errors.append(future.exception())
        window.release()
        done.release()

    started = time.perf_counter()
    for index in range(count):
        window.acquire()
        engine.submit_image(files[index % len(files)], Caller()).add_done_callback(finished)
    for _ in range(count):
        done.acquire()
    seconds = time.perf_counter() - started
    first = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    return {"images": count, "images_per_s": count / seconds, "errors": len(errors), "first": first}


def service_runs(plan: Plan, files_path: Path, cache: Path, deadline: float) -> dict[str, Any]:
    """Each configuration in turn, with the same client processes; one failing skips alone."""
    import multiprocessing

    configs: dict[str, dict[str, Any]] = {"cpu": {"decode": "cpu"}, "gpu": {"decode": "gpu"}}
    if plan.device == "cuda":
        # For latency: graphs cut the model's launch cost, a 1 ms delay the batcher's wait.
        configs["gpu, CUDA graphs, 1 ms delay"] = {
            "decode": "gpu",
            "cuda_graphs": True,
            "max_delay_ms": 1.0,
        }
    only = os.environ.get("VPM_GPU_BENCH_SERVICE_CONFIGS")  # e.g. "processes" for a rerun
    if only == "processes":
        configs = {}
    for count in plan.processes:
        configs[f"gpu, {count} encoder processes"] = {"decode": "gpu", "processes": count}
    results: dict[str, Any] = {}
    with multiprocessing.get_context("spawn").Pool(plan.streams) as clients:
        for name, overrides in configs.items():
            if time.perf_counter() > deadline and results:
                results[name] = {"skipped": "over the time budget"}
                continue
            try:
                if "processes" in overrides:
                    count = overrides["processes"]
                    results[name] = _processes_service(plan, files_path, cache, clients, count)
                else:
                    results[name] = _one_service(plan, files_path, cache, clients, name, overrides)
            except Exception as error:  # noqa: BLE001 - the other configurations still run
                logger.exception("service configuration %r failed", name)
                results[name] = {"error": f"{type(error).__name__}: {error}"}
    rows = [_row(name, figures) for name, figures in results.items()]
    header = [
        "decode",
        "images",
        "img/s",
        f"s for {plan.catalog:,}",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    print(table(f"Service over gRPC, {plan.streams} client streams", header, rows))
    return results


def _row(name: str, figures: dict[str, Any]) -> list[Any]:
    if "images" not in figures:
        return [name, figures.get("skipped") or figures.get("error", "?"), "", "", "", "", ""]
    latency = figures.get("latency_ms", {})
    return [
        name,
        figures["images"],
        figures["images_per_s"],
        figures.get("catalog_s", ""),
        latency.get("p50", ""),
        latency.get("p99", ""),
        figures["errors"],
    ]


def _one_service(
    plan: Plan, files_path: Path, cache: Path, clients: Any, name: str, overrides: dict
) -> dict[str, Any]:
    from bench import gpu_load
    from encoder_service.factory import build_engine
    from encoder_service.server import EncoderApp, create_server
    from tests.support import ServerThread

    max_batch = 256 if plan.device == "cuda" else 8
    queue = 4 * plan.streams * max_batch  # room for every stream's window (2 x max batch)
    settings = encoder_settings(plan, cache, max_batch=max_batch, queue_size=queue, **overrides)
    app = EncoderApp()
    reset_peak(plan.device)
    built = time.perf_counter()

    async def build():  # noqa: ANN202 - ServerThread's builder
        server, port = await create_server(settings, app)
        await app.serve(build_engine(settings))
        return server, port

    thread = ServerThread(build)
    thread.start()
    start_s = time.perf_counter() - built
    try:
        target = thread.target
        count = plan.service_images[overrides["decode"]]
        figures = _stream(clients, [target], files_path, plan, count)
        if name == "gpu":
            catalog = _stream(clients, [target], files_path, plan, plan.catalog)
            figures["catalog_s"] = catalog["seconds"]
            figures["catalog_images_per_s"] = catalog["images_per_s"]
            figures["errors"] += catalog["errors"]
        latencies = clients.apply(
            gpu_load.single_image_latencies, (target, str(files_path), plan.latency_requests)
        )
        figures["latency_ms"] = {
            "p50": median(latencies) * 1000,
            "p99": percentile(latencies, 99) * 1000,
        }
        figures["start_and_warm_up_s"] = start_s
        figures["peak_allocated_mb"] = peak_memory_mb(plan.device)
        figures["device_memory_used_mb"] = device_memory_used_mb(plan.device)
    finally:
        thread.stop(0)
        if app.engine is not None:
            app.engine.close(drain=False)
        release(plan.device)
    return figures


def _processes_service(
    plan: Plan, files_path: Path, cache: Path, clients: Any, count: int
) -> dict[str, Any]:
    """Several `python -m encoder_service` on the one GPU, the client streams spread over them.

    One Python process serializes its gRPC, futures and replies on one
    interpreter lock; several processes (each with its own CUDA context) are
    how a single card is fed past that, as clients already round-robin.
    """
    from tests.support import free_port

    max_batch = 256 if plan.device == "cuda" else 8
    ports = [free_port() for _ in range(count)]
    streams_per_process = math.ceil(plan.streams / count)
    flags = ["--model", plan.model, "--pretrained", "none", "--metrics-port", "0"]
    flags += ["--cache-dir", str(cache), "--decode", "gpu", "--max-batch", str(max_batch)]
    flags += ["--queue-size", str(4 * streams_per_process * max_batch), "--log-level", "WARNING"]
    for key, value in plan.settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    logs = [cache.parent / f"encoder-{port}.log" for port in ports]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "encoder_service", "--port", str(port), *flags],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for port, log in zip(ports, logs, strict=True)
    ]
    try:
        started = time.perf_counter()
        targets = [f"127.0.0.1:{port}" for port in ports]
        for target, process, log in zip(targets, processes, logs, strict=True):
            _wait_until_serving(target, process, log, started + START_TIMEOUT_S)
        figures = {
            "processes": count,
            "start_and_warm_up_s": time.perf_counter() - started,
        }
        figures.update(_stream(clients, targets, files_path, plan, plan.service_images["gpu"]))
        catalog = _stream(clients, targets, files_path, plan, plan.catalog)
        figures["catalog_s"] = catalog["seconds"]
        figures["catalog_images_per_s"] = catalog["images_per_s"]
        figures["errors"] += catalog["errors"]
        figures["device_memory_used_mb"] = device_memory_used_mb(plan.device)
        return figures
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_until_serving(target: str, process: Any, log: Path, deadline: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    serving = health_pb2.HealthCheckResponse.SERVING
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            tail = log.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"encoder on {target} exited {process.returncode}: {tail}")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"encoder on {target} not SERVING within {START_TIMEOUT_S:.0f} s")


def _stream(clients: Any, targets: list[str], files_path: Path, plan: Plan, count: int) -> dict:
    """`count` images over plan.streams streams at once (spread over `targets`); the rate."""
    from bench import gpu_load

    share = math.ceil(count / plan.streams)
    jobs = [
        (
            targets[index % len(targets)],
            str(files_path),
            share,
            index * 7919,
            plan.service_timeout_s,
        )
        for index in range(plan.streams)
    ]
    parts = clients.starmap(gpu_load.stream_images, jobs)
    seconds = max(p.finished for p in parts) - min(p.started for p in parts)
    ok = sum(p.ok for p in parts)
    errors = sum(p.errors for p in parts)
    first = next((p.first_error for p in parts if p.first_error), "")
    if first:
        logger.warning("service stream errors: %s", first)
    return {
        "images": ok,
        "seconds": seconds,
        "images_per_s": ok / seconds,
        "errors": errors,
        "first_error": first,
        "timed_out": any(p.timed_out for p in parts),
    }


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(device: str) -> float | None:
    """The most this process's PyTorch allocator held since the last reset_peak."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def device_memory_used_mb(device: str) -> float | None:
    """All memory in use on the GPU (context, nvJPEG, cache included), as nvidia-smi counts."""
    if not device.startswith("cuda"):
        return None
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
