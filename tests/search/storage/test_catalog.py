"""Domain tier: the SQL catalog, run against both SQLite and the machine's PostgreSQL."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command

from search_service.migrate import alembic_config, upgrade_to_head
from search_service.models import Product
from search_service.storage import catalog as catalog_module
from search_service.storage.catalog import Catalog, create_catalog_engine
from tests.search.conftest import random_catalog
from vpm_common.errors import Unavailable

OpenCatalog = Callable[[str], Catalog]


def pairs(products: list[Product], vectors: np.ndarray) -> list[tuple[Product, np.ndarray]]:
    return list(zip(products, vectors, strict=True))


def test_migrations_create_the_schema_once(catalog_url: str, open_catalog: OpenCatalog) -> None:
    catalog = open_catalog(catalog_url)
    assert upgrade_to_head(catalog.engine) == "0004"  # already there: nothing to do
    inspector = sa.inspect(catalog.engine)
    assert {"products", "deletions", "catalog_state", "alembic_version"} <= set(
        inspector.get_table_names()
    )
    # Only what the service reads by is indexed: the version (catch-up) and the id (unique;
    # PostgreSQL lists its constraint's index); filters run in memory.
    indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes("products")}
    assert ("version",) in indexed and indexed <= {("version",), ("product_id",)}
    logged = {tuple(ix["column_names"]) for ix in inspector.get_indexes("deletions")}
    assert {("version",), ("deleted_at",)} <= logged
    state = catalog.state()
    assert state.version == 0 and state.model_id is None and len(state.catalog_id) == 36
    assert state.pruned_version == 0


def test_a_catalog_of_revision_0001_upgrades_and_keeps_its_deletions(catalog_url: str) -> None:
    """Deletions logged before retention existed count as deleted at the upgrade: none is
    pruned early."""
    engine = create_catalog_engine(catalog_url)
    config = alembic_config()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO deletions VALUES (7, 'p7', 3)"))
    before = time.time()
    assert upgrade_to_head(engine) == "0004"
    # 0001 made nine filter-column indexes; 0003 drops them, and keeps the version's.
    indexed = {tuple(ix["column_names"]) for ix in sa.inspect(engine).get_indexes("products")}
    assert ("version",) in indexed and indexed <= {("version",), ("product_id",)}
    with engine.connect() as conn:
        deleted_at = conn.execute(sa.text("SELECT deleted_at FROM deletions")).scalar_one()
    assert before - 5 <= deleted_at <= time.time() + 5
    engine.dispose()
    catalog = Catalog.open(catalog_url)
    assert catalog.state().pruned_version == 0 and catalog.deleted_since(0).tolist() == [7]
    catalog.close()


def test_deletions_older_than_the_retention_are_pruned(
    catalog_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(10, 4)
    catalog.upsert(pairs(products, vectors))  # version 1
    catalog.delete(["p1", "p2"])  # version 2
    catalog.delete(["p3"])  # version 3
    with catalog.engine.begin() as conn:  # the first two deletions happened long ago
        conn.execute(sa.text("UPDATE deletions SET deleted_at = 1000 WHERE version = 2"))
    catalog.delete(["p4"])  # version 4, now
    assert catalog.prune_deletions(before=5000) == (2, 2)
    assert catalog.state().pruned_version == 2
    assert sorted(catalog.deleted_since(0).tolist()) == sorted(catalog.deleted_since(2).tolist())
    assert len(catalog.deleted_since(2)) == 2
    assert catalog.prune_deletions(before=5000) == (0, 2)  # nothing more that old
    assert catalog.prune_deletions(before=time.time() + 60) == (2, 4)
    assert catalog.state().pruned_version == 4 and catalog.state().version == 4
    assert catalog.deleted_since(0).tolist() == []


def test_upsert_classifies_and_stores_exact_vectors(
    catalog_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(300, 8)
    first = catalog.upsert(pairs(products, vectors))
    assert [o.kind for o in first.outcomes] == ["inserted"] * 300
    assert first.version == 1 and first.model_id == "test-model" and first.dim == 8
    keys = [o.key for o in first.outcomes]
    assert len(set(keys)) == 300

    changed = [
        (products[0], vectors[0]),  # the same: unchanged
        (dataclasses.replace(products[1], name="New name"), vectors[1]),  # metadata only
        (products[2], -vectors[2]),  # vector
        (products[3], vectors[3]),
    ]
    second = catalog.upsert(changed)
    assert [o.kind for o in second.outcomes] == ["unchanged", "updated", "updated", "unchanged"]
    assert [o.vector_changed for o in second.outcomes[1:3]] == [False, True]
    assert [o.key for o in second.outcomes] == keys[:4]  # keys are stable across updates
    assert second.version == 2

    key, product, vector = catalog.get("p2", include_vector=True)
    assert key == keys[2] and product == products[2]
    assert vector.dtype == np.float32 and np.array_equal(vector, -vectors[2])
    assert catalog.get("p1")[1].name == "New name"
    assert catalog.get("nope") is None
    assert catalog.count() == 300


def test_a_vector_of_none_keeps_the_stored_vector_and_model(
    catalog_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(3, 8)
    catalog.upsert(pairs(products, vectors))
    renamed = dataclasses.replace(products[0], name="Renamed", model_id="")
    rows = catalog_module.Rows([(renamed, None), (Product(id="ghost"), None), (products[1], None)])
    write = catalog.upsert(rows)
    assert [o.kind for o in write.outcomes] == ["updated", "failed", "unchanged"]
    assert write.outcomes[0].vector_changed is False
    assert write.outcomes[1].error.message == catalog_module.NOT_STORED
    assert rows.items[0][0].model_id == "test-model"  # for the mirror: the stored model
    _, product, vector = catalog.get("p0", include_vector=True)
    assert (product.name, product.model_id) == ("Renamed", "test-model")
    assert np.array_equal(vector, vectors[0])


ODD_IDS = ['a"b', "back\\slash", "tab\tid", "é-ünï", "日本", "[1]", "null", " spaced "]


@pytest.mark.parametrize("json_lookup", [True, False], ids=["json ids", "IN chunks"])
def test_existing_ids_are_found_whatever_their_characters(
    sqlite_url: str,
    open_catalog: OpenCatalog,
    json_lookup: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite looks a batch's ids up (to upsert or delete) as one JSON array, or in IN chunks
    without json_each."""
    monkeypatch.setattr(catalog_module, "SQLITE_HAS_JSON", json_lookup)
    catalog = open_catalog(sqlite_url)
    products, vectors = random_catalog(len(ODD_IDS) + 1200, 4)  # more than one IN chunk
    products = [
        dataclasses.replace(product, id=ODD_IDS[i]) if i < len(ODD_IDS) else product
        for i, product in enumerate(products)
    ]
    catalog.upsert(pairs(products, vectors))
    again = catalog.upsert(pairs(products, vectors))
    assert {o.kind for o in again.outcomes} == {"unchanged"} and catalog.count() == len(products)
    renamed = [dataclasses.replace(p, name="renamed") for p in products[: len(ODD_IDS)]]
    third = catalog.upsert(pairs(renamed, vectors[: len(ODD_IDS)]))
    assert [o.kind for o in third.outcomes] == ["updated"] * len(ODD_IDS)
    assert catalog.get('a"b')[1].name == "renamed" and catalog.count() == len(products)
    deleted = catalog.delete([*ODD_IDS, "absent"])
    assert sorted(pid for _, pid in deleted.deleted) == sorted(ODD_IDS)
    assert deleted.not_found == ["absent"] and catalog.count() == 1200


