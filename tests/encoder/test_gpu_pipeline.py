"""Domain tier: the tensor image pipeline (device decode path) against the Pillow/open_clip path.

Everything runs on device="cpu" here (torchvision's libjpeg decoder stands in
for nvJPEG); the CUDA tests at the end skip cleanly without a GPU.
"""

from __future__ import annotations

import io
import math
import statistics
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from encoder_service.batcher import Caller
from encoder_service.factory import build_engine
from encoder_service.model import ModelConfig, load_model
from encoder_service.preprocess.gpu_pipeline import (
    CpuPixels,
    JpegRecord,
    TensorImagePipeline,
    TensorTransform,
    resized_size,
    torchvision_decode_jpegs,
    upright,
)
from encoder_service.preprocess.images import ImageLimits, ImagePreprocessor, decode_image
from tests import images
from tests.encoder.test_parity import corpus
from vpm_common.errors import InvalidArgument

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=20_000_000)
MIN_COSINE = 0.999  # fp32 on the CPU; the issue asks >= 0.99 of the GPU in fp16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelConfig("VPM-Tiny", "none"))


def pipeline(loaded, device: str = "cpu", **kwargs) -> TensorImagePipeline:
    transform = TensorTransform.from_preprocess(loaded.preprocess)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return TensorImagePipeline(transform, LIMITS, device, dtype, **kwargs)


def unit(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()


def encode_both_ways(loaded, files: list[bytes], device: str = "cpu"):
    """(vectors via the tensor pipeline, via ImagePreprocessor + the same model, payloads)."""
    tensor_path = pipeline(loaded, device)
    payloads = [tensor_path.admit(data)[0] for data in files]
    prepared = tensor_path.prepare(payloads)
    assert prepared.errors == {} and prepared.pixels.shape[0] == len(files)
    reference = ImagePreprocessor(loaded.preprocess, LIMITS)
    expected = torch.stack([reference(data)[0] for data in files])
    model = loaded.model
    with torch.inference_mode():
        theirs = unit(model.encode_image(expected))  # fp32 on the CPU, before any cast
        ours = unit(model.to(device, prepared.pixels.dtype).encode_image(prepared.pixels))
    model.to("cpu", torch.float32)
    return ours, theirs, payloads


def test_the_tensor_pipeline_matches_the_pillow_path_on_every_kind_of_image(tiny) -> None:
    files = {key: data for key, (data, _) in corpus().items()}
    ours, theirs, payloads = encode_both_ways(tiny, list(files.values()))
    cosines = dict(zip(files, (ours * theirs).sum(axis=1).tolist(), strict=True))
    worst = min(cosines, key=cosines.get)
    print(
        f"tensor vs Pillow path, {len(cosines)} images: min {cosines[worst]:.6f} ({worst}), "
        f"median {statistics.median(cosines.values()):.6f}"
    )
    assert cosines[worst] >= MIN_COSINE, cosines
    routes = {key: type(p).__name__ for key, p in zip(files, payloads, strict=True)}
    device_decoded = {key for key, route in routes.items() if route == "JpegRecord"}
    assert device_decoded == {
        "jpeg-640x480",
        "jpeg-large-3000x2000",
        "jpeg-progressive",
        "panorama-2000x150",
        "tall-150x1600",
        "exif-6-jpeg-phone-photo",
    }, routes


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_pixels_as_pillow_exif_transpose(orientation: int) -> None:
    stored = images.picture(7, 5, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(stored)).transpose(2, 0, 1)
    pixels = torch.from_numpy(np.asarray(stored).copy()).permute(2, 0, 1)
    assert np.array_equal(upright(pixels, orientation).numpy(), expected)


@pytest.mark.parametrize("size", [(480, 640), (640, 480), (2000, 150), (1, 1), (224, 224), (3, 2)])
def test_resized_size_is_torchvisions(size: tuple[int, int]) -> None:
    from torchvision.transforms import functional

    image = Image.new("RGB", (size[1], size[0]))
    expected = functional.resize(image, 224).size[::-1]
    assert resized_size(*size, 224) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 100,
        bytes(range(256)) * 8,
        images.jpeg()[:2000],
        images.encode(images.picture(300, 200), "PNG")[:3000],
        images.jpeg()[:200] + b"\x00" * 5000,
        images.png_declaring(30_000, 30_000),
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        b"\x00" * 2_000_001,
    ],
    ids=[
        "empty",
        "zeros",
        "random",
        "truncated-jpeg",
        "truncated-png",
        "garbage",
        "bomb",
        "svg",
        "big",
    ],
)
def test_bad_images_get_the_pillow_paths_messages(tiny, data: bytes) -> None:
    with pytest.raises(InvalidArgument) as expected:
        decode_image(data, LIMITS)
    with pytest.raises(InvalidArgument) as caught:
        pipeline(tiny).admit(data)
    assert caught.value.message == expected.value.message


