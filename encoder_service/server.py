"""The gRPC face of the encoder: a thin servicer over EncoderEngine, plus health and reflection."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import numpy as np
from grpc import aio
from grpc_health.v1 import health

from encoder_service.batcher import Caller
from encoder_service.encoded import Encoded
from encoder_service.engine import EncoderEngine
from encoder_service.settings import EncoderSettings
from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from vpm_common.errors import STATUS_CODES, InvalidArgument, Unavailable, VpmError
from vpm_common.matrix import WIRE_DTYPES, pack
from vpm_common.server.rpc import rpc_boundary
from vpm_common.server.serving import add_health_and_reflection, listen, new_server, set_serving

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
        reader = _read_images(engine, request_iterator, _caller_for(context), replies)
        async for reply in _replies_of(reader, replies):
            yield reply

    @rpc_boundary
    async def EncodeImageBatches(
        self, request_iterator: AsyncIterator[encoder_pb2.ImageBatch], context: aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.ImageBatchResult]:
        engine = self._app.ready_engine()
        replies: asyncio.Queue[encoder_pb2.ImageBatchResult | None] = asyncio.Queue()
        reader = _read_batches(engine, request_iterator, _caller_for(context), replies)
        async for reply in _replies_of(reader, replies):
            yield reply

    @rpc_boundary
    async def EncodeText(
        self, request: encoder_pb2.TextBatch, context: aio.ServicerContext
    ) -> encoder_pb2.EmbeddingBatch:
        engine = self._app.ready_engine()
        model_id = engine.description.model_id
        texts = list(request.texts)
        pending = engine.submit_texts(texts, _caller_for(context))
        try:
            encoded = await asyncio.wrap_future(pending)
        except Exception as error:  # noqa: BLE001 - becomes every text's error
            encoded = _all_failed(len(texts), engine.description.dim, error)
        return encoder_pb2.EmbeddingBatch(
            items=[
                _reply(str(index), encoded.error_or_vector(index), model_id)
                for index in range(len(encoded))
            ],
            model_id=model_id,
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
            max_request_images=self._app.ready_engine().max_request_images,
            max_request_bytes=self._app.ready_engine().config.max_request_bytes,
        )


async def _replies_of(reader: Coroutine[Any, Any, None], replies: asyncio.Queue) -> AsyncIterator:
    """Run a stream's reader, which queues replies and then None; yield them as they come."""
    task = asyncio.create_task(reader)
    try:
        while (reply := await replies.get()) is not None:
            yield reply
        task.result()  # re-raise what ended the reader, if anything did
    finally:
        task.cancel()


async def _read_images(
    engine: EncoderEngine,
    request_iterator: AsyncIterator[encoder_pb2.ImageItem],
    caller: Caller,
    replies: asyncio.Queue,
) -> None:
    """Admit images while the stream's window has room; queue one reply per image; then None."""
    window = asyncio.Semaphore(engine.config.stream_window)
    answers: set[asyncio.Task] = set()
    model_id = engine.description.model_id

    async def answer(item_id: str, future: asyncio.Future) -> None:
        try:
            outcome: Any = await future
        except Exception as error:  # noqa: BLE001 - becomes this item's error
            outcome = error
        finally:
            window.release()
        replies.put_nowait(_reply(item_id, outcome, model_id))

    try:
        async for item in request_iterator:
            # Not reading further while the window is full is what pushes back on
            # the client: gRPC flow control stops it from sending more.
            await window.acquire()
            try:
                future = asyncio.wrap_future(engine.submit_image(item.data, caller))
            except VpmError as refused:
                window.release()
                replies.put_nowait(_reply(item.id, refused, model_id))
                continue
            task = asyncio.create_task(answer(item.id, future))
            answers.add(task)
            task.add_done_callback(answers.discard)
        if answers:
            await asyncio.gather(*answers)
    finally:
        replies.put_nowait(None)


