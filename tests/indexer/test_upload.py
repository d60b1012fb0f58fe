"""The indexer's uploads against the real search server in-process: batches with one matrix each."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.upload import SearchUnavailable, Uploader, UploadTotals, delete_products
from search_service.engine import SearchEngine
from search_service.storage.catalog import Catalog
from tests.search.conftest import serve_engine
from tests.support import free_port
from vpm.v1 import search_pb2
from vpm_common.search_client import SearchClient

DIM = 8


def test_uploads_go_in_batches_with_one_matrix_and_are_stored_as_sent(tmp_path: Path) -> None:
    engine = SearchEngine(Catalog.open(f"sqlite:///{tmp_path}/catalog.db"), tmp_path / "data")
    engine.load()
    running = serve_engine(engine)
    calls: list[int] = []
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((8, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    async def upload() -> tuple:
        client = SearchClient(running.thread.target, timeout_s=10)
        upsert = client.upsert

        async def counted(batch: search_pb2.ProductBatch) -> search_pb2.UpsertSummary:
            calls.append(batch.vectors.rows)
            assert not any(p.vector for p in batch.products)  # the rows carry the vectors
            return await upsert(batch)

        client.upsert = counted
        acknowledged: list[int] = []
        uploader = Uploader(client, batch_size=3, on_acknowledged=acknowledged.append)
        try:
            for i, vector in enumerate(vectors[:7]):
                product = search_pb2.Product(id=f"u{i}", name=f"item {i}", year=2000 + i)
                await uploader.add(product, vector, "test-model")
            # Another model starts a batch of its own (and the catalog refuses it).
            await uploader.add(search_pb2.Product(id="other"), vectors[7], "other-model")
            totals = await uploader.close()
            stored = {
                i: np.asarray((await client.product(i, include_vector=True)).vector)
                for i in ("u0", "u6")
            }
        finally:
            await client.close()
        return totals, acknowledged, stored

    try:
        totals, acknowledged, stored = asyncio.run(upload())
        assert calls == [3, 3, 1, 1]
        assert (totals.inserted, totals.updated, totals.unchanged) == (7, 0, 0)
        assert totals.failures == [
            ("other", "model_id: 'other-model' differs from the catalog's model 'test-model'")
        ]
        assert acknowledged == [3, 3, 1, 0]
        np.testing.assert_allclose(stored["u0"], vectors[0], atol=1e-6)
        np.testing.assert_allclose(stored["u6"], vectors[6], atol=1e-6)
        product = engine.get("u4")[0]
        assert (product.name, product.year, product.model_id) == ("item 4", 2004, "test-model")
    finally:
        running.stop()
        engine.close()


def test_a_batch_waits_out_a_search_service_that_is_not_up_yet(tmp_path: Path) -> None:
    """As while the service restarts: the batch is sent again until it is taken, within
    retry_s (the indexer's --stall-s); past it, the run stops saying why."""
    port = free_port()
    engine = SearchEngine(Catalog.open(f"sqlite:///{tmp_path}/catalog.db"), tmp_path / "data")
    engine.load()
    vector = np.ones(DIM, np.float32) / np.sqrt(DIM)

    async def upload(retry_s: float) -> tuple:
        client = SearchClient(f"127.0.0.1:{port}", timeout_s=5, retry_s=retry_s)
        uploader = Uploader(client, batch_size=1)
        try:
            await uploader.add(search_pb2.Product(id="late"), vector, "test-model")
            return await uploader.close()
        finally:
            await client.close()

    started = time.monotonic()
    with pytest.raises(SearchUnavailable, match="did not take a batch of 1: UNAVAILABLE"):
        asyncio.run(upload(retry_s=1))
    assert time.monotonic() - started < 5

    coming = threading.Timer(2.0, lambda: running.append(serve_engine(engine, port=port)))
    running: list = []
    coming.start()
    try:
        totals = asyncio.run(upload(retry_s=30))
        assert totals.inserted == 1 and engine.get("late") is not None
    finally:
        coming.join()
        for server in running:
            server.stop()
        engine.close()


def test_adding_raises_once_the_sender_gave_up_with_batches_still_queued() -> None:
    """Encoding runs ahead of the uploads: with the queue full when the service is given up
    on, the next add (and close) raise its error instead of waiting for ever."""
    vector = np.ones(DIM, np.float32) / np.sqrt(DIM)

    async def upload() -> None:
        client = SearchClient(f"127.0.0.1:{free_port()}", timeout_s=1, retry_s=0.5)  # no one
        uploader = Uploader(client, batch_size=1)
        try:
            for i in range(6):  # one sent, two queued, then a fourth waits for room
                await uploader.add(search_pb2.Product(id=f"p{i}"), vector, "test-model")
            await uploader.close()
        finally:
            await client.close()

    with pytest.raises(SearchUnavailable, match="did not take a batch of 1: UNAVAILABLE"):
        asyncio.run(asyncio.wait_for(upload(), 30))


def test_a_prune_the_service_does_not_take_stops_with_the_reason() -> None:
    async def prune() -> int:
        client = SearchClient(f"127.0.0.1:{free_port()}", timeout_s=1, retry_s=0.5)  # no one
        try:
            return await delete_products(client, ["a", "b", "c"], chunk=2)
        finally:
            await client.close()

    with pytest.raises(SearchUnavailable, match=r"did not delete 3 products \(--prune; 0 deleted"):
        asyncio.run(prune())


def test_metadata_alone_goes_without_vectors_and_the_stored_ones_stay(tmp_path: Path) -> None:
    engine = SearchEngine(Catalog.open(f"sqlite:///{tmp_path}/catalog.db"), tmp_path / "data")
    engine.load()
    running = serve_engine(engine)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((4, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sent: list[tuple[int, bool]] = []
    before: dict[int, np.ndarray] = {}

    async def upload() -> UploadTotals:
        client = SearchClient(running.thread.target, timeout_s=10)
        upsert = client.upsert

        async def counted(batch: search_pb2.ProductBatch) -> search_pb2.UpsertSummary:
            sent.append((len(batch.products), batch.HasField("vectors")))
            return await upsert(batch)

        client.upsert = counted
        uploader = Uploader(client, batch_size=10)
        try:
            for i, vector in enumerate(vectors):
                await uploader.add(search_pb2.Product(id=f"m{i}"), vector, "test-model")
            await uploader.close()
            before.update({i: engine.get(f"m{i}", include_vector=True)[1] for i in (1, 2)})
            uploader = Uploader(client, batch_size=10)
            for i in (1, 2):  # renamed; their images did not change
                await uploader.add(search_pb2.Product(id=f"m{i}", name="new"), None, "test-model")
            return await uploader.close()
        finally:
            await client.close()

    try:
        totals = asyncio.run(upload())
        assert sent == [(4, True), (2, False)]
        assert (totals.inserted, totals.updated, totals.failures) == (0, 2, [])
        for i in (1, 2):
            product, vector = engine.get(f"m{i}", include_vector=True)
            assert product.name == "new" and np.array_equal(vector, before[i])
    finally:
        running.stop()
        engine.close()
