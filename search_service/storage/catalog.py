"""The product catalog, the source of truth: SQLAlchemy Core over SQLite or PostgreSQL, same SQL.

Writes happen in batches, one transaction each, with executemany. Each write
transaction first bumps the catalog version in `catalog_state`: that row lock
makes writers commit in version order, and every changed row records the
version, so an index can catch up with `changes_since(version)`.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import sqlalchemy as sa

from search_service.migrate import upgrade_to_head
from search_service.models import METADATA_FIELDS, Product
from search_service.storage.schema import catalog_state, deletions, products
from search_service.vectors import STORED, check_model, from_bytes, to_bytes
from vpm_common.errors import FailedPrecondition, InvalidArgument, Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Columns compared to tell an update from an unchanged re-send (besides the vector).
CONTENT_COLUMNS = (*METADATA_FIELDS, "attributes", "image_sha256", "model_id")
# Rows per IN (...) lookup and per page of a scan: well under every driver's limits.
LOOKUP_CHUNK = 500
PAGE_SIZE = 5000
# Bound parameters per multi-row SQLite INSERT: SQLITE_MAX_VARIABLE_NUMBER's default since 3.32.
SQLITE_PARAMETERS = 32766
# A SQLite commit checkpoints (copies the write-ahead log into the database file)
# once the log holds this much: 42,700 bulk-upserted products write ~130 MB, so
# they commit without stopping to copy (+15 to 40% products/s, measured), and
# the copy happens once, of each page's last version, when writes pause.
WAL_AUTOCHECKPOINT_BYTES = 256 * 2**20
# What of the log's file is kept after a checkpoint empties it.
WAL_KEPT_BYTES = 64 * 2**20


# (key, product, vector or None): one product as the catalog stores it.
Stored = tuple[int, Product, "np.ndarray | None"]


@dataclass(frozen=True)
class CatalogState:
    catalog_id: str
    version: int
    model_id: str | None
    dim: int | None
    # Deletions at or below this version may be gone from the log (see prune_deletions).
    pruned_version: int = 0


class Outcome(NamedTuple):
    """What one upserted product became: "inserted", "updated", "unchanged" or "failed"."""

    kind: str
    key: int = -1
    vector_changed: bool = False
    error: FailedPrecondition | InvalidArgument | None = None


class Rows:
    """(product, unit vector) pairs with distinct ids and their catalog rows, for `Catalog.upsert`
    (a vector of None keeps the stored one).

    Built apart from the write so that a caller can build the next batch's rows
    while one is written: what only the transaction knows (the key and the
    version; for a vector of None, the stored vector and model, the item's
    product then replaced by one naming that model) is added there.
    """

    def __init__(
        self, items: Iterable[tuple[Product, np.ndarray | None]], matrix: np.ndarray | None = None
    ) -> None:
        self.items = list(items)
        self.values = [row_values(product, vector) for product, vector in self.items]
        # The items' vectors as the rows of one matrix, when the caller holds them so.
        self.matrix = matrix

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class UpsertWrite:
    version: int
    outcomes: list[Outcome]
    model_id: str | None
    dim: int | None
    committed: bool = True  # False: nothing changed, and the version is the one before


@dataclass
class DeleteWrite:
    version: int
    deleted: list[tuple[int, str]] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


def create_catalog_engine(
    url: str, sqlite_synchronous: str = "FULL", pool_size: int = 8
) -> sa.Engine:
    """An engine for `url`; SQLite gets WAL, real transactions and its parent folder created.

    A server database gets a pool of `pool_size` connections (and as many more in a
    burst), each checked before use (a restarted server or a dropped idle connection
    costs a reconnect, not a failed request) and replaced after an hour, so proxies
    and poolers that cut old connections never see one.
    """
    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver installed here
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=30,
            pool_recycle=3600,
            pool_pre_ping=True,
        )
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(parsed, connect_args={"timeout": 60})

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's BEGIN (below) delimit transactions, not the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # Large pages suit 2 KB vector rows (fewer page splits); only a new file takes it.
        cursor.execute("PRAGMA page_size = 32768")
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before the upsert is acknowledged (power loss too).
        cursor.execute(f"PRAGMA synchronous = {sqlite_synchronous}")
        cursor.execute("PRAGMA cache_size = -65536")
        # Commits only append to the write-ahead log; copying it into the file waits
        # until the log is this big or writes pause (Catalog.checkpoint, from upkeep).
        page_size = cursor.execute("PRAGMA page_size").fetchone()[0]
        cursor.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_BYTES // page_size}")
        cursor.execute(f"PRAGMA journal_size_limit = {WAL_KEPT_BYTES}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


def display_url(url: sa.URL) -> str:
    return url.render_as_string(hide_password=True)


@contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database named `prefix`_<random>, dropped on exit.

    `admin_url` names a database on the same server to issue CREATE and DROP
    DATABASE from; for tests, benchmarks and the sizing tool. A server that
    cannot be reached raises sqlalchemy's OperationalError from the `with`.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            url = sa.make_url(admin_url).set(database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def _guarded(method: Callable[..., T]) -> Callable[..., T]:
    """Database failures become Unavailable without SQL or paths; details go to the log."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except sa.exc.SQLAlchemyError as err:
            logger.error("catalog %s failed: %s", method.__name__, err)
            raise Unavailable("the catalog database is unavailable; retry later") from None

    return wrapper


