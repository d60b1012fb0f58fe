"""`make run`: start the encoder, the search service and the search page, index the demo catalog,
answer a query.

The services and the page keep running in the background afterwards (logs and
pids in ./data); `make stop` (python -m demo.run --stop) stops them. Offline, the
encoder runs ViT-B-32 with seeded random weights and this says so plainly;
with network access it downloads and uses the real laion2b weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from demo.catalog import generate
from demo.query import search, table
from encoder_service.model import hub_reachable, weights_cached
from vpm.v1 import search_pb2

DATA = Path("data")
CATALOG = DATA / "demo-catalog"
ENCODER_PORT, SEARCH_PORT, WEB_PORT = 50051, 50052, 8080
EXAMPLE_ID = "10001"


def log(message: str) -> None:
    print(f"==> {message}", flush=True)


def pid_file(name: str) -> Path:
    return DATA / "run" / f"{name}.pid"


def stop_services() -> None:
    for name in ("web", "search", "encoder"):
        path = pid_file(name)
        if not path.exists():
            continue
        pid = int(path.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            log(f"stopping {name} (pid {pid})")
            for _ in range(150):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        path.unlink(missing_ok=True)


def start(name: str, args: list[str]) -> subprocess.Popen:
    (DATA / "logs").mkdir(parents=True, exist_ok=True)
    pid_file(name).parent.mkdir(parents=True, exist_ok=True)
    log_path = DATA / "logs" / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # outlives `make run`, and Ctrl-C in this terminal
    )
    pid_file(name).write_text(str(process.pid))
    log(f"started {name} (pid {process.pid}), log in {log_path}")
    return process


def wait_serving(
    name: str, port: int, service: str, process: subprocess.Popen, timeout_s: float
) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (DATA / "logs" / f"{name}.log").read_text().splitlines()[-5:]
            raise SystemExit(
                f"{name} exited with status {process.returncode}:\n  " + "\n  ".join(tail)
            )
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise SystemExit(
        f"{name} did not become SERVING within {timeout_s:.0f} s; see data/logs/{name}.log"
    )


def wait_answering(name: str, url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Wait until `url` answers HTTP 200 (the search page's health address)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (DATA / "logs" / f"{name}.log").read_text().splitlines()[-5:]
            raise SystemExit(
                f"{name} exited with status {process.returncode}:\n  " + "\n  ".join(tail)
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{name} did not answer within {timeout_s:.0f} s; see data/logs/{name}.log")


def choose_weights() -> str:
    chosen = os.environ.get("VPM_ENCODER_PRETRAINED")
    if chosen:
        log(f"weights: {chosen} (from VPM_ENCODER_PRETRAINED)")
        return chosen
    if weights_cached("ViT-B-32", "laion2b_s34b_b79k") or hub_reachable():
        log("weights: laion2b_s34b_b79k (downloaded on first start and cached)")
        return "laion2b_s34b_b79k"
    log(
        "NO NETWORK: the encoder runs ViT-B-32 with seeded RANDOM weights (--pretrained none).\n"
        "    The pipeline is real and the exact product comes back first, but other matches carry\n"
        "    no meaning. With network access, make run uses the real laion2b weights."
    )
    return "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.splitlines()[0])
    parser.add_argument("--stop", action="store_true", help="stop the services a previous run left")
    parser.add_argument("--count", type=int, default=300, help="products in the demo catalog")
    args = parser.parse_args(argv)
    stop_services()
    if args.stop:
        log("stopped")
        return 0
    pretrained = choose_weights()
    encoder = start(
        "encoder",
        [
            "encoder_service",
            "--pretrained",
            pretrained,
            "--port",
            str(ENCODER_PORT),
            "--cache-dir",
            str(DATA / "cache"),
        ],
    )
    search_process = start(
        "search",
        ["search_service", "--port", str(SEARCH_PORT), "--encoder", f"127.0.0.1:{ENCODER_PORT}",
         "--data-dir", str(DATA), "--catalog-url", f"sqlite:///{DATA / 'catalog.db'}"],
    )  # fmt: skip
    if not (CATALOG / "styles.csv").exists():
        log(f"generating a demo catalog of {args.count} products in {CATALOG}")
        generate(CATALOG, args.count)
    log("waiting for the encoder (its first start exports the model to ONNX: up to a minute)")
    wait_serving("encoder", ENCODER_PORT, "vpm.v1.Encoder", encoder, 600)
    wait_serving("search", SEARCH_PORT, "vpm.v1.Search", search_process, 120)
    log("indexing the demo catalog")
    indexing = subprocess.run(
        [sys.executable, "-m", "indexer", "--prune",
         "--styles", str(CATALOG / "styles.csv"), "--images", str(CATALOG / "images"),
         "--encoder", f"127.0.0.1:{ENCODER_PORT}", "--search", f"127.0.0.1:{SEARCH_PORT}"],
    )  # fmt: skip
    if indexing.returncode not in (0, 1):
        raise SystemExit(
            f"indexing failed (exit {indexing.returncode}); services still running: make stop"
        )
    page = start(
        "web",
        ["web", "--port", str(WEB_PORT), "--search", f"127.0.0.1:{SEARCH_PORT}",
         "--images", str(CATALOG / "images")],
    )  # fmt: skip
    wait_answering("web", f"http://127.0.0.1:{WEB_PORT}/healthz", page, 60)
    image = CATALOG / "images" / f"{EXAMPLE_ID}.jpg"
    log(f"example query: the image of product {EXAMPLE_ID} ({image})")
    response = search(
        f"127.0.0.1:{SEARCH_PORT}", search_pb2.SearchRequest(image=image.read_bytes(), top_k=5)
    )
    print(table(response))
    print(
        f"""
Search page: http://127.0.0.1:{WEB_PORT}  (open it in a browser; products like {EXAMPLE_ID}
  there: http://127.0.0.1:{WEB_PORT}/?id={EXAMPLE_ID})

Both services are running: encoder on 127.0.0.1:{ENCODER_PORT}, search on 127.0.0.1:{SEARCH_PORT}.
Query them:
  .venv/bin/python -m demo.query --image {image}
  .venv/bin/python -m demo.query --text "red striped t-shirt" --filter gender=Women
  .venv/bin/python -m demo.query --id {EXAMPLE_ID}
  grpcurl -plaintext -d '{{"product_id": "{EXAMPLE_ID}", "top_k": 5}}' \\
      127.0.0.1:{SEARCH_PORT} vpm.v1.Search/Search
  curl 'http://127.0.0.1:{WEB_PORT}/api/search?id={EXAMPLE_ID}&top_k=5'
Logs: data/logs/. Stop them: make stop"""
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
