"""The query embedding cache in front of the real encoder service (tiny model, random weights)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from search_service.encoders.embedder import Embedding, QueryEmbedder
from search_service.encoders.query_cache import CachingEmbedder, normalize_text
from search_service.engine import SearchEngine
from search_service.models import SearchQuery
from tests.search.conftest import random_catalog
from tests.search.encoders.test_real_encoder import jpeg
from tests.support import ServerThread, free_port
from vpm.v1 import search_pb2
from vpm_common.encoder_client.encoder_pool import EncoderPool
from vpm_common.errors import InvalidArgument, Unavailable
from vpm_common.server.deadlines import caller_deadline

TINY_DIM = 64


class CountingPool(EncoderPool):
    """The real pool, counting the encoder calls it makes (the spy on the one door out)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image_calls = 0
        self.text_calls = 0

    async def encode_images(self, items, timeout_s=None):  # noqa: ANN001, ANN201
        self.image_calls += 1
        return await super().encode_images(items, timeout_s)

    async def encode_texts(self, texts, timeout_s=None):  # noqa: ANN001, ANN201
        self.text_calls += 1
        return await super().encode_texts(texts, timeout_s)


def with_cache(
    target: str,
    work: Callable[[CachingEmbedder, QueryEmbedder, CountingPool], Awaitable[Any]],
    max_entries: int = 100,
    max_bytes: int = 1 << 20,
) -> Any:
    """Run `work(cache, uncached, pool)` on a fresh event loop: a cache and a plain embedder
    over one counting pool (whose channels belong to that loop)."""

    async def main() -> Any:
        pool = CountingPool([target], timeout_s=60)
        uncached = QueryEmbedder(pool)
        try:
            return await work(CachingEmbedder(uncached, max_entries, max_bytes), uncached, pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def assert_entry_sizes(total: int, entries: int, model_id_length: int) -> None:
    """The cache's byte count: more than the vectors and model ids it holds, and no more than
    the bound test_the_byte_estimate_is_close_to_the_memory_an_entry_takes checks."""
    per_entry = total / entries
    assert total % entries == 0
    assert TINY_DIM * 4 + model_id_length < per_entry < TINY_DIM * 4 + model_id_length + 1024


def one_entry_bytes(target: str) -> int:
    async def work(cache: CachingEmbedder, _uncached, _pool):
        await cache.embed_image(jpeg(1))
        return cache.cache_stats().bytes

    return with_cache(target, work)


class InstantEmbedder:
    """A STAND-IN for the encoders (named as one): unit vectors at once, to fill a cache
    quickly and measure the cache's own memory."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.rng = np.random.default_rng(0)

    async def next_model_id(self, field: str = "model_id") -> str:
        return "VPM-Tiny/random-seed0"

    async def embed_text(self, text: str, field: str = "text") -> Embedding:
        vector = self.rng.standard_normal(self.dim).astype(np.float32)
        return Embedding(vector / np.linalg.norm(vector), "VPM-Tiny/random-seed0")


def test_the_byte_estimate_is_close_to_the_memory_an_entry_takes() -> None:
    """tracemalloc, not the cache's own constant, is the oracle: what entries really take."""
    import gc
    import tracemalloc

    count = 4000
    cache = CachingEmbedder(InstantEmbedder(TINY_DIM), max_entries=count + 1, max_bytes=1 << 30)
    texts = [f"query number {i}" for i in range(count)]  # made before the measurement

    async def fill() -> None:
        for text in texts:
            await cache.embed_text(text)

    async def warm() -> None:  # the event loop's own first allocations, outside the measure
        await cache.embed_text("warm-up query")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(warm())
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        loop.run_until_complete(fill())
        gc.collect()
        taken = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    finally:
        loop.close()
    stats = cache.cache_stats()
    assert stats.entries == count + 1
    estimated = stats.bytes / stats.entries
    measured = taken / count
    # Never far under what an entry really takes (the bound is what keeps memory flat),
    # and not so far over that the cache holds much less than it could.
    assert 0.9 * measured <= estimated <= 1.5 * measured, (estimated, measured)


def images_encoded(encoder_app: Any) -> float:
    registry = encoder_app.engine.metrics.registry
    return registry.get_sample_value("vpm_encoder_items_total", {"kind": "image"}) or 0.0


def test_a_repeated_query_is_a_hit_identical_to_the_uncached_vector(
    real_encoder: ServerThread,
) -> None:
    async def work(cache: CachingEmbedder, uncached: QueryEmbedder, pool: CountingPool):
        first = await cache.embed_image(jpeg(1))
        again = await cache.embed_image(jpeg(1))
        other = await cache.embed_image(jpeg(2))
        calls = pool.image_calls
        reference = await uncached.embed_image(jpeg(1))
        return first, again, other, calls, reference, cache.cache_stats()

    first, again, other, calls, reference, stats = with_cache(real_encoder.target, work)
    assert calls == 2  # jpeg(1) once, jpeg(2) once
    assert again is first  # the very entry
    np.testing.assert_array_equal(first.vector, reference.vector)
    assert first.model_id == reference.model_id == "VPM-Tiny/random-seed0"
    assert not np.array_equal(first.vector, other.vector)
    assert (stats.hits, stats.misses, stats.coalesced, stats.entries) == (1, 2, 0, 2)
    assert stats.hit_ratio == pytest.approx(1 / 3)
    assert_entry_sizes(stats.bytes, 2, len(first.model_id))
    with pytest.raises(ValueError):
        first.vector[0] = 0  # shared by every hit: read-only


def test_texts_are_keyed_after_nfc_and_whitespace_but_not_case(
    real_encoder: ServerThread,
) -> None:
    async def work(cache: CachingEmbedder, uncached: QueryEmbedder, pool: CountingPool):
        cached = [
            await cache.embed_text(text)
            for text in ("white sneakers", "  white \t sneakers\n", "White sneakers")
        ]
        raw = [await uncached.embed_text(t) for t in ("  white \t sneakers\n", "White sneakers")]
        composed = await cache.embed_text("caf\u00e9 shoes")
        decomposed = await cache.embed_text("cafe\u0301 shoes")
        return cached, raw, composed, decomposed, cache.cache_stats()

    cached, raw, composed, decomposed, stats = with_cache(real_encoder.target, work)
    assert normalize_text("  white \t sneakers\n") == "white sneakers"
    assert cached[1] is cached[0]
    # What the cache encoded for the normalized text is what the model gives the raw one:
    # CLIP's tokenizer collapses whitespace itself, so the key merges nothing it tells apart.
    np.testing.assert_array_equal(cached[1].vector, raw[0].vector)
    np.testing.assert_array_equal(cached[2].vector, raw[1].vector)
    assert decomposed is composed
    assert (stats.hits, stats.misses) == (2, 3)  # case is kept: "White" is its own entry


def test_least_recently_used_goes_first_by_entries_and_by_bytes(
    real_encoder: ServerThread,
) -> None:
    async def by_entries(cache: CachingEmbedder, _uncached, pool: CountingPool):
        for seed in (1, 2, 3):
            await cache.embed_image(jpeg(seed))
        await cache.embed_image(jpeg(1))  # 1 is now the most recently used, 2 the least
        await cache.embed_image(jpeg(4))  # evicts 2
        before = pool.image_calls
        await cache.embed_image(jpeg(1))
        await cache.embed_image(jpeg(3))
        await cache.embed_image(jpeg(4))
        kept = pool.image_calls - before
        await cache.embed_image(jpeg(2))
        return kept, pool.image_calls - before, cache.cache_stats()

    kept, after_2, stats = with_cache(real_encoder.target, by_entries, max_entries=3)
    assert kept == 0 and after_2 == 1  # 1, 3 and 4 were held; 2 had gone
    assert (stats.entries, stats.evictions) == (3, 2)  # 2 went, then 1 (the least used then)

    entry = one_entry_bytes(real_encoder.target)

    async def by_bytes(cache: CachingEmbedder, _uncached, pool: CountingPool):
        for seed in (1, 2, 3):
            await cache.embed_image(jpeg(seed))
        before = pool.image_calls
        await cache.embed_image(jpeg(3))
        await cache.embed_image(jpeg(2))
        return pool.image_calls - before, cache.cache_stats()

    calls, stats = with_cache(real_encoder.target, by_bytes, max_bytes=2 * entry + entry // 2)
    assert calls == 0 and (stats.entries, stats.bytes, stats.evictions) == (2, 2 * entry, 1)


def test_a_new_model_behind_the_same_address_is_never_served_a_stale_vector(
    make_encoder: Callable[..., tuple[ServerThread, Any]],
) -> None:
    port = free_port()
    first, _ = make_encoder(port=port, seed=0)

    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        old = await cache.embed_image(jpeg(5))
        assert (await cache.embed_image(jpeg(5))) is old
        first.stop(0)
        await asyncio.to_thread(make_encoder, port=port, seed=1)
        new = await cache.embed_image(jpeg(5))
        again = await cache.embed_image(jpeg(5))
        return old, new, again, pool.image_calls, cache.cache_stats()

    old, new, again, calls, stats = with_cache(f"127.0.0.1:{port}", work)
    assert (old.model_id, new.model_id) == ("VPM-Tiny/random-seed0", "VPM-Tiny/random-seed1")
    assert not np.array_equal(old.vector, new.vector)
    assert again is new and calls == 2
    assert (stats.hits, stats.misses) == (2, 2)


def test_32_concurrent_identical_queries_make_one_encoder_call(
    make_encoder: Callable[..., tuple[ServerThread, Any]],
) -> None:
    server, app = make_encoder()
    image = jpeg(9)

    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        await cache.embed_text("warm-up")  # the pool knows the encoder's model, as when serving
        results = await asyncio.gather(
            *(cache.embed_image(image) for _ in range(32)),
            *(cache.embed_text("a red dress") for _ in range(32)),
        )
        return results, pool.image_calls, pool.text_calls - 1, cache.cache_stats()

    items_before = images_encoded(app)
    results, image_calls, text_calls, stats = with_cache(server.target, work)
    assert (image_calls, text_calls) == (1, 1)
    assert images_encoded(app) - items_before == 1  # the encoder's own count agrees
    assert all(r is results[0] for r in results[:32])
    assert all(r is results[32] for r in results[32:])
    assert stats.misses == 3 and stats.hits + stats.coalesced == 62


def test_failures_are_not_cached_and_every_waiter_gets_the_error(
    real_encoder: ServerThread,
) -> None:
    broken = b"\xff\xd8\xff but not a JPEG"

    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        await cache.embed_text("warm-up")  # the pool knows the encoder's model, as when serving
        outcomes = await asyncio.gather(
            *(cache.embed_image(broken) for _ in range(8)), return_exceptions=True
        )
        calls = pool.image_calls
        with pytest.raises(InvalidArgument):
            await cache.embed_image(broken)
        return outcomes, calls, pool.image_calls, cache.cache_stats()

    outcomes, calls, calls_after, stats = with_cache(real_encoder.target, work)
    assert calls == 1 and calls_after == 2  # shared once, then asked again: nothing cached
    assert all(isinstance(o, InvalidArgument) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 8  # one exception object per waiter
    assert outcomes[0].message.startswith("image: ")
    assert (stats.entries, stats.misses, stats.coalesced) == (1, 3, 7)  # the warm-up only


def test_a_caller_that_goes_away_leaves_the_encoding_to_the_others(
    real_encoder: ServerThread,
) -> None:
    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        leader = asyncio.ensure_future(cache.embed_image(jpeg(11)))
        while not cache._flights:  # the leader's encoder call is under way
            await asyncio.sleep(0.001)
        follower = asyncio.ensure_future(cache.embed_image(jpeg(11)))
        await asyncio.sleep(0)
        leader.cancel()
        result = await follower
        return leader.cancelled(), result, pool.image_calls, cache.cache_stats()

    cancelled, result, calls, stats = with_cache(real_encoder.target, work)
    assert cancelled and result.model_id == "VPM-Tiny/random-seed0"
    assert calls == 1 and stats.entries == 1


class CallWithDeadline:
    """A STAND-IN for a grpc ServicerContext (named as one): only its time left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def time_remaining(self) -> float:
        return self.seconds


def test_one_callers_short_deadline_does_not_cut_the_encoding_others_wait_for(
    make_encoder: Callable[..., tuple[ServerThread, Any]],
) -> None:
    # A batch that waits 600 ms to fill: longer than the first caller's 200 ms.
    server, _app = make_encoder(max_batch=8, max_delay_ms=600.0)

    async def hurried(cache: CachingEmbedder) -> Embedding:
        with caller_deadline(CallWithDeadline(0.2)):
            return await cache.embed_text("a red dress")

    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        await cache.embed_text("warm-up")  # the pool knows the encoder's model, as when serving
        first = asyncio.ensure_future(hurried(cache))
        while not cache._flights:  # the first caller's encoding is under way
            await asyncio.sleep(0.001)
        patient = await cache.embed_text("a red dress")  # joins it
        return patient, await asyncio.gather(first, return_exceptions=True), pool.text_calls

    patient, (first,), calls = with_cache(server.target, work)
    assert calls == 2  # the warm-up, then one for both
    # The first caller's own call would have ended at its deadline (gRPC cancels it there);
    # the shared encoding did not, and answered both.
    assert first is patient and patient.vector.shape == (TINY_DIM,)


def test_when_every_caller_has_gone_the_encoding_is_dropped(
    make_encoder: Callable[..., tuple[ServerThread, Any]],
) -> None:
    # An encoder slow to start a batch, so the callers leave while the image waits in it.
    server, app = make_encoder(max_batch=8, max_delay_ms=1500.0)
    metrics = app.engine.metrics

    def dropped() -> float:
        return sum(
            metrics.registry.get_sample_value(
                "vpm_encoder_dropped_total", {"kind": "image", "reason": reason}
            )
            or 0.0
            for reason in ("cancelled", "deadline")
        )

    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        await cache.embed_text("warm-up")
        encoded = images_encoded(app)
        callers = [asyncio.ensure_future(cache.embed_image(jpeg(12))) for _ in range(3)]
        done, _ = await asyncio.wait(callers, timeout=0.3)
        assert not done  # all three still wait for the one call
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        while dropped() < 1:  # the encoder drops the image when its batch comes up
            await asyncio.sleep(0.05)
        flights, encoded_after = len(cache._flights), images_encoded(app)
        again = await cache.embed_image(jpeg(12))  # nothing was left behind: a fresh miss
        return encoded, encoded_after, flights, again, pool.image_calls

    encoded, encoded_after, flights, again, calls = with_cache(server.target, work)
    assert dropped() == 1 and encoded_after == encoded  # the abandoned image never ran
    assert flights == 0 and calls == 2 and again.model_id == "VPM-Tiny/random-seed0"


def test_size_zero_disables_the_cache(real_encoder: ServerThread) -> None:
    async def work(cache: CachingEmbedder, _uncached, pool: CountingPool):
        for _ in range(3):
            await cache.embed_image(jpeg(1))
            await cache.embed_text("shoes")
        return pool.image_calls, pool.text_calls, cache.cache_stats()

    image_calls, text_calls, stats = with_cache(real_encoder.target, work, max_entries=0)
    assert (image_calls, text_calls) == (3, 3)
    assert not stats.enabled and (stats.hits, stats.misses, stats.entries) == (0, 0, 0)


def test_without_an_encoder_queries_stay_unavailable() -> None:
    async def work() -> str:
        cache = CachingEmbedder(QueryEmbedder(None), 10, 1 << 20)
        with pytest.raises(Unavailable) as caught:
            await cache.embed_text("shoes")
        return caught.value.message

    assert asyncio.run(work()).startswith("text: no encoder is configured")


def test_get_stats_and_metrics_report_the_cache_and_id_queries_skip_it(
    real_encoder: ServerThread,
    open_engine: Callable[..., SearchEngine],
    sqlite_url: str,
    start_search: Callable,
) -> None:
    engine = open_engine(sqlite_url)
    products, vectors = random_catalog(50, TINY_DIM, model_id="VPM-Tiny/random-seed0")
    engine.upsert_products(products, vectors)
    running = start_search(engine, encoders=(real_encoder.target,), query_cache_size=100)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"kind": "image"}) or 0.0

    hits, misses = (sample(f"vpm_search_query_cache_{n}_total") for n in ("hits", "misses"))
    image = search_pb2.SearchRequest(image=jpeg(3), top_k=5)
    first = running.stub.Search(image, timeout=60)
    for _ in range(3):
        assert running.stub.Search(image, timeout=60) == first
    running.stub.Search(search_pb2.SearchRequest(product_id="p1", top_k=5))
    asyncio.run(engine.search(SearchQuery(product_id="p2")))
    stats = running.stub.GetStats(search_pb2.GetStatsRequest()).query_cache
    assert stats.enabled and (stats.hits, stats.misses, stats.entries) == (3, 1, 1)
    assert (stats.max_entries, stats.max_bytes) == (100, 64 * 1024 * 1024)
    assert stats.hit_ratio == pytest.approx(0.75)
    assert_entry_sizes(stats.bytes, 1, len("VPM-Tiny/random-seed0"))
    assert sample("vpm_search_query_cache_hits_total") - hits == 3
    assert sample("vpm_search_query_cache_misses_total") - misses == 1
    assert REGISTRY.get_sample_value("vpm_search_query_cache_hit_ratio") == pytest.approx(0.75)
    with pytest.raises(grpc.RpcError) as caught:
        running.stub.Search(search_pb2.SearchRequest(image=b"GIF89a but broken"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