class Catalog:
    """Products, their vectors and the change log, in any SQLAlchemy database."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._log_entry_synced: int | None = None  # inode of the last log synced with its folder

    @classmethod
    def open(cls, url: str, sqlite_synchronous: str = "FULL", pool_size: int = 8) -> Catalog:
        """Connect and migrate the schema to the newest revision."""
        engine = create_catalog_engine(url, sqlite_synchronous, pool_size)
        try:
            upgrade_to_head(engine)
        except sa.exc.SQLAlchemyError as err:
            engine.dispose()
            raise Unavailable(f"cannot open the catalog {display_url(engine.url)}: {err}") from None
        return cls(engine)

    @property
    def checkpoints(self) -> bool:
        """Whether the database keeps a write-ahead log that `checkpoint` copies (SQLite)."""
        return self.engine.dialect.name == "sqlite"

    @property
    def url(self) -> str:
        """The URL with any password masked."""
        return display_url(self.engine.url)

    def sync(self) -> None:
        """Make every transaction committed so far durable, those of `upsert(durable=False)` too.

        SQLite with synchronous FULL: one fsync of the write-ahead log, which
        holds every commit not yet copied into the database file (a copy syncs
        first), and of its folder once per new log file, as SQLite does when its
        own commit creates one. Nothing to do elsewhere: each commit was durable
        already. Unavailable when the operating system reports a failed write.
        """
        path = self._deferred_log
        if path is None:
            return
        try:
            self._fsync_log(path)
        except OSError as err:
            logger.error("catalog sync failed: %s: %s", path, err)
            raise Unavailable("the catalog could not be synced to disk; retry later") from None

    def _fsync_log(self, path: Path) -> None:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no log: the last connection to close copied it in, synced, and removed it
        try:
            os.fsync(descriptor)
            inode = os.fstat(descriptor).st_ino
        finally:
            os.close(descriptor)
        if inode != self._log_entry_synced:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
            self._log_entry_synced = inode

    @functools.cached_property
    @_guarded
    def _deferred_log(self) -> Path | None:
        """The write-ahead log that `sync` flushes: SQLite files at synchronous FULL
        (or EXTRA) only."""
        if not self.checkpoints:
            return None
        with self.engine.connect() as conn:
            ((level,),) = _pragma(conn, "synchronous")
            files = {name: file for _seq, name, file in _pragma(conn, "database_list")}
        if level >= 2 and files.get("main"):  # 2 FULL, 3 EXTRA; "": in memory
            return Path(files["main"] + "-wal")
        return None

    def close(self) -> None:
        self.engine.dispose()

    # -- reads ---------------------------------------------------------------------------

    @_guarded
    def state(self) -> CatalogState:
        with self.engine.connect() as conn:
            return _state(conn)

    @_guarded
    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(products)).scalar_one()

    @_guarded
    def get(self, product_id: str, include_vector: bool = False) -> Stored | None:
        """(key, product, vector or None) of one product, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                _select(include_vector).where(products.c.product_id == product_id)
            ).first()
        return None if row is None else _stored(row, include_vector)

    @_guarded
    def vectors_of(self, keys: Sequence[int]) -> dict[int, np.ndarray]:
        found = {}
        with self.engine.connect() as conn:
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = [int(key) for key in keys[start : start + LOOKUP_CHUNK]]
                query = sa.select(products.c.row_key, products.c.vector).where(
                    products.c.row_key.in_(chunk)
                )
                for row in conn.execute(query):
                    found[row.row_key] = from_bytes(row.vector)
        return found

    def products(
        self, include_vectors: bool = False, since_version: int | None = None
    ) -> Iterator[Stored]:
        """Every product (changed after `since_version`, when given) in key order, paged.

        Pages are separate reads: a product changed during the scan may come out
        in its newer state, which catching up from the version read first repairs.
        """
        last = -1
        while True:
            query = _select(include_vectors).where(products.c.row_key > last)
            if since_version is not None:
                query = query.where(products.c.version > since_version)
            page = self._page(query.order_by(products.c.row_key).limit(PAGE_SIZE))
            for row in page:
                yield _stored(row, include_vectors)
            if len(page) < PAGE_SIZE:
                return
            last = page[-1].row_key

    def vector_pages(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, vectors) pages of the whole catalog, in key order."""
        last = -1
        while True:
            query = (
                sa.select(products.c.row_key, products.c.vector)
                .where(products.c.row_key > last)
                .order_by(products.c.row_key)
                .limit(PAGE_SIZE)
            )
            page = self._page(query)
            if page:
                keys = np.fromiter((row.row_key for row in page), np.int64, len(page))
                blob = b"".join(row.vector for row in page)
                yield keys, np.frombuffer(blob, dtype=STORED).reshape(len(page), -1)
            if len(page) < PAGE_SIZE:
                return
            last = page[-1].row_key

    @_guarded
    def deleted_since(self, version: int) -> np.ndarray:
        """Keys of the products deleted after `version`."""
        with self.engine.connect() as conn:
            keys = conn.execute(
                sa.select(deletions.c.row_key).where(deletions.c.version > version)
            ).scalars()
            return np.fromiter(keys, dtype=np.int64)

    @_guarded
    def _page(self, query: sa.Select) -> list[sa.Row]:
        with self.engine.connect() as conn:
            return list(conn.execute(query))

    # -- writes --------------------------------------------------------------------------

    @_guarded
    def upsert(
        self, items: Rows | Sequence[tuple[Product, np.ndarray]], durable: bool = True
    ) -> UpsertWrite:
        """Insert or replace (product, unit vector) pairs, distinct ids, in one transaction.

        A vector of None keeps the stored one (the product's metadata alone changes); a
        product not stored then fails alone (INVALID_ARGUMENT).

        A product whose model or dimension differs from the catalog's fails alone
        (FAILED_PRECONDITION); an empty catalog takes the model of its first product.
        `durable=False`: the commit may return before it is on disk (SQLite at
        synchronous FULL commits this one at NORMAL: consistent after a power
        loss, but it may be lost); `sync` makes it durable. For a caller that
        commits several batches before acknowledging any, and syncs before it does.
        """
        rows = items if isinstance(items, Rows) else Rows(items)
        ids = [product.id for product, _vector in rows.items]
        if len(set(ids)) != len(ids):
            raise ValueError("one upsert call takes each product id once")
        deferred = not durable and self._deferred_log is not None
        with self.engine.connect() as conn, _safety(conn, "NORMAL" if deferred else None):
            return self._upsert(conn, rows, ids)

    def _upsert(self, conn: sa.Connection, rows: Rows, ids: list[str]) -> UpsertWrite:
        with conn.begin() as transaction:
            state = _bump_version(conn)
            version, model, dim = state.version, state.model_id, state.dim
            first = next(((p, v) for p, v in rows.items if v is not None), None)
            if first is not None:
                product, vector = first
                differs = (model, dim) != (product.model_id, vector.size)
                if differs and (model is None or _is_empty(conn)):
                    model, dim = product.model_id, int(vector.size)
            existing = _rows_by_id(conn, ids)
            inserts: list[tuple] = []
            updates: list[tuple] = []
            outcomes = []
            next_key = _next_key(conn)
            for i, ((product, vector), row) in enumerate(zip(rows.items, rows.values, strict=True)):
                old = existing.get(product.id)
                try:
                    if vector is None:  # metadata only: the stored vector and model stay
                        row, product = _keeping_vector(product, row, old)
                        rows.items[i] = (product, None)  # as stored, for the caller's mirror
                    else:
                        check_model(product.model_id, int(vector.size), model, dim)
                except (FailedPrecondition, InvalidArgument) as err:
                    outcomes.append(Outcome("failed", error=err))
                    continue
                if old is None:
                    inserts.append((next_key, *row, version))
                    outcomes.append(Outcome("inserted", next_key, True))
                    next_key += 1
                    continue
                same_vector = old.vector == row[_VECTOR]
                if same_vector and tuple(old)[_OLD_CONTENT] == row[_CONTENT]:
                    outcomes.append(Outcome("unchanged", old.row_key))
                    continue
                updates.append((*row, version, old.row_key))
                outcomes.append(Outcome("updated", old.row_key, not same_vector))
            if not inserts and not updates:
                transaction.rollback()  # nothing changed: the version stays where it was
                return UpsertWrite(version - 1, outcomes, state.model_id, state.dim, False)
            if inserts:
                _insert(conn, products, ["row_key", *ROW_COLUMNS], inserts)
            if updates:
                where = products.c.row_key == sa.bindparam("b_key")
                statement = products.update().where(where)
                _executemany(conn, statement, [*ROW_COLUMNS, "b_key"], updates)
            conn.execute(
                catalog_state.update()
                .where(catalog_state.c.id == 1)
                .values(next_key=next_key, model_id=model, dim=dim)
            )
        return UpsertWrite(version, outcomes, model, dim)

    @_guarded
    def delete(self, product_ids: Sequence[str]) -> DeleteWrite:
        """Remove products by id in one transaction, logging each for catching up."""
        wanted = list(dict.fromkeys(product_ids))
        with self.engine.connect() as conn, conn.begin() as transaction:
            state = _bump_version(conn)
            rows = _rows_by_id(conn, wanted, _KEYS_BY_ID)
            found = {product_id: row.row_key for product_id, row in rows.items()}
            result = DeleteWrite(state.version, not_found=[i for i in wanted if i not in found])
            if not found:
                transaction.rollback()
                result.version = state.version - 1
                return result
            keys = list(found.values())
            for start in range(0, len(keys), LOOKUP_CHUNK):
                chunk = keys[start : start + LOOKUP_CHUNK]
                conn.execute(products.delete().where(products.c.row_key.in_(chunk)))
            now = int(time.time())
            logged = [(key, pid, state.version, now) for pid, key in found.items()]
            names = ["row_key", "product_id", "version", "deleted_at"]
            _executemany(conn, deletions.insert(), names, logged)
            result.deleted = [(key, pid) for pid, key in found.items()]
        return result

    @_guarded
    def checkpoint(self) -> tuple[int, int] | None:
        """SQLite: copy the write-ahead log into the database file; (frames in the log,
        frames of it now in the file).

        PASSIVE: it waits for no reader or writer, and copies what none of them
        still needs. Other databases have no such step: None.
        """
        if not self.checkpoints:
            return None
        with self.engine.connect() as conn:
            ((_busy, frames, copied),) = _pragma(conn, "wal_checkpoint(PASSIVE)")
        return frames, copied

    @_guarded
    def prune_deletions(self, before: float) -> tuple[int, int]:
        """Drop the deletions logged before Unix time `before`: (rows removed, pruned version).

        Everything up to the newest such deletion's version goes, and the state row
        records that version, so a reader further behind knows to rebuild. The state
        row's lock (as writers take it) means every version up to the current one
        is committed: nothing logged later can fall at or below the pruned version.
        """
        with self.engine.connect() as conn, conn.begin() as transaction:
            conn.execute(
                catalog_state.update()
                .where(catalog_state.c.id == 1)
                .values(pruned_version=catalog_state.c.pruned_version)
            )
            state = _state(conn)
            newest = conn.execute(
                sa.select(sa.func.max(deletions.c.version)).where(
                    deletions.c.deleted_at < int(before)
                )
            ).scalar_one()
            if newest is None or newest <= state.pruned_version:
                transaction.rollback()
                return 0, state.pruned_version
            removed = conn.execute(deletions.delete().where(deletions.c.version <= newest))
            conn.execute(
                catalog_state.update().where(catalog_state.c.id == 1).values(pruned_version=newest)
            )
        return removed.rowcount, newest


@contextmanager
def _safety(conn: sa.Connection, level: str | None) -> Iterator[None]:
    """SQLite: the connection's synchronous level is `level` inside (None: unchanged).

    SQLite refuses the change inside a transaction, so it goes to the driver's
    connection before SQLAlchemy begins one, and back before the connection
    returns to the pool.
    """
    if level is None:
        yield
        return
    ((before,),) = _pragma(conn, "synchronous")
    _pragma(conn, f"synchronous = {level}")
    try:
        yield
    finally:
        try:
            _pragma(conn, f"synchronous = {before}")
        except sqlite3.Error:
            conn.invalidate()  # never back in the pool at the wrong level


def _pragma(conn: sa.Connection, pragma: str) -> list[tuple]:
    """SQLite: run PRAGMA `pragma` on the driver's connection (SQLAlchemy's would begin
    a transaction first, in which some pragmas are refused); its rows."""
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        return cursor.execute(f"PRAGMA {pragma}").fetchall()
    finally:
        cursor.close()


def _state(conn: sa.Connection) -> CatalogState:
    row = conn.execute(sa.select(catalog_state).where(catalog_state.c.id == 1)).one()
    return CatalogState(row.catalog_id, row.version, row.model_id, row.dim, row.pruned_version)


def _bump_version(conn: sa.Connection) -> CatalogState:
    """Take the catalog's write lock (the state row) and the version this write will carry."""
    conn.execute(
        catalog_state.update()
        .where(catalog_state.c.id == 1)
        .values(version=catalog_state.c.version + 1)
    )
    return _state(conn)


