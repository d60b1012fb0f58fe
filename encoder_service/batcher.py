"""Dynamic batching: callers' requests gathered into batches on one inference thread.

A request is a group of payloads (one image, or a client's whole batch of
them). A batch starts when `max_batch` payloads wait, or when the oldest
waiting request has waited `max_delay`; while a batch runs, the next one fills
up, so under load batches grow on their own. A batch takes whole requests
while they fit and splits the one that does not, so a request may span
batches. Requests whose caller is gone (cancelled, or past its deadline) are
dropped before inference. Several queues (images, texts) share the thread
round-robin, so one runtime never runs two batches at once and neither kind
starves.

Per batch, not per item: one call of the queue's `run` (payloads -> an output
that slices by rows, e.g. encoded.Encoded, or a Future of one), and one slice
of that output handed to each request in it. A request's future resolves to
its slice, or to its slices joined by the queue's `join`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from vpm_common.errors import Cancelled, DeadlineExceeded, Unavailable

logger = logging.getLogger(__name__)


class Caller:
    """What the batcher knows of whoever waits for an item: gone yet, and its deadline."""

    __slots__ = ("deadline", "gone")

    def __init__(self, deadline: float | None = None) -> None:
        self.gone = False  # set when the caller cancels or its call ends
        self.deadline = deadline  # time.monotonic() value, or None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class _Request:
    """One caller's group of payloads, as far as batches have taken it."""

    __slots__ = ("payloads", "caller", "future", "enqueued", "taken", "parts", "pending")

    def __init__(self, payloads: Sequence[Any], caller: Caller, future: Future) -> None:
        self.payloads = payloads
        self.caller = caller
        self.future = future
        self.enqueued = time.monotonic()
        self.taken = 0  # payloads handed to batches so far
        self.parts: list[tuple[int, Any]] = []  # (offset, output slice) while it spans batches
        self.pending = 0  # batches it is in that have not answered yet


@dataclass(frozen=True)
class _Part:
    """A run of one request's payloads inside a batch."""

    request: _Request
    start: int  # in the batch's payloads
    count: int
    offset: int  # in the request's payloads