class RecordingDecoder:
    """A fake device decoder: torchvision's CPU decoder, refusing chosen files, logging calls."""

    def __init__(self, refuse: set[bytes] = frozenset()) -> None:
        self.refuse = refuse
        self.calls: list[int] = []

    def __call__(self, encoded: list[torch.Tensor], device: str) -> list[torch.Tensor]:
        self.calls.append(len(encoded))
        if any(bytes(t.numpy()) in self.refuse for t in encoded):
            raise RuntimeError("nvjpeg: NVJPEG_STATUS_BAD_JPEG")
        return torchvision_decode_jpegs(encoded, device)


def jpeg_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small JPEG whose frame header claims width x height."""
    data = bytearray(images.jpeg(64, 48, seed=9))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_jpeg_bomb_never_reaches_the_device_decoder(tiny) -> None:
    decoder = RecordingDecoder()
    with pytest.raises(InvalidArgument) as expected:
        decode_image(jpeg_bomb(), LIMITS)
    with pytest.raises(InvalidArgument) as caught:
        pipeline(tiny, decode_jpegs=decoder).admit(jpeg_bomb())
    assert caught.value.message == expected.value.message
    assert "over the limit of 20000000 pixels" in caught.value.message
    assert decoder.calls == []


def test_a_jpeg_the_device_refuses_is_found_by_halving_and_taken_by_pillow(tiny) -> None:
    good = [images.jpeg(64, 48, seed=seed) for seed in range(7)]
    refused = images.jpeg(80, 60, seed=20)
    # Decodable headers, corrupt scan data: both decoders fail on it.
    corrupt = bytearray(images.jpeg(640, 480, seed=21))
    corrupt[1000:2024] = bytes(range(256)) * 4  # a marker mid-scan
    decoder = RecordingDecoder(refuse={refused})
    tensor_path = pipeline(tiny, decode_jpegs=decoder)
    files = [*good[:3], refused, *good[3:], bytes(corrupt)]
    payloads = [tensor_path.admit(data)[0] for data in files]
    assert all(isinstance(p, JpegRecord) for p in payloads)
    prepared = tensor_path.prepare(payloads)

    assert list(prepared.errors) == [8]
    with pytest.raises(InvalidArgument) as expected:
        decode_image(bytes(corrupt), LIMITS)
    assert prepared.errors[8].message == expected.value.message
    assert prepared.pixels.shape[0] == 9 and not prepared.pixels[8].any()  # its row: zeros
    # Halving: about 2 log2(n) calls per culprit, not a call per image.
    assert len(decoder.calls) <= 1 + 2 * 2 * math.ceil(math.log2(len(files)))
    ours, theirs, _ = encode_both_ways(tiny, files[:8])
    with torch.inference_mode():
        again = unit(tiny.model.encode_image(prepared.pixels[:8]))
    assert float(np.min((again * theirs).sum(axis=1))) >= MIN_COSINE


def test_large_batches_are_decoded_in_chunks_within_the_pixel_budget(tiny, monkeypatch) -> None:
    from encoder_service.preprocess import gpu_pipeline

    monkeypatch.setattr(gpu_pipeline, "DECODE_PIXEL_BUDGET", 3 * 640 * 480)
    monkeypatch.setattr(gpu_pipeline, "RESIZE_PIXEL_BUDGET", 2 * 640 * 480)
    decoder = RecordingDecoder()
    tensor_path = pipeline(tiny, decode_jpegs=decoder)
    files = [images.jpeg(640, 480, seed=seed) for seed in range(7)]
    prepared = tensor_path.prepare([tensor_path.admit(data)[0] for data in files])
    assert decoder.calls == [3, 3, 1]
    reference = pipeline(tiny).prepare([tensor_path.admit(data)[0] for data in files])
    assert torch.equal(prepared.pixels, reference.pixels)


def test_images_pillow_decodes_are_pixel_identical_to_the_cpu_path(tiny) -> None:
    """Non-JPEGs go through open_clip's own PIL steps: not close, equal."""
    files = [
        images.alpha_png(),
        images.cmyk_jpeg(),
        images.animated_gif(),
        images.sixteen_bit_png(),
    ]
    tensor_path = pipeline(tiny)
    payloads = [tensor_path.admit(data)[0] for data in files]
    assert all(isinstance(p, CpuPixels) for p in payloads)
    reference = ImagePreprocessor(tiny.preprocess, LIMITS)
    expected = torch.stack([reference(data)[0] for data in files])
    torch.testing.assert_close(tensor_path.prepare(payloads).pixels, expected, atol=1e-6, rtol=0)


