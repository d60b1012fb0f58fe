"""Domain tier: finding a catalog on disk, each image once, bad rows reported not fatal."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from indexer.sources import STYLES_COLUMNS, fashion_catalog, folder_catalog
from tests import images

HEADER = ",".join(STYLES_COLUMNS) + "\n"


def write_styles(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(row + "\n" for row in rows))
    return path


def test_fashion_layout_reads_rows_and_reports_bad_ones(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("1.jpg", "2.JPG", "3.jpeg", "5.jpg", "9.jpg"):
        (folder / name).write_bytes(images.jpeg(32, 32, seed=len(name)))
    (folder / "notes.txt").write_text("not an image")
    styles = write_styles(
        tmp_path / "styles.csv",
        [
            "1,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011.0,Casual,Turtle Check Men Shirt",
            "2,Women,Footwear,Shoes,Heels,Black,Summer,,Casual,Heels, with, commas in the name",
            "3,Men,Apparel,Topwear,Tshirts,White",  # too few fields
            ",Men,Apparel,Topwear,Tshirts,White,Fall,2012,Casual,No id",
            "4,Men,Apparel,Topwear,Tshirts,White,Fall,2012,Casual,No image on disk",
            "5,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Five",
            "5,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Five again",
        ],
    )
    found = fashion_catalog(styles, folder)
    by_id = {item.id: item for item in found.items}
    assert sorted(by_id) == ["1", "2", "5"]
    assert by_id["1"].fields()["year"] == 2011 and by_id["1"].fields()["base_colour"] == "Navy Blue"
    assert by_id["2"].path.name == "2.JPG"
    assert by_id["2"].fields()["name"] == "Heels, with, commas in the name"
    assert by_id["2"].fields()["year"] == 0
    problems = dict(found.problems)
    assert "6 fields, expected 10" in problems["styles.csv:4"]
    assert "empty id" in problems["styles.csv:5"]
    assert "no image 4.jpg" in problems["styles.csv:6"]
    assert "duplicate id '5'" in problems["styles.csv:8"]
    # 3's row was malformed, 9 has none: neither is indexed, both are named.
    assert "2 image(s) with no styles.csv row, not indexed: 3, 9" in problems[str(folder)]
    # A malformed row hides a product (3 here): the listing is not whole, a prune not safe.
    assert found.incomplete == ("styles.csv:4", problems["styles.csv:4"])


def test_a_listing_with_only_rows_of_no_product_is_whole(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(b"x")
    styles = write_styles(
        tmp_path / "styles.csv",
        [
            "1,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011.0,Casual,One",
            "1,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011.0,Casual,One again",
            "2,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011.0,Casual,No image",
            ",Men,Apparel,Topwear,Tshirts,White,Fall,2012,Casual,No id",
        ],
    )
    found = fashion_catalog(styles, folder)
    assert [item.id for item in found.items] == ["1"] and len(found.problems) == 3
    assert found.incomplete is None


def test_case_insensitive_extensions_never_count_a_file_twice(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(50):
        suffix = (".jpg", ".JPG", ".Jpeg", ".png")[index % 4]
        (folder / f"{index}{suffix}").write_bytes(b"x")
    styles = write_styles(
        tmp_path / "styles.csv", [f"{i},Men,A,B,C,Red,Fall,2012,Casual,P{i}" for i in range(50)]
    )
    found = fashion_catalog(styles, folder)
    assert len(found.items) == 50 and not found.problems


def test_several_files_for_one_id_are_reported_and_jpg_preferred(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "7.png").write_bytes(b"x")
    (folder / "7.jpg").write_bytes(b"x")
    found = fashion_catalog(
        write_styles(tmp_path / "s.csv", ["7,Men,A,B,C,Red,Fall,2012,Casual,P"]), folder
    )
    assert [item.path.name for item in found.items] == ["7.jpg"]
    assert "several images for id 7" in found.problems[0][1]


def test_folder_layout_follows_links_once_and_survives_loops(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    (root / "shoes" / "sneakers").mkdir(parents=True)
    (root / "bags").mkdir()
    (root / "shoes" / "a1.jpg").write_bytes(b"x")
    (root / "shoes" / "sneakers" / "a2.PNG").write_bytes(b"x")
    (root / "bags" / "b1.webp").write_bytes(b"x")
    (root / "top.jpg").write_bytes(b"x")
    (root / "bags" / "readme.md").write_text("no")
    os.symlink(root, root / "bags" / "loop")  # a loop back to the top
    os.symlink(root / "shoes" / "a1.jpg", root / "bags" / "a1-link.jpg")  # the same file again
    (root / "bags" / "a2.jpg").write_bytes(b"y")  # same id as shoes/sneakers/a2.PNG
    # A link to a folder that the walk meets before the folder itself ("bags" < "shoes").
    os.symlink(root / "shoes", root / "bags" / "also-shoes")
    found = folder_catalog(root)
    categories = {item.id: item.fields()["category"] for item in found.items}
    assert categories == {"b1": "bags", "a2": "bags", "a1": "shoes", "top": ""}
    paths = {item.id: item.fields().get("attributes", {}).get("image_path") for item in found.items}
    assert paths["a1"] == "shoes/a1.jpg"
    os.symlink(root, tmp_path / "catalog-link")  # --dir given as a link to the catalog
    assert folder_catalog(tmp_path / "catalog-link").items == [
        dataclasses.replace(item, path=tmp_path / "catalog-link" / item.path.relative_to(root))
        for item in found.items
    ]
    assert any("id 'a2' also at" in what for _, what in found.problems)


def test_folder_layout_lists_what_is_not_a_regular_file_as_a_problem(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would wait for a writer for ever
    (tmp_path / "folder.jpg").mkdir()
    os.symlink(tmp_path / "gone.jpg", tmp_path / "broken.jpg")
    found = folder_catalog(tmp_path)
    assert [item.id for item in found.items] == ["a"]
    assert sorted(found.problems) == [
        (str(tmp_path / "broken.jpg"), "broken link or unreadable; skipped"),
        (str(tmp_path / "pipe.jpg"), "not a regular file; skipped"),
    ]


def test_a_folder_that_cannot_be_listed_is_reported_and_the_listing_not_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bags").mkdir()
    (tmp_path / "shoes").mkdir()
    (tmp_path / "bags" / "b1.jpg").write_bytes(b"x")
    (tmp_path / "shoes" / "s1.jpg").write_bytes(b"x")
    scandir = os.scandir

    def refusing(path: Any) -> Any:
        # A stand-in for a folder without read permission: root, as the tests run, reads all.
        if Path(path) == tmp_path / "shoes":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    found = folder_catalog(tmp_path)
    assert [item.id for item in found.items] == ["b1"]
    shoes = str(tmp_path / "shoes")
    assert found.problems == [(shoes, "folder not listed (Permission denied); skipped")]
    assert found.incomplete == found.problems[0]


def test_a_spreadsheets_byte_order_mark_and_odd_years_are_read(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rows = {"1": "2012.0", "2": "nan", "3": "inf", "4": "1e10", "5": "-3000000000", "6": "x"}
    for product_id in rows:
        (folder / f"{product_id}.jpg").write_bytes(b"x")
    styles = tmp_path / "styles.csv"
    lines = [
        f"{i},Men,Apparel,Topwear,Tshirts,Red,Fall,{year},Casual,N{i}" for i, year in rows.items()
    ]
    # As a spreadsheet exports UTF-8: a byte-order mark before the header.
    styles.write_bytes(b"\xef\xbb\xbf" + (HEADER + "\n".join(lines) + "\n").encode())
    found = fashion_catalog(styles, folder)
    assert found.problems == []
    # Years that are not years (or beyond int32, as Product.year) are not known: 0.
    assert {item.id: item.fields()["year"] for item in found.items} == {
        "1": 2012, "2": 0, "3": 0, "4": 0, "5": 0, "6": 0,
    }  # fmt: skip


def test_an_unclosed_quote_is_reported_not_swallowed_silently(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for product_id in ("1", "2", "3"):
        (folder / f"{product_id}.jpg").write_bytes(b"x")
    styles = write_styles(
        tmp_path / "styles.csv",
        [
            "1,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,One",
            '2,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,"Two, unclosed',
            "3,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,Three",
        ],
    )
    found = fashion_catalog(styles, folder)
    assert [item.id for item in found.items] == ["1"]
    problems = dict(found.problems)
    assert problems["styles.csv:3"] == (
        "a quoted field runs over lines 3-4 (an unclosed quote?); row skipped"
    )
    assert found.incomplete == ("styles.csv:3", problems["styles.csv:3"])


def test_a_field_over_the_csv_limit_is_reported_and_the_rows_before_it_kept(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(b"x")
    styles = write_styles(
        tmp_path / "styles.csv",
        [
            "1,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,One",
            '2,Men,Apparel,Topwear,Tshirts,Red,Fall,2012,Casual,"' + "x" * 200_000 + '"',
        ],
    )
    found = fashion_catalog(styles, folder)
    assert [item.id for item in found.items] == ["1"]
    where, what = found.problems[0]
    assert where.startswith("styles.csv:") and what.endswith("; the rest of the file is not read")
    assert "field larger than field limit" in what
    assert found.incomplete == (where, what)


def test_a_file_name_in_another_encoding_is_reported_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    (root / "shoes").mkdir(parents=True)
    (root / "shoes" / "a1.jpg").write_bytes(b"x")
    # Latin-1 bytes, as a zip made elsewhere unpacks them: not decodable as UTF-8.
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    open(os.path.join(os.fsencode(root), b"caf\xe9", b"b1.jpg"), "wb").close()
    open(os.path.join(os.fsencode(root), b"shoes", b"d\xe9j\xe0.jpg"), "wb").close()
    found = folder_catalog(root)
    assert [item.id for item in found.items] == ["a1"]
    skipped = "the name is not UTF-8 text (another encoding?); skipped"
    assert sorted(found.problems) == [
        (f"{root}/caf\\udce9/b1.jpg", skipped),
        (f"{root}/shoes/d\\udce9j\\udce0.jpg", skipped),
    ]
