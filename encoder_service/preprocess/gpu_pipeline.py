"""Batched image preprocessing in tensor ops on the model's device: nvJPEG decode on CUDA.

The same code runs on "cpu" (tests, CI) and "cuda" (speed). Plain JPEGs, as
`read_jpeg_header` judges them, are decoded a batch at a time by
`torchvision.io.decode_jpeg` (nvJPEG on CUDA), turned upright per EXIF, and
resized (shortest side, antialiased bicubic as Pillow does), center-cropped and
normalized on the device, in uint8 until the resize. Everything else, and any
JPEG the device decoder rejects, is decoded by Pillow exactly as on the CPU
path (same limits, same error messages) and taken through open_clip's own
PIL-side steps to uint8 pixels, so those images match the CPU path bit for bit;
their pixels then take the same device path, where the resize is a no-op.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from encoder_service.preprocess.images import ImageLimits, Timings, decode_image
from encoder_service.preprocess.jpeg_header import JpegHeader, read_jpeg_header
from vpm_common.errors import InvalidArgument, VpmError

logger = logging.getLogger(__name__)

# Pixels decoded by one device decoder call, and resized in one float32 chunk:
# bounds device memory when a batch is full of large photos (uint8: 3 B/pixel).
DECODE_PIXEL_BUDGET = 128_000_000
RESIZE_PIXEL_BUDGET = 48_000_000
# In place of an EXIF orientation: pixels Pillow already resized and cropped.
FINAL = -1
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; the GPU
# machines run torchvision 0.26, where they are current. One warning per call is noise.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")


@dataclass(frozen=True)
class TensorTransform:
    """open_clip's eval transform in numbers, plus its PIL-side steps for CPU-decoded images."""

    resize: int  # the shortest side after resizing
    crop: tuple[int, int]  # (height, width)
    interpolation: str  # "bicubic" or "bilinear", antialiased like Pillow
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pil_steps: Callable[[Any], Any]  # PIL image -> resized, cropped RGB PIL image

    @classmethod
    def from_preprocess(cls, preprocess: Any) -> TensorTransform:
        """Read the Compose open_clip builds; ValueError when it is not the usual kind."""
        from torchvision import transforms

        steps = list(getattr(preprocess, "transforms", []))
        kinds = [type(step).__name__ for step in steps]
        expected = ["Resize", "CenterCrop", "*", "*", "Normalize"]
        if len(steps) != 5 or any(e not in ("*", k) for e, k in zip(expected, kinds, strict=True)):
            raise ValueError(f"the tensor pipeline needs resize, crop, normalize; got {kinds}")
        resize, crop, convert, to_tensor, normalize = steps
        if not (_is_rgb_conversion(convert) and isinstance(to_tensor, transforms.ToTensor)):
            raise ValueError(f"unexpected conversion steps in the preprocess: {kinds}")
        size = resize.size if isinstance(resize.size, int) else tuple(resize.size)
        if isinstance(size, tuple) and len(size) == 1:
            size = size[0]
        modes = {
            transforms.InterpolationMode.BICUBIC: "bicubic",
            transforms.InterpolationMode.BILINEAR: "bilinear",
        }
        if not isinstance(size, int) or resize.max_size is not None:
            raise ValueError(f"the tensor pipeline resizes the shortest side only, not {size}")
        if resize.interpolation not in modes:
            raise ValueError(f"the tensor pipeline cannot resize with {resize.interpolation}")
        crop_size = (int(crop.size[0]), int(crop.size[-1]))
        if max(crop_size) > size:
            raise ValueError(f"crop {crop_size} larger than the resize {size} needs padding")
        return cls(
            resize=size,
            crop=crop_size,
            interpolation=modes[resize.interpolation],
            mean=tuple(float(v) for v in normalize.mean),
            std=tuple(float(v) for v in normalize.std),
            pil_steps=transforms.Compose([resize, crop, convert]),
        )


def _is_rgb_conversion(step: Any) -> bool:
    # open_clip >= 2.24 uses MaybeConvertMode("RGB"); older ones a `_convert_to_rgb` function.
    name = getattr(step, "__name__", "")
    return getattr(step, "mode", None) == "RGB" or name == "_convert_to_rgb"


