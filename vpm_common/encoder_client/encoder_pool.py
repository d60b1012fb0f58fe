"""The one gRPC client of the encoders: round-robin, deadlines, retries, per-target state.

Targets are "host:port" (one channel each, rotated here) or "dns:///name:port":
by default one channel whose round_robin policy spreads calls over every
address the name resolves to; with `expand_dns`, one target per address (so
each replica's share and health are seen, and `resolve()` adds replicas that
appear). A call that meets UNAVAILABLE or RESOURCE_EXHAUSTED is retried on the
next target after a growing pause, always within the call's deadline.

Images travel in batches (EncodeImageBatches) and vectors come back as one
matrix per reply. Every reply names the model that made its vectors, and that
is the model id given to the caller, never one remembered per channel: behind
a round-robin address, replicas may run different models mid-rollout. Once a
model is pinned (`connect`), a target that answers with another one is
excluded and its items go to the others. Nothing here knows what the vectors
are for: the search service and the indexer both use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vpm.v1 import encoder_pb2, encoder_pb2_grpc, vectors_pb2
from vpm_common.encoder_client.targets import DNS_PREFIX, expand, split_targets
from vpm_common.errors import (
    STATUS_CODES,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VpmError,
)
from vpm_common.matrix import unpack
from vpm_common.security import PLAINTEXT, ClientSecurity

logger = logging.getLogger(__name__)

ENCODER_SERVICE = "vpm.v1.Encoder"
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_RESOURCE_EXHAUSTED = STATUS_CODES["RESOURCE_EXHAUSTED"]
_INVALID_ARGUMENT = STATUS_CODES["INVALID_ARGUMENT"]
_READY = grpc.ChannelConnectivity.READY
# A request's limits when an encoder does not say (ModelInfo.max_request_images, _bytes).
DEFAULT_REQUEST_IMAGES = 64
DEFAULT_REQUEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Embedded:
    """One item's outcome: a float32 `vector`, or `code` (a gRPC status number) and `message`."""

    id: str
    vector: np.ndarray | None
    model_id: str = ""
    code: int = 0
    message: str = ""


@dataclass
class EncodedImages:
    """The outcome of a run of images: one row each, and the failures by position."""

    vectors: np.ndarray  # (n, D) float32 unit rows; a failed image's row is zeros
    model_ids: list[str]  # per row, the model of the encoder that answered ("": none did)
    errors: dict[int, tuple[int, str]]  # position -> (gRPC status number, message)


@dataclass(frozen=True)
class TargetStatus:
    target: str
    # "SERVING", "NOT_SERVING", "UNREACHABLE", ...
    state: str
    model_id: str
    calls: int
    failures: int
    last_error: str
    random_weights: bool = False


