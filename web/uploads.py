"""Query photos as the page receives them: a multipart upload, read within limits, checked."""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from vpm_common.errors import InvalidArgument
from web.errors import UploadTooLarge

# Room for the multipart envelope and the few form fields beside the photo.
FORM_OVERHEAD = 64 * 1024
HOW_TO_SEND = "send it as multipart/form-data in the field 'image' (curl -F image=@photo.jpg)"


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    max_pixels: int


async def read_upload(request: Request, limits: UploadLimits) -> tuple[dict[str, str], bytes]:
    """The form's text fields and its checked photo; the body is read no further than the
    limit allows."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidArgument(f"image: {HOW_TO_SEND}")
    cap = limits.max_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise UploadTooLarge(_too_many_bytes(int(declared), limits))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise UploadTooLarge(_too_many_bytes(len(body), limits))
    parser = MultiPartParser(
        request.headers, _once(bytes(body)), max_files=1, max_fields=32, max_part_size=16 * 1024
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise InvalidArgument(f"image: the upload is malformed ({error.message})") from None
    try:
        photo = form.get("image")
        if not isinstance(photo, UploadFile):
            raise InvalidArgument(f"image: no photo in the upload; {HOW_TO_SEND}")
        data = await photo.read()
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
    return fields, checked_photo(data, limits)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def checked_photo(data: bytes, limits: UploadLimits) -> bytes:
    """`data` when it is an image within the limits; reads the header only (the encoders
    decode it, and report a corrupt one)."""
    if not data:
        raise InvalidArgument("image: the file is empty")
    if len(data) > limits.max_bytes:
        raise UploadTooLarge(_too_many_bytes(len(data), limits))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadTooLarge(_too_many_pixels(None, limits)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidArgument(
            "image: this file is not an image the page can read (JPEG, PNG, WebP, GIF, BMP or TIFF)"
        ) from None
    if width * height > limits.max_pixels:
        raise UploadTooLarge(_too_many_pixels((width, height), limits))
    return data


def _too_many_bytes(size: int, limits: UploadLimits) -> str:
    return f"image: the file is {_mb(size)}, over the limit of {_mb(limits.max_bytes)}"


def _too_many_pixels(size: tuple[int, int] | None, limits: UploadLimits) -> str:
    limit = f"{limits.max_pixels / 1e6:g} megapixels"
    if size is None:
        return f"image: the photo declares too many pixels, over the limit of {limit}"
    width, height = size
    return (
        f"image: the photo is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
        f"over the limit of {limit}"
    )


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"
