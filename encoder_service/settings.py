"""The encoder's settings: every flag has a VPM_ENCODER_* environment equivalent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vpm_common.cpus import available_cpus
from vpm_common.guard_settings import ServerGuards
from vpm_common.settings import check, setting

ENV_PREFIX = "VPM_ENCODER_"
# Image bytes per batched request: ~450 photos of the fashion set's ~70 KB.
REQUEST_IMAGE_BYTES = 32 * 1024 * 1024


# Past this many pixels Pillow refuses to open an image whatever our own limit says.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class EncoderSettings(ServerGuards):
    host: str = setting("0.0.0.0", "interface to listen on")
    port: int = setting(50051, "gRPC port (0 picks a free one)")
    model: str = setting("ViT-B-32", "open_clip architecture (VPM-Tiny: a tiny one for tests)")
    pretrained: str = setting(
        "laion2b_s34b_b79k",
        "open_clip pretrained tag, a local checkpoint path, or 'none' for seeded random weights",
    )
    seed: int = setting(0, "seed of the random weights when --pretrained none")
    runtime: str = setting("auto", "inference runtime", choices=("auto", "torch", "onnx"))
    device: str = setting(
        "auto", "where the model runs: auto is cuda when present", choices=("auto", "cpu", "cuda")
    )
    dtype: str = setting(
        "auto",
        "inference precision: auto is float16 on cuda, float32 on cpu",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    decode: str = setting(
        "auto",
        "where images are decoded and preprocessed: gpu = a batch at a time on the model's "
        "device (nvJPEG on cuda; the same tensor code on cpu with --runtime torch), "
        "cpu = Pillow in worker threads; auto = gpu when the torch runtime runs on cuda",
        choices=("auto", "cpu", "gpu"),
    )
    device_batches: int = setting(
        2,
        "with --decode gpu, image batches on the device at once: 2 decodes the next batch "
        "while the model runs one, 1 runs them in turn",
    )
    cuda_graphs: bool = setting(
        False, "replay the image tower as CUDA graphs at fixed batch sizes (torch on cuda)"
    )
    max_batch: int = setting(0, "largest inference batch (0: 8 on cpu, 256 on cuda)")
    max_delay_ms: float = setting(5.0, "longest wait for a batch to fill before it runs")
    workers: int = setting(
        0, "image decode threads (0: one per core but the one left to inference, 1 to 8)"
    )
    threads: int = setting(0, "inference threads on the cpu (0: one per core)")
    queue_size: int = setting(
        0, "items in flight before new work gets RESOURCE_EXHAUSTED (0: 8 x max batch)"
    )
    max_image_bytes: int = setting(20 * 1024 * 1024, "largest image file accepted")
    max_image_pixels: int = setting(
        40_000_000, "largest image accepted, in pixels (decompression bombs)"
    )
    max_texts: int = setting(1024, "most texts in one EncodeText call (at most the queue size)")
    max_text_bytes: int = setting(16 * 1024, "longest text accepted, in UTF-8 bytes")
    cache_dir: Path = setting(
        Path.home() / ".cache" / "vpm", "downloaded weights (weights/) and ONNX exports (onnx/)"
    )
    max_connection_age_s: float = setting(
        300.0,
        "close each client connection after this long (running calls get 60 s more), so "
        "clients resolve DNS again and reach replicas added since; 0: never",
    )
    metrics_port: int = setting(9151, "Prometheus metrics port (0: off)")
    grace_s: float = setting(10.0, "on SIGTERM, how long running calls may take to finish")
    log_level: str = setting("INFO", "logging level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", f"must be 0..65535, got {self.port}")
        check(
            0 <= self.metrics_port <= 65535,
            "metrics_port",
            f"must be 0..65535, got {self.metrics_port}",
        )
        check(0 <= self.max_batch <= 4096, "max_batch", f"must be 0..4096, got {self.max_batch}")
        check(
            0 <= self.max_delay_ms <= 10_000,
            "max_delay_ms",
            f"must be 0..10000, got {self.max_delay_ms}",
        )
        check(
            1 <= self.device_batches <= 8,
            "device_batches",
            f"must be 1..8, got {self.device_batches}",
        )
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        check(self.queue_size >= 0, "queue_size", f"must be >= 0, got {self.queue_size}")
        check(self.max_image_bytes > 0, "max_image_bytes", "must be positive")
        check(
            0 < self.max_image_pixels <= PILLOW_MAX_PIXELS,
            "max_image_pixels",
            f"must be 1 to {PILLOW_MAX_PIXELS} (Pillow refuses larger images as decompression "
            f"bombs), got {self.max_image_pixels}",
        )
        check(self.max_texts > 0, "max_texts", "must be positive")
        check(self.max_text_bytes > 0, "max_text_bytes", "must be positive")
        check(self.grace_s >= 0, "grace_s", "must be >= 0")
        check(self.max_connection_age_s >= 0, "max_connection_age_s", "must be >= 0")
        self.check_guards()

    def batch_size_for(self, device: str) -> int:
        if self.max_batch:
            return self.max_batch
        return 256 if device.startswith("cuda") else 8

    def worker_count(self) -> int:
        # Decode threads on every core contend with the inference thread for them (and for
        # the GIL): on 2 cores, 2 decode threads cost ~40% more CPU per image than 1 and
        # encode fewer images a second (BENCHMARKS.md, encoder service overhead).
        return self.workers or max(1, min(8, available_cpus() - 1))

    def thread_count(self) -> int:
        return self.threads or available_cpus()

    def max_request_bytes(self) -> int:
        """Bytes of images one EncodeImageBatches request may carry: a batch of typical
        photos, or one image of the largest size accepted."""
        return max(self.max_image_bytes, REQUEST_IMAGE_BYTES)

    def max_message_bytes(self) -> int:
        # Room for the images and the message around them.
        return self.max_request_bytes() + 64 * 1024
