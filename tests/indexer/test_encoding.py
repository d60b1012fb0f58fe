"""In-process tier: the indexer's file encoder against real encoder servers (tiny model)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from indexer.encoding import EncodingError, FileEncoder, Job, Jobs, Outcome
from tests import images
from tests.support import free_port
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.encoder_client.targets import expand, split_targets


def make_jobs(count: int) -> list[Job]:
    return [Job(str(index), images.jpeg(160, 120, seed=index)) for index in range(count)]


def encode(
    targets: list[str], jobs: list[Job], on_each=None, **options
) -> tuple[dict[str, Outcome], dict]:
    outcomes: dict[str, Outcome] = {}

    async def main() -> dict:
        pool = EncoderPool(targets, expand_dns=True)
        encoder = FileEncoder(pool, **options)
        try:
            await encoder.connect(timeout_s=5)

            async def done(outcome: Outcome) -> None:
                outcomes[outcome.job.key] = outcome
                if on_each:
                    await on_each(len(outcomes))

            await encoder.encode(jobs, done)
            return encoder.spread()
        finally:
            await pool.close()

    return outcomes, asyncio.run(main())


def test_two_encoders_share_the_work_and_bad_files_fail_alone(make_encoder) -> None:
    first, _ = make_encoder()
    second, _ = make_encoder()
    jobs = make_jobs(60)
    jobs.append(Job("bad", b"not a jpeg"))
    outcomes, spread = encode([first.target, second.target], jobs, window=4)
    assert len(outcomes) == 61
    assert "not a recognized image" in outcomes["bad"].error
    for index in range(60):
        vector = outcomes[str(index)].vector
        assert vector is not None and vector.shape == (64,)
    assert min(spread.values()) >= 10, spread  # both took a real share


def test_an_image_too_large_for_any_request_fails_alone_and_the_run_goes_on(make_encoder) -> None:
    # A real encoder refuses a message over its request limit (32 MB at least) as a whole:
    # sent, this image would fail every image of its stream, at every try, until the run stalled.
    encoder, _ = make_encoder()
    jobs = make_jobs(10)
    jobs.insert(5, Job("huge", b"\xff\xd8" + bytes(33 * 1024 * 1024)))
    outcomes, _spread = encode([encoder.target], jobs, window=4, stall_s=5)
    assert outcomes["huge"].error.startswith(f"image is {len(jobs[5].data)} bytes, over the limit")
    assert all(outcomes[str(index)].vector is not None for index in range(10))


def test_an_unreachable_encoder_is_worked_around(make_encoder) -> None:
    live, _ = make_encoder()
    dead = f"127.0.0.1:{free_port()}"
    outcomes, spread = encode([dead, live.target], make_jobs(20))
    assert all(outcome.vector is not None for outcome in outcomes.values()) and len(outcomes) == 20
    assert spread == {dead: 0, live.target: 20}


def test_an_encoder_that_dies_mid_run_loses_nothing(make_encoder) -> None:
    doomed, _ = make_encoder(max_delay_ms=30.0)
    survivor, _ = make_encoder(max_delay_ms=30.0)
    jobs = make_jobs(120)

    async def kill_after_some(done_count: int) -> None:
        if done_count == 30:
            await asyncio.to_thread(doomed.stop, 0)

    outcomes, spread = encode(
        [doomed.target, survivor.target], jobs, on_each=kill_after_some, window=8
    )
    assert len(outcomes) == 120
    assert all(outcome.vector is not None for outcome in outcomes.values()), {
        k: o.error for k, o in outcomes.items() if o.error
    }
    assert spread[survivor.target] > 60
    # The same image gives the same vector whichever encoder took it.
    reference, _ = encode([survivor.target], jobs[:5])
    for key in map(str, range(5)):
        np.testing.assert_allclose(outcomes[key].vector, reference[key].vector, atol=1e-5)


def test_encoders_of_different_models_are_refused(make_encoder) -> None:
    one, _ = make_encoder(seed=0)
    other, _ = make_encoder(seed=1)
    with pytest.raises(EncodingError, match="encoders disagree on the model"):
        encode([one.target, other.target], [])


def test_no_encoder_at_all_is_a_clear_error() -> None:
    with pytest.raises(EncodingError, match="no encoder answered within 5 s"):
        encode([f"127.0.0.1:{free_port()}"], [])


def test_a_dns_target_streams_to_every_address_it_resolves_to(make_encoder) -> None:
    live, _ = make_encoder()
    port = live.target.rsplit(":", 1)[1]
    assert "127.0.0.1:" + port in expand(f"dns:///localhost:{port}")
    outcomes, spread = encode([f"dns:///localhost:{port}"], make_jobs(10))
    assert len(outcomes) == 10 and spread[f"127.0.0.1:{port}"] == 10


def test_target_lists_are_parsed_and_bad_names_are_clear() -> None:
    assert split_targets(" a:1, ,b:2,") == ["a:1", "b:2"]
    assert expand("host:50051") == ["host:50051"]
    with pytest.raises(ValueError, match="expected dns:///name:port"):
        expand("dns:///no-port")
    with pytest.raises(ValueError, match="cannot resolve no-such-host.invalid"):
        expand("dns:///no-such-host.invalid:50051")


def test_when_every_encoder_is_gone_for_stall_s_the_run_stops_with_the_reason(
    make_encoder,
) -> None:
    doomed, _ = make_encoder()
    jobs = make_jobs(40)
    done: list[int] = []

    async def kill_after_some(done_count: int) -> None:
        done.append(done_count)
        if done_count == 4:
            await asyncio.to_thread(doomed.stop, 0)

    started = time.monotonic()
    with pytest.raises(EncodingError, match=r"no encoder answered for \d+ s"):
        encode([doomed.target], jobs, on_each=kill_after_some, window=4, stall_s=1.5)
    assert time.monotonic() - started < 20
    assert 4 <= max(done) < 40  # what was answered was reported; the rest was not


def test_the_stall_clock_starts_at_the_first_unanswered_request_not_at_the_start(
    make_encoder,
) -> None:
    """As a run that hashes unchanged files for longer than --stall-s, then meets an encoder
    restarting: it waits the encoder out rather than giving up at its first refusal."""
    port = free_port()
    jobs = Jobs()
    outcomes: list[Outcome] = []
    restarted: list = []

    async def main() -> None:
        first, _ = make_encoder(port=port)
        pool = EncoderPool([first.target])
        encoder = FileEncoder(pool, stall_s=5)
        try:
            await encoder.connect(timeout_s=5)

            async def produce() -> None:
                await asyncio.sleep(6)  # hashing unchanged files: longer than stall_s
                await asyncio.to_thread(first.stop, 0)
                jobs.put(make_jobs(1)[0])
                jobs.close()
                await asyncio.sleep(1)  # then the encoder is back, within stall_s
                restarted.append(await asyncio.to_thread(make_encoder, port=port))

            producer = asyncio.create_task(produce())
            await encoder.encode(jobs, lambda outcome: _append(outcomes, outcome))
            await producer
        finally:
            await pool.close()

    asyncio.run(main())
    assert restarted and [outcome.error for outcome in outcomes] == [""]


async def _append(outcomes: list[Outcome], outcome: Outcome) -> None:
    outcomes.append(outcome)


def test_a_producer_waits_for_room_and_goes_on_as_jobs_are_taken() -> None:
    async def main() -> list[str]:
        jobs = Jobs(limit=3)
        events: list[str] = []

        async def produce() -> None:
            for job in make_jobs(7):
                await jobs.room()
                jobs.put(job)
                events.append(f"put {job.key}")
            jobs.close()

        producer = asyncio.create_task(produce())
        await asyncio.sleep(0.05)
        events.append("take")  # the producer stopped at the limit, three jobs queued
        taken = [job.key for job in await jobs.take(2)]
        await asyncio.sleep(0.05)
        while more := await jobs.take(2):
            taken += [job.key for job in more]
        await producer
        assert taken == [str(index) for index in range(7)]
        return events

    events = asyncio.run(main())
    assert events[:5] == ["put 0", "put 1", "put 2", "take", "put 3"]
    assert events[5] == "put 4"