def test_an_unusual_preprocess_is_refused_by_name() -> None:
    from torchvision import transforms

    squash = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])
    with pytest.raises(ValueError, match="needs resize, crop, normalize"):
        TensorTransform.from_preprocess(squash)


# -- the engine with --decode gpu on the CPU --------------------------------------------


@pytest.fixture(scope="module")
def engines(tiny_settings):
    built = {
        decode: build_engine(tiny_settings(runtime="torch", decode=decode, max_batch=4))
        for decode in ("cpu", "gpu")
    }
    yield built
    for engine in built.values():
        engine.close()


def test_the_engine_decodes_on_the_device_only_when_asked(engines, tiny_settings) -> None:
    assert engines["gpu"]._device_images is not None
    assert engines["cpu"]._device_images is None
    auto = build_engine(tiny_settings(runtime="torch", decode="auto"))
    try:
        # auto: the device path when the model runs on CUDA, Pillow on the CPU.
        on_cuda = auto.description.device.startswith("cuda")
        assert (auto._device_images is not None) == on_cuda == torch.cuda.is_available()
    finally:
        auto.close()
    with pytest.raises(ValueError, match="--decode gpu needs --runtime torch"):
        build_engine(tiny_settings(runtime="onnx", decode="gpu"))


def test_engine_vectors_and_errors_match_the_cpu_decode_path(engines) -> None:
    files = [images.jpeg(320, 240, seed=s) for s in range(9)] + [
        images.alpha_png(),
        images.with_orientation(images.picture(90, 60, seed=3), 6, "JPEG"),
        b"nope",
        images.jpeg()[:2000],
        jpeg_bomb(),
        b"",
    ]
    outcomes = {}
    for decode, engine in engines.items():
        futures = [engine.submit_image(data, Caller()) for data in files]
        outcomes[decode] = []
        for future in futures:
            try:
                outcomes[decode].append(future.result(30))
            except InvalidArgument as error:
                outcomes[decode].append(error.message)
        assert engine.in_flight() == 0
    for on_cpu, on_device in zip(outcomes["cpu"], outcomes["gpu"], strict=True):
        if isinstance(on_cpu, str):
            assert on_device == on_cpu
        else:
            assert on_device.dtype == np.float32 and on_device.shape == on_cpu.shape
            assert abs(float(np.linalg.norm(on_device)) - 1) < 1e-5
            assert float(on_device @ on_cpu) >= MIN_COSINE
    stages = engines["gpu"].metrics.stage_seconds
    for stage in ("decode", "preprocess", "queue", "inference"):
        assert stages.labels(stage)._sum.get() > 0, stage


def test_one_batch_at_a_time_on_the_device_gives_the_same_vectors(tiny_settings, engines) -> None:
    serial = build_engine(tiny_settings(runtime="torch", decode="gpu", device_batches=1))
    try:
        data = images.jpeg(seed=12)
        one = serial.submit_image(data, Caller()).result(30)
        two = engines["gpu"].submit_image(data, Caller()).result(30)
        np.testing.assert_allclose(one, two, atol=1e-6)
    finally:
        serial.close()


