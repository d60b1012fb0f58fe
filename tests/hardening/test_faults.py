"""Faults with real processes: kill -9 during ingest, a dead encoder under queries, a full disk."""

from __future__ import annotations

import errno
import random
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests import images
from tests.support import free_port, start_encoder_process, start_search_process
from vpm.v1 import search_pb2, search_pb2_grpc

pytestmark = pytest.mark.slow

DIM = 32
MODEL = "fault-test-model"


def product(product_id: str, rng: np.random.Generator) -> search_pb2.Product:
    vector = rng.standard_normal(DIM).astype(np.float32)
    return search_pb2.Product(
        id=product_id, name=f"name {product_id}", vector=(vector / np.linalg.norm(vector)).tolist(),
        model_id=MODEL, gender=random.choice(("Men", "Women")),
    )  # fmt: skip


def ingest_until_killed(
    stub: search_pb2_grpc.SearchStub, run: int, acked: set[str], stop: threading.Event
) -> None:
    """Send batches of 100 products until the service dies; remember what each summary acked."""
    rng = np.random.default_rng(run)
    batch = 0
    while not stop.is_set():
        ids = [f"r{run}-{batch}-{i}" for i in range(100)]
        try:
            summary = stub.UpsertProducts(iter([product(i, rng) for i in ids]), timeout=30)
        except grpc.RpcError:
            return  # killed mid-call: this batch was not acknowledged
        assert summary.failed == 0, summary.failures
        acked.update(ids)
        batch += 1


def catalog_state(stub: search_pb2_grpc.SearchStub) -> tuple[list[str], search_pb2.Stats]:
    ids = [p.id for p in stub.ListProducts(search_pb2.ListProductsRequest(), timeout=60)]
    return ids, stub.GetStats(search_pb2.GetStatsRequest(), timeout=30)


def test_kill_9_during_ingest_ten_times_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data = tmp_path / "search"
    port = free_port()
    target = f"127.0.0.1:{port}"
    acked: set[str] = set()
    rng = random.Random(7)
    for run in range(10):
        # A short snapshot interval, so kills also land during snapshot writes.
        log_start = (data / "search.log").stat().st_size if (data / "search.log").exists() else 0
        service = start_search_process(port, data, [], "--snapshot-interval-s", "0.3")
        stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(target))
        ids, stats = catalog_state(stub)
        assert acked <= set(ids), f"run {run}: lost {len(acked - set(ids))} acknowledged products"
        assert len(ids) == len(set(ids)) == stats.products == stats.index_size, (
            run,
            len(ids),
            stats,
        )
        stop = threading.Event()
        writer = threading.Thread(target=ingest_until_killed, args=(stub, run, acked, stop))
        writer.start()
        time.sleep(rng.uniform(0.3, 2.0))
        service.kill()
        stop.set()
        writer.join(60)
        # The service was alive until the kill (it did not die on its own mid-ingest), the
        # client learnt of the death, and this life (recovery from the last kill, then
        # ingest with snapshots) logged no error; the log is shared, so read this life's.
        assert service.process.returncode == -signal.SIGKILL, (run, service.process.returncode)
        assert not writer.is_alive(), f"run {run}: the writer still waits on a dead service"
        life = service.log_path.read_bytes()[log_start:].decode(errors="replace")
        assert " ERROR " not in life and "Traceback" not in life, (run, life[-3000:])
    service = start_search_process(port, data, [])
    try:
        stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(target))
        ids, stats = catalog_state(stub)
        assert acked <= set(ids) and len(ids) == len(set(ids)) == stats.products == stats.index_size
        assert len(acked) >= 1000, "too little was acknowledged for the test to mean much"
        # Any vector search agrees with the catalog: the index holds what the catalog holds.
        some = stub.GetProduct(
            search_pb2.GetProductRequest(id=sorted(acked)[0], include_vector=True)
        )
        top = stub.Search(
            search_pb2.SearchRequest(vector=search_pb2.Vector(values=some.vector), top_k=1)
        )
        assert top.matches[0].product.id == some.id and top.matches[0].score > 0.999
    finally:
        service.stop()


def test_an_encoder_killed_under_live_queries_fails_image_queries_fast(
    tmp_path: Path, model_cache: Path
) -> None:
    encoder_port, search_port = free_port(), free_port()
    encoder = start_encoder_process(encoder_port, tmp_path / "encoder.log", model_cache)
    search = start_search_process(
        search_port, tmp_path / "search", [f"127.0.0.1:{encoder_port}"], "--encoder-timeout-s", "3"
    )
    stub = search_pb2_grpc.SearchStub(grpc.insecure_channel(f"127.0.0.1:{search_port}"))
    picture = images.jpeg(96, 96, seed=3)
    try:
        upsert = [
            search_pb2.Product(id=f"p{i}", name="x", image=images.jpeg(64, 64, seed=i))
            for i in range(20)
        ]
        assert stub.UpsertProducts(iter(upsert), timeout=60).inserted == 20
        assert stub.Search(search_pb2.SearchRequest(image=picture), timeout=10).matches
        encoder.kill()
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Search(search_pb2.SearchRequest(image=picture), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert time.monotonic() - started < 4, "an image query hung past the encoder timeout"
            # Id and vector queries do not need the encoder.
            assert stub.Search(search_pb2.SearchRequest(product_id="p1"), timeout=5).matches
        encoder = start_encoder_process(encoder_port, tmp_path / "encoder-2.log", model_cache)
        deadline = time.monotonic() + 30
        while True:  # recovery is automatic: no restart of the search service
            try:
                assert stub.Search(search_pb2.SearchRequest(image=picture), timeout=10).matches
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "image queries never recovered"
                time.sleep(0.5)
    finally:
        search.stop()
        encoder.stop()


def test_a_full_disk_never_replaces_a_good_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Domain tier: the snapshot write fails with ENOSPC half way; the old snapshot stays whole."""
    from search_service.index import vector_index as index_module

    path = tmp_path / "index.snapshot"
    good = {"keys": np.arange(1000, dtype=np.int64), "vectors": np.ones((1000, DIM), np.float32)}
    index_module.write_snapshot(path, good)
    before = path.read_bytes()

    def full_disk(file, **arrays) -> None:  # noqa: ANN001 - np.savez's signature
        file.write(b"x" * 4096)  # a partial write, as a filling disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_module.np, "savez", full_disk)
    bigger = {"keys": np.arange(5000, dtype=np.int64), "vectors": np.zeros((5000, DIM), np.float32)}
    with pytest.raises(OSError, match="No space left on device"):
        index_module.write_snapshot(path, bigger)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
