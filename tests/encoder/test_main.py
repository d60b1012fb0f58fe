"""End-to-end tier: `python -m encoder_service` as a real process, the way a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests import images
from tests.support import free_port
from vpm.v1 import encoder_pb2, encoder_pb2_grpc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_encoder(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "encoder_service", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_serving(target: str, timeout: float = 120) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service="vpm.v1.Encoder"), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{target} never became SERVING")


def test_without_network_real_weights_fail_fast_with_one_clear_line(tmp_path: Path) -> None:
    process = run_encoder(
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        "--cache-dir",
        str(tmp_path),
        env={"HF_HOME": str(tmp_path / "hf")},
    )
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert "not cached and no network" in errors[0]
    assert "--pretrained PATH" in errors[0] and "--pretrained none" in errors[0]


def test_bad_settings_exit_2_naming_the_key() -> None:
    process = run_encoder(env={"VPM_ENCODER_MAX_BATCH": "lots"})
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert output.strip() == "encoder_service: VPM_ENCODER_MAX_BATCH='lots': expected an integer"


def test_serves_then_sigterm_drains_and_exits_0(model_cache: Path) -> None:
    port = free_port()
    process = run_encoder(
        "--model",
        "VPM-Tiny",
        "--pretrained",
        "none",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--cache-dir",
        str(model_cache),
    )
    try:
        target = f"127.0.0.1:{port}"
        wait_serving(target)
        stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(target))
        reply = next(
            stub.EncodeImages(iter([encoder_pb2.ImageItem(id="a", data=images.jpeg())]), timeout=30)
        )
        assert len(reply.vector) == 64
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "RANDOM WEIGHTS" in output
    assert "received SIGTERM: NOT_SERVING" in output and "stopped" in output
    assert "Traceback" not in output
