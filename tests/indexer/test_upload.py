"""The indexer's uploads against the real search server in-process: batches with one matrix each."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from indexer.upload import SearchClient, Uploader
from search_service.engine import SearchEngine
from search_service.storage.catalog import Catalog
from tests.search.conftest import serve_engine
from vpm.v1 import search_pb2

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
            stored = await client.vectors(["u0", "u6"])
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