def test_a_failing_device_batch_fails_its_items_and_the_next_batch_works(engines) -> None:
    batches = engines["gpu"]._device_images
    runtime = batches._runtime
    original = runtime.encode_images_on_device

    def broken(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory (a fake)")

    runtime.encode_images_on_device = broken
    try:
        with pytest.raises(torch.OutOfMemoryError):
            engines["gpu"].submit_image(images.jpeg(seed=13), Caller()).result(30)
    finally:
        runtime.encode_images_on_device = original
    assert engines["gpu"].submit_image(images.jpeg(seed=13), Caller()).result(30).shape == (64,)
    assert engines["gpu"].in_flight() == 0


def test_the_service_answers_with_device_decoding(make_encoder) -> None:
    import grpc

    from vpm.v1 import encoder_pb2, encoder_pb2_grpc

    thread, app = make_encoder(runtime="torch", decode="gpu")
    stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(thread.target))
    files = {"a": images.jpeg(seed=1), "bad": b"nope", "b": images.alpha_png()}
    requests = [encoder_pb2.ImageItem(id=key, data=data) for key, data in files.items()]
    replies = {r.id: r for r in stub.EncodeImages(iter(requests), timeout=60)}
    assert len(replies["a"].vector) == 64 and len(replies["b"].vector) == 64
    assert replies["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a recognized image" in replies["bad"].error.message


@pytest.mark.slow
def test_vit_b_32_with_device_decoding_matches_open_clips_reference(tiny_settings) -> None:
    """The real architecture, the engine end to end, against preprocess + encode_image in fp32."""
    import open_clip

    files = corpus()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    with torch.inference_mode():
        pixels = torch.stack(
            [
                preprocess(upright if upright is not None else Image.open(io.BytesIO(data)))
                for data, upright in files.values()
            ]
        )
        expected = unit(model.eval().encode_image(pixels))
    engine = build_engine(tiny_settings(model="ViT-B-32", runtime="torch", decode="gpu"))
    try:
        futures = [engine.submit_image(data, Caller()) for data, _ in files.values()]
        vectors = np.stack([future.result(300) for future in futures])
    finally:
        engine.close()
    cosines = (vectors * expected).sum(axis=1)
    print(
        f"ViT-B-32, tensor path vs open_clip: min {cosines.min():.6f}, median "
        f"{np.median(cosines):.6f}"
    )
    assert cosines.min() >= MIN_COSINE, dict(zip(files, cosines.tolist(), strict=True))


# -- CUDA: nvJPEG and half precision; skipped without a GPU --------------------------------


@needs_cuda
def test_nvjpeg_in_fp16_matches_the_pillow_path(tiny) -> None:
    files = [data for data, _ in corpus().values()]
    ours, theirs, _ = encode_both_ways(load_model(ModelConfig("VPM-Tiny", "none")), files, "cuda")
    cosines = (ours * theirs).sum(axis=1)
    print(f"nvJPEG fp16 vs Pillow fp32: min {cosines.min():.5f}, median {np.median(cosines):.5f}")
    assert cosines.min() >= 0.99


@needs_cuda
def test_cuda_graphs_give_the_eager_vectors() -> None:
    from encoder_service.inference.runtimes import TorchRuntime

    runtime = TorchRuntime(load_model(ModelConfig("VPM-Tiny", "none")), "cuda", "float16")
    pixels = torch.randn(5, 3, 64, 64, device="cuda", dtype=torch.float16)
    eager = runtime.encode_images_on_device(pixels).float().clone()
    assert runtime.capture_cuda_graphs([1, 4, 8]) == [1, 4, 8]
    graphed = runtime.encode_images_on_device(pixels).float()
    torch.testing.assert_close(graphed, eager, atol=2e-3, rtol=2e-3)
    runtime.close()


@needs_cuda
def test_the_engine_on_cuda_decodes_there_by_default(tiny_settings) -> None:
    engine = build_engine(tiny_settings(runtime="torch", device="cuda", cuda_graphs=True))
    try:
        assert engine._device_images is not None
        data = images.jpeg(seed=3)
        vector = engine.submit_image(data, Caller()).result(30)
        assert vector.shape == (64,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3
    finally:
        engine.close()


def test_png_stays_off_the_device_decoder(tiny) -> None:
    decoder = RecordingDecoder()
    tensor_path = pipeline(tiny, decode_jpegs=decoder)
    payload, _ = tensor_path.admit(images.encode(Image.open(io.BytesIO(images.jpeg())), "PNG"))
    tensor_path.prepare([payload])
    assert isinstance(payload, CpuPixels) and decoder.calls == []


def test_a_broken_device_decoder_sends_every_jpeg_to_pillow(tiny) -> None:
    def broken(encoded, device):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    tensor_path = pipeline(tiny, decode_jpegs=broken)
    assert tensor_path.check_device_decoder(images.jpeg(seed=1)) is False
    payload, _ = tensor_path.admit(images.jpeg(seed=2))
    assert isinstance(payload, CpuPixels)
    assert tensor_path.prepare([payload]).pixels.shape == (1, 3, 64, 64)
    assert pipeline(tiny).check_device_decoder(images.jpeg(seed=1)) is True
