"""FakeEncoder: a stand-in vpm.v1.Encoder for testing the encoder client and the search service.

A FAKE, named as one: it decodes nothing. Its vectors are seeded by the sha256
of the bytes (or text), so equal inputs give equal unit vectors. Bytes that
start with NOT_AN_IMAGE get the per-item INVALID_ARGUMENT a real encoder gives
an undecodable file. Knobs make it fail the way a real encoder can: whole calls
UNAVAILABLE, items RESOURCE_EXHAUSTED, or answers that come too late.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc import aio

from tests.support import ServerThread
from vpm.v1 import encoder_pb2, encoder_pb2_grpc, vectors_pb2
from vpm_common.errors import STATUS_CODES
from vpm_common.server.serving import add_health_and_reflection, set_serving

NOT_AN_IMAGE = b"not an image"
SERVICE_NAME = "vpm.v1.Encoder"


def fake_vector(data: bytes, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(data).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class FakeEncoder(encoder_pb2_grpc.EncoderServicer):
    """Deterministic vectors from content hashes; counts what it was asked."""

    def __init__(self, dim: int = 16, model_id: str = "fake-model") -> None:
        self.dim = dim
        self.model_id = model_id
        self.images = 0  # items encoded
        self.batches = 0  # EncodeImageBatches requests answered
        self.texts = 0
        self.calls = 0
        self.unavailable_calls = 0  # the next this-many calls fail UNAVAILABLE
        self.exhausted_items = 0  # the next this-many items get RESOURCE_EXHAUSTED
        self.delay_s = 0.0
        self.max_request_images = 64
        self.max_request_bytes = 0  # 0: not said
        self.max_batch = 0  # 0: not said

    async def _gate(self, context: aio.ServicerContext) -> None:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.unavailable_calls > 0:
            self.unavailable_calls -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake encoder: going away")

    async def EncodeImages(  # noqa: N802 - the gRPC method name
        self, request_iterator: AsyncIterator[encoder_pb2.ImageItem], context: aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.EmbeddingItem]:
        await self._gate(context)
        async for item in request_iterator:
            yield self._encode(item)

    def _encode(self, item: encoder_pb2.ImageItem) -> encoder_pb2.EmbeddingItem:
        if self.exhausted_items > 0:
            self.exhausted_items -= 1
            error = encoder_pb2.Error(code=STATUS_CODES["RESOURCE_EXHAUSTED"], message="queue full")
            return encoder_pb2.EmbeddingItem(id=item.id, error=error)
        if item.data.startswith(NOT_AN_IMAGE):
            error = encoder_pb2.Error(
                code=STATUS_CODES["INVALID_ARGUMENT"], message="image data is truncated or corrupt"
            )
            return encoder_pb2.EmbeddingItem(id=item.id, error=error)
        self.images += 1
        vector = fake_vector(item.data, self.dim)
        return encoder_pb2.EmbeddingItem(id=item.id, vector=vector.tolist(), model_id=self.model_id)

    async def EncodeImageBatches(  # noqa: N802
        self, request_iterator: AsyncIterator[encoder_pb2.ImageBatch], context: aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.ImageBatchResult]:
        await self._gate(context)
        async for batch in request_iterator:
            self.batches += 1
            rows = np.zeros((len(batch.images), self.dim), dtype=np.float32)
            errors = []
            for index, data in enumerate(batch.images):
                item = self._encode(encoder_pb2.ImageItem(id=str(index), data=data))
                if item.HasField("error"):
                    errors.append(encoder_pb2.ItemError(index=index, error=item.error))
                else:
                    rows[index] = item.vector
            yield encoder_pb2.ImageBatchResult(
                id=batch.id,
                model_id=self.model_id,
                vectors=vectors_pb2.VectorMatrix(
                    rows=len(rows), dim=self.dim, data=rows.astype("<f4").tobytes()
                ),
                errors=errors,
            )

    async def EncodeText(  # noqa: N802
        self, request: encoder_pb2.TextBatch, context: aio.ServicerContext
    ) -> encoder_pb2.EmbeddingBatch:
        await self._gate(context)
        self.texts += len(request.texts)
        return encoder_pb2.EmbeddingBatch(
            items=[
                encoder_pb2.EmbeddingItem(
                    id=str(i),
                    vector=fake_vector(text.encode(), self.dim).tolist(),
                    model_id=self.model_id,
                )
                for i, text in enumerate(request.texts)
            ],
            model_id=self.model_id,
        )

    async def GetModelInfo(  # noqa: N802
        self, request: encoder_pb2.GetModelInfoRequest, context: aio.ServicerContext
    ) -> encoder_pb2.ModelInfo:
        return encoder_pb2.ModelInfo(
            model="Fake",
            pretrained="none",
            model_id=self.model_id,
            dim=self.dim,
            random_weights=True,
            max_request_images=self.max_request_images,
            max_request_bytes=self.max_request_bytes,
            max_batch=self.max_batch,
        )


def start_fake_encoder(fake: FakeEncoder, port: int = 0) -> ServerThread:
    """A real grpc.aio server serving `fake` on `port` (0: a free one), health SERVING."""

    async def build() -> tuple[aio.Server, int]:
        server = aio.server()
        encoder_pb2_grpc.add_EncoderServicer_to_server(fake, server)
        health = add_health_and_reflection(server, [SERVICE_NAME])
        await set_serving(health, [SERVICE_NAME], True)
        return server, server.add_insecure_port(f"127.0.0.1:{port}")

    thread = ServerThread(build)
    thread.start()
    return thread
