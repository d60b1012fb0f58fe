"""End-to-end tier: real encoder, search and indexer processes on a generated catalog."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from demo.catalog import generate
from tests import images
from tests.support import (
    ROOT,
    ServiceProcess,
    free_port,
    start_encoder_process,
    start_search_process,
    wait_until,
)
from vpm.v1 import search_pb2, search_pb2_grpc

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    encoders: list[ServiceProcess]
    encoder_targets: list[str]
    search: ServiceProcess
    search_target: str
    stub: search_pb2_grpc.SearchStub


@pytest.fixture
def stack(tmp_path: Path, model_cache: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Encoders (one, or as many as the test's `encoders` marker says) and a search service."""
    marker = request.node.get_closest_marker("encoders")
    count = marker.args[0] if marker else 1
    ports = [free_port() for _ in range(count)]
    encoders = [
        start_encoder_process(port, tmp_path / f"encoder-{i}.log", model_cache)
        for i, port in enumerate(ports)
    ]
    targets = [f"127.0.0.1:{port}" for port in ports]
    search_port = free_port()
    search = start_search_process(search_port, tmp_path / "search", targets)
    channel = grpc.insecure_channel(f"127.0.0.1:{search_port}")
    yield Stack(
        encoders, targets, search, f"127.0.0.1:{search_port}", search_pb2_grpc.SearchStub(channel)
    )
    channel.close()
    search.stop()
    for encoder in encoders:
        encoder.stop()


