"""Settings to a ready engine: load the model, build the runtime, size the batcher, warm up."""

from __future__ import annotations

import logging

from encoder_service.engine import EncoderEngine, EngineConfig
from encoder_service.images import ImageLimits
from encoder_service.metrics import EncoderMetrics
from encoder_service.model import ModelConfig, load_model
from encoder_service.runtimes import build_runtime
from encoder_service.settings import EncoderSettings

logger = logging.getLogger(__name__)


def engine_config(settings: EncoderSettings, device: str) -> EngineConfig:
    max_batch = settings.batch_size_for(device)
    return EngineConfig(
        max_batch=max_batch,
        max_delay_s=settings.max_delay_ms / 1000,
        workers=settings.worker_count(),
        queue_size=settings.queue_size or 8 * max_batch,
        stream_window=2 * max_batch,
        limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
        max_texts=settings.max_texts,
        max_text_bytes=settings.max_text_bytes,
    )


def build_engine(settings: EncoderSettings, metrics: EncoderMetrics | None = None) -> EncoderEngine:
    """Load, build and warm up; raises WeightsUnavailable, ValueError or ParityError on failure."""
    loaded = load_model(
        ModelConfig(
            settings.model, settings.pretrained, settings.seed, str(settings.cache_dir / "weights")
        )
    )
    runtime = build_runtime(
        loaded,
        runtime=settings.runtime,
        device=settings.device,
        dtype=settings.dtype,
        threads=settings.threads,
        cache_dir=settings.cache_dir,
    )
    engine = EncoderEngine(loaded, runtime, engine_config(settings, runtime.device), metrics)
    seconds = engine.warm_up()
    info = engine.description
    logger.info(
        "model %s ready: runtime %s on %s (%s), dim %d, max batch %d; warm-up took %.1f s",
        info.model_id,
        info.runtime,
        info.device,
        info.dtype,
        info.dim,
        info.max_batch,
        seconds,
    )
    return engine
