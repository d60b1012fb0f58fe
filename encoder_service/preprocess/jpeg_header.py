"""A JPEG header reader that says, without decoding, whether the device decoder may take a file.

It reads only the markers before the first scan: frame size, components,
sampling, and the EXIF (or XMP) orientation, the way Pillow reads them. It
accepts only the plain case, an 8-bit three-component YCbCr baseline or
progressive JPEG with common chroma sampling, within the limits, with an end
marker. Anything else (CMYK, grayscale, arithmetic coding, odd EXIF, a
truncated file, a bomb) gets None and goes to Pillow, whose answer, pixels or
error message, is then exactly the CPU path's.

Why not Pillow's lazy `Image.open`, which reads the same markers: it costs 3x
this reader on a plain file and 6-9x with a camera's EXIF block (its open parses
the EXIF for the DPI), over the GPU path's per-image budget, and it keeps
neither the SOF marker nor the tables' precision (`python -m bench
jpeg-header`; BENCHMARKS.md, "JPEG header reading").
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from encoder_service.preprocess.images import too_thin

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
SOF_BASELINE, SOF_PROGRESSIVE = 0xC0, 0xC2
SOS, DQT, APP1, APP14 = 0xDA, 0xDB, 0xE1, 0xEE
# Segments a plain file may carry before its first scan and that are read past:
# Huffman tables, restart interval, APP0..APP15, comments. Any other marker
# (reserved, hierarchical, arithmetic conditioning, a stray RST or EOI) is for Pillow.
SKIPPED = frozenset({0xC4, 0xDD, *range(0xE0, 0xF0), 0xFE})
LUMA_SAMPLING = frozenset({0x11, 0x21, 0x12, 0x22})  # 4:4:4, 4:2:2, 4:4:0, 4:2:0
EXIF_PREFIX = b"Exif\0\0"
XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
# The pattern Pillow's getexif() uses when EXIF carries no orientation.
XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
ORIENTATION_TAG = 0x0112
RGB_COMPONENT_IDS = (ord("R"), ord("G"), ord("B"))  # libjpeg then decodes without YCbCr


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    orientation: int  # 2..8 as Pillow's exif_transpose acts on it; 1 for none (or any other value)
    progressive: bool


class _NotPlain(Exception):
    """The file is not the plain case; Pillow decides what it is."""


def read_jpeg_header(data: bytes, max_bytes: int, max_pixels: int) -> JpegHeader | None:
    """The header of a plain JPEG within the limits, or None when Pillow must decide."""
    if not data.startswith(SOI) or len(data) > max_bytes:
        return None
    try:
        header, scan_start = _read_markers(data)
    except (_NotPlain, IndexError, struct.error):
        return None
    if header.width * header.height > max_pixels or too_thin(header.width, header.height):
        return None  # Pillow's path refuses it, saying why
    # A missing end marker is how a truncated upload looks; Pillow reports it as such.
    if data.rfind(EOI) <= scan_start:
        return None
    return header


def _read_markers(data: bytes) -> tuple[JpegHeader, int]:
    frame: tuple[int, int, bool] | None = None
    exif_segments: list[bytes] = []
    xmp: bytes | None = None
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise _NotPlain
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > len(data):
            raise _NotPlain
        segment = data[pos + 4 : pos + 2 + length]
        if marker == SOS:
            break
        if marker in (SOF_BASELINE, SOF_PROGRESSIVE):
            if frame is not None:
                raise _NotPlain
            frame = (*_frame_size(segment), marker == SOF_PROGRESSIVE)
        elif marker == DQT:
            _check_quantization_tables(segment)
        elif marker not in SKIPPED:
            raise _NotPlain
        elif marker == APP1 and segment.startswith(EXIF_PREFIX):
            exif_segments.append(segment[len(EXIF_PREFIX) :])
        elif marker == APP1 and segment.startswith(XMP_PREFIX):
            xmp = segment.split(b"\x00", 1)[1]  # Pillow keeps the last one
        elif marker == APP14 and segment.startswith(b"Adobe"):
            raise _NotPlain  # its colour transform flag is libjpeg's business
        pos += 2 + length
    if frame is None:
        raise _NotPlain
    width, height, progressive = frame
    return JpegHeader(width, height, _orientation(exif_segments, xmp), progressive), pos


def _check_quantization_tables(segment: bytes) -> None:
    """8-bit tables of 64 entries each, as a baseline decoder wants (Pillow checks the sizes)."""
    if not segment or len(segment) % 65:
        raise _NotPlain
    if any(segment[at] >> 4 for at in range(0, len(segment), 65)):
        raise _NotPlain


def _frame_size(segment: bytes) -> tuple[int, int]:
    precision, height, width, count = struct.unpack_from(">BHHB", segment)
    if precision != 8 or count != 3 or len(segment) != 6 + 3 * count or not width or not height:
        raise _NotPlain
    ids = tuple(segment[6 + 3 * i] for i in range(3))
    sampling = tuple(segment[7 + 3 * i] for i in range(3))
    if ids == RGB_COMPONENT_IDS or sampling[0] not in LUMA_SAMPLING or sampling[1:] != (17, 17):
        raise _NotPlain
    return width, height


def _orientation(exif_segments: list[bytes], xmp: bytes | None) -> int:
    """Orientation as Pillow's getexif() finds it: EXIF IFD0 first, else the XMP packet."""
    if len(exif_segments) > 1:
        raise _NotPlain  # Pillow concatenates them; not worth imitating
    value = _exif_orientation(exif_segments[0]) if exif_segments else None
    if value is None and xmp:
        match = XMP_ORIENTATION.search(xmp)
        value = int(match[2]) if match else None
    return value if value in range(2, 9) else 1


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 in a TIFF block; None when absent; odd layouts raise."""
    if not tiff:
        return None
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        raise _NotPlain
    magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42:
        raise _NotPlain
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        raise _NotPlain
    found = None
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind, items = struct.unpack_from(order + "HHI", tiff, entry)
        if tag != ORIENTATION_TAG:
            continue
        if found is not None or items != 1 or kind not in (3, 4):  # one SHORT or LONG
            raise _NotPlain
        (found,) = struct.unpack_from(order + ("H" if kind == 3 else "I"), tiff, entry + 8)
    return found
