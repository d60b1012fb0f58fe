"""The encoder engine: decode in worker threads, dynamic batches on the runtime, unit vectors out.

This is the domain object behind the gRPC servicer and knows nothing of gRPC.
Work is admitted up to a fixed number of items in flight (decode + queue +
inference); beyond that, callers get ResourceExhausted at once instead of
the server growing without bound. With `device_decode`, worker threads only
read JPEG headers (and decode what the device cannot) and the batches are
decoded and preprocessed on the model's device (encoder_service.inference.device_batches).
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
from encoder_service.encoded import Encoded, unit_rows
from encoder_service.inference.cuda_graphs import batch_buckets
from encoder_service.inference.runtimes import Runtime
from encoder_service.metrics import EncoderMetrics
from encoder_service.model import LoadedModel
from encoder_service.preprocess.cpu_transform import cpu_transform
from encoder_service.preprocess.images import ImageLimits, ImagePreprocessor
from vpm_common.errors import Cancelled, InvalidArgument, ResourceExhausted, VpmError

logger = logging.getLogger(__name__)

# Longest run of a text without a space: open_clip's BPE takes time growing with the square
# of a word's length (seconds for a word of thousands of letters), holding the interpreter
# lock. Words, compounds and short URLs fit; a run of letters of a script written without
# spaces is one word to the tokenizer, and this allows a long sentence of one.
MAX_WORD_CHARS = 100


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
    # Bytes of images one request may carry (the server's message limit follows it).
    max_request_bytes: int = 32 * 1024 * 1024
    max_texts: int = 1024
    max_text_bytes: int = 16 * 1024
    # Decode and preprocess image batches on the runtime's device (a TorchRuntime).
    device_decode: bool = False
    # With device_decode: batches launched on the device and not yet finished.
    device_in_flight: int = 2


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
        self._preprocess = ImagePreprocessor(cpu_transform(loaded.preprocess), config.limits)
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
        self._device_images = self._device_path(loaded) if config.device_decode else None
        run_images = self._run_images if self._device_images is None else self._device_images.run
        self._workers = ThreadPoolExecutor(
            config.workers, thread_name_prefix="decode", initializer=_one_torch_thread
        )
        # Texts are tokenized on a thread of their own: a call of long texts must not hold up
        # the images waiting for a decode worker.
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._batcher = DynamicBatcher(
            [
                BatchQueue("image", run_images, Encoded.join),
                BatchQueue("text", self._run_texts, Encoded.join),
            ],
            max_batch=config.max_batch,
            max_delay_s=config.max_delay_s,
            observer=self.metrics,
        )
        self._admitted = 0
        self._admit_lock = threading.Lock()

    def _device_path(self, loaded: LoadedModel) -> Any:
        from encoder_service.inference.device_batches import DeviceImageBatches
        from encoder_service.preprocess.gpu_pipeline import TensorImagePipeline, TensorTransform

        runtime = self.runtime
        if not hasattr(runtime, "encode_images_on_device"):
            raise ValueError(f"decoding on the device needs the torch runtime, not {runtime.name}")
        pipeline = TensorImagePipeline(
            TensorTransform.from_preprocess(loaded.preprocess),
            self.config.limits,
            runtime.device,
            runtime.input_dtype,
        )
        return DeviceImageBatches(pipeline, runtime, self.metrics, self.config.device_in_flight)

    # -- images ------------------------------------------------------------------

    @property
    def max_request_images(self) -> int:
        """Most images one request may carry: what the queue can admit at once."""
        return self.config.queue_size

    def submit_images(self, images: Sequence[bytes], caller: Caller) -> Future:
        """Start encoding a request of images; the future gives an Encoded with one row per
        image (a bad image fails only its own row) or raises the VpmError that failed them all.

        The request is admitted whole or refused whole (ResourceExhausted), decoded in
        chunks on the worker threads, then queued for inference as one group.
        """
        count = len(images)
        if not 1 <= count <= self.max_request_images:
            raise InvalidArgument(
                f"images: a request carries 1 to {self.max_request_images} images, got {count}"
            )
        self._admit(count, caller)
        result: Future = Future()
        result.add_done_callback(lambda _: self._release(count))
        size = -(-count // self.config.workers)
        starts = range(0, count, size)
        decoding = _Decoding(images, caller, result, chunks=len(starts))
        for start in starts:
            self._workers.submit(self._decode_chunk, decoding, start, min(start + size, count))
        return result

    def submit_image(self, data: bytes, caller: Caller) -> Future:
        """One image: the future gives its vector (D,) or raises its VpmError."""
        single: Future = Future()

        def unpack(done: Future) -> None:
            if done.exception() is not None:
                _settle(single, error=done.exception())
                return
            outcome = done.result().error_or_vector(0)
            if isinstance(outcome, BaseException):
                _settle(single, error=outcome)
            else:
                _settle(single, outcome)

        self.submit_images([data], caller).add_done_callback(unpack)
        return single

    def _decode_chunk(self, decoding: _Decoding, start: int, stop: int) -> None:
        """A worker thread: decode images[start:stop]; the last chunk queues the request."""
        try:
            if decoding.caller.gone:
                # Counted like the batcher's drops, so the metrics show every item a caller left.
                self.metrics.dropped("image", "cancelled", stop - start)
            else:
                for index in range(start, stop):
                    try:
                        decoding.payloads[index] = self._decode(decoding.images[index])
                    except Exception as error:  # noqa: BLE001 - becomes this image's error
                        if isinstance(error, InvalidArgument):
                            self.metrics.rejected.labels("invalid").inc()
                        decoding.errors[index] = error
        finally:
            if decoding.chunk_done():
                self._queue_decoded(decoding)

    def _decode(self, data: bytes) -> Any:
        if self._device_images is not None:
            return self._device_images.admit(data)
        pixels, timings = self._preprocess(data)
        self.metrics.stage_seconds.labels("decode").observe(timings.decode_s)
        self.metrics.stage_seconds.labels("preprocess").observe(timings.preprocess_s)
        return pixels

    def _queue_decoded(self, decoding: _Decoding) -> None:
        """Hand the decoded images of a request to the batcher as one group."""
        result, count = decoding.result, len(decoding.images)
        if decoding.caller.gone:
            _settle(result, error=Cancelled("the caller cancelled"))
            return
        positions = [i for i in range(count) if i not in decoding.errors]
        if not positions:
            nothing = Encoded(np.zeros((0, self.description.dim), dtype=np.float32))
            _settle(result, nothing.spread(count, positions, decoding.errors))
            return
        try:
            queued = self._batcher.submit(
                "image", [decoding.payloads[i] for i in positions], decoding.caller
            )
        except VpmError as refused:
            _settle(result, error=refused)
            return

        def encoded(done: Future) -> None:
            if done.exception() is not None:
                _settle(result, error=done.exception())
            else:
                _settle(result, done.result().spread(count, positions, decoding.errors))

        queued.add_done_callback(encoded)

    def _run_images(self, payloads: list[Any]) -> Encoded:
        import torch

        return Encoded(unit_rows(self.runtime.encode_images(torch.stack(payloads))))

    # -- texts -------------------------------------------------------------------

    @property
    def max_request_texts(self) -> int:
        """Most texts one call may carry: --max-texts, but no more than the queue admits at
        once (told to retry, a larger call would be refused forever)."""
        return min(self.config.max_texts, self.config.queue_size)

    def submit_texts(self, texts: Sequence[str], caller: Caller) -> Future:
        """The future gives an Encoded with one row per text, in order; a bad text fails
        only its own row."""
        if not texts:
            raise InvalidArgument("texts is empty: send at least one text")
        limit = self.max_request_texts
        if len(texts) > limit:
            why = "" if limit == self.config.max_texts else " (the queue's size, --queue-size)"
            raise InvalidArgument(f"texts has {len(texts)} items, over the limit of {limit}{why}")
        errors: dict[int, BaseException] = {}
        for index, text in enumerate(texts):
            problem = self._text_problem(text)
            if problem:
                errors[index] = InvalidArgument(f"texts[{index}]: {problem}")
        positions = [index for index in range(len(texts)) if index not in errors]
        result: Future = Future()
        if not positions:
            nothing = Encoded(np.zeros((0, self.description.dim), dtype=np.float32))
            _settle(result, nothing.spread(len(texts), positions, errors))
            return result
        self._admit(len(positions), caller)
        result.add_done_callback(lambda _: self._release(len(positions)))
        self._tokenizing.submit(self._tokenize_and_queue, texts, positions, errors, caller, result)
        return result

    def _text_problem(self, text: str) -> str | None:
        if not text.strip():
            return "text is empty"
        size = len(text.encode("utf-8"))
        if size > self.config.max_text_bytes:
            return f"text is {size} bytes, over the limit of {self.config.max_text_bytes}"
        longest = max(map(len, text.split()))
        if longest > MAX_WORD_CHARS:
            return (
                f"text has a word of {longest} characters (no space in it), over the limit of "
                f"{MAX_WORD_CHARS}: the tokenizer's time grows with the square of a word's length"
            )
        return None

    def _tokenize_and_queue(
        self,
        texts: Sequence[str],
        positions: list[int],
        errors: dict[int, BaseException],
        caller: Caller,
        result: Future,
    ) -> None:
        try:
            tokens = self._tokenizer([texts[index] for index in positions])
            for index, row in zip(positions, tokens, strict=True):
                if self._tokenizer.is_empty(row):  # its row is encoded, its error is the answer
                    errors[index] = InvalidArgument(
                        f"texts[{index}]: text is empty once cleaned (only control characters "
                        "or markup such as &nbsp;)"
                    )
            queued = self._batcher.submit("text", list(tokens), caller)
        except Exception as error:  # noqa: BLE001 - every caller must get an answer
            _settle(result, error=error)
            return

        def encoded(done: Future) -> None:
            if done.exception() is not None:
                _settle(result, error=done.exception())
            else:
                _settle(result, done.result().spread(len(texts), positions, errors))

        queued.add_done_callback(encoded)

    def _run_texts(self, payloads: list[Any]) -> Encoded:
        import torch

        return Encoded(unit_rows(self.runtime.encode_texts(torch.stack(payloads))))

    # -- admission and lifecycle -----------------------------------------------------

    def _admit(self, count: int, caller: Caller | None = None) -> None:
        """Take `count` items in, or refuse at once: when the queue is full, or when the work
        already queued would outlast the caller's deadline (shedding beats a late answer)."""
        with self._admit_lock:
            if self._admitted + count > self.config.queue_size:
                self.metrics.rejected.labels("queue_full").inc(count)
                raise ResourceExhausted(
                    f"encoder queue is full ({self._admitted} items in flight, limit "
                    f"{self.config.queue_size}); retry with backoff"
                )
            if caller is not None and caller.deadline is not None:
                wait_s = (self._admitted + count) * self.metrics.seconds_per_item()
                left_s = caller.deadline - time.monotonic()
                # Half the time left, not all of it: under overload the estimate runs
                # behind (batches slow down as load grows), and the answer must travel back.
                if self._admitted and wait_s > 0.5 * left_s:
                    self.metrics.rejected.labels("deadline").inc(count)
                    raise ResourceExhausted(
                        f"encoder busy: about {wait_s:.1f} s of work is queued, more than half the "
                        f"{max(left_s, 0):.1f} s left before this call's deadline; retry later"
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

    def warm_up_batch_sizes(self) -> list[int]:
        """A full batch and a single item; on a GPU every size bucket, as first calls are slow."""
        if self.runtime.device.startswith("cuda"):
            return sorted(batch_buckets(self.config.max_batch), reverse=True)
        return sorted({self.config.max_batch, 1}, reverse=True)

    def warm_up(self) -> float:
        """Run the warm-up batch sizes through the image path and one text; returns seconds."""
        import torch

        started = time.perf_counter()
        size = self._image_size
        if self._device_images is not None:
            self._device_images.warm_up(self.warm_up_batch_sizes())
        else:
            for count in self.warm_up_batch_sizes():
                self.runtime.encode_images(torch.zeros(count, 3, size, size))
        self.runtime.encode_texts(self._tokenizer(["a photo of a product"]))
        if self._device_images is None:
            # A first estimate of the cost of an item, until real batches refine it.
            batch = max(self.warm_up_batch_sizes())
            pixels = torch.zeros(batch, 3, size, size)
            timed = time.perf_counter()
            self.runtime.encode_images(pixels)
            self.metrics.observe_item_cost((time.perf_counter() - timed) / batch)
        return time.perf_counter() - started

    def close(self, drain: bool = True) -> None:
        """Finish (drain) or fail what is queued, then stop the threads and the runtime."""
        self._workers.shutdown(wait=drain, cancel_futures=not drain)
        self._tokenizing.shutdown(wait=drain, cancel_futures=not drain)
        self._batcher.close(drain=drain)
        if self._device_images is not None:
            self._device_images.close()
        self.runtime.close()


def _one_torch_thread() -> None:
    """Keep a decode thread's tensor work on its own core (the setting is per thread).

    Its resize is too small to gain from more, and extra OpenMP threads would wait
    on the cores inference needs.
    """
    import torch

    torch.set_num_threads(1)


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


class _Decoding:
    """A request of images on its way through the worker threads."""

    def __init__(
        self, images: Sequence[bytes], caller: Caller, result: Future, chunks: int
    ) -> None:
        self.images = images
        self.caller = caller
        self.result = result
        self.payloads: list[Any] = [None] * len(images)
        self.errors: dict[int, BaseException] = {}
        self.chunks = chunks  # counted down as each is decoded
        self._lock = threading.Lock()

    def chunk_done(self) -> bool:
        """Count one chunk as decoded; True for the last."""
        with self._lock:
            self.chunks -= 1
            return self.chunks == 0
