"""Prometheus metrics of one encoder: throughput, batch sizes, queue depth, per-stage latency."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from encoder_service.batcher import BatchObserver

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RATE_WINDOW_S = 10.0


class EncoderMetrics(BatchObserver):
    """The metrics, in a registry of their own (one per engine, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.items = Counter(
            "vpm_encoder_items", "Items encoded, by kind (image, text)", ["kind"], registry=r
        )
        self.rejected = Counter(
            "vpm_encoder_rejected",
            "Items refused before inference, by reason (invalid, queue_full, deadline)",
            ["reason"],
            registry=r,
        )
        self.dropped_items = Counter(
            "vpm_encoder_dropped",
            "Queued items dropped because their caller was gone, by reason (cancelled, deadline)",
            ["kind", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "vpm_encoder_batch_size",
            "Items per inference batch",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "vpm_encoder_stage_seconds",
            "Seconds per stage: decode, preprocess (per item), queue (per request in a batch), "
            "inference (per batch)",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vpm_encoder_queue_depth", "Items waiting for inference", ["kind"], registry=r
        )
        self.in_flight = Gauge(
            "vpm_encoder_in_flight",
            "Items admitted and not yet answered (decode + queue + inference)",
            registry=r,
        )
        self.images_per_second = Gauge(
            "vpm_encoder_images_per_second",
            f"Images encoded per second over the last {RATE_WINDOW_S:.0f} s",
            registry=r,
        )
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._item_cost: float | None = None
        self.images_per_second.set_function(self._image_rate)

    # BatchObserver hooks, called on the inference thread.
    def batch_started(self, queue: str, size: int, waits: list[float]) -> None:
        self.batch_size.labels(queue).observe(size)
        stage = self.stage_seconds.labels("queue")
        for wait in waits:  # one per request in the batch
            stage.observe(wait)

    def batch_finished(self, queue: str, size: int, seconds: float) -> None:
        self.stage_seconds.labels("inference").observe(seconds)
        self.items.labels(queue).inc(size)
        self.observe_item_cost(seconds / size)
        if queue == "image":
            with self._lock:
                self._recent.append((time.monotonic(), size))

    def observe_item_cost(self, seconds: float) -> None:
        """Fold one measurement of inference seconds per item into a moving average."""
        with self._lock:
            if self._item_cost is None:
                self._item_cost = seconds
            else:
                self._item_cost = 0.8 * self._item_cost + 0.2 * seconds

    def seconds_per_item(self) -> float:
        """Inference time per item in recent batches (0 until measured): admission uses it to
        refuse work that would wait past its caller's deadline."""
        with self._lock:
            return self._item_cost or 0.0

    def dropped(self, queue: str, reason: str, count: int = 1) -> None:
        self.dropped_items.labels(queue, reason).inc(count)

    def depth(self, queue: str, waiting: int) -> None:
        self.queue_depth.labels(queue).set(waiting)

    def _image_rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(size for _, size in self._recent) / RATE_WINDOW_S
