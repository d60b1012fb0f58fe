"""Finding a catalog on disk: the fashion layout (styles.csv + images/<id>.jpg) or any folder.

Every image file is found exactly once: extensions are matched without regard
to case (so `1.jpg` is not also counted as `1.JPG`), a file reached through
several links is one file, and symbolic-link loops are not followed around.
What cannot be used is reported with where it is and why, never fatal.
"""

from __future__ import annotations

import csv
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
STYLES_COLUMNS = (
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
)  # fmt: skip
# styles.csv column -> Product field
FIELD_OF_COLUMN = {
    "gender": "gender",
    "masterCategory": "master_category",
    "subCategory": "sub_category",
    "articleType": "article_type",
    "baseColour": "base_colour",
    "season": "season",
    "usage": "usage",
    "productDisplayName": "name",
}
MAX_ID_LENGTH = 256
# The free attribute that records where a product's image lies, relative to the folder the
# indexer read (--images or --dir): the search page finds thumbnails there.
IMAGE_PATH_ATTRIBUTE = "image_path"


@dataclass(frozen=True)
class SourceItem:
    """One product found on disk: its id, its image file, and its metadata as Product fields."""

    id: str
    path: Path
    metadata: tuple[tuple[str, str | int], ...]  # sorted (field, value) pairs
    image_path: str = ""  # `path` relative to the folder read, '/'-separated

    def fields(self) -> dict[str, str | int | dict[str, str]]:
        """Product fields: the metadata, and the image's relative path as an attribute."""
        fields: dict[str, str | int | dict[str, str]] = dict(self.metadata)
        if self.image_path:
            fields["attributes"] = {IMAGE_PATH_ATTRIBUTE: self.image_path}
        return fields


@dataclass
class Discovery:
    items: list[SourceItem] = field(default_factory=list)
    # (where, what): malformed rows, missing or ambiguous images, duplicate ids...
    problems: list[tuple[str, str]] = field(default_factory=list)
    # The first problem that left products unread (rows not parsed, a folder not listed):
    # their ids are not known, so a prune would take them for gone.
    incomplete: tuple[str, str] | None = None

    def problem(self, where: str, what: str) -> None:
        self.problems.append((where, what))

    def unread(self, where: str, what: str) -> None:
        """A problem that may hide products."""
        self.problem(where, what)
        self.incomplete = self.incomplete or (where, what)


def image_names(folder: Path) -> Iterator[str]:
    """Names of the image files directly in `folder`, each once, by case-insensitive extension."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                yield entry.name


def _preference(name: str) -> int:
    return IMAGE_EXTENSIONS.index(name[name.rfind(".") :].lower())


def fashion_catalog(styles: Path, images: Path) -> Discovery:
    """Products from styles.csv whose image images/<id>.<ext> exists."""
    found = Discovery()
    # File names by stem as strings, a Path made only for the file chosen: two Paths a file
    # (made, then made relative) were the costliest part of finding a large catalog's images.
    by_stem: dict[str, list[str]] = {}
    for name in image_names(images):
        by_stem.setdefault(name.rpartition(".")[0], []).append(name)
    seen: set[str] = set()
    for line, row in _styles_rows(styles, found):
        product_id = row["id"]
        if product_id in seen:
            found.problem(f"{styles.name}:{line}", f"duplicate id {product_id!r}; first row kept")
            continue
        seen.add(product_id)
        names = by_stem.get(product_id)
        if not names:
            found.problem(f"{styles.name}:{line}", f"no image {product_id}.jpg in {images}")
            continue
        if len(names) > 1:
            names = sorted(names, key=_preference)
            found.problem(
                str(images / names[0]),
                f"several images for id {product_id} ({', '.join(names)}); using the first",
            )
        found.items.append(
            SourceItem(product_id, images / names[0], _metadata_of_row(row), names[0])
        )
    orphans = sorted(set(by_stem) - seen)
    if orphans:
        sample = ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        found.problem(
            str(images), f"{len(orphans)} image(s) with no styles.csv row, not indexed: {sample}"
        )
    return found


def _styles_rows(styles: Path, found: Discovery) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for every usable row; malformed rows are reported and skipped."""
    # utf-8-sig: a spreadsheet's export starts with a byte-order mark, which would
    # otherwise stick to the first column's name.
    with styles.open(newline="", encoding="utf-8-sig", errors="replace") as file:
        reader = csv.reader(file)
        try:
            yield from _usable_rows(reader, styles.name, found)
        except csv.Error as error:  # e.g. a field over the csv module's size limit
            found.unread(
                f"{styles.name}:{reader.line_num}", f"{error}; the rest of the file is not read"
            )