def _next_key(conn: sa.Connection) -> int:
    return conn.execute(
        sa.select(catalog_state.c.next_key).where(catalog_state.c.id == 1)
    ).scalar_one()


def _is_empty(conn: sa.Connection) -> bool:
    return conn.execute(sa.select(products.c.row_key).limit(1)).first() is None


class _ById(NamedTuple):
    """One query for products by id, in the two forms `_rows_by_id` sends."""

    json: sa.Select  # the ids as one JSON array (SQLite's json_each, built in since 3.38)
    listed: sa.Select  # the ids as an expanding IN list: compiled once, whatever the ids

    @classmethod
    def of(cls, query: sa.Select) -> _ById:
        ids_in_json = sa.select(sa.column("value")).select_from(
            sa.func.json_each(sa.bindparam("ids"))
        )
        return cls(
            query.where(products.c.product_id.in_(ids_in_json)),
            # A literal IN list instead would cost ~3 us an id to compile.
            query.where(products.c.product_id.in_(sa.bindparam("ids", expanding=True))),
        )


SQLITE_HAS_JSON = sqlite3.sqlite_version_info >= (3, 38)
_ROWS_BY_ID = _ById.of(sa.select(products))
_KEYS_BY_ID = _ById.of(sa.select(products.c.row_key, products.c.product_id))


