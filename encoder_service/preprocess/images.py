"""Image bytes to model input: decode within limits, EXIF orientation, open_clip's preprocess.

Images are taken as a viewer shows them (EXIF orientation first) and then
preprocessed by the model's open_clip transform (for RGB images, its tensor
form in encoder_service.preprocess.cpu_transform), so vectors agree with open_clip's
reference pipeline. Every way an input can be bad ends in InvalidArgument
with a message a client can act on.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vpm_common.errors import InvalidArgument

logger = logging.getLogger(__name__)

# Only these decoders may run on client bytes: PIL's others include formats
# that shell out (EPS via Ghostscript) or that nobody sends as a product photo.
# Once for the process, since catch_warnings() is not thread-safe: our own pixel limit
# replaces PIL's decompression-bomb warning, and PIL's warnings about corrupt EXIF or
# truncated metadata cost at most the orientation, never the image.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

Image.init()  # register every plugin now: `formats=` only finds registered ones
FORMATS = tuple(
    name for name in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF") if name in Image.OPEN
)


# How many times longer than wide (or wider than tall) an image may be. open_clip resizes the
# shortest side to the model's input size before its centre crop, so a thin image is scaled
# up first: a 100-byte PNG of 20000x1 became 224 x 4,480,000 pixels, gigabytes and seconds
# of work for one image. No product photo is that thin; panoramas are ~10:1.
MAX_ASPECT_RATIO = 100


def too_thin(width: int, height: int) -> bool:
    return max(width, height) > MAX_ASPECT_RATIO * min(width, height)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class Timings:
    decode_s: float
    preprocess_s: float


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode `data` into a fully loaded PIL image, upright per its EXIF orientation."""
    if not data:
        raise InvalidArgument("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidArgument(
            "not a recognized image (expected JPEG, PNG, WebP, GIF, BMP or TIFF)"
        ) from None
    except Image.DecompressionBombError:
        raise InvalidArgument(_too_many_pixels(limits)) from None
    except (OSError, SyntaxError, ValueError):
        raise InvalidArgument("image header is corrupt") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {limits.max_pixels} pixels"
        )
    if too_thin(width, height):
        raise InvalidArgument(
            f"image is {width}x{height}: one side over {MAX_ASPECT_RATIO} times the other "
            "(it would be scaled up to that many times its short side's square before cropping)"
        )
    try:
        image.load()
    except Image.DecompressionBombError:
        raise InvalidArgument(_too_many_pixels(limits)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError):
        raise InvalidArgument("image data is truncated or corrupt") from None
    return _eight_bit(_upright(image))


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit greyscale, its levels scaled as a viewer shows them:
    Pillow's conversion to RGB clips every level over 255, a white square for most photos."""
    if not image.mode.startswith("I;16"):
        return image
    return Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")


def _too_many_pixels(limits: ImageLimits) -> str:
    return f"image declares too many pixels, over the limit of {limits.max_pixels} pixels"


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a good image
        logger.debug("ignoring unreadable EXIF orientation", exc_info=True)
        return image


class ImagePreprocessor:
    """decode_image, then the model's open_clip transform; callable from worker threads."""

    def __init__(self, transform: Callable[[Image.Image], Any], limits: ImageLimits) -> None:
        self._transform = transform
        self.limits = limits

    def __call__(self, data: bytes) -> tuple[Any, Timings]:
        """Image bytes -> (float32 tensor (3, S, S), time spent decoding and preprocessing)."""
        started = time.perf_counter()
        image = decode_image(data, self.limits)
        decoded = time.perf_counter()
        try:
            pixels = self._transform(image)
        except (OSError, ValueError):
            raise InvalidArgument(f"image cannot be converted from {image.mode} mode") from None
        return pixels, Timings(decoded - started, time.perf_counter() - decoded)
