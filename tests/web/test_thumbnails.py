"""Thumbnails over HTTP: only files inside the image folder, made once, revalidated cheaply."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from indexer.sources import IMAGE_PATH_ATTRIBUTE, fashion_catalog, folder_catalog
from tests import images
from tests.web.conftest import RunningPage
from web import api
from web.thumbnails import ThumbnailStore


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An image folder, with a secret beside it and links in it pointing in and out."""
    root = tmp_path / "images"
    (root / "shoes" / "red").mkdir(parents=True)
    (root / "shoes" / "red" / "a 1.jpg").write_bytes(images.jpeg(1080, 1440, seed=1))
    (root / "top.png").write_bytes(images.encode(images.picture(200, 100), "PNG"))
    (root / "notes.txt").write_text("not a picture")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (tmp_path / "secret.jpg").write_bytes(images.jpeg(64, 64, seed=9))
    os.symlink(tmp_path / "secret.jpg", root / "out.jpg")
    os.symlink(tmp_path, root / "outdir")
    os.symlink(root / "top.png", root / "in.png")
    return root


@pytest.fixture
def page(folder: Path, start_page: Callable[..., RunningPage]) -> RunningPage:
    # No search service is needed for thumbnails.
    return start_page(images=folder, thumbnail_size=200)


def test_a_thumbnail_is_a_small_upright_jpeg_with_validators(page: RunningPage) -> None:
    reply = page.get("/thumbnails/shoes/red/a%201.jpg")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(reply.body)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (150, 200)
    etag, modified = reply.headers["etag"], reply.headers["last-modified"]
    assert page.get("/thumbnails/shoes/red/a%201.jpg", if_none_match=etag).status == 304
    assert page.get("/thumbnails/shoes/red/a%201.jpg", if_modified_since=modified).status == 304
    assert page.get("/thumbnails/shoes/red/a%201.jpg", if_none_match='"other"').status == 200
    assert page.get("/thumbnails/in.png").status == 200, "a link that stays inside is fine"


def test_a_changed_file_gets_a_new_thumbnail_and_etag(page: RunningPage, folder: Path) -> None:
    first = page.get("/thumbnails/top.png")
    (folder / "top.png").write_bytes(images.encode(images.picture(100, 200, seed=3), "PNG"))
    os.utime(folder / "top.png", ns=(1, 10**18))
    second = page.get("/thumbnails/top.png", if_none_match=first.headers["etag"])
    assert second.status == 200 and second.headers["etag"] != first.headers["etag"]
    with Image.open(io.BytesIO(second.body)) as thumb:
        assert thumb.size == (100, 200)


@pytest.mark.parametrize(
    "path",
    [
        "/thumbnails/../secret.jpg",
        "/thumbnails/shoes/../../secret.jpg",
        "/thumbnails/%2e%2e/secret.jpg",
        "/thumbnails/..%2Fsecret.jpg",
        "/thumbnails/%2E%2E%2Fsecret.jpg",
        "/thumbnails/shoes%2F..%2F..%2Fsecret.jpg",
        "/thumbnails/..%5Csecret.jpg",
        "/thumbnails//etc/hostname.jpg",
        "/thumbnails/%2Fetc%2Fhostname.jpg",
        "/thumbnails/out.jpg",
        "/thumbnails/outdir/secret.jpg",
        "/thumbnails/./top.png",
        "/thumbnails/shoes//red/a%201.jpg",
        "/thumbnails/notes.txt",
        "/thumbnails/shoes",
        "/thumbnails/",
        "/thumbnails/missing.jpg",
        "/thumbnails/top.png%00.jpg",
        "/thumbnails/%252e%252e/secret.jpg",
    ],
)
def test_nothing_outside_the_folder_nor_any_non_image_is_served(
    page: RunningPage, path: str
) -> None:
    reply = page.get(path)
    assert reply.status == 404, (path, reply.body[:100])
    assert reply.json()["error"]["message"] == "thumbnail: no such image in the image folder"


def test_an_unreadable_image_is_not_found_with_its_own_message(page: RunningPage) -> None:
    reply = page.get("/thumbnails/broken.jpg")
    assert reply.status == 404 and "cannot be read" in reply.message


def test_concurrent_requests_make_a_thumbnail_once(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ThumbnailStore(folder, 100, 10**6)
    made = []
    original = store._make
    monkeypatch.setattr(store, "_make", lambda path: made.append(path) or original(path))
    version = store.version("shoes/red/a 1.jpg")

    async def five_then_one() -> list[bytes]:
        thumbs = await asyncio.gather(*(store.thumbnail(version) for _ in range(5)))
        return [*thumbs, await store.thumbnail(version)]

    assert len(set(asyncio.run(five_then_one()))) == 1
    assert len(made) == 1, "made once, then served from the cache"


def test_the_indexer_records_the_path_the_page_reads(tmp_path: Path) -> None:
    assert IMAGE_PATH_ATTRIBUTE == api.IMAGE_PATH
    shop = tmp_path / "fashion"
    (shop / "images").mkdir(parents=True)
    (shop / "images" / "7.jpg").write_bytes(b"x")
    (shop / "styles.csv").write_text(
        "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,"
        "productDisplayName\n7,Men,A,B,C,Red,Fall,2012,Casual,P\n"
    )
    (item,) = fashion_catalog(shop / "styles.csv", shop / "images").items
    assert item.fields()["attributes"] == {"image_path": "7.jpg"}
    (tmp_path / "tree" / "bags" / "small").mkdir(parents=True)
    (tmp_path / "tree" / "bags" / "small" / "b1.webp").write_bytes(b"x")
    (item,) = folder_catalog(tmp_path / "tree").items
    assert item.fields()["attributes"] == {"image_path": "bags/small/b1.webp"}
