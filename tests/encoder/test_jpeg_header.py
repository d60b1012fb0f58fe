"""Domain tier: the JPEG header reader agrees with Pillow, or hands the file to Pillow."""

from __future__ import annotations

import contextlib
import functools
import io
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from torchvision import transforms

from encoder_service.model import ModelConfig, load_model
from encoder_service.preprocess.gpu_pipeline import CpuPixels, TensorImagePipeline, TensorTransform
from encoder_service.preprocess.images import ImageLimits
from encoder_service.preprocess.jpeg_header import XMP_PREFIX, read_jpeg_header
from tests import images
from vpm_common.errors import InvalidArgument

MAX_BYTES, MAX_PIXELS = 2_000_000, 20_000_000


def read(data: bytes):
    return read_jpeg_header(data, MAX_BYTES, MAX_PIXELS)


def with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """`jpeg` with one more marker segment right after SOI."""
    return jpeg[:2] + struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload + jpeg[2:]


def exif_block(orientation: int | None, order: str = "<", kind: int = 3, count: int = 1) -> bytes:
    """An APP1 EXIF payload with an IFD0 holding (or not) one orientation entry."""
    head = (b"II" if order == "<" else b"MM") + struct.pack(order + "HI", 42, 8)
    if orientation is None:
        return b"Exif\0\0" + head + struct.pack(order + "HI", 0, 0)
    value = struct.pack(
        order + ("HH" if kind == 3 else "I"), *((orientation, 0)[: 2 if kind == 3 else 1])
    )
    entry = struct.pack(order + "HHI", 0x0112, kind, count) + value
    return b"Exif\0\0" + head + struct.pack(order + "H", 1) + entry + struct.pack(order + "I", 0)


def pillow_orientation(data: bytes) -> int:
    """What Pillow's exif_transpose acts on: 2..8, else 1."""
    try:
        value = Image.open(io.BytesIO(data)).getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - exif_transpose failing leaves the image as it is
        return 1
    return value if value in range(2, 9) else 1


SMALL = images.jpeg(64, 48, seed=3)
XMP_6 = XMP_PREFIX + b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'


@pytest.mark.parametrize(
    "data",
    [
        images.jpeg(640, 480, seed=1),
        images.encode(images.picture(500, 375), "JPEG", progressive=True),
        images.encode(images.picture(90, 70), "JPEG", subsampling=0),  # 4:4:4
        images.encode(images.picture(90, 70), "JPEG", subsampling=1),  # 4:2:2
        *(images.with_orientation(images.picture(60, 40), o, "JPEG") for o in (2, 3, 6, 8)),
        *(with_segment(SMALL, 0xE1, exif_block(o)) for o in range(0, 10)),
        *(with_segment(SMALL, 0xE1, exif_block(o, ">")) for o in (5, 7)),
        with_segment(SMALL, 0xE1, exif_block(6, ">", kind=4)),
        with_segment(SMALL, 0xE1, exif_block(None)),
        with_segment(SMALL, 0xE1, XMP_6),
        with_segment(with_segment(SMALL, 0xE1, XMP_6), 0xE1, exif_block(None)),
        with_segment(with_segment(SMALL, 0xE1, XMP_6), 0xE1, exif_block(3)),
    ],
)
def test_plain_jpegs_are_read_as_pillow_reads_them(data: bytes) -> None:
    header = read(data)
    assert header is not None
    assert (header.width, header.height) == Image.open(io.BytesIO(data)).size
    assert header.orientation == pillow_orientation(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\xff\xd8", "nothing after SOI"),
        (images.encode(images.picture(64, 48), "PNG"), "not a JPEG"),
        (images.encode(images.picture(64, 48).convert("L"), "JPEG"), "grayscale"),
        (images.cmyk_jpeg(64, 48), "CMYK"),
        (images.jpeg()[:2000], "truncated: no end marker"),
        (images.jpeg()[:200] + b"\x00" * 5000, "garbage body"),
        (with_segment(SMALL, 0xEE, b"Adobe" + bytes(7)), "Adobe colour transform"),
        (with_segment(with_segment(SMALL, 0xE1, exif_block(6)), 0xE1, exif_block(3)), "2 EXIF"),
        (with_segment(SMALL, 0xE1, exif_block(6, kind=3, count=2)), "orientation count 2"),
        (with_segment(SMALL, 0xE1, exif_block(6, kind=1)), "orientation as a BYTE"),
        (with_segment(SMALL, 0xE1, b"Exif\0\0XX*\0\x08\0\0\0"), "bad TIFF byte order"),
        (with_segment(SMALL, 0xE1, b"Exif\0\0II*\0\xff\0\0\0"), "IFD past the end"),
    ],
)
def test_anything_unusual_is_left_to_pillow(data: bytes, why: str) -> None:
    assert read(data) is None, why