def _rows_by_id(
    conn: sa.Connection, ids: Sequence[str], query: _ById = _ROWS_BY_ID
) -> dict[str, sa.Row]:
    """The rows of `query` (whole product rows by default) for those of `ids` that exist."""
    if conn.dialect.name == "sqlite" and SQLITE_HAS_JSON:
        # The whole batch in one statement: ~3 ms instead of ~9 for 5,000 new ids.
        rows = conn.execute(query.json, {"ids": json.dumps(list(ids))})
        return {row.product_id: row for row in rows}
    found = {}
    for start in range(0, len(ids), LOOKUP_CHUNK):
        chunk = ids[start : start + LOOKUP_CHUNK]
        found.update({row.product_id: row for row in conn.execute(query.listed, {"ids": chunk})})
    return found


def _select(include_vector: bool) -> sa.Select:
    columns = [c for c in products.c if include_vector or c.name != "vector"]
    return sa.select(*columns)


def _insert(conn: sa.Connection, table: sa.Table, names: list[str], rows: list[tuple]) -> None:
    """Insert `rows` (values in `names` order, driver types) into `table`.

    On SQLite, as multi-row INSERT ... VALUES statements of up to
    SQLITE_PARAMETERS parameters (fewer where the library allows fewer): the
    sqlite3 module releases the GIL once per statement step, so one step that
    inserts ~1,900 rows lets the next batch's checks and the index update run
    beside it, where executemany's one step per row hands the GIL back and forth
    for every row. On PostgreSQL through psycopg, as one binary COPY (see
    `_copy_into`). Other drivers take `_executemany`.
    """
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg":
        _copy_into(conn, table, names, rows)
        return
    if conn.dialect.name != "sqlite":
        _executemany(conn, table.insert(), names, rows)
        return
    quote = conn.dialect.identifier_preparer.quote
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in names)}) VALUES "
    group = f"({', '.join('?' * len(names))})"
    connection = conn.connection.dbapi_connection
    # Statements of ~1,900 rows of 17 values measured as fast as whole 5,000-row batches.
    parameters = min(SQLITE_PARAMETERS, connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    text = connection.getlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH) - len(head)
    per_statement = max(1, min(parameters // len(names), text // (len(group) + 2)))
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        sql = head + ", ".join([group] * len(chunk))
        conn.exec_driver_sql(sql, tuple(itertools.chain.from_iterable(chunk)))


def _copy_into(conn: sa.Connection, table: sa.Table, names: list[str], rows: list[tuple]) -> None:
    """PostgreSQL: `rows` into `table` by one COPY in binary form, in the connection's
    transaction: vectors travel as their bytes (text COPY doubles them into hex), and the
    server parses no statement per row (see BENCHMARKS.md, ingest into PostgreSQL)."""
    quote = conn.dialect.identifier_preparer.quote
    # COPY's binary form needs each column's server type by name: "varchar(256)" -> "varchar".
    types = [table.c[name].type.compile(conn.dialect).split("(")[0].lower() for name in names]
    sql = f"COPY {quote(table.name)} ({', '.join(quote(name) for name in names)}) FROM STDIN"
    cursor = conn.connection.dbapi_connection.cursor()
    with cursor, cursor.copy(sql + " (FORMAT BINARY)") as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


def _executemany(
    conn: sa.Connection, statement: sa.Executable, names: list[str], rows: list[tuple]
) -> None:
    """Run `statement` once per row (values in `names` order) through the driver's executemany.

    SQLAlchemy compiles the statement for the dialect, so the SQL stays portable;
    the rows then go to the driver as they are, skipping SQLAlchemy's per-row
    parameter processing, which cost more than SQLite's own insert (measured
    ~25 us a row). Values must already be driver types: str, int, bytes.
    """
    compiled = statement.compile(dialect=conn.dialect, column_keys=names)
    if not compiled.positional:
        conn.exec_driver_sql(compiled.string, [dict(zip(names, row, strict=True)) for row in rows])
        return
    order = list(compiled.positiontup)
    if order != names:
        picks = [names.index(name) for name in order]
        rows = [tuple(row[i] for i in picks) for row in rows]
    conn.exec_driver_sql(compiled.string, rows)


# A product row's columns in table order after row_key (see row_values).
ROW_COLUMNS = [column.name for column in products.c if column.name != "row_key"]
_CONTENT = slice(1, 1 + len(CONTENT_COLUMNS))  # name ... model_id, within a row_values tuple
_OLD_CONTENT = slice(2, 2 + len(CONTENT_COLUMNS))  # the same within a selected products row
_VECTOR = ROW_COLUMNS.index("vector")
assert ROW_COLUMNS[_CONTENT] == list(CONTENT_COLUMNS), "products columns moved: update row_values"
assert ROW_COLUMNS[-1] == "version", "products columns moved: Catalog.upsert appends the version"
assert ROW_COLUMNS[_VECTOR - 2 : _VECTOR] == ["image_sha256", "model_id"], (
    "products columns moved: see _keeping_vector"
)


NOT_STORED = (
    "vector, image: set one of them (only a product in the catalog may come without, "
    "to change its metadata and keep its vector)"
)


def _keeping_vector(product: Product, row: tuple, old: sa.Row | None) -> tuple[tuple, Product]:
    """The row and product of a metadata-only upsert: the stored vector and model kept, and
    the stored image hash where none is sent (it is the hash of the kept vector's image)."""
    if old is None:
        raise InvalidArgument(NOT_STORED)
    if product.model_id and product.model_id != old.model_id:
        raise InvalidArgument(
            f"model_id: {product.model_id!r} but no vector; the stored vector is of model "
            f"{old.model_id!r}"
        )
    sha256 = product.image_sha256 or old.image_sha256
    kept = replace(product, model_id=old.model_id, image_sha256=sha256)
    return (*row[: _VECTOR - 2], sha256, old.model_id, old.vector), kept


def row_values(product: Product, vector: np.ndarray | None) -> tuple:
    """A row's values in ROW_COLUMNS order but the last (`version`), as the driver takes them
    (the vector None when the stored one stays: Catalog.upsert fills it in)."""
    attributes = product.attributes
    return (
        product.id,
        product.name,
        product.gender,
        product.master_category,
        product.sub_category,
        product.article_type,
        product.base_colour,
        product.season,
        product.year,
        product.usage,
        product.category,
        json.dumps(dict(sorted(attributes.items()))) if attributes else "{}",
        product.image_sha256,
        product.model_id,
        None if vector is None else to_bytes(vector),  # None: the stored one (see upsert)
    )


def _stored(row: sa.Row, include_vector: bool) -> Stored:
    product = Product(
        id=row.product_id,
        **{name: getattr(row, name) for name in METADATA_FIELDS},
        attributes=json.loads(row.attributes),
        image_sha256=row.image_sha256,
        model_id=row.model_id,
    )
    return row.row_key, product, from_bytes(row.vector) if include_vector else None