class _Target:
    """One channel and what this client has seen of it."""

    def __init__(
        self,
        target: str,
        options: list[tuple[str, object]],
        security: ClientSecurity,
        server_name: str = "",
    ) -> None:
        self.name = target
        self.channel = security.aio_channel(target, options, server_name=server_name)
        self.encoder = encoder_pb2_grpc.EncoderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.model_info: encoder_pb2.ModelInfo | None = None
        self.calls = 0
        self.failures = 0
        self.last_error = ""
        self.down_until = 0.0
        self.answered = 0  # images it encoded for this client
        self.excluded = ""  # why it must not be used: it runs another model

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
        expand_dns: bool = False,
    ) -> None:
        targets = split_targets(targets)
        if not targets:
            raise ValueError("an encoder pool needs at least one target")
        self.specs = targets
        self.security = security
        self.expand_dns = expand_dns
        self.model_id = ""  # the pinned model (connect); "" takes any
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
        self._options = {"base": base, "balanced": balanced}
        self._targets: list[_Target] = []
        if expand_dns:
            self.resolve()
        else:
            self._targets = [
                _Target(t, balanced if t.startswith(DNS_PREFIX) else base, security)
                for t in targets
            ]
        self._next = 0

    def resolve(self) -> list[str]:
        """With expand_dns: add a target for every address the specs name now (blocking DNS
        lookups: call it in a thread); returns the addresses added. ValueError when a
        name does not resolve."""
        known = {target.name for target in self._targets}
        added = []
        for spec in self.specs:
            server_name = (
                spec[len(DNS_PREFIX) :].rpartition(":")[0] if spec.startswith(DNS_PREFIX) else ""
            )
            for address in expand(spec):
                if address not in known:
                    known.add(address)
                    added.append(address)
                    self._targets.append(
                        _Target(address, self._options["base"], self.security, server_name)
                    )
        return added

    @property
    def targets(self) -> list[str]:
        return [target.name for target in self._targets]

    def spread(self) -> dict[str, int]:
        """Images each target encoded for this client."""
        return {target.name: target.answered for target in self._targets}

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

    async def connect(self, timeout_s: float = 10.0) -> encoder_pb2.ModelInfo:
        """Ask every target what it runs (waiting up to `timeout_s` for it to come up): at
        least one must answer and all that do must agree; that model is then pinned.
        Unavailable when none answers, FailedPrecondition when they disagree."""
        deadline = self._deadline(timeout_s)
        infos = await asyncio.gather(
            *(self._model_info_of(t, deadline, wait_for_ready=True) for t in self._targets),
            return_exceptions=True,
        )
        answered = [
            (target, info)
            for target, info in zip(self._targets, infos, strict=True)
            if isinstance(info, encoder_pb2.ModelInfo)
        ]
        if not answered:
            reasons = "; ".join(
                f"{t.name}: {_reason(info)}" for t, info in zip(self._targets, infos, strict=True)
            )
            raise Unavailable(f"no encoder answered within {timeout_s:.0f} s ({reasons})")
        models = {info.model_id for _, info in answered}
        if len(models) > 1:
            listing = ", ".join(f"{t.name} runs {info.model_id}" for t, info in answered)
            raise FailedPrecondition(
                f"encoders disagree on the model ({listing}); vectors must not be mixed"
            )
        self.model_id = answered[0][1].model_id
        for target, info in zip(self._targets, infos, strict=True):
            if not isinstance(info, encoder_pb2.ModelInfo):
                logger.warning(
                    "encoder %s not answering yet (%s); will try it again",
                    target.name,
                    _reason(info),
                )
        return answered[0][1]

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
                reply = await target.encoder.EncodeText(
                    encoder_pb2.TextBatch(texts=list(texts)), timeout=_remaining(deadline)
                )
                target.succeeded()
                # An encoder older than the field names no model: then its channel's.
                model_id = reply.model_id or (await self._model_info_of(target, deadline)).model_id
                if not self._same_model(target, model_id):
                    errors.append(f"{target.name}: runs {model_id}")
                    continue
                return [_embedded(str(i), item, model_id) for i, item in enumerate(reply.items)]
            except aio.AioRpcError as err:
                await self._after_failure(target, err, attempt, deadline, errors)
        raise _gave_up(errors)

    async def encode_images(
        self, items: Sequence[tuple[str, bytes]], timeout_s: float | None = None
    ) -> list[Embedded]:
        """One result per (id, image bytes) item, in order (a view of `encode_image_batch`)."""
        encoded = await self.encode_image_batch([data for _, data in items], timeout_s)
        results = []
        for row, (item_id, _) in enumerate(items):
            error = encoded.errors.get(row)
            if error is not None:
                results.append(Embedded(item_id, None, encoded.model_ids[row], *error))
            else:
                results.append(Embedded(item_id, encoded.vectors[row], encoded.model_ids[row]))
        return results

    async def encode_image_batch(
        self,
        images: Sequence[bytes],
        timeout_s: float | None = None,
        dtype: int = vectors_pb2.FLOAT32,
    ) -> EncodedImages:
        """Every image's vector, as rows of one matrix, through EncodeImageBatches.

        Images the stream did not answer (the encoder went away), images refused with
        RESOURCE_EXHAUSTED and images answered by an encoder of another model than the
        pinned one are sent again, to the next target, after a pause.
        """
        deadline = self._deadline(timeout_s)
        run = _ImageRun(images)
        errors: list[str] = []
        for attempt in range(self.attempts):
            if not run.pending:
                break
            target = self._pick()
            try:
                await self._stream_images(target, run, deadline, dtype, errors)
                target.succeeded()
                if run.pending:
                    await asyncio.sleep(min(self._pause(attempt), _remaining(deadline)))
            except aio.AioRpcError as err:
                await self._after_failure(target, err, attempt, deadline, errors)
        if run.pending:
            failure = _gave_up(errors)
            for index in run.pending:
                run.errors[index] = (failure.code, failure.message)
        return run.result()

    async def _stream_images(
        self, target: _Target, run: _ImageRun, deadline: float, dtype: int, errors: list[str]
    ) -> None:
        """One EncodeImageBatches stream to `target` carrying every pending image."""
        info = await self._model_info_of(target, deadline)
        # Room for the message around the images.
        most_bytes = (info.max_request_bytes or DEFAULT_REQUEST_BYTES) - 64 * 1024
        run.refuse_larger(most_bytes)
        if not run.pending:
            return
        # Requests of one inference batch: the encoder admits a request whole or refuses it,
        # and one as large as its queue (max_request_images) fits only when nothing else
        # is in flight, so beside any other load it would be refused on every attempt.
        limits = [n for n in (info.max_batch, info.max_request_images) if n > 0]
        chunks = _chunks(
            run.pending,
            [len(data) for data in run.images],
            min(limits, default=DEFAULT_REQUEST_IMAGES),
            most_bytes,
        )
        requests = [
            encoder_pb2.ImageBatch(id=str(k), images=[run.images[i] for i in chunk], dtype=dtype)
            for k, chunk in enumerate(chunks)
        ]
        answered: set[int] = set()
        refused = 0
        call = target.encoder.EncodeImageBatches(iter(requests), timeout=_remaining(deadline))
        try:
            async for reply in call:
                chunk = chunks[int(reply.id)]
                if not self._same_model(target, reply.model_id):
                    call.cancel()  # its other answers would be of the wrong model too
                    errors.append(f"{target.name}: runs {reply.model_id}")
                    break
                refused += run.take(chunk, unpack(reply.vectors), reply.model_id, reply.errors)
                target.answered += len(chunk)
                answered.add(int(reply.id))
        finally:
            run.pending = [i for k, chunk in enumerate(chunks) if k not in answered for i in chunk]
            run.pending += run.refused
            run.refused = []
        if refused:
            errors.append(f"{target.name}: RESOURCE_EXHAUSTED for {refused} items")

    def _same_model(self, target: _Target, model_id: str) -> bool:
        """False, and the target excluded, when it answers with another model than the
        pinned one."""
        if not self.model_id or model_id == self.model_id:
            return True
        target.excluded = f"runs {model_id}, not {self.model_id}"
        target.model_info = None
        logger.error("encoder %s %s: not using it", target.name, target.excluded)
        return False

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
        """The target `_pick` would return now, without moving the turn: the next usable
        one not down a moment ago, else the next usable one. FailedPrecondition when every
        target runs another model than the pinned one."""
        now = time.monotonic()
        count = len(self._targets)
        usable = [
            self._targets[(self._next + step) % count]
            for step in range(count)
            if not self._targets[(self._next + step) % count].excluded
        ]
        if not usable:
            raise FailedPrecondition(f"no encoder runs model {self.model_id} any more")
        for target in usable:
            if target.down_until <= now:
                return target
        return usable[0]

    async def _model_info_of(
        self, target: _Target, deadline: float, wait_for_ready: bool = False
    ) -> encoder_pb2.ModelInfo:
        # Asked again whenever the channel is not connected: the next connection may reach
        # an encoder restarted with another model, and the query cache keys by the model.
        if target.model_info is None or target.channel.get_state() != _READY:
            target.model_info = await target.encoder.GetModelInfo(
                encoder_pb2.GetModelInfoRequest(),
                timeout=_remaining(deadline),
                wait_for_ready=wait_for_ready,
            )
            if self.model_id and target.model_info.model_id != self.model_id:
                self._same_model(target, target.model_info.model_id)
            elif target.excluded:  # restarted with the pinned model
                target.excluded = ""
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
        info = target.model_info
        return TargetStatus(
            target.name,
            state,
            model_id,
            target.calls,
            target.failures,
            target.last_error,
            info is not None and info.random_weights,
        )


