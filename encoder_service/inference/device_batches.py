"""Image batches decoded, preprocessed and encoded on the model's device, one overlapping the next.

The batcher's inference thread launches a batch (device decode, preprocess,
the model, unit-normalization and a non-blocking copy of the vectors into
pinned host memory) and returns at once with one future for the batch; a
finishing thread waits for that copy and settles it with the batch's Encoded.
So while the GPU runs the model on batch N, the inference thread already
decodes batch N+1 (nvJPEG has its own stream and, on A100/H100, its own
hardware). `in_flight` bounds the batches launched and not yet finished; 1
runs them strictly in turn.

Stage metrics: "decode" and "preprocess" are observed once per batch for the
device work (the time the whole batch took), and once per item for images
Pillow decoded in a worker thread.
"""

from __future__ import annotations

import io
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from encoder_service.encoded import Encoded
from encoder_service.inference.runtimes import TorchRuntime
from encoder_service.metrics import EncoderMetrics
from encoder_service.preprocess.gpu_pipeline import (
    CpuPixels,
    JpegRecord,
    PreparedBatch,
    TensorImagePipeline,
)

logger = logging.getLogger(__name__)


@dataclass
class _Launched:
    """A batch on its way: where its vectors will land, and how to know they have."""

    prepared: PreparedBatch
    host: Any  # float32 (N, D) in pinned memory, filled once `done` is reached
    done: Any  # a CUDA event recorded after the copy; None on the CPU


class DeviceImageBatches:
    """The engine's image path when images are decoded on the model's device."""

    def __init__(
        self,
        pipeline: TensorImagePipeline,
        runtime: TorchRuntime,
        metrics: EncoderMetrics,
        in_flight: int = 2,
    ) -> None:
        import torch

        self._torch = torch
        self.pipeline = pipeline
        self._runtime = runtime
        self._metrics = metrics
        self._cuda = runtime.device.startswith("cuda")
        self._slots = threading.BoundedSemaphore(in_flight)
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="device-finish")
        self._observe = True

    def admit(self, data: bytes) -> JpegRecord | CpuPixels:
        """Worker threads: route one image (InvalidArgument for a bad one, as on the CPU path)."""
        payload, timings = self.pipeline.admit(data)
        if self._observe and isinstance(payload, CpuPixels):
            self._metrics.stage_seconds.labels("decode").observe(timings.decode_s)
            self._metrics.stage_seconds.labels("preprocess").observe(timings.preprocess_s)
        return payload

    def run(self, payloads: list[JpegRecord | CpuPixels]) -> Future:
        """The batcher's batch function: launch, and return at once a future of the Encoded."""
        self._slots.acquire()
        try:
            launched = self._launch(payloads)
            future: Future = Future()
            self._finisher.submit(self._finish, launched, future)
        except BaseException:
            self._slots.release()
            raise
        return future

    def _launch(self, payloads: list[JpegRecord | CpuPixels]) -> _Launched:
        torch = self._torch
        prepared = self.pipeline.prepare(payloads)
        features = self._runtime.encode_images_on_device(prepared.pixels)
        unit = torch.nn.functional.normalize(features.float(), dim=1)
        if not self._cuda:
            return _Launched(prepared, unit, None)
        host = torch.empty(unit.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(unit, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(prepared, host, done)

    def _finish(self, launched: _Launched, future: Future) -> None:
        """The finishing thread: wait for the batch's copy, then settle the batch's future."""
        try:
            if launched.done is not None:
                launched.done.synchronize()
            rows = np.array(launched.host.numpy(), dtype=np.float32)
            prepared = launched.prepared
            if self._observe:
                stage = self._metrics.stage_seconds
                stage.labels("decode").observe(prepared.decode_s)
                stage.labels("preprocess").observe(prepared.preprocess_s())
            future.set_result(Encoded(rows, dict(prepared.errors)))
        except BaseException as error:  # noqa: BLE001 - every waiting caller must hear of it
            logger.exception("finishing an image batch of %d failed", len(launched.host))
            future.set_exception(error)
        finally:
            self._slots.release()

    def warm_up(self, batch_sizes: list[int]) -> None:
        """Run every batch size once (device decoder, resize kernels, model), unobserved."""
        self._observe = False
        try:
            jpeg, png = _sample_images()
            self.pipeline.check_device_decoder(jpeg)
            for size in batch_sizes:
                payloads = [self.admit(jpeg) for _ in range(size)]
                if size > 1:
                    payloads[-1] = self.admit(png)
                self.run(payloads).result()
        finally:
            self._observe = True

    def close(self) -> None:
        """Wait for launched batches to finish."""
        self._finisher.shutdown(wait=True)


def _sample_images() -> tuple[bytes, bytes]:
    """A 640x480 JPEG (the device path) and a small PNG (the Pillow path)."""
    from PIL import Image

    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], axis=-1).astype(np.uint8)
    files = []
    for image, fmt in ((pixels, "JPEG"), (pixels[:64, :48], "PNG")):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, fmt)
        files.append(buffer.getvalue())
    return files[0], files[1]