def index(
    stack: Stack, catalog: Path, *extra: str, timeout_s: float = 300
) -> tuple[int, dict, str]:
    """Run `python -m indexer` on the fashion layout; (exit status, summary JSON, output)."""
    summary_path = catalog / f"summary-{time.monotonic_ns()}.json"
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "--styles", str(catalog / "styles.csv"),
         "--images", str(catalog / "images"), "--encoder", ",".join(stack.encoder_targets),
         "--search", stack.search_target, "--summary-json", str(summary_path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return done.returncode, summary, done.stdout + done.stderr


def catalog_ids(stack: Stack) -> list[str]:
    return [
        product.id
        for product in stack.stub.ListProducts(search_pb2.ListProductsRequest(), timeout=30)
    ]


def test_index_query_rerun_and_incremental_changes(stack: Stack, tmp_path: Path) -> None:
    catalog = generate(tmp_path / "catalog", count=40)
    status, summary, output = index(stack, catalog)
    assert status == 0, output
    assert (summary["found"], summary["encoded"], summary["failed"]) == (40, 40, []), summary
    assert "indexing finished" in output and "encoded            40 images" in output
    # Off a terminal, progress is logged: the last line once all 40 are encoded and sent.
    assert re.search(r"indexing: 40/40 img \(.*\), \d+ acknowledged", output), output

    picture = (catalog / "images" / "10007.jpg").read_bytes()
    reply = stack.stub.Search(search_pb2.SearchRequest(image=picture, top_k=3), timeout=30)
    assert reply.matches[0].product.id == "10007" and reply.matches[0].score >= 0.99
    assert reply.matches[0].product.article_type == "Watches"  # metadata from styles.csv

    status, summary, output = index(stack, catalog)
    assert status == 0 and summary["encoded"] == 0 and summary["skipped_unchanged"] == 40, output

    for product_id in ("10001", "10002", "10003"):
        (catalog / "images" / f"{product_id}.jpg").write_bytes(
            images.jpeg(300, 400, seed=int(product_id))
        )
    for product_id in ("10010", "10011"):
        (catalog / "images" / f"{product_id}.jpg").unlink()
    rows = list(csv.reader((catalog / "styles.csv").open()))
    rows[21][-1] = "A renamed product"  # product 10020: metadata only
    with (catalog / "styles.csv").open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    status, summary, output = index(stack, catalog, "--prune")
    assert status == 0, output
    assert (summary["encoded"], summary["pruned"], summary["metadata_updated"]) == (3, 2, 1), (
        summary
    )
    assert summary["skipped_unchanged"] == 40 - 2 - 3 - 1
    assert sorted(catalog_ids(stack)) == sorted(
        str(10000 + i) for i in range(40) if i not in (10, 11)
    )
    renamed = stack.stub.GetProduct(search_pb2.GetProductRequest(id="10020"), timeout=10)
    assert renamed.name == "A renamed product"
    changed = (catalog / "images" / "10002.jpg").read_bytes()
    top = stack.stub.Search(search_pb2.SearchRequest(image=changed, top_k=1), timeout=30).matches[0]
    assert top.product.id == "10002" and top.score >= 0.99


def test_a_corrupt_image_is_listed_and_the_run_goes_on(stack: Stack, tmp_path: Path) -> None:
    catalog = generate(tmp_path / "catalog", count=12)
    (catalog / "images" / "10004.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    status, summary, output = index(stack, catalog)
    assert status == 1
    assert summary["encoded"] == 11
    assert [entry["what"].endswith("10004.jpg") for entry in summary["failed"]] == [True]
    assert "FAILED" in output and "10004.jpg" in output
    assert len(catalog_ids(stack)) == 11


def test_a_prune_that_would_empty_the_catalog_is_refused(stack: Stack, tmp_path: Path) -> None:
    catalog = generate(tmp_path / "catalog", count=10)
    assert index(stack, catalog)[0] == 0
    empty = tmp_path / "empty"  # a wrong or unmounted catalog path
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "indexer", "--dir", str(empty), "--prune",
         "--encoder", stack.encoder_targets[0], "--search", stack.search_target],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"no product with an image in {empty} (image files end in .jpg" in done.stderr
    assert "--prune would delete 10 of the catalog's 10 products" in done.stderr
    assert len(catalog_ids(stack)) == 10
    # An unclosed quote swallows the rows after it: they are not read, not gone.
    rows = (catalog / "styles.csv").read_text().splitlines()
    rows[3] = rows[3] + ',"unclosed'
    (catalog / "styles.csv").write_text("\n".join(rows) + "\n")
    status, summary, output = index(stack, catalog, "--prune", "--prune-limit", "1")
    assert status == 2, output
    assert "--prune refused: the catalog was not read whole (styles.csv:4: " in output
    # --summary-json says so too: a file from an earlier run is never left to stand for this one.
    assert summary["stopped"].startswith("cannot start: --prune refused"), summary
    assert len(catalog_ids(stack)) == 10


def count(stack: Stack) -> int:
    return stack.stub.GetStats(search_pb2.GetStatsRequest(), timeout=10).products


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_an_indexer_killed_mid_run_finishes_on_the_next_run(
    stack: Stack, tmp_path: Path, how: str
) -> None:
    catalog = generate(tmp_path / "catalog", count=300)
    indexer = ServiceProcess(
        "indexer",
        ["--styles", str(catalog / "styles.csv"), "--images", str(catalog / "images"),
         "--encoder", stack.encoder_targets[0], "--search", stack.search_target,
         "--batch-size", "10"],
        tmp_path / "indexer.log",
    )  # fmt: skip
    wait_until(lambda: count(stack) >= 20, timeout_s=120)
    if how == "kill -9":
        indexer.kill()
    else:  # as docker stop or a deleted Kubernetes Job: it says so, with the status of SIGTERM
        assert indexer.stop() == 143, indexer.output
        assert "terminated (SIGTERM); what was acknowledged is kept" in indexer.output
    partial = count(stack)
    assert 0 < partial < 300, f"kill came too late ({partial}); the test proves nothing"
    status, summary, output = index(stack, catalog)
    assert status == 0, output
    assert summary["skipped_unchanged"] >= partial and summary["encoded"] <= 300 - partial
    ids = catalog_ids(stack)
    assert len(ids) == len(set(ids)) == 300


@pytest.mark.encoders(2)
def test_an_encoder_killed_mid_run_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    catalog = generate(tmp_path / "catalog", count=300)
    indexer = ServiceProcess(
        "indexer",
        ["--styles", str(catalog / "styles.csv"), "--images", str(catalog / "images"),
         "--encoder", ",".join(stack.encoder_targets), "--search", stack.search_target,
         "--batch-size", "10", "--summary-json", str(tmp_path / "summary.json")],
        tmp_path / "indexer.log",
    )  # fmt: skip
    wait_until(lambda: count(stack) >= 20, timeout_s=120)
    stack.encoders[0].kill()
    assert count(stack) < 300, "kill came too late; the test proves nothing"
    assert indexer.process.wait(300) == 0, indexer.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["encoded"] == 300 and summary["failed"] == []
    assert summary["encoder_spread"][stack.encoder_targets[1]] > 0
    ids = catalog_ids(stack)
    assert len(ids) == len(set(ids)) == 300
    status, summary, _ = index(stack, catalog)
    assert status == 0 and summary["encoded"] == 0 and summary["skipped_unchanged"] == 300


def test_identical_images_are_encoded_once_while_hashing_and_encoding_overlap(
    stack: Stack, tmp_path: Path
) -> None:
    """Copies of one picture under other ids: one next to its original (it joins the image
    while that waits for its vector) and one 700 files later (hashed in a later slice,
    when the vector is usually back and is reused). Either way: encoded once, and every
    product stored with the same vector."""
    catalog = generate(tmp_path / "catalog", count=40)
    folder = catalog / "images"
    rows = list(csv.reader((catalog / "styles.csv").open()))
    header, first = rows[0], rows[1]
    original = folder / f"{first[0]}.jpg"
    fillers, copies = 700, {"90001": 1, "90002": 700}  # id -> position after the original
    extra = []
    for number in range(fillers):
        product_id = str(80000 + number)
        (folder / f"{product_id}.jpg").write_bytes(images.jpeg(48, 48, seed=1000 + number))
        extra.append([product_id, *first[1:]])
    for product_id, position in copies.items():
        (folder / f"{product_id}.jpg").write_bytes(original.read_bytes())
        extra.insert(position - 1, [product_id, *first[1:]])
    with (catalog / "styles.csv").open("w", newline="") as file:
        csv.writer(file).writerows([header, first, *extra, *rows[2:]])
    status, summary, output = index(stack, catalog)
    assert status == 0, output
    total = 40 + fillers + len(copies)
    assert (summary["found"], summary["failed"]) == (total, []), summary
    assert summary["encoded"] == total - len(copies)  # each distinct image once
    assert (summary["reused_duplicates"], summary["duplicate_groups"]) == (2, 1)
    vectors = {
        product_id: stack.stub.GetProduct(
            search_pb2.GetProductRequest(id=product_id, include_vector=True), timeout=10
        ).vector
        for product_id in (first[0], *copies)
    }
    assert vectors["90001"] == vectors[first[0]] == vectors["90002"]
    assert len(catalog_ids(stack)) == total


def test_a_dry_run_reports_the_plan_and_writes_nothing(stack: Stack, tmp_path: Path) -> None:
    catalog = generate(tmp_path / "catalog", count=12)
    status, summary, output = index(stack, catalog, "--dry-run")
    assert status == 0, output
    assert (summary["dry_run"], summary["found"], summary["encoded"]) == (True, 12, 0), summary
    assert "plan: 12 to encode, 0 metadata-only, 0 unchanged" in output
    assert catalog_ids(stack) == []
