"""The GPU benchmark's moving parts: encoder and search processes, the engine alone, the indexer.

Encoders and search run as `python -m ...` processes, as a user starts them;
client processes (bench/gpu/gpu_load.py) stream the JPEGs, so the figures are the
servers' own. The engine alone runs in this process, with the same settings.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.gpu.gpu_bench import Plan

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 240.0  # an encoder process: import torch, build the model, warm up


def encoder_values(plan: Plan, cache: Path) -> dict[str, Any]:
    """The encoder settings every process and the in-process engine share."""
    return {
        "model": plan.model,
        "pretrained": "none",
        "decode": "gpu",
        "max_batch": plan.max_batch,
        "cache_dir": cache,
        **plan.settings,
    }


def build_engine_here(plan: Plan, cache: Path) -> Any:
    from encoder_service.factory import build_engine
    from encoder_service.settings import EncoderSettings

    values = {"host": "127.0.0.1", "port": 0, "metrics_port": 0, **encoder_values(plan, cache)}
    return build_engine(EncoderSettings(**values))


class Processes:
    """`python -m <module>` processes, output to logs under `logs`; stop() ends them all."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, module: str, name: str, flags: list[str]) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", module, *flags], stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        self.started.append((process, log))
        return process

    def encoders(self, plan: Plan, cache: Path, count: int) -> list[str]:
        """Start `count` encoder processes at once; their targets (not yet waited for)."""
        from tests.support import free_port

        flags = ["--metrics-port", "0", "--log-level", "WARNING", "--host", "127.0.0.1"]
        for key, value in encoder_values(plan, cache).items():
            flags += [f"--{key.replace('_', '-')}", str(value)]
        targets = []
        for index in range(count):
            port = free_port()
            self.start("encoder_service", f"encoder-{index}", [*flags, "--port", str(port)])
            targets.append(f"127.0.0.1:{port}")
        return targets

    def search(self, data: Path, encoders: list[str]) -> str:
        from tests.support import free_port

        port = free_port()
        flags = ["--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data)]
        flags += ["--catalog-url", f"sqlite:///{data}/catalog.db", "--metrics-port", "0"]
        flags += ["--encoder", ",".join(encoders), "--log-level", "WARNING"]
        data.mkdir(parents=True, exist_ok=True)
        self.start("search_service", "search", flags)
        return f"127.0.0.1:{port}"

    def wait_serving(self, target: str, service: str, timeout_s: float = START_TIMEOUT_S) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        port = target.rsplit(":", 1)[1]
        process, log = next(
            (p, log) for p, log in self.started if p.args[p.args.index("--port") + 1] == port
        )
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
        serving = health_pb2.HealthCheckResponse.SERVING
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                tail = log.read_text().strip().splitlines()[-5:]
                raise RuntimeError(f"{service} on {target} exited {process.returncode}: {tail}")
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                if stub.Check(request, timeout=2).status == serving:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{service} on {target} not SERVING within {timeout_s:.0f} s")

    def stop(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in self.started:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.started.clear()


def engine_alone(engine: Any, files: list[bytes], count: int, request: int) -> dict[str, Any]:
    """Requests of `request` images through submit_images, the queue kept full (as the RPC's
    streams keep it): the device pipeline's own rate, no gRPC."""
    from encoder_service.batcher import Caller

    slots = threading.Semaphore(max(1, engine.config.queue_size // request))
    done = threading.Semaphore(0)
    failures: list[str] = []

    def finished(future: Any) -> None:
        if future.exception() is not None:
            failures.append(repr(future.exception()))
        elif future.result().errors:
            failures.append(repr(next(iter(future.result().errors.values()))))
        slots.release()
        done.release()

    starts = range(0, count, request)
    started = time.perf_counter()
    for start in starts:
        slots.acquire()
        chunk = [files[i % len(files)] for i in range(start, min(start + request, count))]
        engine.submit_images(chunk, Caller()).add_done_callback(finished)
    for _ in starts:
        done.acquire()
    seconds = time.perf_counter() - started
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "errors": len(failures),
        "first_error": failures[0] if failures else "",
    }


def stream(
    clients: Any,
    targets: list[str],
    files_path: Path,
    count: int,
    streams: int,
    request: int,
    timeout_s: float,
) -> dict[str, Any]:
    """`count` images over `streams` EncodeImageBatches streams (spread over `targets`)."""
    from bench.gpu import gpu_load

    share = math.ceil(count / streams)
    jobs = [
        (targets[i % len(targets)], str(files_path), share, i * 7919, timeout_s, request, 4)
        for i in range(streams)
    ]
    parts = clients.starmap(gpu_load.stream_batches, jobs)
    seconds = max(p.finished for p in parts) - min(p.started for p in parts)
    ok = sum(p.ok for p in parts)
    first = next((p.first_error for p in parts if p.first_error), "")
    if first:
        logger.warning("stream errors: %s", first)
    return {
        "images": ok,
        "seconds": seconds,
        "images_per_s": ok / seconds,
        "errors": sum(p.errors for p in parts) + (share * streams - ok if first else 0),
        "first_error": first,
        "timed_out": any(p.timed_out for p in parts),
    }


def run_indexer(
    catalog: Path, encoders: list[str], search: str, summary: Path, workers: int, timeout_s: float
) -> dict[str, Any]:
    """`python -m indexer` over the catalog; wall clock from its start to its exit."""
    command = [
        sys.executable, "-m", "indexer", "--styles", str(catalog / "styles.csv"),
        "--images", str(catalog / "images"), "--encoder", ",".join(encoders), "--search", search,
        "--progress", "off", "--log-level", "WARNING", "--workers", str(workers),
        "--summary-json", str(summary),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"indexer exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    report = json.loads(summary.read_text())
    return {
        "wall_s": wall,
        "elapsed_s": report["elapsed_s"],
        "images_per_s": report["images_per_s"],
        "encoded": report["encoded"],
        "skipped_unchanged": report["skipped_unchanged"],
        "metadata_updated": report["metadata_updated"],
        "failed": len(report["failed"]),
        "first_failure": report["failed"][0] if report["failed"] else None,
        "spread": report["encoder_spread"],
    }


def searchable(search: str, catalog: Path, count: int, probes: int = 5) -> dict[str, Any]:
    """The catalog's product count, and probes: search by id answers; a product's own image
    finds that product first."""
    import grpc

    from vpm.v1 import search_pb2, search_pb2_grpc

    stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(search))
    stats = stub.GetStats(search_pb2.GetStatsRequest(), timeout=30)
    ids = [str(i * (count // probes) + 1) for i in range(probes)]
    by_id = [
        len(stub.Search(search_pb2.SearchRequest(product_id=i, top_k=5), timeout=30).matches)
        for i in ids
    ]
    by_image = []
    for product in ids:
        data = (catalog / "images" / f"{product}.jpg").read_bytes()
        reply = stub.Search(search_pb2.SearchRequest(image=data, top_k=1), timeout=30)
        best = reply.matches[0] if reply.matches else None
        by_image.append([product, best.product.id if best else None, best.score if best else None])
    found_itself = sum(1 for product, best, _ in by_image if best == product)
    return {
        "products": stats.products,
        "index_size": stats.index_size,
        "all_searchable": stats.products == count and stats.index_size == count,
        "search_by_id_matches": by_id,
        "image_finds_itself": f"{found_itself}/{len(ids)}",
        "by_image": by_image,
    }


def device_memory_used_mb(device: str) -> float | None:
    """All memory in use on the GPU (every process's context included), as nvidia-smi counts."""
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
