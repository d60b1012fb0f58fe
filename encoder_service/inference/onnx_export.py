"""Export the two towers to ONNX once per model, cache them on disk, and prove parity before use.

The cache is keyed by the model id (architecture + weights, or seed for
random weights) and the PyTorch version, and written atomically (temporary
directory + rename), so concurrent encoders on one disk never read a
half-written graph. Every load compares ONNX Runtime with PyTorch on a fixed
probe batch and refuses to serve below cosine 0.999.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from encoder_service.inference.runtimes import PARITY_MIN_COSINE, OnnxRuntime, ParityError
from encoder_service.model import LoadedModel

logger = logging.getLogger(__name__)

OPSET = 18
PROBE_TEXTS = ["a photo of a red dress", "white sneakers", "", "navy blue denim jacket " * 20]


def load_checked(loaded: LoadedModel, cache_dir: Path, threads: int = 0) -> OnnxRuntime:
    """An OnnxRuntime for `loaded`, exported on first use, that agrees with PyTorch."""
    folder = export(loaded, cache_dir)
    runtime = OnnxRuntime(folder / "visual.onnx", folder / "text.onnx", threads)
    image_cos, text_cos = parity(loaded, runtime)
    logger.info("ONNX parity with PyTorch: min cosine images %.6f, texts %.6f", image_cos, text_cos)
    if min(image_cos, text_cos) < PARITY_MIN_COSINE:
        raise ParityError(
            f"ONNX graphs in {folder} disagree with PyTorch (min cosine images {image_cos:.6f}, "
            f"texts {text_cos:.6f}, need {PARITY_MIN_COSINE}); refusing to serve them"
        )
    return runtime


def cache_folder(loaded: LoadedModel, cache_dir: Path) -> Path:
    import torch

    key = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{loaded.model_id}-torch{torch.__version__}-op{OPSET}")
    return cache_dir / "onnx" / key


def export(loaded: LoadedModel, cache_dir: Path) -> Path:
    """The cache folder holding visual.onnx and text.onnx for this model, exporting if absent."""
    folder = cache_folder(loaded, cache_dir)
    if (folder / "meta.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    started = time.perf_counter()
    logger.info(
        "exporting %s to ONNX (first use of this model; cached in %s)", loaded.model_id, folder
    )
    try:
        _export_towers(loaded, staging)
        (staging / "meta.json").write_text(
            json.dumps({"model_id": loaded.model_id, "opset": OPSET})
        )
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            # Another encoder finished the same export first; its copy is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("ONNX export done in %.1f s", time.perf_counter() - started)
    return folder


def _export_towers(loaded: LoadedModel, folder: Path) -> None:
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(pixels)

    class TextTower(ImageTower):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model.encode_text(tokens)

    size = loaded.image_size
    towers = [
        (ImageTower(loaded.model), torch.zeros(2, 3, size, size), "pixels", "visual.onnx"),
        (TextTower(loaded.model), loaded.tokenizer(["a", "b"]), "tokens", "text.onnx"),
    ]
    for tower, example, input_name, file_name in towers:
        with warnings.catch_warnings(), _quiet_export_logs():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                tower.eval(),
                (example,),
                str(folder / file_name),
                input_names=[input_name],
                output_names=["features"],
                dynamic_axes={input_name: {0: "batch"}, "features": {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )


@contextlib.contextmanager
def _quiet_export_logs() -> Any:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)


def parity(loaded: LoadedModel, runtime: OnnxRuntime) -> tuple[float, float]:
    """Min cosine between ONNX Runtime and PyTorch on fixed probe images and texts."""
    import torch

    generator = torch.Generator().manual_seed(1234)
    pixels = torch.randn(3, 3, loaded.image_size, loaded.image_size, generator=generator)
    tokens = loaded.tokenizer(PROBE_TEXTS)
    with torch.inference_mode():
        ref_images = loaded.model.encode_image(pixels).numpy()
        ref_texts = loaded.model.encode_text(tokens).numpy()
    return (
        _min_cosine(ref_images, runtime.encode_images(pixels)),
        _min_cosine(ref_texts, runtime.encode_texts(tokens)),
    )


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())
