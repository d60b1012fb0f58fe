"""Unit tier: vector checks, filter keys and the filter index, the readers-writer lock, settings."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

from search_service.collector import full_collections_paused
from search_service.engine import INLINE_SEARCH_S, InlineSearches
from search_service.index.filters import FilterIndex, parse_filters
from search_service.index.rwlock import ReadWriteLock
from search_service.models import Product
from search_service.settings import SearchSettings
from search_service.vectors import check_model, unit_vector, unit_vectors
from vpm_common.errors import FailedPrecondition, InvalidArgument
from vpm_common.settings import SettingsError, load_settings


def test_unit_vector_normalizes_in_float32() -> None:
    vector = unit_vector([3.0, 4.0], "vector")
    assert vector.dtype == np.float32
    np.testing.assert_allclose(vector, [0.6, 0.8], rtol=1e-6)


def test_unit_vector_survives_extreme_magnitudes() -> None:
    np.testing.assert_allclose(unit_vector([1e-30, 1e-30], "v"), [2**-0.5] * 2, rtol=1e-6)
    np.testing.assert_allclose(unit_vector([3e38, 3e38], "v"), [2**-0.5] * 2, rtol=1e-6)


def test_unit_vector_agrees_with_a_float64_oracle_on_query_sized_vectors() -> None:
    rng = np.random.default_rng(5)
    for scale in (1e-30, 1.0, 1e30):
        values = (rng.standard_normal(512) * scale).astype(np.float32)
        wide = values.astype(np.float64)
        expected = (wide / np.sqrt(np.sum(wide * wide))).astype(np.float32)
        np.testing.assert_allclose(unit_vector(values, "v", 512), expected, rtol=1e-7)


@pytest.mark.parametrize(
    ("values", "dim", "message"),
    [
        ([1.0, 2.0], 3, "vector: expected 3 values (the catalog's dimension), got 2"),
        ([1.0, float("nan"), 2.0], None, "vector: value 1 is not finite (nan)"),
        ([float("inf"), 0.0], None, "vector: value 0 is not finite (inf)"),
        ([1.0, float("-inf"), float("inf")], None, "vector: value 1 is not finite (-inf)"),
        ([0.0, 0.0, 0.0], None, "vector: has zero norm"),
        ([], None, "vector: must be a non-empty list of numbers"),
    ],
)
def test_unit_vector_refusals_name_the_field(values: list, dim: int | None, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        unit_vector(values, "vector", dim)
    assert caught.value.message == message


def test_unit_vectors_matches_unit_vector_one_by_one() -> None:
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal(8) for _ in range(5)]
    rows += [[0.0] * 8, [float("nan")] * 8, rng.standard_normal(4), [1e-30] * 8]
    results = unit_vectors(rows, "vector")
    for row, result in zip(rows, results, strict=True):
        try:
            expected = unit_vector(row, "vector")
        except InvalidArgument as err:
            assert isinstance(result, InvalidArgument)
            assert result.message == err.message
        else:
            np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_check_model_refuses_another_model_or_dimension() -> None:
    check_model("m", 4, None, None)  # an empty catalog takes anything
    check_model("m", 4, "m", 4)
    with pytest.raises(FailedPrecondition, match="model_id: 'x' differs from the catalog's model"):
        check_model("x", 4, "m", 4)
    with pytest.raises(FailedPrecondition, match="vector: 3 values, but the catalog holds 4-dim"):
        check_model("m", 3, "m", 4)


def test_filter_keys_accept_styles_csv_spellings_and_attributes() -> None:
    terms = parse_filters(
        {
            "masterCategory": "Apparel",
            "baseColour": "Blue",
            "year": "2012",
            "attributes.fit": "slim",
        }
    )
    assert sorted(terms) == [
        ("attributes.fit", "slim"),
        ("base_colour", "Blue"),
        ("master_category", "Apparel"),
        ("year", "2012"),
    ]


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"colour": "Blue"}, "filters: unknown key 'colour'; use one of id, name, gender"),
        ({"attributes.": "x"}, "filters: key 'attributes.' needs an attribute name after the dot"),
        ({"year": "recent"}, "filters: 'year' must be an integer, got 'recent'"),
    ],
)
def test_bad_filter_keys_name_the_key(filters: dict, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filters(filters)
    assert caught.value.message.startswith(message)


def test_filter_index_matches_all_terms_and_forgets_removed_keys() -> None:
    index = FilterIndex()
    products = [
        Product(id="a", gender="Men", year=2012, attributes={"fit": "slim"}),
        Product(id="b", gender="Men", year=2013),
        Product(id="c", gender="Women", year=2012, attributes={"fit": "slim"}),
    ]
    keys = np.array([3, 7, 9])
    index.put(keys, index.encode(products))
    assert index.matching([("gender", "Men")]).tolist() == [3, 7]
    assert index.matching([("year", "2012"), ("attributes.fit", "slim")]).tolist() == [3, 9]
    assert index.matching([("id", "b")]).tolist() == [7]
    assert index.matching([("gender", "Kids")]).tolist() == []
    # Replacing a product drops the attributes it no longer has.
    index.put(np.array([3]), index.encode([Product(id="a", gender="Women")]))
    assert index.matching([("attributes.fit", "slim")]).tolist() == [9]
    index.remove(np.array([9]))
    assert index.matching([("gender", "Women")]).tolist() == [3]


def test_rwlock_lets_readers_share_and_writers_exclude() -> None:
    lock = ReadWriteLock()
    inside: list[str] = []
    events: list[tuple[str, int]] = []

    def reader(n: int) -> None:
        with lock.read():
            inside.append("r")
            events.append(("r", len([x for x in inside if x == "r"])))
            time.sleep(0.05)
            inside.remove("r")

    def writer() -> None:
        with lock.write():
            events.append(("w", len(inside)))
            time.sleep(0.02)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(count for kind, count in events if kind == "r") > 1  # readers overlapped
    assert all(count == 0 for kind, count in events if kind == "w")  # the writer was alone


def test_rwlock_gives_a_read_slot_without_waiting_only_when_one_is_free() -> None:
    lock = ReadWriteLock()
    writing, leave = threading.Event(), threading.Event()

    def writer() -> None:
        with lock.write():
            writing.set()
            leave.wait(5)

    thread = threading.Thread(target=writer)
    with lock.read_if_free() as free:
        assert free
        thread.start()
        assert not writing.wait(0.2)  # a reader holds the lock: the writer waits
        with lock.read_if_free() as second:
            assert not second  # and while a writer waits, no new slot is free
    assert writing.wait(5)  # the slot given back, the writer goes in
    started = time.monotonic()
    with lock.read_if_free() as free:
        assert not free and time.monotonic() - started < 0.1  # refused at once
    leave.set()
    thread.join()
    with lock.read_if_free() as free:
        assert free


def test_searches_leave_the_event_loop_once_slow_and_come_back_when_probes_are_fast() -> None:
    choice = InlineSearches()
    assert choice.wanted()  # nothing measured yet: on the loop

    def slow() -> None:
        time.sleep(2 * INLINE_SEARCH_S)

    choice.run(slow)  # one slow search (cold caches, say) moves nothing
    assert choice.wanted()
    for _ in range(InlineSearches.RECENT):
        choice.run(lambda: None)
    choice.run(slow)  # nor does one among fast ones
    assert choice.wanted()
    for _ in range(InlineSearches.RECENT // 2 + 1):  # a run of slow ones does
        choice.run(slow)
    picks = [choice.wanted() for _ in range(3 * InlineSearches.PROBE_EVERY)]
    probes = [n for n, pick in enumerate(picks) if pick]  # one in PROBE_EVERY
    assert len(probes) == 3 and list(np.diff(probes)) == [InlineSearches.PROBE_EVERY] * 2
    while not all(choice.wanted() for _ in range(3)):  # fast probes bring it back
        choice.run(lambda: None)
    assert choice.median < INLINE_SEARCH_S


def test_cache_and_catch_up_settings_come_from_flags_or_variables_and_name_the_key() -> None:
    environ = {"VPM_SEARCH_QUERY_CACHE_SIZE": "0", "VPM_SEARCH_CATCH_UP_INTERVAL_S": "0.25"}
    settings = load_settings(SearchSettings, "VPM_SEARCH_", ["--catalog-pool-size=3"], environ)
    assert (settings.query_cache_size, settings.catch_up_interval_s) == (0, 0.25)
    assert settings.catalog_pool_size == 3 and settings.deletions_retention_days == 7.0
    for flag, message in [
        ("--query-cache-size=-1", "--query-cache-size / VPM_SEARCH_QUERY_CACHE_SIZE: must not"),
        ("--catch-up-interval-s=-1", "--catch-up-interval-s / VPM_SEARCH_CATCH_UP_INTERVAL_S:"),
        ("--catalog-pool-size=0", "--catalog-pool-size / VPM_SEARCH_CATALOG_POOL_SIZE: must be 1"),
        ("--deletions-retention-days=-2", "--deletions-retention-days / VPM_SEARCH_DELETIONS"),
    ]:
        with pytest.raises(SettingsError) as caught:
            load_settings(SearchSettings, "VPM_SEARCH_", [flag], {})
        assert str(caught.value).startswith(message), flag


def test_full_collections_pause_until_the_last_holder_leaves() -> None:
    before = gc.get_threshold()
    first_in, second_out = threading.Event(), threading.Event()
    seen = []

    def other() -> None:
        with full_collections_paused():
            first_in.set()
            second_out.wait(5)
            seen.append(gc.get_threshold())

    thread = threading.Thread(target=other)
    with pytest.raises(RuntimeError), full_collections_paused():
        thread.start()
        first_in.wait(5)
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**6
        raise RuntimeError("the body's error goes through")
    assert gc.get_threshold()[2] > 10**6  # the other holder is still inside
    second_out.set()
    thread.join(5)
    assert seen[0][2] > 10**6 and gc.get_threshold() == before


def test_while_paused_young_collections_free_cycles_and_no_full_collection_runs() -> None:
    """What a stream of minutes needs: cyclic garbage made meanwhile is still freed."""
    generations: list[int] = []

    def heard(phase: str, info: dict) -> None:
        if phase == "stop":
            generations.append(info["generation"])

    class Node:
        pass

    gc.collect()
    freed = []
    gc.callbacks.append(heard)
    try:
        with full_collections_paused():
            kept = [[] for _ in range(200_000)]  # long-lived containers, as a bulk upsert's
            for n in range(50_000):  # cycles, each garbage at once
                a, b = Node(), Node()
                a.other, b.other = b, a
                if n % 1000 == 0:
                    weakref.finalize(a, freed.append, n)
                del a, b
    finally:
        gc.callbacks.remove(heard)
    assert 0 in generations and 2 not in generations
    assert len(freed) >= 45  # of 50 watched cycles: all but those made since the last one
    del kept