def test_nothing_changed_keeps_the_version(catalog_url: str, open_catalog: OpenCatalog) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(10, 4)
    catalog.upsert(pairs(products, vectors))
    again = catalog.upsert(pairs(products, vectors))
    assert again.version == 1 and catalog.state().version == 1
    assert {o.kind for o in again.outcomes} == {"unchanged"}


def test_model_guard_per_item_and_adoption_by_an_empty_catalog(
    catalog_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(3, 4)
    other = Product(id="other", model_id="another-model")
    short = Product(id="short", model_id="test-model")
    write = catalog.upsert(
        [*pairs(products, vectors), (other, vectors[0]), (short, np.ones(3, np.float32))]
    )
    kinds = [o.kind for o in write.outcomes]
    assert kinds == ["inserted"] * 3 + ["failed", "failed"]
    assert write.outcomes[3].error.status == "FAILED_PRECONDITION"
    assert write.outcomes[3].error.message == (
        "model_id: 'another-model' differs from the catalog's model 'test-model'"
    )
    assert write.outcomes[4].error.message == (
        "vector: 3 values, but the catalog holds 4-dimensional vectors of model 'test-model'"
    )
    # Emptied, the catalog may take another model.
    catalog.delete([p.id for p in products])
    write = catalog.upsert([(other, np.ones(6, np.float32) / 6**0.5)])
    assert write.outcomes[0].kind == "inserted" and (write.model_id, write.dim) == (
        "another-model",
        6,
    )


def test_delete_logs_changes_for_catching_up(catalog_url: str, open_catalog: OpenCatalog) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(20, 4)
    keys = [o.key for o in catalog.upsert(pairs(products, vectors)).outcomes]
    catalog.upsert([(products[5], -vectors[5])])  # version 2
    deleted = catalog.delete(["p1", "p2", "ghost", "p1"])  # version 3
    assert sorted(deleted.deleted) == [(keys[1], "p1"), (keys[2], "p2")]
    assert deleted.not_found == ["ghost"] and deleted.version == 3
    assert catalog.delete(["ghost"]).version == 3  # nothing deleted: no new version

    assert sorted(catalog.deleted_since(2).tolist()) == [keys[1], keys[2]]
    assert catalog.deleted_since(3).tolist() == []
    changed = list(catalog.products(include_vectors=True, since_version=1))
    assert [(key, product.id) for key, product, _ in changed] == [(keys[5], "p5")]
    assert np.array_equal(changed[0][2], -vectors[5])
    # A deleted id comes back under a new key; keys are never reused.
    back = catalog.upsert([(products[1], vectors[1])])
    assert back.outcomes[0].kind == "inserted" and back.outcomes[0].key > max(keys)


def test_large_batches_commit_in_one_transaction(
    catalog_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(catalog_url)
    products, vectors = random_catalog(12_000, 8)
    write = catalog.upsert(pairs(products, vectors))
    assert write.version == 1 and catalog.count() == 12_000
    pages = list(catalog.vector_pages())
    stored = np.concatenate([page for _, page in pages])
    assert np.array_equal(stored, vectors)  # keys follow insertion order
    listed = [product for _, product, _ in catalog.products()]
    assert listed == products


def test_sqlite_inserts_fit_the_library_parameter_limit(
    sqlite_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(sqlite_url)
    catalog.engine.dispose()  # the connections below take the lower limit as they open
    limit = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER
    sa.event.listen(catalog.engine, "connect", lambda dbapi, _record: dbapi.setlimit(limit, 999))
    products, vectors = random_catalog(700, 8)  # 17 values a row: 58 rows a statement
    assert catalog.upsert(pairs(products, vectors)).committed
    assert [product for _, product, _ in catalog.products()] == products
    stored = np.concatenate([page for _, page in catalog.vector_pages()])
    assert np.array_equal(stored, vectors)


def test_sqlite_commits_append_to_the_log_and_a_checkpoint_copies_it(
    sqlite_url: str, open_catalog: OpenCatalog, tmp_path
) -> None:
    catalog = open_catalog(sqlite_url)
    products, vectors = random_catalog(2000, 64)  # ~0.6 MB of rows
    database = tmp_path / "catalog.db"
    before = database.stat().st_size
    catalog.upsert(pairs(products, vectors))
    assert database.stat().st_size == before  # committed, in the log only
    frames, copied = catalog.checkpoint()
    assert frames == copied > 0
    assert database.stat().st_size > before + 2000 * 64 * 4
    # Still whole when read by another connection, after the copy.
    assert [product for _, product, _ in open_catalog(sqlite_url).products()] == products


def test_postgresql_has_no_checkpoint_step(
    postgres_catalog_url: str, open_catalog: OpenCatalog
) -> None:
    catalog = open_catalog(postgres_catalog_url)
    assert not catalog.checkpoints and catalog.checkpoint() is None


@pytest.mark.parametrize("dim", [512, 4096])
def test_postgresql_keeps_rows_inline_up_to_a_page_and_toasts_larger_ones(
    postgres_catalog_url: str, open_catalog: OpenCatalog, dim: int
) -> None:
    """ViT-B-32's rows (~2.3 KB) are not compressed or moved to the TOAST table (migration
    0004): PostgreSQL's own catalog says where they went; 16 KB vectors still fit."""
    catalog = open_catalog(postgres_catalog_url)
    products, vectors = random_catalog(50, dim)
    assert [o.kind for o in catalog.upsert(pairs(products, vectors)).outcomes] == ["inserted"] * 50
    with catalog.engine.connect() as conn:
        options, toast = conn.execute(
            sa.text(
                "SELECT reloptions, reltoastrelid::regclass::text FROM pg_class "
                "WHERE relname = 'products'"
            )
        ).one()
        toasted = conn.execute(sa.text(f"SELECT count(*) FROM {toast}")).scalar_one()
    assert "toast_tuple_target=8160" in options
    assert (toasted == 0) == (dim == 512), toasted
    key, product, vector = catalog.get("p7", include_vector=True)
    assert product == products[7] and np.array_equal(vector, vectors[7])


def _synchronous_at_inserts(catalog: Catalog) -> list[int]:
    """The connection's synchronous level whenever the catalog sends an INSERT."""
    seen: list[int] = []

    @sa.event.listens_for(catalog.engine, "before_cursor_execute")
    def record(conn, _cursor, statement, *_args) -> None:
        if statement.startswith("INSERT"):
            level = conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()
            seen.append(level[0])

    return seen


def test_sqlite_commits_at_normal_when_not_durable_and_sync_fsyncs_the_log(
    sqlite_url: str, open_catalog: OpenCatalog, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = open_catalog(sqlite_url)
    levels = _synchronous_at_inserts(catalog)
    products, vectors = random_catalog(20, 8)
    catalog.upsert(pairs(products[:10], vectors[:10]), durable=False)
    catalog.upsert(pairs(products[10:], vectors[10:]))
    assert levels == [1, 2]  # NORMAL for the deferred commit only, FULL (the default) after
    with catalog.engine.connect() as conn:  # the pooled connection went back at FULL
        assert conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone() == (2,)

    # The disk cannot be watched here: os.fsync is recorded (and still run) instead.
    synced: list[str] = []
    fsync = catalog_module.os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(catalog_module.os.readlink(f"/proc/self/fd/{descriptor}"))
        fsync(descriptor)

    monkeypatch.setattr(catalog_module.os, "fsync", recording_fsync)
    catalog.sync()
    catalog.sync()
    # The log, and its folder's entry once per log file.
    log = str(tmp_path / "catalog.db-wal")
    assert synced == [log, str(tmp_path), log]

    def failing_fsync(_descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(catalog_module.os, "fsync", failing_fsync)
    with pytest.raises(Unavailable, match="could not be synced to disk; retry later"):
        catalog.sync()
    catalog.engine.dispose()  # the last connection closes: SQLite copies the log in and drops it
    assert not (tmp_path / "catalog.db-wal").exists()
    catalog.sync()  # nothing left to sync: no error


@pytest.mark.parametrize("kind", ["postgresql", "sqlite NORMAL", "sqlite in memory"])
def test_catalogs_durable_at_each_commit_have_nothing_to_sync(
    kind: str, request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kind == "postgresql":
        catalog = Catalog.open(request.getfixturevalue("postgres_catalog_url"))
    elif kind == "sqlite NORMAL":
        catalog = Catalog.open(f"sqlite:///{tmp_path}/catalog.db", sqlite_synchronous="NORMAL")
    else:
        catalog = Catalog.open("sqlite:///:memory:")
    levels = _synchronous_at_inserts(catalog) if catalog.checkpoints else []
    monkeypatch.setattr(catalog_module.os, "fsync", lambda _descriptor: pytest.fail("fsync"))
    products, vectors = random_catalog(5, 8)
    assert catalog.upsert(pairs(products, vectors), durable=False).committed
    catalog.sync()
    assert catalog.count() == 5
    # Each commit at the level configured: no log file to sync, nothing deferred.
    assert levels == {"sqlite NORMAL": [1], "sqlite in memory": [2]}.get(kind, [])
    catalog.close()


def test_unreachable_database_is_unavailable_without_sql(tmp_path) -> None:
    with pytest.raises(Unavailable) as caught:
        Catalog.open("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    assert "cannot open the catalog" in caught.value.message
    catalog = Catalog.open(f"sqlite:///{tmp_path}/c.db")
    catalog.engine.dispose()
    with create_catalog_engine(f"sqlite:///{tmp_path}/c.db").begin() as conn:
        conn.exec_driver_sql("DROP TABLE products")
    with pytest.raises(Unavailable) as caught:
        catalog.count()
    assert caught.value.message == "the catalog database is unavailable; retry later"
    catalog.close()


def test_sqlite_parent_folders_are_created(tmp_path) -> None:
    catalog = Catalog.open(f"sqlite:///{tmp_path}/a/b/catalog.db")
    assert (tmp_path / "a" / "b" / "catalog.db").exists()
    assert catalog.url == f"sqlite:///{tmp_path}/a/b/catalog.db"
    catalog.close()


def test_password_is_masked_in_the_url(postgres_url: str) -> None:
    engine = create_catalog_engine(postgres_url.replace("postgres@", "postgres:secret@"))
    assert "secret" not in Catalog(engine).url and "***" in Catalog(engine).url
    engine.dispose()


def test_postgresql_connections_are_pooled_and_a_dropped_one_is_replaced(
    postgres_catalog_url: str,
) -> None:
    catalog = Catalog.open(postgres_catalog_url, pool_size=3)
    assert (catalog.engine.pool.size(), catalog.engine.pool._max_overflow) == (3, 3)
    with catalog.engine.connect() as conn:  # the pool's one connection so far
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    admin = create_catalog_engine(postgres_catalog_url)
    with admin.connect() as conn:  # as a server restart or an idle timeout would
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    assert catalog.count() == 0  # checked before use, replaced: no error reaches a caller
    catalog.close()
