"""A gRPC client over one or more encoders: round-robin, deadlines, retries, per-target state.

Targets are "host:port" (one channel each, rotated here) or "dns:///name:port"
(one channel whose round_robin policy spreads calls over every address the
name resolves to). A call that meets UNAVAILABLE or RESOURCE_EXHAUSTED is
retried on the next target after a growing pause, always within the call's
deadline. Nothing here knows what the vectors are for: the search service and
the indexer both use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from vpm_common.errors import (
    STATUS_CODES,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VpmError,
)
from vpm_common.security import PLAINTEXT, ClientSecurity

logger = logging.getLogger(__name__)

ENCODER_SERVICE = "vpm.v1.Encoder"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_RESOURCE_EXHAUSTED = STATUS_CODES["RESOURCE_EXHAUSTED"]
_READY = grpc.ChannelConnectivity.READY


@dataclass(frozen=True)
class Embedded:
    """One item's outcome: a float32 `vector`, or `code` (a gRPC status number) and `message`."""

    id: str
    vector: np.ndarray | None
    model_id: str = ""
    code: int = 0
    message: str = ""


@dataclass(frozen=True)
class TargetStatus:
    target: str
    # "SERVING", "NOT_SERVING", "UNREACHABLE", ...
    state: str
    model_id: str
    calls: int
    failures: int
    last_error: str


class _Target:
    """One channel and what this client has seen of it."""

    def __init__(
        self, target: str, options: list[tuple[str, object]], security: ClientSecurity
    ) -> None:
        self.name = target
        self.channel = security.aio_channel(target, options)
        self.encoder = encoder_pb2_grpc.EncoderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.model_info: encoder_pb2.ModelInfo | None = None
        self.calls = 0
        self.failures = 0
        self.last_error = ""
        self.down_until = 0.0

    def succeeded(self) -> None:
        self.calls += 1
        self.down_until = 0.0

    def failed(self, error: aio.AioRpcError, pause_s: float) -> None:
        self.calls += 1
        self.failures += 1
        self.last_error = f"{error.code().name}: {error.details()}"
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            self.model_info = None  # it may come back running another model
            self.down_until = time.monotonic() + pause_s


