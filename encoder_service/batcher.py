"""Dynamic batching: items from every caller gathered into batches on one inference thread.

A batch starts when `max_batch` items wait, or when the oldest waiting item
has waited `max_delay`; while a batch runs, the next one fills up, so under
load batches grow on their own. Items whose caller is gone (cancelled, or
past its deadline) are dropped before inference. Several queues (images,
texts) share the thread round-robin, so one runtime never runs two batches at
once and neither kind starves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
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


@dataclass
class _Item:
    payload: Any
    caller: Caller
    future: Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchQueue:
    """One kind of work: how to run a batch of its payloads, and the items waiting."""

    name: str
    run: Callable[[list[Any]], Sequence[Any]]  # payloads -> one result per payload, in order
    items: deque = field(default_factory=deque)


class BatchObserver:
    """Hooks for metrics; the defaults do nothing."""

    def batch_started(self, queue: str, size: int, waits: list[float]) -> None: ...

    def batch_finished(self, queue: str, size: int, seconds: float) -> None: ...

    def dropped(self, queue: str, reason: str) -> None: ...

    def depth(self, queue: str, waiting: int) -> None: ...


class DynamicBatcher:
    """Gathers submitted payloads into batches and runs them on a single thread."""

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

    def submit(self, queue: str, payload: Any, caller: Caller) -> Future:
        """Queue one payload; the future resolves to its result or a VpmError."""
        future: Future = Future()
        with self._lock:
            if self._closing:
                raise Unavailable("the encoder is shutting down")
            target = self._queues[queue]
            target.items.append(_Item(payload, caller, future))
            self._observer.depth(queue, len(target.items))
            self._lock.notify()
        return future

    def waiting(self) -> int:
        with self._lock:
            return sum(len(queue.items) for queue in self._queues.values())

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop taking work; run what is queued (drain) or fail it, then stop the thread."""
        with self._lock:
            self._closing = True
            if not drain:
                for queue in self._queues.values():
                    while queue.items:
                        queue.items.popleft().future.set_exception(
                            Unavailable("the encoder is shutting down")
                        )
            self._lock.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            picked = self._next_batch()
            if picked is None:
                return
            queue, items = picked
            self._run(queue, items)

    def _next_batch(self) -> tuple[BatchQueue, list[_Item]] | None:
        with self._lock:
            while True:
                queue = self._ready_queue()
                if queue is not None:
                    return queue, self._take(queue)
                if self._closing and not any(q.items for q in self._queues.values()):
                    return None
                self._lock.wait(self._time_to_next_deadline())

    def _ready_queue(self) -> BatchQueue | None:
        """The next queue in turn that is full, past its delay, or being drained at close."""
        now = time.monotonic()
        for offset in range(len(self._order)):
            name = self._order[(self._turn + offset) % len(self._order)]
            queue = self._queues[name]
            if not queue.items:
                continue
            waited = now - queue.items[0].enqueued
            if len(queue.items) >= self.max_batch or waited >= self.max_delay_s or self._closing:
                self._turn = (self._turn + offset + 1) % len(self._order)
                return queue
        return None

    def _time_to_next_deadline(self) -> float | None:
        oldest = [q.items[0].enqueued for q in self._queues.values() if q.items]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self.max_delay_s - time.monotonic())

    def _take(self, queue: BatchQueue) -> list[_Item]:
        """Up to max_batch live items; dead ones are failed here, before any inference."""
        now = time.monotonic()
        taken: list[_Item] = []
        while queue.items and len(taken) < self.max_batch:
            item = queue.items.popleft()
            if item.caller.gone or item.future.cancelled():
                self._drop(queue.name, item, Cancelled("the caller cancelled"), "cancelled")
            elif item.caller.expired(now):
                self._drop(
                    queue.name, item, DeadlineExceeded("deadline passed while queued"), "deadline"
                )
            else:
                taken.append(item)
        self._observer.depth(queue.name, len(queue.items))
        return taken

    def _drop(self, queue: str, item: _Item, error: Exception, reason: str) -> None:
        self._observer.dropped(queue, reason)
        if item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)

    def _run(self, queue: BatchQueue, items: list[_Item]) -> None:
        if not items:
            return
        live = [item for item in items if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.monotonic()
        self._observer.batch_started(queue.name, len(live), [started - i.enqueued for i in live])
        try:
            results = queue.run([item.payload for item in live])
        except Exception as error:  # noqa: BLE001 - every waiting caller must hear of it
            logger.exception("%s batch of %d failed", queue.name, len(live))
            for item in live:
                item.future.set_exception(error)
            return
        finally:
            self._observer.batch_finished(queue.name, len(live), time.monotonic() - started)
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)
