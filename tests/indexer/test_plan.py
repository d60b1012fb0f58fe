"""Unit tier: deciding a run from the files on disk and what the catalog holds."""

from __future__ import annotations

import hashlib
from pathlib import Path

from indexer.plan import HASH_RUN, Stored, make_plan, normalized
from indexer.sources import SourceItem
from tests import images

MODEL = "tiny/random-seed0"


def write_items(folder: Path, count: int) -> list[SourceItem]:
    folder.mkdir(exist_ok=True)
    items = []
    for index in range(count):
        path = folder / f"{index}.jpg"
        path.write_bytes(images.jpeg(40, 30, seed=index))
        items.append(SourceItem(str(index), path, (("name", f"item {index}"),), path.name))
    return items


def stored_as(
    item: SourceItem, sha256: str, metadata=None, model_id: str = MODEL, image_path: str = ""
) -> Stored:
    return Stored(
        sha256, model_id, normalized(metadata or item.metadata), image_path or item.image_path
    )


def test_each_file_is_decided_by_its_own_hash(tmp_path: Path) -> None:
    # More files than one slice of two reading threads, so that order across runs is checked.
    items = write_items(tmp_path, 2 * HASH_RUN + 5)
    digests = [hashlib.sha256(item.path.read_bytes()).hexdigest() for item in items]
    stored = {
        "0": stored_as(items[0], digests[0]),  # unchanged
        "1": stored_as(items[1], digests[1], (("name", "old name"),)),  # metadata only
        "2": stored_as(items[2], digests[3]),  # another image before
        "3": stored_as(items[3], digests[3], model_id="other-model"),  # another model's vector
        # The same bytes under another name (3.JPG renamed 3.jpg): the page's path must follow.
        "4": stored_as(items[4], digests[4], image_path="4.JPG"),
    }
    plan = make_plan(items, stored, MODEL, workers=2)
    assert [h.item.id for h in plan.unchanged] == ["0"]
    assert [h.item.id for h in plan.metadata_only] == ["1", "4"]
    assert [h.item.id for h in plan.encode] == [item.id for item in items[2:] if item.id != "4"]
    for hashed in plan.encode + plan.unchanged + plan.metadata_only:
        assert hashed.sha256 == digests[int(hashed.item.id)]


def test_a_file_gone_since_discovery_is_unreadable_with_the_reason(tmp_path: Path) -> None:
    items = write_items(tmp_path, 3)
    items[1].path.unlink()
    plan = make_plan(items, {}, MODEL, workers=1)
    assert [h.item.id for h in plan.encode] == ["0", "2"]
    [(item, reason)] = plan.unreadable
    assert item.id == "1" and reason == "cannot read: No such file or directory"


def test_identical_images_are_grouped_by_hash(tmp_path: Path) -> None:
    items = write_items(tmp_path, 3)
    items[2].path.write_bytes(items[0].path.read_bytes())
    plan = make_plan(items, {}, MODEL, workers=1)
    digest = hashlib.sha256(items[0].path.read_bytes()).hexdigest()
    assert plan.duplicates == {digest: ["0", "2"]}
