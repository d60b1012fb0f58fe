"""Encoding a catalog's images (their files' bytes, read once by the indexer): a request at a
time, several requests in flight.

The encoders are reached through the one encoder client core
(vpm_common.encoder_client.encoder_pool): it spreads the requests round-robin,
sends again on another encoder what one could not take or lost, and leaves an
encoder that runs another model than the run's. What is decided here: which
files travel together, how many requests are in flight (`window` images per
encoder, so every encoder stays busy and memory stays flat however big the
catalog), and what happens when no encoder answers: the images wait and are
sent again until `stall_s` passes without any progress, and then the run stops
rather than report them done. Images an encoder refuses as bad are final
failures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from vpm.v1 import encoder_pb2
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.errors import STATUS_CODES, FailedPrecondition, VpmError

logger = logging.getLogger(__name__)

# Per-image answers that say "not now" rather than "this image is bad".
RETRY_CODES = {
    STATUS_CODES[name]
    for name in ("CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE")
}


class EncodingError(RuntimeError):
    """No encoder can do the work: unreachable, a different model, or silent for too long."""


@dataclass(eq=False)
class Job:
    """An image to encode: its file's bytes, kept until it is encoded or fails for good."""

    key: str
    data: bytes


@dataclass(frozen=True)
class Outcome:
    job: Job
    vector: np.ndarray | None
    error: str = ""


