"""The encoder client (vpm_common.encoder_client.encoder_pool) against FakeEncoder servers:
spread, retries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np
import pytest

from tests.search.fake_encoder import fake_vector
from tests.support import free_port
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.errors import DeadlineExceeded, Unavailable


def run_with_pool(targets: list[str], work: Callable, **options: object):
    """Run `work(pool)` on a fresh event loop; the pool's channels belong to that loop."""

    async def main():
        pool = EncoderPool(targets, **options)
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def test_calls_go_round_robin(fake_encoders: Callable) -> None:
    (a, server_a), (b, server_b) = fake_encoders(), fake_encoders()

    async def work(pool: EncoderPool):
        for i in range(10):
            [item] = await pool.encode_texts([f"text {i}"])
            np.testing.assert_allclose(
                item.vector, fake_vector(f"text {i}".encode(), 16), rtol=1e-6
            )
        return pool.targets

    assert run_with_pool([server_a.target, server_b.target], work) == [
        server_a.target,
        server_b.target,
    ]
    assert (a.calls, b.calls) == (5, 5)


def test_images_come_back_in_order_with_per_item_errors(fake_encoders: Callable) -> None:
    fake, server = fake_encoders(dim=8, model_id="m1")
    items = [("x", b"one"), ("x", b"not an image!"), ("y", b"three")]

    async def work(pool: EncoderPool):
        return await pool.encode_images(items)

    results = run_with_pool([server.target], work)
    assert [r.id for r in results] == ["x", "x", "y"]
    np.testing.assert_allclose(results[0].vector, fake_vector(b"one", 8), rtol=1e-6)
    assert (results[1].vector, results[1].code) == (None, 3)
    assert results[1].message == "image data is truncated or corrupt"
    assert {r.model_id for r in results} == {"m1"}


def test_unavailable_is_retried_on_another_target(fake_encoders: Callable) -> None:
    (a, server_a), (b, server_b) = fake_encoders(), fake_encoders()
    a.unavailable_calls = 3

    async def work(pool: EncoderPool):
        return [await pool.encode_texts(["hi"]) for _ in range(4)]

    results = run_with_pool([server_a.target, server_b.target], work, backoff_s=0.01)
    assert all(r[0].vector is not None for r in results)
    assert b.calls >= 3


def test_refused_items_are_sent_again(fake_encoders: Callable) -> None:
    fake, server = fake_encoders()
    fake.exhausted_items = 4
    items = [(str(i), b"img%d" % i) for i in range(10)]

    async def work(pool: EncoderPool):
        return await pool.encode_images(items)

    results = run_with_pool([server.target], work, backoff_s=0.01)
    assert [r.id for r in results] == [str(i) for i in range(10)]
    assert all(r.vector is not None for r in results)
    assert fake.calls == 2


def test_no_encoder_answering_is_unavailable_quickly() -> None:
    targets = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    async def work(pool: EncoderPool):
        with pytest.raises(Unavailable) as caught:
            await pool.encode_texts(["hi"])
        results = await pool.encode_images([("a", b"x")])
        return caught.value.message, results

    started = time.monotonic()
    message, results = run_with_pool(targets, work, backoff_s=0.01, timeout_s=5)
    assert time.monotonic() - started < 4
    assert message.startswith("no encoder answered (127.0.0.1:")
    assert "UNAVAILABLE" in message
    assert results[0].vector is None and results[0].code == 14


def test_deadline_is_honoured(fake_encoders: Callable) -> None:
    fake, server = fake_encoders()

    async def work(pool: EncoderPool):
        await pool.model_info()  # cached, so only the slow call remains
        fake.delay_s = 2.0
        with pytest.raises(DeadlineExceeded):
            await pool.encode_texts(["slow"], timeout_s=0.3)

    started = time.monotonic()
    run_with_pool([server.target], work)
    assert time.monotonic() - started < 1.9


def test_status_reports_each_target_and_a_returning_encoder_is_used(
    fake_encoders: Callable,
) -> None:
    live, live_server = fake_encoders(model_id="m-live")
    port = free_port()
    dead_target = f"127.0.0.1:{port}"

    async def work(pool: EncoderPool):
        first = await pool.status()
        await pool.encode_texts(["a"])
        returned, _ = fake_encoders(port=port, model_id="m-live")
        await asyncio.sleep(0.5)  # past the client's reconnect backoff
        for _ in range(6):
            await pool.encode_texts(["b"])
        second = await pool.status()
        return first, second, returned

    first, second, returned = run_with_pool([live_server.target, dead_target], work, backoff_s=0.01)
    assert [(s.target, s.state, s.model_id) for s in first] == [
        (live_server.target, "SERVING", "m-live"),
        (dead_target, "UNREACHABLE", ""),
    ]
    assert [s.state for s in second] == ["SERVING", "SERVING"]
    assert returned.calls >= 2  # traffic came back to it


def test_next_model_info_takes_no_turn_and_a_restart_with_another_model_is_seen(
    fake_encoders: Callable,
) -> None:
    (a, server_a), (b, server_b) = fake_encoders(model_id="m-a"), fake_encoders(model_id="m-b")

    async def work(pool: EncoderPool):
        peeked = []
        for i in range(6):
            peeked.append((await pool.next_model_info()).model_id)
            [item] = await pool.encode_texts([f"text {i}"])
            assert item.model_id == peeked[-1]  # the call went where the peek looked
        calls = (a.calls, b.calls)
        # b restarts on its port with another model; only a status check happens meanwhile.
        port = server_b.port
        server_b.stop(0)
        await asyncio.sleep(0.3)
        fake_encoders(port=port, model_id="m-b2")
        statuses = await pool.status()
        models = {(await pool.next_model_info()).model_id}
        await pool.encode_texts(["x"])
        models.add((await pool.next_model_info()).model_id)
        return peeked, calls, statuses, models

    peeked, calls, statuses, models = run_with_pool([server_a.target, server_b.target], work)
    assert peeked == ["m-a", "m-b"] * 3
    assert calls == (3, 3)
    assert [s.model_id for s in statuses] == ["m-a", "m-b2"]
    assert models == {"m-a", "m-b2"}