@dataclass(frozen=True)
class JpegRecord:
    """A JPEG for the device decoder: its bytes (also as a CPU uint8 tensor) and header."""

    data: bytes
    encoded: Any  # uint8 tensor (len(data),) on the CPU
    header: JpegHeader


@dataclass(frozen=True)
class CpuPixels:
    """An image Pillow decoded and resized: uint8 (H, W, 3), pinned when bound for CUDA."""

    pixels: Any


@dataclass
class PreparedBatch:
    """Model input for a whole batch (an error's row is zeros), and the per-item errors."""

    pixels: Any  # (N, 3, H, W) in the model's input dtype, on the device
    errors: dict[int, VpmError]
    decode_s: float  # host time spent in the device decoder (it returns when done)
    preprocess_marks: list[tuple[Any, Any]]  # (start, end) per chunk: see preprocess_s

    def preprocess_s(self) -> float:
        """Device time spent resizing and normalizing; on CUDA, ask once the batch is done."""
        return sum(_seconds(start, end) for start, end in self.preprocess_marks)


DecodeJpegs = Callable[[list[Any], str], list[Any]]


def torchvision_decode_jpegs(encoded: list[Any], device: str) -> list[Any]:
    """uint8 (3, H, W) RGB tensors on `device` from JPEG bytes; nvJPEG when `device` is CUDA."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


class TensorImagePipeline:
    """Image bytes to model input, a whole batch at a time on `device`."""

    def __init__(
        self,
        transform: TensorTransform,
        limits: ImageLimits,
        device: str,
        dtype: Any,
        decode_jpegs: DecodeJpegs = torchvision_decode_jpegs,
    ) -> None:
        import torch

        self._torch = torch
        self.transform = transform
        self.limits = limits
        self.device = device
        self.dtype = dtype
        self._decode_jpegs = decode_jpegs
        self._pin = device.startswith("cuda")
        # The decoder's outputs come from this stream's memory pool (see _device_decode).
        self._decode_stream = torch.cuda.Stream(device) if self._pin else None
        self.device_jpegs = True  # False once check_device_decoder finds it broken
        std = torch.tensor(transform.std, dtype=torch.float32)
        mean = torch.tensor(transform.mean, dtype=torch.float32)
        # (x / 255 - mean) / std as one multiply-add on 0..255 values.
        self._scale = (1 / (255 * std)).view(1, 3, 1, 1).to(device)
        self._shift = (-mean / std).view(1, 3, 1, 1).to(device)

    # -- worker threads ----------------------------------------------------------

    def admit(self, data: bytes) -> tuple[JpegRecord | CpuPixels, Timings]:
        """Route one image: a plain JPEG to the device as bytes, anything else through Pillow."""
        started = time.perf_counter()
        header = None
        if self.device_jpegs:
            # Our reader, not Pillow's lazy open: 7-13 µs a file against Pillow's 22-29 µs,
            # and 73-93 µs with a camera's EXIF block, all of it holding the interpreter lock
            # (`python -m bench jpeg-header`; BENCHMARKS.md, "JPEG header reading").
            header = read_jpeg_header(data, self.limits.max_bytes, self.limits.max_pixels)
        if header is not None:
            encoded = self._torch.frombuffer(bytearray(data), dtype=self._torch.uint8)
            return JpegRecord(data, encoded, header), Timings(time.perf_counter() - started, 0.0)
        image = decode_image(data, self.limits)
        decoded = time.perf_counter()
        pixels = self._cpu_pixels(image)
        return pixels, Timings(decoded - started, time.perf_counter() - decoded)

    def _cpu_pixels(self, image: Any) -> CpuPixels:
        """open_clip's own PIL steps (resize, crop, RGB), so these match the CPU path exactly."""
        try:
            array = np.array(self.transform.pil_steps(image), dtype=np.uint8)
        except (OSError, ValueError):
            raise InvalidArgument(f"image cannot be converted from {image.mode} mode") from None
        pixels = self._torch.from_numpy(array)
        return CpuPixels(pixels.pin_memory() if self._pin else pixels)

    def check_device_decoder(self, jpeg: bytes) -> bool:
        """Decode one good JPEG on the device; if that fails, send every JPEG to Pillow instead.

        A torchvision built without nvJPEG would otherwise fail every batch
        and find each image's fallback by halving: correct, and very slow.
        """
        try:
            self._device_decode([self._torch.frombuffer(bytearray(jpeg), dtype=self._torch.uint8)])
        except Exception as error:  # noqa: BLE001 - whatever it is, Pillow still works
            logger.error("the device JPEG decoder fails here (%s); JPEGs go to Pillow", error)
            self.device_jpegs = False
        return self.device_jpegs

    # -- the inference thread ------------------------------------------------------

    def prepare(self, payloads: Sequence[JpegRecord | CpuPixels]) -> PreparedBatch:
        """Decode and preprocess a batch on the device; bad items become per-item errors.

        It goes a chunk of pixels at a time (decode, then resize into the
        batch's rows), so a batch of large photos never holds all of its
        decoded pixels on the device at once.
        """
        torch = self._torch
        height, width = self.transform.crop
        out = torch.zeros((len(payloads), 3, height, width), dtype=self.dtype, device=self.device)
        prepared = PreparedBatch(out, {}, 0.0, [])
        sizes = [_payload_size(payload) for payload in payloads]
        for chunk in _chunks(list(range(len(payloads))), sizes, DECODE_PIXEL_BUDGET):
            started = time.perf_counter()
            images, errors = self.decode([payloads[index] for index in chunk])
            prepared.decode_s += time.perf_counter() - started
            prepared.errors.update((chunk[at], error) for at, error in errors.items())
            rows = [chunk[at] for at in sorted(images)]
            start = self._mark()
            self.preprocess(out, rows, [images[at] for at in sorted(images)])
            prepared.preprocess_marks.append((start, self._mark()))
        return prepared

    def _mark(self) -> Any:
        """A point on the device's timeline: a CUDA event there, the host clock on the CPU."""
        if not self._pin:
            return time.perf_counter()
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def decode(
        self, payloads: Sequence[JpegRecord | CpuPixels]
    ) -> tuple[dict[int, tuple[Any, int]], dict[int, VpmError]]:
        """{index: (uint8 (3, H, W) on the device, EXIF orientation or FINAL)}, {index: error}."""
        images: dict[int, tuple[Any, int]] = {}
        errors: dict[int, VpmError] = {}
        jpegs = [i for i, payload in enumerate(payloads) if isinstance(payload, JpegRecord)]
        if jpegs:
            outcomes = self._decode_or_split([payloads[i] for i in jpegs])
            for index, outcome in zip(jpegs, outcomes, strict=True):
                if isinstance(outcome, VpmError):
                    errors[index] = outcome
                else:
                    images[index] = outcome
        for index, payload in enumerate(payloads):
            if isinstance(payload, CpuPixels):
                images[index] = (self._to_device(payload.pixels), FINAL)
        return images, errors

    def _decode_or_split(self, records: list[JpegRecord]) -> list[tuple[Any, int] | VpmError]:
        """One decoder call for all; when it refuses, halves, down to Pillow for the culprit."""
        try:
            decoded = self._device_decode([r.encoded for r in records])
        except RuntimeError as error:  # the decoder gives no partial results
            if len(records) > 1:
                middle = len(records) // 2
                return self._decode_or_split(records[:middle]) + self._decode_or_split(
                    records[middle:]
                )
            logger.info("device JPEG decoder refused an image (%s); decoding it with Pillow", error)
            return [self._decode_with_pillow(records[0])]
        return [
            (image, record.header.orientation)
            for image, record in zip(decoded, records, strict=True)
        ]

    def _device_decode(self, encoded: list[Any]) -> list[Any]:
        """The decoder call; on CUDA its outputs are allocated on a stream of their own.

        nvJPEG writes on its own stream without waiting for ours. Allocated on
        the main stream, its outputs could take memory that the previous
        batch's model, still running there, has just released; from a separate
        pool, marked as used by the main stream, they cannot.
        """
        if self._decode_stream is None:
            return self._decode_jpegs(encoded, self.device)
        torch = self._torch
        main = torch.cuda.current_stream()
        with torch.cuda.stream(self._decode_stream):
            images = self._decode_jpegs(encoded, self.device)
        main.wait_stream(self._decode_stream)
        for image in images:
            image.record_stream(main)
        return images

    def _decode_with_pillow(self, record: JpegRecord) -> tuple[Any, int] | VpmError:
        try:
            image = decode_image(record.data, self.limits)
            return self._to_device(self._cpu_pixels(image).pixels), FINAL
        except VpmError as error:
            return error

    def _to_device(self, pixels: Any) -> Any:
        """uint8 (H, W, 3) on the CPU -> uint8 (3, H, W) on the device; uint8 over the bus."""
        return pixels.to(self.device, non_blocking=True).permute(2, 0, 1)

    def preprocess(self, out: Any, rows: list[int], images: list[tuple[Any, int]]) -> None:
        """Upright, resize, crop, normalize into out[rows], images of one size and turn at once."""
        torch = self._torch
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for at, (image, orientation) in enumerate(images):
            groups[(orientation, *image.shape[-2:])].append(at)
        for (orientation, h, w), members in groups.items():
            for chunk in _chunks(members, [_Size(w, h)] * len(members), RESIZE_PIXEL_BUDGET):
                batch = torch.stack([images[at][0] for at in chunk])
                if orientation != FINAL:
                    batch = self._resize_crop(upright(batch, orientation))
                self._put(out, [rows[at] for at in chunk], self._normalize(batch))

    def _put(self, out: Any, rows: list[int], values: Any) -> None:
        """out[rows] = values, without a host sync (a CUDA index tensor made from a list syncs)."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            out[rows[0] : rows[0] + len(rows)] = values
            return
        index = self._torch.tensor(rows)
        if self._pin:
            index = index.pin_memory()
        out.index_copy_(0, index.to(self.device, non_blocking=True), values)

    def _resize_crop(self, batch: Any) -> Any:
        """uint8 (N, 3, H, W) -> float32 (N, 3, crop) with values 0..255, as Pillow would give."""
        torch = self._torch
        h, w = batch.shape[-2:]
        new_h, new_w = resized_size(h, w, self.transform.resize)
        pixels = batch.float()
        if (new_h, new_w) != (h, w):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(new_h, new_w), mode=self.transform.interpolation, antialias=True
            )
            # Pillow resizes in uint8: it clips the overshoot and rounds.
            pixels = pixels.clamp_(0, 255).round_()
        crop_h, crop_w = self.transform.crop
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        return pixels[:, :, top : top + crop_h, left : left + crop_w]

    def _normalize(self, pixels: Any) -> Any:
        """0..255 values (any dtype) -> (x / 255 - mean) / std in the model's dtype."""
        return self._torch.addcmul(self._shift, pixels.float(), self._scale).to(self.dtype)