def test_the_limits_are_checked_from_the_header_alone() -> None:
    assert read_jpeg_header(SMALL, len(SMALL) - 1, MAX_PIXELS) is None
    assert read_jpeg_header(SMALL, MAX_BYTES, 64 * 48 - 1) is None
    data = bytearray(SMALL)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30_000, 30_000)
    assert read(bytes(data)) is None
    assert read_jpeg_header(bytes(data), MAX_BYTES, 10**9) is not None
    data[sof + 5 : sof + 9] = struct.pack(">HH", 20, 30_000)  # 30000x20: too thin
    assert read_jpeg_header(bytes(data), MAX_BYTES, 10**9) is None


EXIF_JPEG = with_segment(with_segment(SMALL, 0xE1, XMP_6), 0xE1, exif_block(8, ">"))


@functools.cache
def device_path() -> tuple[TensorImagePipeline, transforms.Compose]:
    """The GPU path's router on the CPU, and open_clip's own PIL-side steps of the same model."""
    preprocess = load_model(ModelConfig("VPM-Tiny", "none")).preprocess
    limits = ImageLimits(MAX_BYTES, MAX_PIXELS)
    router = TensorImagePipeline(
        TensorTransform.from_preprocess(preprocess), limits, "cpu", torch.float32
    )
    return router, transforms.Compose(preprocess.transforms[:3])  # resize, crop, RGB


def pillow_pixels(data: bytes, pil_steps: transforms.Compose) -> np.ndarray | None:
    """Pillow's own answer: the upright image through open_clip's PIL steps, None if it refuses."""
    try:
        image = Image.open(
            io.BytesIO(data), formats=("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
        )
        if image.width * image.height > MAX_PIXELS:
            return None
        image.load()
    except Exception:  # noqa: BLE001 - whatever Pillow refuses, the service refuses
        return None
    with contextlib.suppress(Exception):  # a broken EXIF block leaves the image as stored
        image = ImageOps.exif_transpose(image)
    try:
        return np.asarray(pil_steps(image), dtype=np.uint8)
    except (OSError, ValueError):
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4))
def test_a_damaged_header_is_read_as_pillow_reads_it_or_left_to_pillow(changes) -> None:
    data = bytearray(EXIF_JPEG)
    for position, value in changes:
        data[position % len(data)] = value
    data = bytes(data)
    header = read(data)
    if header is not None:
        image = Image.open(io.BytesIO(data))
        assert (header.width, header.height) == image.size
        assert image.mode == "RGB"
        assert header.orientation == pillow_orientation(data)
        return
    # Declined: the GPU path must give exactly Pillow's answer, pixels or a refusal.
    router, pil_steps = device_path()
    expected = pillow_pixels(data, pil_steps)
    try:
        payload, _ = router.admit(data)
    except InvalidArgument:
        assert expected is None, "the GPU path refused an image Pillow decodes"
        return
    assert isinstance(payload, CpuPixels), "a declined file went to the device decoder"
    assert expected is not None, "the GPU path took an image Pillow refuses"
    np.testing.assert_array_equal(payload.pixels.numpy(), expected)
