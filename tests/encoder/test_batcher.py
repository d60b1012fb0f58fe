"""Domain tier: the dynamic batcher forms batches, honours delays, drops the departed."""

from __future__ import annotations

import threading
import time

import pytest

from encoder_service.batcher import BatchQueue, Caller, DynamicBatcher
from vpm_common.errors import Cancelled, DeadlineExceeded, Unavailable


class Recorder:
    """A batch function that remembers every batch it ran and can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def __call__(self, payloads: list[int]) -> list[int]:
        self.running.set()
        self.gate.wait(10)
        self.batches.append(list(payloads))
        return [p * 10 for p in payloads]


def make(recorder: Recorder, max_batch: int = 4, delay: float = 0.05) -> DynamicBatcher:
    return DynamicBatcher([BatchQueue("image", recorder)], max_batch=max_batch, max_delay_s=delay)


def test_items_queued_while_a_batch_runs_form_full_batches() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=4)
    recorder.gate.clear()
    first = batcher.submit("image", [0], Caller())
    assert recorder.running.wait(5)
    futures = [batcher.submit("image", [i], Caller()) for i in range(1, 10)]
    recorder.gate.set()
    assert [f.result(5) for f in [first, *futures]] == [[i * 10] for i in range(10)]
    assert [len(b) for b in recorder.batches] == [1, 4, 4, 1]
    batcher.close()


def test_a_lone_item_waits_about_max_delay_then_runs_alone() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=8, delay=0.2)
    started = time.monotonic()
    assert batcher.submit("image", [7], Caller()).result(5) == [70]
    assert 0.15 <= time.monotonic() - started < 2
    assert recorder.batches == [[7]]
    batcher.close()


def test_departed_and_expired_callers_are_dropped_before_inference() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=8, delay=0.01)
    recorder.gate.clear()
    blocker = batcher.submit("image", [0], Caller())
    assert recorder.running.wait(5)
    gone, expired, alive = Caller(), Caller(deadline=time.monotonic() + 0.05), Caller()
    gone_future = batcher.submit("image", [1], gone)
    expired_future = batcher.submit("image", [2], expired)
    alive_future = batcher.submit("image", [3], alive)
    gone.gone = True
    time.sleep(0.1)
    recorder.gate.set()
    assert blocker.result(5) == [0]
    assert alive_future.result(5) == [30]
    with pytest.raises(Cancelled):
        gone_future.result(5)
    with pytest.raises(DeadlineExceeded):
        expired_future.result(5)
    assert recorder.batches == [[0], [3]]
    batcher.close()


def test_a_failing_batch_fails_each_of_its_items_and_the_batcher_goes_on() -> None:
    calls = []

    def flaky(payloads: list[int]) -> list[int]:
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return payloads

    batcher = DynamicBatcher([BatchQueue("image", flaky)], max_batch=2, max_delay_s=0.01)
    with pytest.raises(RuntimeError):
        batcher.submit("image", [1], Caller()).result(5)
    assert batcher.submit("image", [2], Caller()).result(5) == [2]
    batcher.close()


def test_queues_take_turns() -> None:
    order: list[str] = []
    gate = threading.Event()

    def runner(name: str):  # noqa: ANN202
        def run(payloads: list[int]) -> list[int]:
            gate.wait(5)
            order.append(name)
            return payloads

        return run

    batcher = DynamicBatcher(
        [BatchQueue("image", runner("image")), BatchQueue("text", runner("text"))],
        max_batch=1,
        max_delay_s=0.0,
    )
    futures = [batcher.submit("image", [i], Caller()) for i in range(3)]
    futures += [batcher.submit("text", [i], Caller()) for i in range(3)]
    gate.set()
    for future in futures:
        future.result(5)
    # The first image batch may start before any text arrives; after that they alternate.
    assert order[1:5] in (["text", "image", "text", "image"], ["image", "text", "image", "text"])
    batcher.close()


def test_close_drains_queued_work_then_refuses_new_work() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=2, delay=1.0)
    futures = [batcher.submit("image", [i], Caller()) for i in range(3)]
    batcher.close(drain=True)
    assert [f.result(0) for f in futures] == [[0], [10], [20]]
    with pytest.raises(Unavailable):
        batcher.submit("image", [9], Caller())


def test_a_request_fills_batches_and_spans_them_and_each_caller_gets_its_rows() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=4, delay=0.01)
    recorder.gate.clear()
    blocker = batcher.submit("image", [0], Caller())
    assert recorder.running.wait(5)
    big = batcher.submit("image", list(range(1, 7)), Caller())  # 6 payloads: spans batches
    small = batcher.submit("image", [7, 8], Caller())
    recorder.gate.set()
    assert blocker.result(5) == [0]
    assert big.result(5) == [10, 20, 30, 40, 50, 60]
    assert small.result(5) == [70, 80]
    # Whole requests while they fit, the one that does not split: never over max_batch.
    assert recorder.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    batcher.close()


def test_a_request_whose_caller_leaves_between_its_batches_is_dropped_whole() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch=2, delay=0.01)
    recorder.gate.clear()
    caller = Caller()
    request = batcher.submit("image", [1, 2, 3, 4], caller)
    assert recorder.running.wait(5)  # the first two are in a batch
    caller.gone = True
    recorder.gate.set()
    with pytest.raises(Cancelled):
        request.result(5)
    assert recorder.batches == [[1, 2]]
    batcher.close()


def test_a_batch_answered_later_by_a_future_reaches_its_requests() -> None:
    """The device path launches a batch and answers from another thread."""
    from concurrent.futures import Future, ThreadPoolExecutor

    finisher = ThreadPoolExecutor(1)

    def launch(payloads: list[int]) -> Future:
        return finisher.submit(lambda: [p + 100 for p in payloads])

    batcher = DynamicBatcher([BatchQueue("image", launch)], max_batch=3, max_delay_s=0.05)
    requests = [batcher.submit("image", [i, i + 1], Caller()) for i in (0, 10, 20)]
    assert [r.result(5) for r in requests] == [[100, 101], [110, 111], [120, 121]]
    batcher.close()
    finisher.shutdown()
