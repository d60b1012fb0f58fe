"""Fuzzing the image path for a bounded time: any bytes either decode or raise InvalidArgument."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoder_service.preprocess.images import ImageLimits, ImagePreprocessor, decode_image
from tests import images
from vpm_common.errors import InvalidArgument

LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=4_000_000)
SEEDS = [
    images.jpeg(64, 48, seed=1),
    images.encode(images.picture(40, 30, seed=2), "PNG"),
    images.encode(images.picture(40, 30, seed=3).convert("P"), "GIF"),
    images.encode(images.picture(40, 30, seed=4), "WEBP"),
    images.encode(images.picture(20, 20, seed=5), "BMP"),
    images.encode(images.picture(20, 20, seed=6), "TIFF"),
    images.with_orientation(images.picture(30, 20, seed=7), 6, "JPEG"),
]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def survives(data: bytes) -> None:
    """The only acceptable outcomes: a decoded image, or InvalidArgument with a message."""
    try:
        image = decode_image(data, LIMITS)
    except InvalidArgument as error:
        assert error.message and "Traceback" not in error.message
    else:
        assert image.width * image.height <= LIMITS.max_pixels


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    survives(data)


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
    st.integers(0, 10**6),
)
def test_mutated_real_images(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    survives(bytes(data[: max(1, cut % (len(data) + 1))]))


@pytest.fixture(scope="module")
def preprocess():
    from encoder_service.model import ModelConfig, load_model

    return ImagePreprocessor(load_model(ModelConfig("VPM-Tiny", "none")).preprocess, LIMITS)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
)
def test_what_decodes_also_preprocesses(
    preprocess, seed: bytes, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(seed)
    for position, value in flips:
        data[position % len(data)] = value
    try:
        pixels, _ = preprocess(bytes(data))
    except InvalidArgument:
        return
    assert tuple(pixels.shape) == (3, 64, 64)
