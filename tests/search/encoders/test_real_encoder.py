"""The search service with the real encoder service (tiny model, random weights) behind it."""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image

from search_service.engine import SearchEngine
from tests.support import ServerThread
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, search_pb2


def jpeg(seed: int, size: int = 96) -> bytes:
    """A small JPEG of smooth random colour fields, different for each seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_image_products_and_image_text_queries(
    real_encoder: ServerThread,
    open_engine: Callable[..., SearchEngine],
    catalog_url: str,
    start_search: Callable,
) -> None:
    running = start_search(open_engine(catalog_url), encoders=(real_encoder.target,), timeout_s=60)
    embedder = running.engine.embedder
    encoded = []
    original = embedder.embed_images

    async def counting(items, field="image"):  # noqa: ANN001, ANN202 - a spy on the one door
        encoded.extend(item_id for item_id, _ in items)
        return await original(items, field)

    embedder.embed_images = counting
    images = {f"sku-{i}": jpeg(i) for i in range(12)}

    def stream():
        for i, (sku, data) in enumerate(images.items()):
            yield search_pb2.Product(
                id=sku, name=f"Item {i}", gender=("Men", "Women")[i % 2], image=data
            )
        yield search_pb2.Product(id="broken", image=b"\x89PNG but not really")

    summary = running.stub.UpsertProducts(stream(), timeout=120)
    assert (summary.inserted, summary.failed) == (12, 1)
    failure = summary.failures[0]
    assert (failure.id, failure.code) == ("broken", 3)
    assert failure.message.startswith("image: ")
    assert len(encoded) == 13

    again = running.stub.UpsertProducts(stream(), timeout=120)
    assert (again.unchanged, again.inserted, again.updated) == (12, 0, 0)
    assert len(encoded) == 14  # only the broken one was sent again

    stats = running.stub.GetStats(search_pb2.GetStatsRequest())
    assert stats.model_id == "VPM-Tiny/random-seed0" and stats.dim == 64
    assert [(e.state, e.model_id, e.random_weights) for e in stats.encoders] == [
        ("SERVING", stats.model_id, True)  # --pretrained none
    ]

    hit = running.stub.Search(search_pb2.SearchRequest(image=images["sku-5"], top_k=3), timeout=60)
    assert hit.matches[0].product.id == "sku-5"
    assert hit.matches[0].score == pytest.approx(1.0, abs=1e-4)
    men = running.stub.Search(
        search_pb2.SearchRequest(image=images["sku-4"], top_k=20, filters={"gender": "Men"})
    )
    assert len(men.matches) == 6 and {m.product.gender for m in men.matches} == {"Men"}
    text = running.stub.Search(search_pb2.SearchRequest(text="a photo of a shoe", top_k=4))
    # The oracle: the text encoded by the encoder directly, ranked against the stored
    # vectors by numpy.
    encoder = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(real_encoder.target))
    [item] = encoder.EncodeText(
        encoder_pb2.TextBatch(texts=["a photo of a shoe"]), timeout=30
    ).items
    query = np.array(item.vector, dtype=np.float32)
    stored = {
        sku: np.array(
            running.stub.GetProduct(
                search_pb2.GetProductRequest(id=sku, include_vector=True), timeout=10
            ).vector,
            dtype=np.float32,
        )
        for sku in images
    }
    scores = {sku: float(vector @ query) for sku, vector in stored.items()}
    expected = sorted(scores, key=lambda sku: -scores[sku])[:4]
    assert [m.product.id for m in text.matches] == expected
    for match in text.matches:
        assert match.score == pytest.approx(scores[match.product.id], abs=1e-5)

    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Search(search_pb2.SearchRequest(image=b"GIF89a but broken"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("image: ")
