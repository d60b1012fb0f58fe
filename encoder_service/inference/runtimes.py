"""Inference runtimes behind one interface: PyTorch (CPU or CUDA) and ONNX Runtime (CPU).

Both start from the same `LoadedModel`, so they compute the same function;
the ONNX graphs are exported from those very weights and checked for parity
before they may serve. Runtimes return raw (unnormalized) float32 features;
the engine normalizes.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.model import LoadedModel
from vpm_common.cpus import available_cpus

logger = logging.getLogger(__name__)

PARITY_MIN_COSINE = 0.999


class ParityError(RuntimeError):
    """An exported graph disagrees with the PyTorch model it came from."""


class Runtime(ABC):
    """Runs the two towers on batches."""

    name: str
    device: str
    dtype: str

    @abstractmethod
    def encode_images(self, pixels: Any) -> np.ndarray:
        """float32 tensor (N, 3, S, S) on the CPU -> float32 features (N, D)."""

    @abstractmethod
    def encode_texts(self, tokens: Any) -> np.ndarray:
        """int64 tensor (N, context_length) -> float32 features (N, D)."""

    def close(self) -> None:  # noqa: B027 - most runtimes have nothing to release
        """Release what the runtime holds."""


class TorchRuntime(Runtime):
    """PyTorch eager: fp32 on the CPU; on CUDA the model itself cast to fp16/bf16.

    Casting the weights once is cheaper than autocast, which re-casts them on
    every call; ViT-B-32 keeps cosine >= 0.999 to fp32 in half precision.
    """

    name = "torch"

    def __init__(self, loaded: LoadedModel, device: str = "cpu", dtype: str = "float32") -> None:
        import torch

        self._torch = torch
        self.device = device
        self.dtype = dtype
        self.input_dtype = getattr(torch, dtype)  # what encode_images_on_device takes
        self.image_size = loaded.image_size
        self._model = loaded.model.to(device=device, dtype=self.input_dtype).eval()
        self._graphs: Any = (
            None  # encoder_service.inference.cuda_graphs.GraphedTower, when captured
        )

    def _run(self, tower: Any, batch: Any) -> np.ndarray:
        torch = self._torch
        batch = batch.to(self.device, non_blocking=True)
        if batch.is_floating_point():
            batch = batch.to(self.input_dtype)
        with torch.inference_mode():
            features = tower(batch)
        return features.float().cpu().numpy()

    def encode_images(self, pixels: Any) -> np.ndarray:
        return self._run(self._image_tower, pixels)

    def encode_texts(self, tokens: Any) -> np.ndarray:
        return self._run(self._model.encode_text, tokens)

    def encode_images_on_device(self, pixels: Any) -> Any:
        """(N, 3, S, S) in input_dtype on the device -> features (N, D) there, not waited for.

        Read the result before the next call: with CUDA graphs it is a view of
        the graph's output buffer, which the next replay overwrites.
        """
        with self._torch.inference_mode():
            return self._image_tower(pixels)

    def _image_tower(self, pixels: Any) -> Any:
        if self._graphs is not None:
            features = self._graphs(pixels)
            if features is not None:
                return features
        return self._model.encode_image(pixels)

    def capture_cuda_graphs(self, batch_sizes: list[int]) -> list[int]:
        """Replay the image tower as CUDA graphs at these batch sizes; returns those captured."""
        from encoder_service.inference.cuda_graphs import GraphedTower

        if not self.device.startswith("cuda"):
            raise ValueError("CUDA graphs need --device cuda")
        self._graphs = GraphedTower.capture(
            self._model.encode_image, batch_sizes, self.image_size, self.input_dtype, self.device
        )
        return self._graphs.batch_sizes if self._graphs is not None else []

    def close(self) -> None:
        self._model = self._graphs = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


class OnnxRuntime(Runtime):
    """ONNX Runtime on the CPU over graphs exported from the same weights."""

    name = "onnx"
    device = "cpu"
    dtype = "float32"

    def __init__(self, visual_path: Path, text_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or available_cpus()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: its warnings are about graph internals
        # Idle ORT threads spin by default, stealing the cores that decode images
        # and run PyTorch next to it; on a small CPU that costs more than it saves.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self._visual = ort.InferenceSession(str(visual_path), options, providers=providers)
        self._text = ort.InferenceSession(str(text_path), options, providers=providers)

    def encode_images(self, pixels: Any) -> np.ndarray:
        array = np.ascontiguousarray(pixels.numpy(), dtype=np.float32)
        return self._visual.run(None, {"pixels": array})[0]

    def encode_texts(self, tokens: Any) -> np.ndarray:
        array = np.ascontiguousarray(tokens.numpy(), dtype=np.int64)
        return self._text.run(None, {"tokens": array})[0]

    def close(self) -> None:
        self._visual = self._text = None


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is usable, else 'cpu'; 'cuda' without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if not device.startswith("cuda") and dtype != "float32":
        raise ValueError(f"--dtype {dtype}: the CPU runs float32 only")
    return dtype


def build_runtime(
    loaded: LoadedModel,
    runtime: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    threads: int = 0,
    cache_dir: Path | None = None,
) -> Runtime:
    """The runtime the settings ask for; 'auto' is PyTorch on CUDA and the faster one on the CPU."""
    import torch

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if threads > 0:
        torch.set_num_threads(threads)
    if runtime == "torch" or (runtime == "auto" and device.startswith("cuda")):
        return TorchRuntime(loaded, device, dtype)
    if device.startswith("cuda"):
        raise ValueError("--runtime onnx runs on the CPU only here; use --runtime torch on CUDA")
    from encoder_service.inference import onnx_export

    cache_dir = cache_dir or Path.home() / ".cache" / "vpm"
    try:
        onnx = onnx_export.load_checked(loaded, cache_dir, threads)
    except Exception as error:
        if runtime == "onnx":
            raise
        logger.warning("ONNX Runtime unusable (%s); using PyTorch", error)
        return TorchRuntime(loaded, device, dtype)
    if runtime == "onnx":
        return onnx
    return _faster_on_one_image(onnx, TorchRuntime(loaded, device, dtype), loaded.image_size)


def _faster_on_one_image(first: Runtime, second: Runtime, image_size: int) -> Runtime:
    """Measure one-image latency of both (what a live query waits for) and keep the faster."""
    import torch

    probe = torch.zeros(1, 3, image_size, image_size)
    timings = {}
    for candidate in (first, second):
        candidate.encode_images(probe)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            candidate.encode_images(probe)
        timings[candidate] = (time.perf_counter() - started) / 3
    chosen = min(timings, key=timings.get)
    logger.info(
        "runtime auto: one image takes %s; using %s",
        ", ".join(f"{r.name} {t * 1000:.1f} ms" for r, t in timings.items()),
        chosen.name,
    )
    for candidate in timings:
        if candidate is not chosen:
            candidate.close()
    return chosen