def _concatenated(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else [x for part in parts for x in part]


@dataclass
class BatchQueue:
    """One kind of work: how to run a batch of its payloads, and the requests waiting."""

    name: str
    # payloads -> an output that slices by rows (one row per payload), or a Future of one
    run: Callable[[list[Any]], Any]
    # the output slices of a request that spanned batches -> one output
    join: Callable[[list[Any]], Any] = _concatenated
    requests: deque = field(default_factory=deque)
    waiting: int = 0  # payloads in `requests` not yet taken


class BatchObserver:
    """Hooks for metrics; the defaults do nothing."""

    def batch_started(self, queue: str, size: int, waits: list[float]) -> None: ...

    def batch_finished(self, queue: str, size: int, seconds: float) -> None: ...

    def dropped(self, queue: str, reason: str, count: int = 1) -> None: ...

    def depth(self, queue: str, waiting: int) -> None: ...


class DynamicBatcher:
    """Gathers submitted requests into batches and runs them on a single thread."""

    def __init__(
        self,
        queues: Sequence[BatchQueue],
        max_batch: int,
        max_delay_s: float,
        observer: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._queues = {queue.name: queue for queue in queues}
        self._order = [queue.name for queue in queues]
        self._turn = 0
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._observer = observer or BatchObserver()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._thread.start()

    def submit(self, queue: str, payloads: Sequence[Any], caller: Caller) -> Future:
        """Queue a request of one or more payloads; the future resolves to the run's output
        rows for them, in order, or to a VpmError."""
        future: Future = Future()
        if not payloads:
            raise ValueError("a request needs at least one payload")
        with self._lock:
            if self._closing:
                raise Unavailable("the encoder is shutting down")
            target = self._queues[queue]
            target.requests.append(_Request(payloads, caller, future))
            target.waiting += len(payloads)
            self._observer.depth(queue, target.waiting)
            self._lock.notify()
        return future

    def waiting(self) -> int:
        with self._lock:
            return sum(queue.waiting for queue in self._queues.values())

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking work; run what is queued (drain) or fail it, then stop the thread."""
        with self._lock:
            self._closing = True
            if not drain:
                for queue in self._queues.values():
                    while queue.requests:
                        _fail(queue.requests.popleft(), Unavailable("the encoder is shutting down"))
                    queue.waiting = 0
            self._lock.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            queue, parts = picked
            self._run(queue, parts)

    def _next_batch(self) -> tuple[BatchQueue, list[_Part]] | None:
        with self._lock:
            while True:
                queue = self._ready_queue()
                if queue is not None:
                    return queue, self._take(queue)
                if self._closing and not any(q.requests for q in self._queues.values()):
                    return None
                self._lock.wait(self._time_to_next_deadline())

    def _ready_queue(self) -> BatchQueue | None:
        """The next queue in turn that is full, past its delay, or being drained at close."""
        now = time.monotonic()
        for offset in range(len(self._order)):
            name = self._order[(self._turn + offset) % len(self._order)]
            queue = self._queues[name]
            if not queue.requests:
                continue
            waited = now - queue.requests[0].enqueued
            if queue.waiting >= self.max_batch or waited >= self.max_delay_s or self._closing:
                self._turn = (self._turn + offset + 1) % len(self._order)
                return queue
        return None

    def _time_to_next_deadline(self) -> float | None:
        oldest = [q.requests[0].enqueued for q in self._queues.values() if q.requests]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self.max_delay_s - time.monotonic())

    def _take(self, queue: BatchQueue) -> list[_Part]:
        """Up to max_batch payloads of live requests, the last one split if it does not fit;
        dead requests are failed here, before any inference."""
        now = time.monotonic()
        parts: list[_Part] = []
        size = 0
        while queue.requests and size < self.max_batch:
            request = queue.requests[0]
            left = len(request.payloads) - request.taken
            if request.caller.gone or request.future.done():
                self._drop(queue, request, Cancelled("the caller cancelled"), "cancelled")
                continue
            if request.caller.expired(now):
                error = DeadlineExceeded("deadline passed while queued")
                self._drop(queue, request, error, "deadline")
                continue
            count = min(left, self.max_batch - size)
            parts.append(_Part(request, size, count, request.taken))
            request.pending += 1  # under the lock, as _deliver counts it down
            request.taken += count
            queue.waiting -= count
            size += count
            if request.taken == len(request.payloads):
                queue.requests.popleft()
        self._observer.depth(queue.name, queue.waiting)
        return parts

    def _drop(self, queue: BatchQueue, request: _Request, error: Exception, reason: str) -> None:
        queue.requests.popleft()
        left = len(request.payloads) - request.taken
        queue.waiting -= left
        self._observer.dropped(queue.name, reason, left)
        _fail(request, error)

    def _run(self, queue: BatchQueue, parts: list[_Part]) -> None:
        if not parts:
            return
        payloads: list[Any] = []
        for part in parts:
            payloads.extend(part.request.payloads[part.offset : part.offset + part.count])
        started = time.monotonic()
        self._observer.batch_started(
            queue.name, len(payloads), [started - part.request.enqueued for part in parts]
        )
        try:
            output = queue.run(payloads)
        except Exception as error:  # noqa: BLE001 - every waiting caller must hear of it
            logger.exception("%s batch of %d failed", queue.name, len(payloads))
            for part in parts:
                _fail(part.request, error)
            return
        finally:
            self._observer.batch_finished(queue.name, len(payloads), time.monotonic() - started)
        if isinstance(output, Future):  # launched on a device; it answers later
            output.add_done_callback(lambda done: self._hand_out(queue, parts, done))
        else:
            self._deliver(queue, parts, output)

    def _hand_out(self, queue: BatchQueue, parts: list[_Part], done: Future) -> None:
        """A device batch answered: its output to its requests, or its error to each."""
        error = done.exception()
        if error is not None:
            for part in parts:
                _fail(part.request, error)
        else:
            self._deliver(queue, parts, done.result())

    def _deliver(self, queue: BatchQueue, parts: list[_Part], output: Any) -> None:
        """Each request its slice of the batch's output; a request complete with it is answered."""
        for part in parts:
            request = part.request
            piece = output[part.start : part.start + part.count]
            if part.offset == 0 and part.count == len(request.payloads):
                _settle(request.future, piece)  # the common case: the whole request in one batch
                continue
            # A request split over batches: a device batch may answer on another thread
            # while the inference thread takes the request's next part.
            with self._lock:
                request.pending -= 1
                request.parts.append((part.offset, piece))
                complete = request.pending == 0 and request.taken == len(request.payloads)
            if complete:
                request.parts.sort(key=lambda offset_piece: offset_piece[0])
                _settle(request.future, queue.join([piece for _, piece in request.parts]))


def _settle(future: Future, result: Any) -> None:
    if not future.done():
        with contextlib.suppress(InvalidStateError):  # lost a race with cancel(): nobody waits
            future.set_result(result)


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        with contextlib.suppress(InvalidStateError):
            request.future.set_exception(error)