class FileEncoder:
    """The encoders of one indexing run, fed the bytes of image files."""

    def __init__(
        self,
        pool: EncoderPool,
        window: int = 0,
        stall_s: float = 120.0,
        resolve_every_s: float = 30.0,
    ) -> None:
        self.pool = pool
        self.window = window
        self.stall_s = stall_s
        self.resolve_every_s = resolve_every_s
        self.model_info: encoder_pb2.ModelInfo | None = None
        self.request_images = 1

    async def connect(self, timeout_s: float = 10.0) -> encoder_pb2.ModelInfo:
        """Ask every encoder what it runs: at least one must answer, and all that do agree."""
        try:
            info = await self.pool.connect(timeout_s)
        except VpmError as error:
            raise EncodingError(error.message) from None
        batch = max(info.max_batch, 1)
        window = self.window or 4 * batch
        # A request is one of the encoder's batches, and a window holds several, so that while
        # one is encoded the next ones are read, sent and decoded (with two, the encoder
        # waited on the indexer: BENCHMARKS.md, the indexer against the encoders alone).
        self.request_images = max(1, min(batch, window // 2, info.max_request_images or batch))
        self.window = window
        self.model_info = info
        return info

    def spread(self) -> dict[str, int]:
        """Images answered by each encoder during this run."""
        return self.pool.spread()

    async def encode(
        self, jobs: list[Job] | Jobs, on_outcome: Callable[[Outcome], Awaitable[None]]
    ) -> None:
        """Encode every job once (or fail it with a reason), calling on_outcome as each finishes.

        `jobs` may still be growing (a Jobs its producer closes when done): requests go out
        as soon as one is full, so encoding overlaps whatever finds the jobs.
        """
        if self.model_info is None:
            raise RuntimeError("connect() first")
        if isinstance(jobs, list):
            jobs = Jobs(jobs, closed=True)
        await _Run(self, jobs, on_outcome).until_done()


class Jobs:
    """Jobs handed over as they are found; `close()` says no more will come.

    `limit` (0: none) is the producer's brake, for it to wait on in `room()`: each
    job holds its file's bytes until taken, so memory stays flat however far the
    producer could run ahead of the encoders.
    """

    def __init__(self, jobs: list[Job] | None = None, closed: bool = False, limit: int = 0) -> None:
        self._jobs: deque[Job] = deque(jobs or ())
        self._closed = closed
        self.limit = limit
        self._changed = asyncio.Event()
        self._taken = asyncio.Event()

    def put(self, job: Job) -> None:
        self._jobs.append(job)
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def room(self) -> None:
        """Wait until fewer than `limit` jobs wait to be taken."""
        while self.limit and len(self._jobs) >= self.limit:
            self._taken.clear()
            await self._taken.wait()

    async def take(self, count: int) -> list[Job]:
        """The next `count` jobs, waiting until there are that many or no more will come;
        [] once all are taken."""
        while len(self._jobs) < count and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        taken = [self._jobs.popleft() for _ in range(min(count, len(self._jobs)))]
        self._taken.set()
        return taken


class _Run:
    """One encode() call: requests in flight, images waiting to be sent again, a stall clock."""

    def __init__(
        self,
        encoder: FileEncoder,
        jobs: Jobs,
        on_outcome: Callable[[Outcome], Awaitable[None]],
    ) -> None:
        self.encoder = encoder
        self.fresh = jobs
        # Taken, not yet encoded: sent again (by the driver that put it there, if no other).
        self.again: list[list[Job]] = []
        self.on_outcome = on_outcome
        # When the first request sent since the last answer was sent: the stall clock. Not
        # the run's start: hashing unchanged files for a while is no silence of the encoders.
        self.failing_since: float | None = None
        self.pause_s = 0.5

    async def until_done(self) -> None:
        pool = self.encoder.pool
        in_flight = max(2, len(pool.targets) * self.encoder.window // self.encoder.request_images)
        resolver = asyncio.create_task(self._resolve_periodically())
        try:
            await asyncio.gather(*(self._drive() for _ in range(in_flight)))
        finally:
            resolver.cancel()
            await asyncio.gather(resolver, return_exceptions=True)

    async def _drive(self) -> None:
        """Send one request at a time until no work is left (or the run stalls)."""
        while True:
            if self.again:
                jobs = self.again.pop()
            else:
                jobs = await self.fresh.take(self.encoder.request_images)
                if not jobs:
                    return
            await self._encode(jobs)

    async def _encode(self, jobs: list[Job]) -> None:
        sent = time.monotonic()
        try:
            encoded = await self.encoder.pool.encode_image_batch(
                [job.data for job in jobs], timeout_s=self.encoder.stall_s
            )
        except FailedPrecondition as error:  # every encoder runs another model
            raise EncodingError(error.message) from None
        except VpmError as error:
            codes = dict.fromkeys(range(len(jobs)), (error.code, error.message))
            encoded = None
        else:
            codes = encoded.errors
        retry: list[Job] = []
        for row, job in enumerate(jobs):
            code, message = codes.get(row, (0, ""))
            if code in RETRY_CODES:
                retry.append(job)
            elif code:
                await self._settle(Outcome(job, None, message))
            else:
                await self._settle(Outcome(job, encoded.vectors[row]))
        if retry:
            await self._wait_before_again(retry, codes, sent)

    async def _wait_before_again(self, retry: list[Job], codes: dict, sent: float) -> None:
        """Nobody could take these now (sent at `sent`): pause, then queue them again, unless
        nothing has answered for stall_s."""
        if self.failing_since is None:
            self.failing_since = sent
        silent_s = time.monotonic() - self.failing_since
        if silent_s > self.encoder.stall_s:
            reasons = {message for code, message in codes.values() if code in RETRY_CODES}
            raise EncodingError(
                f"no encoder answered for {silent_s:.0f} s, {len(retry)} images of a request "
                f"still to encode ({'; '.join(sorted(reasons))})"
            )
        await asyncio.sleep(self.pause_s)
        self.pause_s = min(2 * self.pause_s, 5.0)
        self.again.append(retry)

    async def _settle(self, outcome: Outcome) -> None:
        self.failing_since = None
        self.pause_s = 0.5
        await self.on_outcome(outcome)

    async def _resolve_periodically(self) -> None:
        pool = self.encoder.pool
        if not pool.expand_dns:
            return
        while True:
            await asyncio.sleep(self.encoder.resolve_every_s)
            try:
                added = await asyncio.to_thread(pool.resolve)
            except ValueError as error:
                logger.warning("cannot resolve encoders again: %s", error)
                continue
            for address in added:
                logger.info("encoder %s appeared; sending it images too", address)
