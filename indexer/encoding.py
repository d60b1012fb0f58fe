"""Streaming images through several encoders at once, each with a bounded window in flight.

Every encoder gets its own EncodeImages stream and at most `window` images
outstanding, so all of them stay busy and memory stays flat however big the
catalog. An encoder that goes away has its outstanding images put back in
the shared queue for the others; it is picked up again when it answers its
health check. Items the encoder refuses as bad are final failures; items it
could not take (queue full, shutting down) are retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vpm.v1 import encoder_pb2, encoder_pb2_grpc
from vpm_common.errors import STATUS_CODES
from vpm_common.security import PLAINTEXT, ClientSecurity
from vpm_common.targets import DNS_PREFIX, expand, split_targets

logger = logging.getLogger(__name__)

ENCODER_SERVICE = "vpm.v1.Encoder"
RETRY_CODES = {
    STATUS_CODES[name]
    for name in ("CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE")
}
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class FleetError(RuntimeError):
    """No encoder can do the work: unreachable, a different model, or silent for too long."""


@dataclass(eq=False)
class Job:
    key: str
    path: Path
    attempts: int = 0


@dataclass(frozen=True)
class Outcome:
    job: Job
    vector: np.ndarray | None
    sha256: str  # of the bytes that were encoded
    error: str = ""


@dataclass(eq=False)
class EncoderTarget:
    name: str
    channel: aio.Channel
    stub: encoder_pb2_grpc.EncoderStub
    health: health_pb2_grpc.HealthStub
    window: int = 0
    model_id: str = ""
    excluded: str = ""  # why this encoder must not be used (another model)
    answered: int = 0
    streams_lost: int = 0
    state: str = "UNKNOWN"
    stats: dict = field(default_factory=dict)


class EncoderFleet:
    """The encoders of one run, all of the same model.

    `specs` are target strings: "host:port", or "dns:///name:port", which
    stands for every address the name resolves to. Names are resolved again
    every `resolve_every_s` during a run, so replicas added meanwhile (a
    Kubernetes scale-up) get their own stream too.
    """

    def __init__(
        self,
        specs: list[str],
        window: int = 0,
        max_attempts: int = 5,
        stall_s: float = 120.0,
        resolve_every_s: float = 30.0,
        security: ClientSecurity = PLAINTEXT,
    ):
        self.specs = split_targets(specs)
        self.security = security
        if not self.specs:
            raise FleetError("no encoder targets given")
        self.targets: list[EncoderTarget] = []
        self._window = window
        self.max_attempts = max_attempts
        self.stall_s = stall_s
        self.resolve_every_s = resolve_every_s
        self.model_info: encoder_pb2.ModelInfo | None = None
        try:
            self.resolve()
        except ValueError as error:
            raise FleetError(str(error)) from None

    def resolve(self) -> list[EncoderTarget]:
        """Add a target for every address the specs name now; returns the new ones."""
        known = {target.name for target in self.targets}
        added = []
        for spec in self.specs:
            for address in expand(spec):
                if address not in known:
                    known.add(address)
                    added.append(self._target(address, _server_name(spec)))
        self.targets += added
        return added

    def _target(self, address: str, name: str) -> EncoderTarget:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        channel = self.security.aio_channel(address, options, server_name=name)
        stub, health = encoder_pb2_grpc.EncoderStub(channel), health_pb2_grpc.HealthStub(channel)
        return EncoderTarget(address, channel, stub, health)

    async def close(self) -> None:
        for target in self.targets:
            await target.channel.close()

    async def connect(self, timeout_s: float = 10.0) -> encoder_pb2.ModelInfo:
        """Ask every encoder what it runs: at least one must answer, and all that do must agree."""
        infos = await asyncio.gather(
            *(
                t.stub.GetModelInfo(
                    encoder_pb2.GetModelInfoRequest(), timeout=timeout_s, wait_for_ready=True
                )
                for t in self.targets
            ),
            return_exceptions=True,
        )
        answered = [
            (t, info)
            for t, info in zip(self.targets, infos, strict=True)
            if not isinstance(info, BaseException)
        ]
        if not answered:
            reasons = "; ".join(
                f"{t.name}: {_reason(info)}" for t, info in zip(self.targets, infos, strict=True)
            )
            raise FleetError(f"no encoder answered within {timeout_s:.0f} s ({reasons})")
        model_ids = {info.model_id for _, info in answered}
        if len(model_ids) > 1:
            listing = ", ".join(f"{t.name} runs {info.model_id}" for t, info in answered)
            raise FleetError(
                f"encoders disagree on the model ({listing}); vectors must not be mixed"
            )
        self.model_info = answered[0][1]
        for target, info in answered:
            self._accept(target, info)
        for target, info in zip(self.targets, infos, strict=True):
            if isinstance(info, BaseException):
                logger.warning(
                    "encoder %s not answering yet (%s); will retry it during the run",
                    target.name,
                    _reason(info),
                )
        return self.model_info

    def _accept(self, target: EncoderTarget, info: encoder_pb2.ModelInfo) -> None:
        if info.model_id != self.model_info.model_id:
            target.excluded = f"runs {info.model_id}, not {self.model_info.model_id}"
            logger.error("encoder %s %s: not using it", target.name, target.excluded)
            return
        target.model_id = info.model_id
        target.window = self._window or max(8, 2 * info.max_batch)
        target.state = "SERVING"

    async def encode(
        self, jobs: list[Job], on_outcome: Callable[[Outcome], Awaitable[None]]
    ) -> None:
        """Encode every job once (or fail it with a reason), calling on_outcome as each finishes."""
        if not jobs:
            return
        run = _Run(self, jobs, on_outcome)
        await run.until_done()

    def spread(self) -> dict[str, int]:
        """Images answered by each encoder during this fleet's life."""
        return {target.name: target.answered for target in self.targets}