def _gave_up(errors: list[str]) -> VpmError:
    """After the last attempt: RESOURCE_EXHAUSTED when every encoder only said it was full
    (so callers back off, as for any shed load), UNAVAILABLE otherwise."""
    if errors and all("RESOURCE_EXHAUSTED" in error for error in errors):
        return ResourceExhausted(
            f"every encoder is at capacity; retry with backoff ({'; '.join(errors)})"
        )
    return Unavailable(f"no encoder answered ({'; '.join(errors)})")


def _chunks(indexes: list[int], sizes: list[int], most: int, most_bytes: int) -> list[list[int]]:
    """`indexes` in runs of at most `most` images and `most_bytes` bytes (at least one each)."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    total = 0
    for index in indexes:
        if chunk and (len(chunk) == most or total + sizes[index] > most_bytes):
            chunks.append(chunk)
            chunk, total = [], 0
        chunk.append(index)
        total += sizes[index]
    if chunk:
        chunks.append(chunk)
    return chunks


class _ImageRun:
    """The images of one encode_image_batch call, what came back, and what is still to send."""

    def __init__(self, images: Sequence[bytes]) -> None:
        self.images = images
        self.pending = list(range(len(images)))
        self.refused: list[int] = []  # RESOURCE_EXHAUSTED in this stream: to send again
        self.vectors: np.ndarray | None = None
        self.model_ids = [""] * len(images)
        self.errors: dict[int, tuple[int, str]] = {}

    def refuse_larger(self, most_bytes: int) -> None:
        """Fail the pending images no request can carry: sent, one would fail its whole
        stream (and every image sent with it) at each try, on every encoder."""
        for index in self.pending:
            size = len(self.images[index])
            if size > most_bytes:
                self.errors[index] = (
                    _INVALID_ARGUMENT,
                    f"image is {size} bytes, over the limit of {most_bytes} that a request "
                    "to the encoders may carry",
                )
        self.pending = [index for index in self.pending if index not in self.errors]

    def take(
        self,
        chunk: list[int],
        matrix: np.ndarray,
        model_id: str,
        item_errors: Sequence[encoder_pb2.ItemError],
    ) -> int:
        """Place one reply's rows; returns how many of its images were refused."""
        if matrix.shape[0] != len(chunk):
            raise Unavailable(f"an encoder answered {matrix.shape[0]} rows for {len(chunk)} images")
        if self.vectors is None:
            self.vectors = np.zeros((len(self.images), matrix.shape[1]), dtype=np.float32)
        self.vectors[chunk] = matrix
        for index in chunk:
            self.model_ids[index] = model_id
        refused = 0
        for item in item_errors:
            index = chunk[item.index]
            if item.error.code == _RESOURCE_EXHAUSTED:
                self.refused.append(index)
                refused += 1
            else:
                self.errors[index] = (item.error.code, item.error.message)
        return refused

    def result(self) -> EncodedImages:
        vectors = (
            self.vectors
            if self.vectors is not None
            else np.zeros((len(self.images), 0), np.float32)
        )
        return EncodedImages(vectors, self.model_ids, self.errors)


def _reason(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _embedded(item_id: str, reply: encoder_pb2.EmbeddingItem, model_id: str) -> Embedded:
    if reply.HasField("error"):
        return Embedded(item_id, None, model_id, reply.error.code, reply.error.message)
    return Embedded(item_id, np.asarray(reply.vector, dtype=np.float32), model_id)