@dataclass(frozen=True)
class _Size:
    width: int
    height: int


def _payload_size(payload: JpegRecord | CpuPixels) -> Any:
    if isinstance(payload, JpegRecord):
        return payload.header
    height, width = payload.pixels.shape[:2]
    return _Size(width, height)


def _seconds(start: Any, end: Any) -> float:
    """Between two marks: CUDA events (both reached) or host clock readings."""
    if isinstance(start, float):
        return end - start
    return start.elapsed_time(end) / 1000


def _chunks(indices: list[int], sizes: Sequence[Any], budget: int) -> list[list[int]]:
    """Split `indices` (with sizes alike) into runs whose pixels stay within `budget`."""
    chunks: list[list[int]] = []
    pixels = 0
    for index, size in zip(indices, sizes, strict=True):
        area = size.width * size.height
        if chunks and pixels + area <= budget:
            chunks[-1].append(index)
            pixels += area
        else:
            chunks.append([index])
            pixels = area
    return chunks


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shortest side to `size`, the other truncated in proportion."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def upright(batch: Any, orientation: int) -> Any:
    """(..., H, W) as Pillow's exif_transpose turns it for an EXIF orientation (2..8)."""
    if orientation == 2:
        return batch.flip(-1)
    if orientation == 3:
        return batch.flip(-2, -1)
    if orientation == 4:
        return batch.flip(-2)
    if orientation == 5:
        return batch.transpose(-2, -1)
    if orientation == 6:
        return batch.rot90(-1, (-2, -1))
    if orientation == 7:
        return batch.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return batch.rot90(1, (-2, -1))
    return batch
