"""The encoder engine: decode in worker threads, dynamic batches on the runtime, unit vectors out.

This is the domain object behind the gRPC servicer and knows nothing of gRPC.
Work is admitted up to a fixed number of items in flight (decode + queue +
inference); beyond that, callers get ResourceExhausted at once instead of
the server growing without bound.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from encoder_service.batcher import BatchQueue, Caller, DynamicBatcher
from encoder_service.images import ImageLimits, ImagePreprocessor
from encoder_service.metrics import EncoderMetrics
from encoder_service.model import LoadedModel
from encoder_service.runtimes import Runtime
from vpm_common.errors import Cancelled, InvalidArgument, ResourceExhausted, VpmError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8
    max_delay_s: float = 0.005
    workers: int = 2
    # Items admitted at once across all callers (decode + queue + inference).
    queue_size: int = 64
    # Items one stream may have in flight before the server stops reading it.
    stream_window: int = 16
    limits: ImageLimits = ImageLimits()
    max_texts: int = 1024
    max_text_bytes: int = 16 * 1024


@dataclass(frozen=True)
class ModelDescription:
    """What GetModelInfo reports."""

    model: str
    pretrained: str
    model_id: str
    dim: int
    runtime: str
    device: str
    dtype: str
    max_batch: int
    max_delay_ms: float
    image_size: int
    context_length: int
    random_weights: bool


class EncoderEngine:
    """Turns image bytes and texts into L2-normalized float32 vectors, batching across callers."""

    def __init__(
        self,
        loaded: LoadedModel,
        runtime: Runtime,
        config: EngineConfig,
        metrics: EncoderMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or EncoderMetrics()
        self.runtime = runtime
        self._preprocess = ImagePreprocessor(loaded.preprocess, config.limits)
        self._tokenizer = loaded.tokenizer
        self._image_size = loaded.image_size
        self.description = ModelDescription(
            model=loaded.config.name,
            pretrained=loaded.pretrained_label,
            model_id=loaded.model_id,
            dim=loaded.dim,
            runtime=runtime.name,
            device=runtime.device,
            dtype=runtime.dtype,
            max_batch=config.max_batch,
            max_delay_ms=config.max_delay_s * 1000,
            image_size=loaded.image_size,
            context_length=loaded.context_length,
            random_weights=loaded.random_weights,
        )
        self._workers = ThreadPoolExecutor(config.workers, thread_name_prefix="decode")
        self._batcher = DynamicBatcher(
            [BatchQueue("image", self._run_images), BatchQueue("text", self._run_texts)],
            max_batch=config.max_batch,
            max_delay_s=config.max_delay_s,
            observer=self.metrics,
        )
        self._admitted = 0
        self._admit_lock = threading.Lock()

    # -- images ------------------------------------------------------------------

    def submit_image(self, data: bytes, caller: Caller) -> Future:
        """Start encoding one image; the future gives its vector (D,) or raises a VpmError."""
        self._admit(1)
        result: Future = Future()
        result.add_done_callback(lambda _: self._release(1))
        decoded = self._workers.submit(self._decode, data, caller)
        decoded.add_done_callback(lambda done: self._after_decode(done, caller, result))
        return result

    def _decode(self, data: bytes, caller: Caller) -> Any:
        if caller.gone:
            raise Cancelled("the caller cancelled")
        pixels, timings = self._preprocess(data)
        self.metrics.stage_seconds.labels("decode").observe(timings.decode_s)
        self.metrics.stage_seconds.labels("preprocess").observe(timings.preprocess_s)
        return pixels

    def _after_decode(self, decoded: Future, caller: Caller, result: Future) -> None:
        error = decoded.exception()
        if error is not None:
            if isinstance(error, InvalidArgument):
                self.metrics.rejected.labels("invalid").inc()
            _settle(result, error=error)
            return
        try:
            queued = self._batcher.submit("image", decoded.result(), caller)
        except VpmError as refused:
            _settle(result, error=refused)
            return
        _chain(queued, result)

    def _run_images(self, payloads: list[Any]) -> list[np.ndarray]:
        import torch

        return list(_unit_rows(self.runtime.encode_images(torch.stack(payloads))))

    # -- texts -------------------------------------------------------------------

    def submit_texts(self, texts: Sequence[str], caller: Caller) -> list[Future]:
        """One future per text, in order; a bad text fails only its own future."""
        if not texts:
            raise InvalidArgument("texts is empty: send at least one text")
        if len(texts) > self.config.max_texts:
            raise InvalidArgument(
                f"texts has {len(texts)} items, over the limit of {self.config.max_texts}"
            )
        futures: list[Future] = [Future() for _ in texts]
        valid = []
        for index, text in enumerate(texts):
            problem = self._text_problem(text)
            if problem:
                _settle(futures[index], error=InvalidArgument(f"texts[{index}]: {problem}"))
            else:
                valid.append(index)
        if valid:
            self._admit(len(valid))
            for index in valid:
                futures[index].add_done_callback(lambda _: self._release(1))
            self._workers.submit(self._tokenize_and_queue, texts, valid, futures, caller)
        return futures

    def _text_problem(self, text: str) -> str | None:
        if not text.strip():
            return "text is empty"
        size = len(text.encode("utf-8"))
        if size > self.config.max_text_bytes:
            return f"text is {size} bytes, over the limit of {self.config.max_text_bytes}"
        return None

    def _tokenize_and_queue(
        self, texts: Sequence[str], valid: list[int], futures: list[Future], caller: Caller
    ) -> None:
        try:
            tokens = self._tokenizer([texts[index] for index in valid])
            for row, index in enumerate(valid):
                _chain(self._batcher.submit("text", tokens[row], caller), futures[index])
        except Exception as error:  # noqa: BLE001 - every caller must get an answer
            for index in valid:
                _settle(futures[index], error=error)

    def _run_texts(self, payloads: list[Any]) -> list[np.ndarray]:
        import torch

        return list(_unit_rows(self.runtime.encode_texts(torch.stack(payloads))))

    # -- admission and lifecycle -----------------------------------------------------

    def _admit(self, count: int) -> None:
        with self._admit_lock:
            if self._admitted + count > self.config.queue_size:
                self.metrics.rejected.labels("queue_full").inc(count)
                raise ResourceExhausted(
                    f"encoder queue is full ({self._admitted} items in flight, limit "
                    f"{self.config.queue_size}); retry with backoff"
                )
            self._admitted += count
            self.metrics.in_flight.set(self._admitted)

    def _release(self, count: int) -> None:
        with self._admit_lock:
            self._admitted -= count
            self.metrics.in_flight.set(self._admitted)

    def in_flight(self) -> int:
        with self._admit_lock:
            return self._admitted

    def warm_up(self) -> float:
        """Run a full batch and a single item through both towers; returns seconds taken."""
        import torch

        started = time.perf_counter()
        size = self._image_size
        for count in (self.config.max_batch, 1):
            self.runtime.encode_images(torch.zeros(count, 3, size, size))
        self.runtime.encode_texts(self._tokenizer(["a photo of a product"]))
        return time.perf_counter() - started

    def close(self, drain: bool = True) -> None:
        """Finish (drain) or fail what is queued, then stop the threads and the runtime."""
        self._workers.shutdown(wait=drain, cancel_futures=not drain)
        self._batcher.close(drain=drain)
        self.runtime.close()


def _unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.float32(1e-12))


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a future unless it was cancelled (asyncio cancels its side when a caller leaves)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except Exception:  # noqa: BLE001 - lost a race with cancel(); nobody is waiting
        pass


def _chain(source: Future, target: Future) -> None:
    def copy(done: Future) -> None:
        if done.cancelled():
            _settle(target, error=Cancelled("cancelled"))
        elif done.exception() is not None:
            _settle(target, error=done.exception())
        else:
            _settle(target, result=done.result())

    source.add_done_callback(copy)