async def _read_batches(
    engine: EncoderEngine,
    request_iterator: AsyncIterator[encoder_pb2.ImageBatch],
    caller: Caller,
    replies: asyncio.Queue,
) -> None:
    """Admit image batches while the stream's window has room; one reply per batch; then None.

    The window counts images, and always admits a batch when none is in flight, so
    a batch larger than the window still goes through (alone).
    """
    window = _ImageWindow(engine.config.stream_window)
    answers: set[asyncio.Task] = set()
    model_id, dim = engine.description.model_id, engine.description.dim

    async def answer(batch: encoder_pb2.ImageBatch, future: asyncio.Future) -> None:
        count = len(batch.images)
        try:
            outcome: Encoded | BaseException = await future
        except Exception as error:  # noqa: BLE001 - becomes every image's error
            outcome = error
        finally:
            window.give(count)
        if isinstance(outcome, BaseException):
            outcome = _all_failed(count, dim, outcome)
        replies.put_nowait(_batch_reply(batch, outcome, model_id))

    try:
        async for batch in request_iterator:
            count = len(batch.images)
            if count > engine.max_request_images:
                raise InvalidArgument(
                    f"images: a batch carries at most {engine.max_request_images} images "
                    f"(ModelInfo.max_request_images), got {count}"
                )
            if batch.dtype not in WIRE_DTYPES:
                raise InvalidArgument(f"dtype: unknown vector dtype {batch.dtype}")
            if count == 0:
                replies.put_nowait(
                    _batch_reply(batch, Encoded(np.zeros((0, dim), np.float32)), model_id)
                )
                continue
            # Not reading further while the window is full is what pushes back on
            # the client: gRPC flow control stops it from sending more.
            await window.take(count)
            try:
                future = asyncio.wrap_future(engine.submit_images(batch.images, caller))
            except VpmError as refused:
                window.give(count)
                future = asyncio.get_running_loop().create_future()
                future.set_exception(refused)
            task = asyncio.create_task(answer(batch, future))
            answers.add(task)
            task.add_done_callback(answers.discard)
        if answers:
            await asyncio.gather(*answers)
    except InvalidArgument:
        # The batches before the refused message still get their one reply each.
        if answers:
            await asyncio.gather(*answers)
        raise
    finally:
        replies.put_nowait(None)


class _ImageWindow:
    """Images in flight on one stream: take() waits while a new batch would overfill it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self._changed = asyncio.Condition()

    async def take(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not self.used or self.used + count <= self.size)
            self.used += count

    def give(self, count: int) -> None:
        self.used -= count
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()


def _caller_for(context: aio.ServicerContext) -> Caller:
    remaining = context.time_remaining()
    caller = Caller(None if remaining is None else time.monotonic() + remaining)

    def gone(_: Any) -> None:
        caller.gone = True

    context.add_done_callback(gone)
    return caller


def _reply(item_id: str, outcome: Any, model_id: str) -> encoder_pb2.EmbeddingItem:
    if isinstance(outcome, np.ndarray):
        return encoder_pb2.EmbeddingItem(id=item_id, vector=outcome.tolist(), model_id=model_id)
    return encoder_pb2.EmbeddingItem(id=item_id, error=_error(item_id, outcome))


def _all_failed(count: int, dim: int, error: BaseException) -> Encoded:
    return Encoded(np.zeros((count, dim), np.float32), dict.fromkeys(range(count), error))


def _batch_reply(
    batch: encoder_pb2.ImageBatch, encoded: Encoded, model_id: str
) -> encoder_pb2.ImageBatchResult:
    """The reply is built from the batch's matrix: one copy into the message's bytes."""
    return encoder_pb2.ImageBatchResult(
        id=batch.id,
        model_id=model_id,
        vectors=pack(encoded.vectors, batch.dtype),
        errors=[
            encoder_pb2.ItemError(index=index, error=_error(f"{batch.id}[{index}]", error))
            for index, error in sorted(encoded.errors.items())
        ],
    )


def _error(item_id: str, outcome: BaseException) -> encoder_pb2.Error:
    if isinstance(outcome, VpmError):
        return encoder_pb2.Error(code=outcome.code, message=outcome.message)
    ref = uuid.uuid4().hex[:8]
    logger.error("item %r failed (ref %s)", item_id, ref, exc_info=outcome)
    return encoder_pb2.Error(code=STATUS_CODES["INTERNAL"], message=f"internal error (ref {ref})")


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