class EncoderPool:
    """Calls the encoders behind `targets`; every method honours a deadline."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        timeout_s: float = 30.0,
        attempts: int = 4,
        backoff_s: float = 0.05,
        max_message_bytes: int = 64 * 1024 * 1024,
        security: ClientSecurity = PLAINTEXT,
    ) -> None:
        if not targets:
            raise ValueError("an encoder pool needs at least one target")
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        base = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Notice a restarted encoder within a fraction of a second.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        balanced = [
            *base,
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ]
        self._targets = [
            _Target(t, balanced if t.startswith("dns:") else base, security) for t in targets
        ]
        self._next = 0

    @property
    def targets(self) -> list[str]:
        return [target.name for target in self._targets]

    async def close(self) -> None:
        await asyncio.gather(*(target.channel.close() for target in self._targets))

    # -- calls ---------------------------------------------------------------------------

    async def model_info(self, timeout_s: float | None = None) -> encoder_pb2.ModelInfo:
        """What the next answering encoder runs (cached per target until it fails)."""
        deadline = self._deadline(timeout_s)
        errors: list[str] = []
        for attempt in range(self.attempts):
            target = self._pick()
            try:
                return await self._model_info_of(target, deadline)
            except aio.AioRpcError as err:
                await self._after_failure(target, err, attempt, deadline, errors)
        raise Unavailable(f"no encoder answered ({'; '.join(errors)})")

    async def next_model_info(self, timeout_s: float | None = None) -> encoder_pb2.ModelInfo:
        """What the encoder the next call goes to runs, without taking its turn (the search
        service's query cache keys by it); when that one does not answer, any that does."""
        try:
            return await self._model_info_of(self._peek(), self._deadline(timeout_s))
        except aio.AioRpcError:
            return await self.model_info(timeout_s)

    async def encode_texts(
        self, texts: Sequence[str], timeout_s: float | None = None
    ) -> list[Embedded]:
        """One result per text, in order."""
        deadline = self._deadline(timeout_s)
        errors: list[str] = []
        for attempt in range(self.attempts):
            target = self._pick()
            try:
                info = await self._model_info_of(target, deadline)
                reply = await target.encoder.EncodeText(
                    encoder_pb2.TextBatch(texts=list(texts)), timeout=_remaining(deadline)
                )
                target.succeeded()
                return [
                    _embedded(str(i), item, info.model_id) for i, item in enumerate(reply.items)
                ]
            except aio.AioRpcError as err:
                await self._after_failure(target, err, attempt, deadline, errors)
        raise _gave_up(errors)

    async def encode_images(
        self, items: Sequence[tuple[str, bytes]], timeout_s: float | None = None
    ) -> list[Embedded]:
        """One result per (id, image bytes) item, in order.

        Items the stream did not answer (the encoder went away) and items refused
        with RESOURCE_EXHAUSTED are sent again, to the next target, after a pause.
        """
        deadline = self._deadline(timeout_s)
        results: list[Embedded | None] = [None] * len(items)
        pending = list(range(len(items)))
        errors: list[str] = []
        for attempt in range(self.attempts):
            if not pending:
                break
            target = self._pick()
            try:
                info = await self._model_info_of(target, deadline)
                call = target.encoder.EncodeImages(
                    _image_requests(items, pending), timeout=_remaining(deadline)
                )
                async for reply in call:
                    index = int(reply.id)
                    outcome = _embedded(items[index][0], reply, info.model_id)
                    if outcome.code != _RESOURCE_EXHAUSTED:
                        results[index] = outcome
                target.succeeded()
                pending = [i for i in pending if results[i] is None]
                if pending:
                    errors.append(f"{target.name}: RESOURCE_EXHAUSTED for {len(pending)} items")
                    await asyncio.sleep(min(self._pause(attempt), _remaining(deadline)))
            except aio.AioRpcError as err:
                pending = [i for i in pending if results[i] is None]
                await self._after_failure(target, err, attempt, deadline, errors)
        failure = _gave_up(errors)
        for i in pending:
            results[i] = Embedded(items[i][0], None, "", failure.code, failure.message)
        return [r for r in results if r is not None]

    async def status(self, timeout_s: float = 1.0) -> list[TargetStatus]:
        """Each target's health (grpc.health.v1) and model, asked now."""
        return list(await asyncio.gather(*(self._status_of(t, timeout_s) for t in self._targets)))

    # -- internals -----------------------------------------------------------------------

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    def _pause(self, attempt: int) -> float:
        return self.backoff_s * 2**attempt

    def _pick(self) -> _Target:
        """The next target in turn, skipping any that failed a moment ago while others are up."""
        target = self._peek()
        self._next = (self._targets.index(target) + 1) % len(self._targets)
        return target

    def _peek(self) -> _Target:
        """The target `_pick` would return now, without moving the turn."""
        now = time.monotonic()
        count = len(self._targets)
        for step in range(count):
            target = self._targets[(self._next + step) % count]
            if target.down_until <= now:
                return target
        return self._targets[self._next]

    async def _model_info_of(self, target: _Target, deadline: float) -> encoder_pb2.ModelInfo:
        # Asked again whenever the channel is not connected: the next connection may reach
        # an encoder restarted with another model, and the query cache keys by the model.
        if target.model_info is None or target.channel.get_state() != _READY:
            target.model_info = await target.encoder.GetModelInfo(
                encoder_pb2.GetModelInfoRequest(), timeout=_remaining(deadline)
            )
        return target.model_info

    async def _after_failure(
        self,
        target: _Target,
        err: aio.AioRpcError,
        attempt: int,
        deadline: float,
        errors: list[str],
    ) -> None:
        """Record the failure; raise it as a domain error unless a retry may help; pause."""
        pause = self._pause(attempt)
        target.failed(err, pause)
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED or _remaining(deadline) <= 0:
            raise DeadlineExceeded(f"the encoder did not answer in time ({target.name})")
        if code not in RETRYABLE:
            error_class = {
                grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
                grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
            }.get(code, Unavailable)
            if error_class is Unavailable:
                # Our caller's client gets the code only: gRPC's details of a refused token
                # or a failed handshake describe this service's setup, and go to the log.
                logger.error("encoder %s: %s: %s", target.name, code.name, err.details())
                raise Unavailable(f"encoder {target.name}: {code.name}")
            raise error_class(f"encoder {target.name}: {code.name}: {err.details()}")
        # Likewise: connection failures say which TLS check failed, or which address refused.
        errors.append(f"{target.name}: {code.name}")
        logger.warning(
            "encoder %s: %s: %s (attempt %d)", target.name, code.name, err.details(), attempt + 1
        )
        await asyncio.sleep(min(pause, _remaining(deadline)))

    async def _status_of(self, target: _Target, timeout_s: float) -> TargetStatus:
        if target.channel.get_state() != _READY:
            target.model_info = None  # this check may reconnect it to a restarted encoder
        try:
            reply = await target.health.Check(
                health_pb2.HealthCheckRequest(service=ENCODER_SERVICE), timeout=timeout_s
            )
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            if state == "SERVING" and target.model_info is None:
                await self._model_info_of(target, time.monotonic() + timeout_s)
        except aio.AioRpcError as err:
            unreachable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            state = "UNREACHABLE" if err.code() in unreachable else err.code().name
        model_id = target.model_info.model_id if target.model_info is not None else ""
        return TargetStatus(
            target.name, state, model_id, target.calls, target.failures, target.last_error
        )


def _gave_up(errors: list[str]) -> VpmError:
    """After the last attempt: RESOURCE_EXHAUSTED when every encoder only said it was full
    (so callers back off, as for any shed load), UNAVAILABLE otherwise."""
    if errors and all("RESOURCE_EXHAUSTED" in error for error in errors):
        return ResourceExhausted(
            f"every encoder is at capacity; retry with backoff ({'; '.join(errors)})"
        )
    return Unavailable(f"no encoder answered ({'; '.join(errors)})")


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _image_requests(
    items: Sequence[tuple[str, bytes]], indexes: list[int]
) -> Iterator[encoder_pb2.ImageItem]:
    # The reply id is the item's position, so client ids need not be unique.
    for i in indexes:
        yield encoder_pb2.ImageItem(id=str(i), data=items[i][1])


def _embedded(item_id: str, reply: encoder_pb2.EmbeddingItem, model_id: str) -> Embedded:
    if reply.HasField("error"):
        return Embedded(item_id, None, model_id, reply.error.code, reply.error.message)
    return Embedded(item_id, np.asarray(reply.vector, dtype=np.float32), model_id)
