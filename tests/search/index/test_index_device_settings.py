"""--index-device: parsing, the auto fallback, and the refusals, down to a real process's start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from search_service.__main__ import PREFIX
from search_service.index import gpu
from search_service.settings import SearchSettings
from vpm_common.settings import SettingsError, load_settings

REPO = Path(__file__).resolve().parents[3]
NO_GPU = gpu.gpu_missing()
needs_no_gpu = pytest.mark.skipif(NO_GPU is None, reason="a GPU FAISS is here: nothing to refuse")


def test_the_flag_and_the_variable_choose_the_device() -> None:
    assert load_settings(SearchSettings, PREFIX, [], environ={}).index_device == "cpu"
    settings = load_settings(SearchSettings, PREFIX, ["--index-device", "auto"], environ={})
    assert settings.index_device == "auto"
    settings = load_settings(SearchSettings, PREFIX, [], environ={f"{PREFIX}INDEX_DEVICE": "cuda"})
    assert settings.index_device == "cuda"


def test_hnsw_on_cuda_is_refused_naming_the_flag_and_the_variable() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            SearchSettings, PREFIX, ["--index-device=cuda", "--index-factory=HNSW32"], environ={}
        )
    message = str(caught.value)
    assert message.startswith("--index-device / VPM_SEARCH_INDEX_DEVICE: cuda: HNSW32 is an HNSW")
    assert "--index-device cpu" in message


@pytest.mark.parametrize("factory", ["Flat", "IVF4096,Flat", "IVF4096,PQ64", "IVF1024,PQ32x8"])
def test_flat_and_ivf_may_live_on_a_gpu(factory: str) -> None:
    assert gpu.factory_problem(factory) is None


@pytest.mark.parametrize("factory", ["HNSW32", "IVF256_HNSW32,Flat", "PQ64", "OPQ16,IVF64,PQ16"])
def test_other_factories_may_not(factory: str) -> None:
    assert gpu.factory_problem(factory) is not None


@needs_no_gpu
def test_auto_falls_back_to_the_cpu_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="search_service.index.gpu"):
        assert gpu.resolve_device("auto", "Flat") == "cpu"
    [line] = [r.getMessage() for r in caplog.records]
    assert line == f"index device auto: the index stays on the CPU: {NO_GPU}"


def test_auto_keeps_hnsw_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="search_service.index.gpu"):
        assert gpu.resolve_device("auto", "HNSW32") == "cpu"
    assert "HNSW" in caplog.text


@needs_no_gpu
def test_cuda_without_a_gpu_faiss_is_refused() -> None:
    with pytest.raises(gpu.DeviceError, match="^cuda: this FAISS build has no GPU support"):
        gpu.resolve_device("cuda", "Flat")
    assert gpu.resolve_device("cpu", "HNSW32") == "cpu"


def run_service(tmp_path: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "search_service",
        "--host=127.0.0.1",
        "--port=0",
        "--metrics-port=0",
        "--catalog-url=sqlite:///catalog.db",
        "--data-dir=data",
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout_s
    )


@pytest.mark.slow
@needs_no_gpu
def test_a_service_asked_for_cuda_without_a_gpu_stops_at_start_with_one_line(
    tmp_path: Path,
) -> None:
    done = run_service(tmp_path, "--index-device=cuda")
    assert done.returncode == 2
    output = done.stdout + done.stderr
    [line] = [line for line in output.splitlines() if "ERROR" in line]
    assert "--index-device / VPM_SEARCH_INDEX_DEVICE: cuda: this FAISS build has no GPU" in line
    assert "Traceback" not in output
    assert not (tmp_path / "catalog.db").exists()  # refused before opening anything


@pytest.mark.slow
def test_a_service_asked_for_hnsw_on_cuda_stops_at_start_with_one_line(tmp_path: Path) -> None:
    done = run_service(tmp_path, "--index-device=cuda", "--index-factory=HNSW32")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "search_service: --index-device / VPM_SEARCH_INDEX_DEVICE: cuda: "
        + gpu.factory_problem("HNSW32")
    ]
