"""Domain tier: engines sharing one catalog, as processes do, keep in step by its change log."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from search_service.engine import SearchEngine
from search_service.upkeep import catch_up_every, checkpoint_when_quiet, prune_every
from tests.search.conftest import random_catalog
from vpm_common.errors import NotFound

OpenEngine = Callable[..., SearchEngine]
DAY_S = 86400


def ids(result) -> list[str]:  # noqa: ANN001 - a SearchResult
    return [match.product.id for match in result.matches]


def test_changes_through_one_engine_reach_the_other_by_the_change_log(
    catalog_url: str, open_engine: OpenEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    products, vectors = random_catalog(500, 16)
    a = open_engine(catalog_url, tmp_path / "a")
    b = open_engine(catalog_url, tmp_path / "b")
    caplog.set_level(logging.INFO)
    a.upsert_products(products[:400], vectors[:400])
    done = b.catch_up()
    assert (done.since, done.version, done.changed, done.deleted) == (0, 1, 400, 0)
    assert not done.rebuilt and b.mirror.model_id == "test-model" and b.mirror.dim == 16
    assert ids(b.search_vector(product_id="p7", top_k=1)) == ids(a.search_vector(vectors[7]))[1:2]

    # Both write; each brings in only what the other did since its own version.
    b.upsert_products([dataclasses.replace(products[3], name="renamed")], [-vectors[3]])
    a.upsert_products(products[400:], vectors[400:])
    b.delete(["p5", "p450"])
    assert a.catch_up().version == b.catch_up().version == 4
    for engine in (a, b):
        assert engine.mirror.agrees() and len(engine.mirror.records) == 498
        assert engine.get("p3")[0].name == "renamed"
        assert ids(engine.search_vector(-vectors[3], top_k=1)) == ["p3"]
        with pytest.raises(NotFound):
            engine.get("p450")
    assert a.index_keys().tolist() == b.index_keys().tolist()
    assert a.catch_up().changed == 0  # nothing new: nothing read but the state row
    assert "building the" not in caplog.text


def test_an_emptied_catalog_s_new_model_reaches_the_other_engine(
    catalog_url: str, open_engine: OpenEngine, tmp_path: Path
) -> None:
    old, old_vectors = random_catalog(30, 8, model_id="old-model")
    a = open_engine(catalog_url, tmp_path / "a")
    b = open_engine(catalog_url, tmp_path / "b")
    a.upsert_products(old, old_vectors)
    b.catch_up()
    a.delete([p.id for p in old])
    new, new_vectors = random_catalog(30, 12, model_id="new-model", prefix="n")
    a.upsert_products(new, new_vectors)
    b.catch_up()
    assert (b.mirror.model_id, b.mirror.dim, len(b.mirror.records)) == ("new-model", 12, 30)
    result = b.search_vector(new_vectors[4], top_k=1)
    assert ids(result) == ["n4"] and result.model_id == "new-model"


def test_rows_of_a_model_taken_after_the_state_was_read_wait_for_the_next_round(
    catalog_url: str, open_engine: OpenEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a catch-up must survive: the catalog is emptied and takes another model of
    another dimension between its read of the state row and its read of the products."""
    old, old_vectors = random_catalog(20, 8, model_id="old-model")
    a = open_engine(catalog_url, tmp_path / "a")
    b = open_engine(catalog_url, tmp_path / "b")
    a.upsert_products(old, old_vectors)
    b.catch_up()
    a.delete([p.id for p in old[:10]])
    stale = a.catalog.state()  # what b reads first...
    a.delete([p.id for p in old[10:]])  # ...before the catalog changes model under it
    new, new_vectors = random_catalog(20, 12, model_id="new-model", prefix="n")
    a.upsert_products(new, new_vectors)
    real_state = b.catalog.state
    calls = iter([stale])
    monkeypatch.setattr(b.catalog, "state", lambda: next(calls, None) or real_state())
    first = b.catch_up()  # deletions are read as they are now: all 20 are logged
    assert (first.version, first.changed, first.deleted) == (stale.version, 0, 20)
    assert (b.mirror.model_id, b.mirror.dim, len(b.mirror.records)) == ("old-model", 8, 0)
    second = b.catch_up()
    assert (second.changed, second.deleted) == (20, 10)
    assert (b.mirror.model_id, b.mirror.dim, len(b.mirror.records)) == ("new-model", 12, 20)
    assert ids(b.search_vector(new_vectors[7], top_k=1)) == ["n7"]


def age_deletions(engine: SearchEngine, days: float) -> None:
    """Make every logged deletion `days` old."""
    with engine.catalog.engine.begin() as conn:
        then = int(time.time() - days * DAY_S)
        conn.execute(sa.text("UPDATE deletions SET deleted_at = :t"), {"t": then})


