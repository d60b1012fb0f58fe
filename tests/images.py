"""Synthetic test images: structured pictures in every format and mode the encoder must take."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB picture with gradients, a shape and texture, different for each seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(2, 9, 3)
    channels = [
        127
        + 100
        * np.sin(freq[c] * x / max(width, 1) + phase[c])
        * np.cos(freq[c] * y / max(height, 1))
        for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1)
    cx, cy, r = (
        rng.uniform(0.2, 0.8) * width,
        rng.uniform(0.2, 0.8) * height,
        0.25 * min(width, height),
    )
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
    pixels[disc] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 6, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(width: int = 640, height: int = 480, seed: int = 0, quality: int = 90) -> bytes:
    return encode(picture(width, height, seed), "JPEG", quality=quality)


def with_orientation(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    """The file a camera would write for `upright`: stored pixels + an EXIF orientation tag."""
    inverse = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        6: [Image.Transpose.ROTATE_90],
        8: [Image.Transpose.ROTATE_270],
    }[orientation]
    stored = upright
    for step in inverse:
        stored = stored.transpose(step)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes())


def animated_gif(width: int = 120, height: int = 90) -> bytes:
    frames = [picture(width, height, seed).convert("P") for seed in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is tiny (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def sixteen_bit_ramp(width: int, height: int) -> np.ndarray:
    return (np.linspace(0, 65535, width * height).reshape(height, width)).astype(np.uint16)


def sixteen_bit_png(width: int = 200, height: int = 150) -> bytes:
    return encode(Image.fromarray(sixteen_bit_ramp(width, height)), "PNG")


def sixteen_bit_png_as_viewed(width: int = 200, height: int = 150) -> Image.Image:
    """The 8-bit greyscale picture a viewer shows for sixteen_bit_png (its levels / 256)."""
    return Image.fromarray((sixteen_bit_ramp(width, height) // 256).astype(np.uint8), "L")


def cmyk_jpeg(width: int = 300, height: int = 200, seed: int = 4) -> bytes:
    return encode(picture(width, height, seed).convert("CMYK"), "JPEG", quality=92)


def alpha_png(width: int = 320, height: int = 240, seed: int = 5) -> bytes:
    image = picture(width, height, seed).convert("RGBA")
    alpha = np.zeros((height, width), np.uint8)
    alpha[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    alpha[: height // 8] = 128
    image.putalpha(Image.fromarray(alpha))
    return encode(image, "PNG")