class _Run:
    """One encode() call: the shared queue, the drivers of each encoder, and a stall watchdog."""

    def __init__(
        self, fleet: EncoderFleet, jobs: list[Job], on_outcome: Callable[[Outcome], Awaitable[None]]
    ):
        self.fleet = fleet
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs:
            self.queue.put_nowait(job)
        self.remaining = len(jobs)
        self.finished = asyncio.Event()
        self.on_outcome = on_outcome
        self.last_progress = time.monotonic()

    async def until_done(self) -> None:
        self.drivers = [asyncio.create_task(self._drive(target)) for target in self.fleet.targets]
        watchdog = asyncio.create_task(self._watch())
        resolver = asyncio.create_task(self._resolve_periodically())
        finished = asyncio.create_task(self.finished.wait())
        try:
            await asyncio.wait({finished, watchdog}, return_when=asyncio.FIRST_COMPLETED)
            if watchdog.done():
                watchdog.result()  # raises FleetError
        finally:
            tasks = [*self.drivers, watchdog, resolver, finished]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _resolve_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.fleet.resolve_every_s)
            try:
                added = await asyncio.to_thread(self.fleet.resolve)
            except ValueError as error:
                logger.warning("cannot resolve encoders again: %s", error)
                continue
            for target in added:
                logger.info("encoder %s appeared; sending it images too", target.name)
                self.drivers.append(asyncio.create_task(self._drive(target)))

    async def _watch(self) -> None:
        while not self.finished.is_set():
            await asyncio.sleep(0.5)
            usable = [t for t in self.fleet.targets if not t.excluded]
            if not usable:
                raise FleetError("no encoder runs the model of this run")
            if time.monotonic() - self.last_progress > self.fleet.stall_s:
                states = ", ".join(f"{t.name} {t.state}" for t in self.fleet.targets)
                raise FleetError(
                    f"no encoder answered for {self.fleet.stall_s:.0f} s, "
                    f"{self.remaining} images left ({states})"
                )

    async def complete(self, outcome: Outcome) -> None:
        self.last_progress = time.monotonic()
        await self.on_outcome(outcome)
        self.remaining -= 1
        if self.remaining == 0:
            self.finished.set()

    async def retry(self, job: Job, reason: str, delay_s: float = 0.0) -> None:
        job.attempts += 1
        if job.attempts >= self.fleet.max_attempts:
            await self.complete(
                Outcome(job, None, "", f"gave up after {job.attempts} attempts: {reason}")
            )
        elif delay_s:
            asyncio.get_running_loop().call_later(delay_s, self.queue.put_nowait, job)
        else:
            self.queue.put_nowait(job)

    async def _drive(self, target: EncoderTarget) -> None:
        """Keep one stream open to `target` while there is work, reconnecting after failures."""
        pause = 0.5
        while not self.finished.is_set():
            if target.excluded:
                return
            if not await self._usable(target):
                await asyncio.sleep(pause)
                pause = min(2 * pause, 5.0)
                continue
            try:
                await self._stream(target)
                pause = 0.5
            except aio.AioRpcError as error:
                target.streams_lost += 1
                target.state = error.code().name
                logger.warning(
                    "encoder %s: stream lost (%s); its images go to the others",
                    target.name,
                    _reason(error),
                )
                await asyncio.sleep(pause)
                pause = min(2 * pause, 5.0)

    async def _usable(self, target: EncoderTarget) -> bool:
        try:
            if not target.model_id:
                info = await target.stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=2)
                self.fleet._accept(target, info)
                if target.excluded:
                    return False
                logger.info("encoder %s is up; sending it images", target.name)
            reply = await target.health.Check(
                health_pb2.HealthCheckRequest(service=ENCODER_SERVICE), timeout=2
            )
        except aio.AioRpcError as error:
            target.state = error.code().name
            return False
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        target.state = "SERVING" if serving else "NOT_SERVING"
        return serving

    async def _stream(self, target: EncoderTarget) -> None:
        call = target.stub.EncodeImages()
        window = asyncio.Semaphore(target.window)
        outstanding: dict[str, tuple[Job, str]] = {}
        sender = asyncio.create_task(self._send(call, window, outstanding))
        closer = asyncio.create_task(self._close_when_finished(call, sender))
        try:
            async for reply in call:
                job, sha256 = outstanding.pop(reply.id)
                window.release()
                target.answered += 1
                if not reply.HasField("error"):
                    await self.complete(
                        Outcome(job, np.asarray(reply.vector, dtype=np.float32), sha256)
                    )
                elif reply.error.code in RETRY_CODES:
                    await self.retry(job, f"{target.name}: {reply.error.message}", delay_s=0.2)
                else:
                    await self.complete(Outcome(job, None, sha256, reply.error.message))
            if sender.done() and not sender.cancelled() and sender.exception():
                raise sender.exception()
        finally:
            sender.cancel()
            closer.cancel()
            for job, _ in outstanding.values():
                await self.retry(job, f"encoder {target.name} went away")
            outstanding.clear()

    async def _send(
        self, call: aio.StreamStreamCall, window: asyncio.Semaphore, outstanding: dict
    ) -> None:
        sequence = 0
        while True:
            await window.acquire()
            job = await self.queue.get()
            request_id = str(sequence)
            sequence += 1
            # Outstanding from the moment it leaves the queue: if this stream dies
            # while the file is being read, the job is sent again, not lost.
            outstanding[request_id] = (job, "")
            try:
                data, sha256 = await asyncio.to_thread(_read, job.path)
            except OSError as error:
                del outstanding[request_id]
                window.release()
                await self.complete(
                    Outcome(job, None, "", f"cannot read: {error.strerror or error}")
                )
                continue
            outstanding[request_id] = (job, sha256)
            await call.write(encoder_pb2.ImageItem(id=request_id, data=data))

    async def _close_when_finished(self, call: aio.StreamStreamCall, sender: asyncio.Task) -> None:
        await self.finished.wait()
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await call.done_writing()


def _server_name(spec: str) -> str:
    """The name a TLS certificate must carry for the addresses of a dns:/// spec; "" for others.

    This client dials each resolved address itself, and would otherwise check the
    certificate against a bare IP address.
    """
    if not spec.startswith(DNS_PREFIX):
        return ""
    return spec[len(DNS_PREFIX) :].rpartition(":")[0]


def _read(path: Path) -> tuple[bytes, str]:
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _reason(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
