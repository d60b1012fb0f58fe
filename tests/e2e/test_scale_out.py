"""End-to-end tier: several encoder processes behind the indexer and the search service."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.support import (
    ServiceProcess,
    free_port,
    start_encoder_process,
    start_search_process,
    wait_until,
)
from vpm.v1 import search_pb2, search_pb2_grpc

pytestmark = pytest.mark.slow

# Small batches: slow enough encoders that a kill and a restart (which takes a
# few seconds, plus up to the pool's 5 s reconnect backoff) land in the middle of
# a run. 6,000 photos ran in 8.5 s once the search service ingested faster, and
# the run sometimes ended before the restarted encoder was reached.
SLOW = ("--max-batch", "2")
PHOTOS = 12_000


def images_encoded(metrics_port: int) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vpm_encoder_items_total" and sample.labels.get("kind") == "image":
                return sample.value
    return 0.0


def photo_folder(folder: Path, count: int) -> Path:
    for index in range(count):
        category = folder / ("shoes", "bags", "hats")[index % 3]
        category.mkdir(parents=True, exist_ok=True)
        (category / f"p{index}.jpg").write_bytes(images.jpeg(48, 48, seed=index, quality=80))
    return folder


class Encoder:
    def __init__(self, tmp_path: Path, cache: Path, name: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.tmp_path, self.cache, self.name = tmp_path, cache, name
        self.process: ServiceProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Encoder:
        self.process = start_encoder_process(
            self.port,
            self.tmp_path / f"{self.name}.log",
            self.cache,
            *SLOW,
            "--metrics-port",
            str(self.metrics_port),
        )
        return self

    def encoded(self) -> float:
        return images_encoded(self.metrics_port)


def test_indexing_shares_encoders_survives_a_kill_and_returns_to_a_restarted_one(
    tmp_path: Path, model_cache: Path
) -> None:
    first = Encoder(tmp_path, model_cache, "first").start()
    second = Encoder(tmp_path, model_cache, "second").start()
    search_port = free_port()
    search = start_search_process(search_port, tmp_path / "search", [])
    folder = photo_folder(tmp_path / "photos", PHOTOS)
    indexer = ServiceProcess(
        "indexer",
        ["--dir", str(folder), "--encoder", f"{first.target},{second.target}",
         "--search", f"127.0.0.1:{search_port}", "--batch-size", "50", "--window", "2"],
        tmp_path / "indexer.log",
    )  # fmt: skip
    try:
        # A fair share while both run (counted after both streams are warm): each
        # encoder pulls images as fast as it frees window slots, so on a quiet
        # machine the split is about even; a loaded one skews it a little.
        wait_until(lambda: first.encoded() + second.encoded() >= 100, timeout_s=120)
        start = first.encoded(), second.encoded()
        wait_until(lambda: first.encoded() + second.encoded() >= sum(start) + 400, timeout_s=120)
        shares = first.encoded() - start[0], second.encoded() - start[1]
        assert min(shares) >= 0.25 * sum(shares), shares
        first.process.kill()
        after_kill = second.encoded()
        # The run goes on without it.
        wait_until(lambda: second.encoded() >= after_kill + 40, timeout_s=120)
        first.start()  # same port, a fresh process
        wait_until(
            lambda: first.encoded() >= 20 or indexer.process.poll() is not None, timeout_s=60
        )
        assert first.encoded() >= 20, "the run ended before the restarted encoder got traffic"
        assert indexer.process.wait(300) == 0, indexer.output
        stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{search_port}"))
        ids = [p.id for p in stub.ListProducts(search_pb2.ListProductsRequest(), timeout=30)]
        assert len(ids) == len(set(ids)) == PHOTOS
    finally:
        indexer.kill()
        search.stop()
        for encoder in (first, second):
            encoder.process.stop()


def test_search_keeps_answering_image_queries_on_the_encoder_left_and_returns_to_one_back(
    tmp_path: Path, model_cache: Path
) -> None:
    first = Encoder(tmp_path, model_cache, "first").start()
    second = Encoder(tmp_path, model_cache, "second").start()
    search_port = free_port()
    # The query cache off, and a new picture each time: every query must reach an encoder.
    search = start_search_process(
        search_port, tmp_path / "search", [first.target, second.target], "--query-cache-size", "0"
    )
    stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{search_port}"))
    seeds = iter(range(10_000))

    def query() -> None:
        picture = images.jpeg(64, 64, seed=next(seeds))
        stub.Search(search_pb2.SearchRequest(image=picture, top_k=1), timeout=10)

    try:
        for _ in range(10):
            query()
        assert first.encoded() >= 3 and second.encoded() >= 3  # round-robin
        first.process.kill()
        for _ in range(10):
            query()  # never fails: the dead encoder is skipped
        first.start()
        before = first.encoded()
        deadline = time.monotonic() + 60
        while first.encoded() == before:
            assert time.monotonic() < deadline, "the restarted encoder never got a query"
            query()
            time.sleep(0.2)
    finally:
        search.stop()
        for encoder in (first, second):
            encoder.process.stop()
