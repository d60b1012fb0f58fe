"""JPEG header reading for the GPU path: our parser against Pillow's lazy `Image.open`, µs a file.

The GPU path's worker threads read each upload's header to route it: its size
(for the limits and the decoder's pixel budget), its EXIF orientation, and
whether it is a plain 8-bit YCbCr baseline or progressive JPEG that nvJPEG
takes (`encoder_service.preprocess.gpu_pipeline.TensorImagePipeline.admit`). Both readers
here give those facts for the same bytes: `read_jpeg_header`, and Pillow's
`Image.open` (which reads the markers up to the first scan, no pixels) plus
`getexif()` and checks on what Pillow parsed. Pillow's `Image.open` alone (the
size, nothing else) is timed too, as its floor. Files: a few sizes, each plain
and with a camera's EXIF block (IFD0, Exif and GPS sub-IFDs, orientation 6).
Every reader is timed on every file in each of a few interleaved rounds; the
table gives the medians. The worker threads hold the interpreter lock while
they read, so each µs here is taken from the engine's ~300 µs of Python work
per image (BENCHMARKS.md, GPU section).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from bench.common import median, record, table, verdict
from encoder_service.preprocess.jpeg_header import RGB_COMPONENT_IDS, JpegHeader, read_jpeg_header
from tests import images

ROUNDS = int(os.environ.get("VPM_BENCH_JPEG_ROUNDS", "5"))
CALLS = int(os.environ.get("VPM_BENCH_JPEG_CALLS", "2000"))  # per file, reader and round
SIZES = [(64, 48), (640, 480), (1920, 1080), (4000, 3000)]
# What the GPU section measured for the whole header step of a worker thread (the header
# read, plus the copy of the bytes into a tensor) on 640x480 JPEGs: 40 µs an image.
BUDGET_US = 40.0
MAX_BYTES, MAX_PIXELS = 20 * 1024 * 1024, 40_000_000  # the encoder's default limits
LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2)}


def camera_exif(orientation: int) -> bytes:
    """An EXIF block like a camera's: IFD0, an Exif sub-IFD and a GPS sub-IFD (~0.8 KB)."""
    exif = Image.Exif()
    exif.update({0x010F: "Canon", 0x0110: "Canon EOS R5", 0x0112: orientation,
                 0x011A: 300.0, 0x011B: 300.0, 0x0128: 2, 0x0131: "Firmware 1.8.1",
                 0x0132: "2026:11:27 10:00:00", 0x013B: "A photographer"})  # fmt: skip
    exif.get_ifd(0x8769).update({0x829A: 0.004, 0x829D: 2.8, 0x8827: 400, 0x920A: 50.0,
                                 0x9003: "2026:11:27 10:00:00", 0x9004: "2026:11:27 10:00:00",
                                 0xA002: 4000, 0xA003: 3000, 0xA434: "RF24-105mm F4 L IS USM",
                                 0x927C: bytes(256)})  # fmt: skip
    exif.get_ifd(0x8825).update({0x0001: "N", 0x0003: "E", 0x0005: 0, 0x0006: 35.0})
    return exif.tobytes()


def pillow_header(data: bytes, max_bytes: int, max_pixels: int) -> JpegHeader | None:
    """The facts `read_jpeg_header` gives, from Pillow's lazy open; None when it is not plain.

    Pillow keeps less than the GPU path needs: not which SOF marker framed the
    image (arithmetic, lossless and hierarchical JPEGs look baseline here) nor
    the quantization tables' precision. This reader is the lower bound of a
    Pillow-based one, which would still have to scan the markers for those.
    """
    if len(data) > max_bytes:
        return None
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - anything Pillow refuses goes to Pillow's decode
        return None
    width, height = image.size
    if image.mode != "RGB" or "adobe_transform" in image.info or width * height > max_pixels:
        return None
    ids = tuple(layer[0] for layer in image.layer)
    sampling = [layer[1:3] for layer in image.layer]
    if ids == RGB_COMPONENT_IDS or sampling[0] not in LUMA_SAMPLING or sampling[1:] != [(1, 1)] * 2:
        return None
    if data.rfind(b"\xff\xd9") <= image.fp.tell():  # no end marker after the scan's start
        return None
    return JpegHeader(
        width,
        height,
        orientation if orientation in range(2, 9) else 1,
        bool(image.info.get("progressive")),
    )


def pillow_size(data: bytes, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    """Pillow's `Image.open` and nothing else: the size only, the floor of any Pillow reader."""
    return Image.open(io.BytesIO(data), formats=("JPEG",)).size


READERS: dict[str, Callable[[bytes, int, int], Any]] = {
    "read_jpeg_header (ours)": read_jpeg_header,
    "Pillow open + getexif + checks": pillow_header,
    "Pillow open alone (size only)": pillow_size,
}


def bench_files() -> dict[str, bytes]:
    files = {}
    for width, height in SIZES:
        picture = images.picture(width, height)
        files[f"{width}x{height}"] = images.encode(picture, "JPEG", quality=90)
        files[f"{width}x{height} + EXIF"] = images.encode(
            picture, "JPEG", quality=90, exif=camera_exif(6)
        )
    return files


def check_agreement(files: dict[str, bytes]) -> None:
    """Both readers must say the same of every file, or the timings compare different work."""
    for name, data in files.items():
        ours = read_jpeg_header(data, MAX_BYTES, MAX_PIXELS)
        pillows = pillow_header(data, MAX_BYTES, MAX_PIXELS)
        if ours is None or ours != pillows:
            raise AssertionError(f"{name}: ours {ours} against Pillow's {pillows}")


def time_reader(reader: Callable[[bytes, int, int], Any], data: bytes) -> float:
    """µs a call, over CALLS calls."""
    started = time.perf_counter()
    for _ in range(CALLS):
        reader(data, MAX_BYTES, MAX_PIXELS)
    return (time.perf_counter() - started) / CALLS * 1e6


def run() -> dict[str, Any]:
    files = bench_files()
    check_agreement(files)
    samples: dict[tuple[str, str], list[float]] = {
        (file, reader): [] for file in files for reader in READERS
    }
    for _ in range(ROUNDS):
        for file, data in files.items():
            for name, reader in READERS.items():
                samples[(file, name)].append(time_reader(reader, data))
    us = {key: median(values) for key, values in samples.items()}
    ours, pillow, floor = READERS
    rows = [
        [file, f"{len(data):,}", us[(file, ours)], us[(file, pillow)], us[(file, floor)],
         f"{us[(file, pillow)] / us[(file, ours)]:.1f}x"]
        for file, data in files.items()
    ]  # fmt: skip
    print(
        table(
            f"JPEG header read, µs a file (medians of {ROUNDS} rounds of {CALLS} calls)",
            ["file", "bytes", "ours", "Pillow + checks", "Pillow open alone", "Pillow / ours"],
            rows,
        )
    )
    worst = max(us[(file, pillow)] for file in files)
    print(
        f"Pillow's slowest file: {worst:.1f} µs against the {BUDGET_US:.0f} µs budget: "
        f"{verdict(worst <= BUDGET_US)}"
    )
    figures = {
        "rounds": ROUNDS,
        "calls": CALLS,
        "budget_us": BUDGET_US,
        "us_per_file": {
            file: {name: us[(file, name)] for name in READERS} | {"bytes": len(data)}
            for file, data in files.items()
        },
    }
    record("jpeg-header", figures)
    return figures


if __name__ == "__main__":
    run()
