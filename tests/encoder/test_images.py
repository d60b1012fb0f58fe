"""Domain tier: image decoding limits and orientation, without a server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from encoder_service.preprocess.images import ImageLimits, decode_image
from tests import images
from vpm_common.errors import InvalidArgument

LIMITS = ImageLimits(max_bytes=2_000_000, max_pixels=20_000_000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image is empty (0 bytes)"),
        (b"\x00" * 100, "not a recognized image"),
        (bytes(range(256)) * 8, "not a recognized image"),
        (images.jpeg()[:2000], "image data is truncated or corrupt"),
        (
            images.encode(images.picture(300, 200), "PNG")[:3000],
            "image data is truncated or corrupt",
        ),
        (images.jpeg()[:200] + b"\x00" * 5000, "image data is truncated or corrupt"),
        (images.png_declaring(30_000, 30_000), "over the limit of 20000000 pixels"),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
            "not a recognized image",
        ),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "not a recognized image"),
        (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "not a recognized image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a recognized image"),
        (b"\x00" * 2_000_001, "over the limit of 2000000"),
        (images.encode(images.picture(20_000, 1), "PNG"), "image is 20000x1: one side over 100"),
        (images.encode(images.picture(1, 5_000), "PNG"), "image is 1x5000: one side over 100"),
    ],
    ids=[
        "empty",
        "zeros",
        "random",
        "truncated-jpeg",
        "truncated-png",
        "garbage-body",
        "bomb-30000x30000",
        "svg",
        "html",
        "pdf",
        "eps",
        "too-many-bytes",
        "20000x1",
        "1x5000",
    ],
)
def test_bad_images_are_invalid_arguments_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, LIMITS)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (images.encode(images.picture(1, 1), "PNG"), (1, 1)),
        (images.encode(images.picture(100, 1), "PNG"), (100, 1)),  # as thin as may be
        (images.animated_gif(120, 90), (120, 90)),
        (images.cmyk_jpeg(300, 200), (300, 200)),
        (images.sixteen_bit_png(200, 150), (200, 150)),
        (images.alpha_png(320, 240), (320, 240)),
        (images.encode(images.picture(64, 48), "WEBP"), (64, 48)),
        (images.encode(images.picture(64, 48), "BMP"), (64, 48)),
        (images.encode(images.picture(64, 48), "TIFF"), (64, 48)),
    ],
    ids=[
        "1x1",
        "100x1",
        "animated-gif",
        "cmyk-jpeg",
        "16-bit-png",
        "alpha-png",
        "webp",
        "bmp",
        "tiff",
    ],
)
def test_unusual_but_valid_images_decode(data: bytes, size: tuple[int, int]) -> None:
    assert decode_image(data, LIMITS).size == size


@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
def test_exif_orientation_gives_the_upright_picture(orientation: int) -> None:
    upright = images.picture(80, 50, seed=7)
    data = images.with_orientation(upright, orientation, "PNG")
    stored = Image.open(io.BytesIO(data))
    assert stored.size == ((50, 80) if orientation in (6, 8) else (80, 50))
    decoded = decode_image(data, LIMITS)
    assert decoded.size == upright.size
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(upright))
