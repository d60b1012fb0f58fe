"""The gRPC face of the encoder: a thin servicer over EncoderEngine, plus health and reflection."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from grpc import aio
from grpc_health.v1 import health

from encoder_service.batcher import Caller
from encoder_service.engine import EncoderEngine
from encoder_service.settings import EncoderSettings
from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from vpm_common.errors import STATUS_CODES, Unavailable, VpmError
from vpm_common.rpc import rpc_boundary
from vpm_common.serving import add_health_and_reflection, listen, new_server, set_serving

logger = logging.getLogger(__name__)

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name


class EncoderApp:
    """What the server serves: the engine once it is loaded, and the health status that says so."""

    def __init__(self, engine: EncoderEngine | None = None) -> None:
        self.engine = engine
        self.health = health.aio.HealthServicer()

    async def serve(self, engine: EncoderEngine) -> None:
        """Start answering with `engine` and report SERVING."""
        self.engine = engine
        await set_serving(self.health, [SERVICE_NAME], True)

    def ready_engine(self) -> EncoderEngine:
        if self.engine is None:
            raise Unavailable("the encoder is still loading its model; retry shortly")
        return self.engine


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, app: EncoderApp) -> None:
        self._app = app

    @rpc_boundary
    async def EncodeImages(
        self, request_iterator: AsyncIterator[encoder_pb2.ImageItem], context: aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.EmbeddingItem]:
        engine = self._app.ready_engine()
        replies: asyncio.Queue[encoder_pb2.EmbeddingItem | None] = asyncio.Queue()
        reader = asyncio.create_task(
            _read_images(engine, request_iterator, _caller_for(context), replies)
        )
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            reader.result()  # re-raise what ended the reader, if anything did
        finally:
            reader.cancel()

    @rpc_boundary
    async def EncodeText(
        self, request: encoder_pb2.TextBatch, context: aio.ServicerContext
    ) -> encoder_pb2.EmbeddingBatch:
        engine = self._app.ready_engine()
        futures = engine.submit_texts(list(request.texts), _caller_for(context))
        outcomes = await asyncio.gather(
            *(asyncio.wrap_future(future) for future in futures), return_exceptions=True
        )
        return encoder_pb2.EmbeddingBatch(
            items=[_reply(str(index), outcome) for index, outcome in enumerate(outcomes)]
        )

    @rpc_boundary
    async def GetModelInfo(
        self, request: encoder_pb2.GetModelInfoRequest, context: aio.ServicerContext
    ) -> encoder_pb2.ModelInfo:
        info = self._app.ready_engine().description
        return encoder_pb2.ModelInfo(
            model=info.model,
            pretrained=info.pretrained,
            model_id=info.model_id,
            dim=info.dim,
            runtime=info.runtime,
            device=info.device,
            dtype=info.dtype,
            max_batch=info.max_batch,
            max_delay_ms=info.max_delay_ms,
            image_size=info.image_size,
            context_length=info.context_length,
            random_weights=info.random_weights,
            normalization="l2",
        )


async def _read_images(
    engine: EncoderEngine,
    request_iterator: AsyncIterator[encoder_pb2.ImageItem],
    caller: Caller,
    replies: asyncio.Queue,
) -> None:
    """Admit images while the stream's window has room; queue one reply per image; then None."""
    window = asyncio.Semaphore(engine.config.stream_window)
    answers: set[asyncio.Task] = set()

    async def answer(item_id: str, future: asyncio.Future) -> None:
        try:
            outcome: Any = await future
        except Exception as error:  # noqa: BLE001 - becomes this item's error
            outcome = error
        finally:
            window.release()
        replies.put_nowait(_reply(item_id, outcome))

    try:
        async for item in request_iterator:
            # Not reading further while the window is full is what pushes back on
            # the client: gRPC flow control stops it from sending more.
            await window.acquire()
            try:
                future = asyncio.wrap_future(engine.submit_image(item.data, caller))
            except VpmError as refused:
                window.release()
                replies.put_nowait(_reply(item.id, refused))
                continue
            task = asyncio.create_task(answer(item.id, future))
            answers.add(task)
            task.add_done_callback(answers.discard)
        if answers:
            await asyncio.gather(*answers)
    finally:
        replies.put_nowait(None)


def _caller_for(context: aio.ServicerContext) -> Caller:
    remaining = context.time_remaining()
    caller = Caller(None if remaining is None else time.monotonic() + remaining)

    def gone(_: Any) -> None:
        caller.gone = True

    context.add_done_callback(gone)
    return caller


def _reply(item_id: str, outcome: Any) -> encoder_pb2.EmbeddingItem:
    if isinstance(outcome, np.ndarray):
        return encoder_pb2.EmbeddingItem(id=item_id, vector=outcome.tolist())
    if isinstance(outcome, VpmError):
        error = encoder_pb2.Error(code=outcome.code, message=outcome.message)
    else:
        ref = uuid.uuid4().hex[:8]
        logger.error("item %r failed (ref %s)", item_id, ref, exc_info=outcome)
        error = encoder_pb2.Error(
            code=STATUS_CODES["INTERNAL"], message=f"internal error (ref {ref})"
        )
    return encoder_pb2.EmbeddingItem(id=item_id, error=error)


async def create_server(settings: EncoderSettings, app: EncoderApp) -> tuple[aio.Server, int]:
    """A server for `app` bound to settings.host:settings.port (0: a free port); not yet started."""
    security = settings.security()
    server = new_server(
        settings.max_message_bytes(),
        max_connection_age_s=settings.max_connection_age_s,
        auth=security.auth(),
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        max_streams_per_connection=settings.max_streams_per_connection,
    )
    encoder_pb2_grpc.add_EncoderServicer_to_server(EncoderServicer(app), server)
    add_health_and_reflection(server, [SERVICE_NAME], app.health)
    await set_serving(app.health, [SERVICE_NAME], app.engine is not None)
    port = listen(server, f"{settings.host}:{settings.port}", security.credentials())
    return server, port
