"""Settings to a ready engine: load the model, build the runtime, size the batcher, warm up."""

from __future__ import annotations

import logging

from encoder_service.engine import EncoderEngine, EngineConfig
from encoder_service.inference.cuda_graphs import batch_buckets
from encoder_service.inference.runtimes import Runtime, TorchRuntime, build_runtime
from encoder_service.metrics import EncoderMetrics
from encoder_service.model import LoadedModel, ModelConfig, load_model
from encoder_service.preprocess.images import ImageLimits
from encoder_service.settings import EncoderSettings

logger = logging.getLogger(__name__)


def engine_config(
    settings: EncoderSettings, device: str, device_decode: bool = False
) -> EngineConfig:
    max_batch = settings.batch_size_for(device)
    return EngineConfig(
        max_batch=max_batch,
        max_delay_s=settings.max_delay_ms / 1000,
        workers=settings.worker_count(),
        queue_size=settings.queue_size or 8 * max_batch,
        stream_window=2 * max_batch,
        limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
        max_request_bytes=settings.max_request_bytes(),
        max_texts=settings.max_texts,
        max_text_bytes=settings.max_text_bytes,
        device_decode=device_decode,
        device_in_flight=settings.device_batches,
    )


def resolve_decode(decode: str, runtime: Runtime, loaded: LoadedModel) -> bool:
    """Whether images are decoded on the runtime's device; 'auto' does so for PyTorch on CUDA."""
    from encoder_service.preprocess.gpu_pipeline import TensorTransform

    on_torch = isinstance(runtime, TorchRuntime)
    if decode == "gpu" and not on_torch:
        raise ValueError(f"--decode gpu needs --runtime torch; the runtime is {runtime.name}")
    if decode == "cpu" or not on_torch:
        return False
    if decode == "auto" and not runtime.device.startswith("cuda"):
        return False
    try:
        TensorTransform.from_preprocess(loaded.preprocess)
    except ValueError as error:
        if decode == "gpu":
            raise ValueError(f"--decode gpu: {error}") from None
        logger.warning("decoding images with Pillow: %s", error)
        return False
    return True


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
        threads=settings.thread_count(),
        cache_dir=settings.cache_dir,
    )
    decode_on_device = resolve_decode(settings.decode, runtime, loaded)
    config = engine_config(settings, runtime.device, decode_on_device)
    if settings.cuda_graphs:
        if not (isinstance(runtime, TorchRuntime) and runtime.device.startswith("cuda")):
            raise ValueError("--cuda-graphs needs the torch runtime on --device cuda")
        runtime.capture_cuda_graphs(batch_buckets(config.max_batch))
    engine = EncoderEngine(loaded, runtime, config, metrics)
    seconds = engine.warm_up()
    info = engine.description
    logger.info(
        "model %s ready: runtime %s on %s (%s), dim %d, max batch %d, images decoded on %s; "
        "warm-up took %.1f s",
        info.model_id,
        info.runtime,
        info.device,
        info.dtype,
        info.dim,
        info.max_batch,
        runtime.device if decode_on_device else "the cpu (Pillow)",
        seconds,
    )
    return engine