def test_each_reply_names_its_model_even_when_the_channel_stays_up(
    fake_encoders: Callable,
) -> None:
    """A rolling update behind one address: the same connection starts answering with
    another model; the vectors must be labelled with the model that made them."""
    fake, server = fake_encoders(model_id="old")

    async def work(pool: EncoderPool):
        before = await pool.encode_images([("a", b"img")])
        fake.model_id = "new"
        after = await pool.encode_images([("a", b"img")])
        [text] = await pool.encode_texts(["hello"])
        return before[0].model_id, after[0].model_id, text.model_id

    assert run_with_pool([server.target], work) == ("old", "new", "new")


def test_a_target_that_turns_to_another_model_is_left_and_its_images_go_elsewhere(
    fake_encoders: Callable,
) -> None:
    (_, server_a), (b, server_b) = fake_encoders(model_id="m1"), fake_encoders(model_id="m1")
    images = [b"img%d" % i for i in range(20)]

    async def work(pool: EncoderPool):
        info = await pool.connect(timeout_s=5)
        b.model_id = "m2"
        results = [await pool.encode_image_batch(images[i : i + 5]) for i in range(0, 20, 5)]
        return info.model_id, results, pool.spread()

    pinned, results, spread = run_with_pool([server_a.target, server_b.target], work)
    assert pinned == "m1"
    for start, encoded in zip(range(0, 20, 5), results, strict=True):
        assert encoded.errors == {} and set(encoded.model_ids) == {"m1"}
        expected = np.array([fake_vector(data, 16) for data in images[start : start + 5]])
        np.testing.assert_allclose(encoded.vectors, expected, rtol=1e-6)
    assert spread == {server_a.target: 20, server_b.target: 0}


def test_a_long_run_of_images_travels_in_requests_of_the_encoders_size(
    fake_encoders: Callable,
) -> None:
    fake, server = fake_encoders(dim=8)
    fake.max_request_images = 3
    images = [b"img%d" % i for i in range(10)] + [b"not an image, truly"]

    async def work(pool: EncoderPool):
        return await pool.encode_image_batch(images)

    encoded = run_with_pool([server.target], work)
    assert fake.batches == 4 and fake.calls == 1  # one stream, ceil(11 / 3) requests
    expected = np.array([fake_vector(data, 8) for data in images[:10]])
    np.testing.assert_allclose(encoded.vectors[:10], expected, rtol=1e-6)
    assert encoded.errors == {10: (3, "image data is truncated or corrupt")}


def test_requests_carry_one_inference_batch_not_a_whole_queue(fake_encoders: Callable) -> None:
    # An encoder admits a request whole: one as large as its queue would be refused
    # whenever anything else is in flight there.
    fake, server = fake_encoders(dim=8)
    fake.max_batch, fake.max_request_images = 2, 8
    images = [b"img%d" % i for i in range(7)]

    async def work(pool: EncoderPool):
        return await pool.encode_image_batch(images)

    encoded = run_with_pool([server.target], work)
    assert fake.batches == 4 and fake.calls == 1  # ceil(7 / 2) requests on one stream
    expected = np.array([fake_vector(data, 8) for data in images])
    np.testing.assert_allclose(encoded.vectors, expected, rtol=1e-6)


def test_requests_stay_within_the_encoders_byte_limit(fake_encoders: Callable) -> None:
    fake, server = fake_encoders(dim=8)
    fake.max_request_bytes = 64 * 1024 + 250  # the message around the images takes 64 KB
    images = [bytes([i]) * 100 for i in range(7)] + [b"x" * 1000]  # the last alone is over

    async def work(pool: EncoderPool):
        return await pool.encode_image_batch(images)

    encoded = run_with_pool([server.target], work)
    assert fake.batches == 4  # 2 + 2 + 2 + 1; the big one is never sent
    expected = np.array([fake_vector(data, 8) for data in images[:7]])
    np.testing.assert_allclose(encoded.vectors[:7], expected, rtol=1e-6)
    assert encoded.errors == {
        7: (
            3,
            "image is 1000 bytes, over the limit of 250 that a request to the encoders may carry",
        )
    }


def test_connect_refuses_encoders_that_disagree_and_expand_dns_sees_each_address(
    fake_encoders: Callable,
) -> None:
    from vpm_common.errors import FailedPrecondition

    (_, one), (_, other) = fake_encoders(model_id="m1"), fake_encoders(model_id="m2")

    async def disagree(pool: EncoderPool):
        with pytest.raises(FailedPrecondition, match="encoders disagree on the model"):
            await pool.connect(timeout_s=5)

    run_with_pool([one.target, other.target], disagree)

    async def by_address(pool: EncoderPool):
        await pool.connect(timeout_s=5)
        await pool.encode_image_batch([b"a", b"b"])
        return pool.spread()

    spread = run_with_pool([f"dns:///localhost:{one.port}"], by_address, expand_dns=True)
    assert spread[f"127.0.0.1:{one.port}"] == 2
