"""Thumbnails of the operator's image folder: only files inside it, resized once, validated.

A name is a '/'-separated path relative to the folder, as the indexer records
it. It is refused, as not found, when it is absolute, has an empty, '.' or
'..' part, a backslash or a NUL, is not an image file name, or resolves
(symbolic links followed) to anything outside the folder. A thumbnail is made
once per version of its file (path, size and modification time) and kept in a
bounded memory cache; its ETag and Last-Modified come from that version, so a
revalidation costs a stat and no image work.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from PIL import Image, ImageOps

from vpm_common.errors import NotFound

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# A source image this large is not a product photo; its decoding would hold a worker for long.
MAX_SOURCE_PIXELS = 100_000_000
QUALITY = 85


@dataclass(frozen=True)
class Version:
    """Which version of a source file a thumbnail shows; the validators come from it."""

    path: Path
    size: int
    mtime_ns: int

    @property
    def etag(self) -> str:
        key = f"{self.path}\0{self.size}\0{self.mtime_ns}".encode()
        return '"' + hashlib.sha256(key).hexdigest()[:32] + '"'

    @property
    def last_modified(self) -> str:
        return formatdate(self.mtime_ns / 1e9, usegmt=True)


class ThumbnailStore:
    """JPEG thumbnails of the images under `root`, at most `size` pixels on their long side."""

    def __init__(self, root: Path, size: int, max_bytes: int) -> None:
        self.root = Path(os.path.realpath(root))
        self.size = size
        self.max_bytes = max_bytes
        self._cache: OrderedDict[Version, bytes] = OrderedDict()
        self._bytes = 0
        self._making: dict[Version, asyncio.Future[bytes]] = {}

    def version(self, name: str) -> Version:
        """The current version of the file `name` names; NotFound for any name refused."""
        path = self._inside(name)
        try:
            stat = path.stat()
        except OSError:
            raise _not_found() from None
        return Version(path, stat.st_size, stat.st_mtime_ns)

    async def thumbnail(self, version: Version) -> bytes:
        """The thumbnail of `version`, made in a worker thread once, however many ask at once."""
        cached = self._cache.get(version)
        if cached is not None:
            self._cache.move_to_end(version)
            return cached
        making = self._making.get(version)
        if making is None:
            making = asyncio.ensure_future(asyncio.to_thread(self._make, version.path))
            self._making[version] = making
            making.add_done_callback(lambda _done: self._making.pop(version, None))
            making.add_done_callback(lambda done: self._keep(version, done))
        return await asyncio.shield(making)

    def _inside(self, name: str) -> Path:
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or "\0" in name
            or any(part in ("", ".", "..") for part in parts)
            or not name.lower().endswith(IMAGE_EXTENSIONS)
        ):
            raise _not_found()
        path = Path(os.path.realpath(self.root.joinpath(*parts)))
        if not path.is_relative_to(self.root) or path == self.root:
            raise _not_found()
        return path

    def _make(self, path: Path) -> bytes:
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_SOURCE_PIXELS:
                    raise ValueError(f"{width}x{height} pixels")
                image.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale
                upright = ImageOps.exif_transpose(image)
                upright.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
                out = io.BytesIO()
                upright.convert("RGB").save(out, "JPEG", quality=QUALITY, optimize=True)
                return out.getvalue()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            logger.warning("no thumbnail for %s: %s", path, error)
            raise NotFound("thumbnail: the image file cannot be read") from None

    def _keep(self, version: Version, done: asyncio.Future[bytes]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        data = done.result()
        if len(data) > self.max_bytes:
            return
        self._cache[version] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _version, evicted = self._cache.popitem(last=False)
            self._bytes -= len(evicted)


def _not_found() -> NotFound:
    # The same answer for every refusal: a probe learns nothing about the disk.
    return NotFound("thumbnail: no such image in the image folder")