def test_an_engine_or_snapshot_behind_the_pruned_log_rebuilds(
    catalog_url: str, open_engine: OpenEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    products, vectors = random_catalog(300, 8)
    a = open_engine(catalog_url, tmp_path / "a")
    a.upsert_products(products, vectors)
    b = open_engine(catalog_url, tmp_path / "b")
    assert b.save_snapshot()  # at version 1
    a.delete(["p1", "p2"])
    b.catch_up()
    assert a.prune_deletions(7 * DAY_S) == 0  # fresh deletions stay
    a.delete(["p3"])  # version 3, which b has not read
    age_deletions(a, 8)
    assert a.prune_deletions(7 * DAY_S) == 3
    caplog.set_level(logging.INFO)

    done = b.catch_up()  # at version 2, behind the log pruned through 3
    assert done.rebuilt and done.version == 3
    assert "behind the deletions log kept (pruned through version 3)" in caplog.text
    assert b.mirror.agrees() and len(b.mirror.records) == 297
    with pytest.raises(NotFound):
        b.get("p3")

    restarted = open_engine(catalog_url, tmp_path / "b")  # its snapshot is at version 1
    assert "older than the deletions log kept (pruned through version 3): rebuilding" in (
        caplog.text
    )
    assert restarted.mirror.snapshot_loaded is None and len(restarted.mirror.records) == 297


def test_upkeep_loops_catch_up_and_prune_until_cancelled(
    sqlite_url: str, open_engine: OpenEngine, tmp_path: Path
) -> None:
    products, vectors = random_catalog(50, 8)
    a = open_engine(sqlite_url, tmp_path / "a")
    b = open_engine(sqlite_url, tmp_path / "b")

    async def run() -> tuple[float, int]:
        follow = asyncio.create_task(catch_up_every(b, 0.05))
        prune = asyncio.create_task(prune_every(a, 7, interval_s=0.05))
        try:
            started = time.monotonic()
            await asyncio.to_thread(a.upsert_products, products, vectors)
            while len(b.mirror.records) < 50:
                await asyncio.sleep(0.01)
            seen_after = time.monotonic() - started
            await asyncio.to_thread(a.delete, ["p1"])
            age_deletions(a, 30)
            while a.catalog.state().pruned_version < 2:
                await asyncio.sleep(0.01)
            return seen_after, b.mirror.version
        finally:
            follow.cancel()
            prune.cancel()

    seen_after, version = asyncio.run(asyncio.wait_for(run(), 30))
    assert seen_after < 2 and version >= 1


def test_upkeep_checkpoints_a_sqlite_catalog_once_writes_pause(
    sqlite_url: str, open_engine: OpenEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = open_engine(sqlite_url)
    database = tmp_path / "catalog.db"
    caplog.set_level(logging.DEBUG, logger="search_service.upkeep")

    async def run() -> list[int]:
        checkpoints = asyncio.create_task(checkpoint_when_quiet(engine, 0.3))
        try:
            sizes = []
            for start in range(0, 600, 50):  # a write every ~0.05 s, past two quiet checks
                products, vectors = random_catalog(50, 256, seed=start, prefix=f"b{start}-")
                await asyncio.to_thread(engine.upsert_products, products, vectors)
                sizes.append(database.stat().st_size)
                await asyncio.sleep(0.05)
            while "checkpointed the catalog at" not in caplog.text:  # done, not just begun
                await asyncio.sleep(0.02)
            sizes.append(database.stat().st_size)
            return sizes
        finally:
            checkpoints.cancel()

    sizes = asyncio.run(asyncio.wait_for(run(), 30))
    assert len(set(sizes[:-1])) == 1  # nothing copied while the writes went on
    assert sizes[-1] > sizes[0] + 600 * 256 * 4  # then every row
    assert "checkpointed the catalog at version 12" in caplog.text


def test_upkeep_has_nothing_to_checkpoint_on_postgresql(
    postgres_catalog_url: str, open_engine: OpenEngine
) -> None:
    engine = open_engine(postgres_catalog_url)
    asyncio.run(asyncio.wait_for(checkpoint_when_quiet(engine, 0.01), 5))  # returns at once


def test_catch_up_waits_while_the_engine_s_own_upsert_runs_and_misses_nothing(
    catalog_url: str, open_engine: OpenEngine, tmp_path: Path
) -> None:
    """A's upsert pauses between its batches while B writes; a catch-up meanwhile reads
    nothing (A's own commits come through its applies), yet A ends with B's writes too:
    its next apply finds B's version in between and catches up then."""
    from search_service.models import VectorBatch

    products, vectors = random_catalog(300, 16)
    a = open_engine(catalog_url, tmp_path / "a", batch_size=100)
    b = open_engine(catalog_url, tmp_path / "b")
    reads: list[int] = []
    products_of = a.catalog.products

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a spy on catalog reads
        reads.append(1)
        return products_of(*args, **kwargs)

    a.catalog.products = counting
    paused = asyncio.Event()
    go_on = asyncio.Event()

    async def batches():
        yield VectorBatch(products[:100], vectors[:100])
        paused.set()
        await go_on.wait()
        yield VectorBatch(products[100:200], vectors[100:200])

    async def run() -> tuple:
        upsert = asyncio.ensure_future(a.upsert(batches()))
        await paused.wait()
        await asyncio.sleep(0.2)  # A's first batch is committed (and maybe applied)
        await asyncio.to_thread(b.upsert_products, products[200:], vectors[200:])
        before = len(reads)
        during = await asyncio.to_thread(a.catch_up)
        read_during = len(reads) - before
        go_on.set()
        summary = await upsert
        return during, read_during, summary

    during, read_during, summary = asyncio.run(asyncio.wait_for(run(), 30))
    assert during.since == during.version and read_during == 0  # nothing read meanwhile
    assert summary.inserted == 200
    a.catch_up()
    b.catch_up()
    assert a.mirror.agrees() and len(a.mirror.records) == 300
    assert a.index_keys().tolist() == b.index_keys().tolist()