def _usable_rows(reader: Any, name: str, found: Discovery) -> Iterator[tuple[int, dict[str, str]]]:
    header = next(reader, None)
    if header is None:
        found.problem(name, "file is empty")
        return
    header = [column.strip() for column in header]
    missing = [column for column in STYLES_COLUMNS if column not in header]
    if missing:
        found.problem(f"{name}:1", f"header lacks column(s) {', '.join(missing)}")
        return
    last = 1
    for values in reader:
        first, line = last + 1, reader.line_num  # a quoted field may span lines
        last = line
        if not any(value.strip() for value in values):
            continue
        if line > first and any("\n" in value or "\r" in value for value in values):
            # Most often an unclosed quote, which swallows the rows after it.
            found.unread(
                f"{name}:{first}",
                f"a quoted field runs over lines {first}-{line} (an unclosed quote?); row skipped",
            )
            continue
        if len(values) > len(header) and header[-1] == "productDisplayName":
            # The real fashion set has unquoted commas in the last, free-text
            # column; they belong to the name.
            values = values[: len(header) - 1] + [",".join(values[len(header) - 1 :])]
        if len(values) != len(header):
            found.unread(
                f"{name}:{line}", f"{len(values)} fields, expected {len(header)}; row skipped"
            )
            continue
        row = {column: value.strip() for column, value in zip(header, values, strict=True)}
        problem = _id_problem(row["id"])
        if problem:
            found.problem(f"{name}:{line}", f"{problem}; row skipped")
            continue
        yield line, row


def _id_problem(product_id: str) -> str | None:
    if not product_id:
        return "empty id"
    if len(product_id) > MAX_ID_LENGTH:
        return f"id longer than {MAX_ID_LENGTH} characters"
    if "/" in product_id or "\\" in product_id or product_id in (".", ".."):
        return f"id {product_id!r} cannot be a file name"
    return None


def _is_utf8(text: str) -> bool:
    """False for a name the file system gave undecodable (its bytes as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata_of_row(row: dict[str, str]) -> tuple[tuple[str, str | int], ...]:
    values: dict[str, str | int] = {field: row[column] for column, field in FIELD_OF_COLUMN.items()}
    values["year"] = _year(row.get("year", ""))
    return tuple(sorted(values.items()))


def _year(text: str) -> int:
    """The year of "2011" or "2011.0"; 0 (not known) for what is none, such as "", "nan"
    or a number beyond what Product.year (int32) holds."""
    try:
        number = float(text)
    except ValueError:
        return 0
    return int(number) if math.isfinite(number) and abs(number) < 2**31 else 0


def folder_catalog(root: Path) -> Discovery:
    """Every image under `root`: id = file stem, category = its folder relative to root."""
    found = Discovery()
    first_path_of: dict[str, Path] = {}
    for path in walk_images(root, found):
        if not _is_utf8(str(path.relative_to(root))):
            # Named with its undecodable bytes escaped: the summary and logs are UTF-8.
            shown = str(path).encode("utf-8", "backslashreplace").decode("utf-8")
            found.problem(shown, "the name is not UTF-8 text (another encoding?); skipped")
            continue
        product_id = path.stem
        problem = _id_problem(product_id)
        if problem:
            found.problem(str(path), problem)
            continue
        if product_id in first_path_of:
            found.problem(
                str(path), f"id {product_id!r} also at {first_path_of[product_id]}; skipped"
            )
            continue
        first_path_of[product_id] = path
        category = path.parent.relative_to(root).as_posix()
        metadata = {
            "name": product_id.replace("_", " "),
            "category": "" if category == "." else category,
        }
        found.items.append(
            SourceItem(
                product_id, path, tuple(sorted(metadata.items())), path.relative_to(root).as_posix()
            )
        )
    return found


def walk_images(root: Path, found: Discovery) -> list[Path]:
    """Image files under root, sorted, following links but never into a folder twice.

    A file reached by several paths (links) is listed once, under its own
    path rather than a link's when the walk finds both. Broken links and what
    is not a regular file are problems of `found`, skipped.
    """
    visited: set[tuple[int, int]] = set()
    chosen: dict[tuple[int, int], Path] = {}

    def unlisted(error: OSError) -> None:  # e.g. no permission, a stale network mount
        found.unread(str(error.filename), f"folder not listed ({error.strerror}); skipped")

    # The folders under root by their own paths: one reached first through a link is walked
    # at its own path instead, so that its files' category and image_path are their own.
    top = os.fspath(root)
    own = {_key(folder) for folder, _, _ in os.walk(top)}
    for folder, subfolders, files in os.walk(top, onerror=unlisted, followlinks=True):
        key = _key(folder)
        linked = folder != top and os.path.islink(folder)  # root itself may be a link
        if key in visited or (key in own and linked):
            subfolders[:] = []  # a link loop, or a link to a folder walked at its own path
            continue
        visited.add(key)
        subfolders.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(folder) / name
            try:
                file_stat = path.stat()
            except OSError:
                found.problem(str(path), "broken link or unreadable; skipped")
                continue
            if not stat.S_ISREG(file_stat.st_mode):  # reading a pipe would wait for ever
                found.problem(str(path), "not a regular file; skipped")
                continue
            key = (file_stat.st_dev, file_stat.st_ino)
            if key not in chosen or (chosen[key].is_symlink() and not path.is_symlink()):
                chosen[key] = path
    return sorted(chosen.values())


def _key(folder: str) -> tuple[int, int]:
    status = os.stat(folder)
    return status.st_dev, status.st_ino
