"""The in-memory mirror of the catalog that searches read: products, filters and the vector index.

Everything here is derived from the catalog and kept at one catalog version.
It changes only under the write side of `lock`, one whole batch at a time, so
a search (read side) sees a batch entirely or not at all. It is rebuilt from
the catalog, or loaded from a snapshot and caught up with the catalog's
changes since the snapshot's version; while serving, `catch_up` brings in
what other processes sharing the catalog wrote, from the same change log.
A mirror (or snapshot) older than the pruned part of the deletions log cannot
catch up, and is rebuilt from the catalog instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search_service.index.filters import FilterIndex
from search_service.index.rwlock import ReadWriteLock
from search_service.index.vector_index import (
    IndexNotReady,
    SnapshotError,
    VectorIndex,
    all_cores,
    training_need,
    write_snapshot,
)
from search_service.models import Product
from search_service.storage.catalog import Catalog, CatalogState

logger = logging.getLogger(__name__)

SNAPSHOT_NAME = "index.snapshot"
# Training sample cap: k-means cost grows with it, quality barely past this.
MAX_TRAINING_VECTORS = 200_000
# An approximate index with more tombstones than this is rebuilt at start.
MAX_DEAD_FRACTION = 0.25

# (key, product, vector): a changed product; vector None when only its metadata changed.
Change = tuple[int, Product, "np.ndarray | None"]


@dataclass(frozen=True)
class CaughtUp:
    """What one catch-up did: from and to which catalog version, products changed and deleted."""

    since: int
    version: int
    changed: int = 0
    deleted: int = 0
    rebuilt: bool = False  # the log no longer reached back: everything was read again


class CatalogMirror:
    """Products by key, keys by id, filters and the vector index, at catalog version `version`."""

    def __init__(
        self,
        catalog: Catalog,
        data_dir: Path,
        factory: str = "Flat",
        params: str = "",
        scan_threads: int = 1,
        device: str = "cpu",
    ) -> None:
        self.catalog = catalog
        self.scan_threads = scan_threads
        self.device = device  # "cpu" or "cuda", resolved (see search_service.index.gpu)
        self.snapshot_path = Path(data_dir) / SNAPSHOT_NAME
        self.factory = factory
        self.params = params
        self.lock = ReadWriteLock()
        self.index: VectorIndex | None = None  # None until the catalog has a model
        self.records: dict[int, Product] = {}
        self.keys: dict[str, int] = {}
        self.filters = FilterIndex()
        self.catalog_id = ""
        self.version = 0
        self.model_id: str | None = None
        self.dim: int | None = None
        self._snapshot_lock = threading.Lock()
        self._snapshot_version = -1
        self.snapshot_loaded: int | None = None  # the version of the snapshot load() used

    # -- reads (hold lock.read()) --------------------------------------------------------

    def not_trained(self, count: int | None = None) -> IndexNotReady:
        need = training_need(self.factory)
        have = len(self.records) if count is None else count
        return IndexNotReady(
            f"the {self.factory} index needs at least {need} vectors to train and the "
            f"catalog has {have}; searches fail until then (or use --index-factory Flat)"
        )

    @property
    def holds_vectors(self) -> bool:
        """Whether `stored_vector` reads memory (an index that keeps vectors as they came),
        not the catalog."""
        return self.index is not None and self.index.holds_vectors

    def stored_vector(self, key: int) -> np.ndarray:
        """A product's vector: from the index when it keeps it as it came (Flat, HNSW,
        IVF-Flat), else from the catalog (a PQ code is not the vector)."""
        if self.holds_vectors:
            return self.index.vectors(np.array([key], dtype=np.int64))[0]
        return self.catalog.vectors_of([key])[key]

    def agrees(self) -> bool:
        """The index holds exactly the keys of the products."""
        held = self.index.keys() if self.index is not None else np.empty(0, np.int64)
        known = np.fromiter(self.records, dtype=np.int64, count=len(self.records))
        return np.array_equal(held, np.sort(known))

    # -- loading -------------------------------------------------------------------------

    def load(self) -> None:
        """Snapshot plus the changes since, or a rebuild; then check index and products agree."""
        state = self.catalog.state()
        self.catalog_id, self.model_id, self.dim = state.catalog_id, state.model_id, state.dim
        opened = self._open_snapshot(state)
        self._load_records()
        if opened is None:
            self.index, self.version = self._build(state), state.version
        else:
            self.index, self.version = opened
            self._snapshot_version = self.snapshot_loaded = self.version
        self.catch_up()
        if self.index is not None and self.index.is_trained and not self.agrees():
            logger.warning("index and catalog disagree after catching up: rebuilding the index")
            self.index, self.snapshot_loaded = self._build(self.catalog.state()), None
        if self.index is not None and self.index.dead_fraction > MAX_DEAD_FRACTION:
            share = 100 * self.index.dead_fraction
            logger.info("index holds %.0f%% removed vectors: rebuilding it", share)
            self.index, self.snapshot_loaded = self._build(self.catalog.state()), None

    def save_snapshot(self) -> bool:
        """Write the index atomically if it changed since the last snapshot."""
        with self._snapshot_lock:
            with self.lock.read():
                index = self.index
                if index is None or not index.is_trained or self.version == self._snapshot_version:
                    return False
                version = self.version
                meta = {
                    "catalog_id": self.catalog_id,
                    "version": version,
                    "model_id": self.model_id,
                }
                arrays = index.snapshot_arrays(meta)
            started = time.monotonic()
            # What the snapshot holds is on disk first: after a power loss, a snapshot
            # never holds products the catalog lost (they may not be synced yet, see
            # Catalog.upsert's durable).
            self.catalog.sync()
            write_snapshot(self.snapshot_path, arrays)
            self._snapshot_version = version
            logger.info(
                "index snapshot at catalog version %d written in %.2fs",
                version,
                time.monotonic() - started,
            )
            return True

    def _load_records(self) -> None:
        records, filters = self._read_records()
        with self.lock.write():
            self.records = records
            self.keys = {product.id: key for key, product in records.items()}
            self.filters = filters

    def _read_records(self) -> tuple[dict[int, Product], FilterIndex]:
        keys, products = [], []
        for key, product, _vector in self.catalog.products():
            keys.append(key)
            products.append(product)
        filters = FilterIndex()
        filters.put(np.array(keys, dtype=np.int64), filters.encode(products))
        return dict(zip(keys, products, strict=True)), filters

    def _open_snapshot(self, state: CatalogState) -> tuple[VectorIndex, int] | None:
        if state.dim is None:
            return None
        try:
            # Search-time parameters (efSearch, nprobe) are this process's, set on the
            # loaded index: another value never costs a rebuild; a build-time one
            # (efConstruction) does, below, or it would apply to new vectors only.
            index, meta = VectorIndex.load(
                self.snapshot_path, self.scan_threads, self.device, self.params
            )
        except SnapshotError as err:
            logger.warning("%s: rebuilding the index from the catalog", err)
            return None
        problem = None
        if meta.get("catalog_id") != state.catalog_id:
            problem = "belongs to another catalog"
        elif (meta.get("factory"), meta.get("dim")) != (self.factory, state.dim):
            problem = f"is a {meta.get('factory')} index of dim {meta.get('dim')}"
        elif meta.get("model_id") != state.model_id:
            problem = f"holds vectors of model {meta.get('model_id')!r}"
        elif (built := index.built_otherwise()) is not None:
            problem = f"was built with {built}"
        elif meta["version"] > state.version:
            problem = f"is at version {meta['version']}, ahead of the catalog's {state.version}"
        elif meta["version"] < state.pruned_version:
            problem = (
                f"is at version {meta['version']}, older than the deletions log kept "
                f"(pruned through version {state.pruned_version})"
            )
        if problem is not None:
            logger.warning("index snapshot %s %s: rebuilding", self.snapshot_path, problem)
            return None
        logger.info(
            "index snapshot at catalog version %d, catalog at %d: catching up",
            meta["version"],
            state.version,
        )
        return index, int(meta["version"])

    def _build(
        self, state: CatalogState, records: dict[int, Product] | None = None
    ) -> VectorIndex | None:
        """A fresh index of the vectors of the products held, or of `records` (trained first
        if its type needs it), built on every core.

        Rows the catalog gained since the products were read are left to catching up,
        so the index never holds a key without its product.
        """
        with all_cores():
            return self._build_index(state, records)

    def _build_index(
        self, state: CatalogState, records: dict[int, Product] | None
    ) -> VectorIndex | None:
        if state.dim is None:
            return None
        records = self.records if records is None else records
        known = np.sort(np.fromiter(records, dtype=np.int64, count=len(records)))
        index = self._new_index(state.dim)
        total = self.catalog.count()
        if not index.is_trained:
            if total < training_need(self.factory):
                logger.warning("%s", self.not_trained(total).message)
                return index
            index.train(self._training_sample())
        logger.info("building the %s index from the catalog: %d vectors", self.factory, total)
        done, last_log = 0, time.monotonic()
        for keys, vectors in self.catalog.vector_pages():
            held = np.isin(keys, known, assume_unique=True)
            index.put(keys[held], vectors[held])
            done += len(keys)
            if time.monotonic() - last_log > 2.0:
                logger.info("building the index: %d/%d vectors", done, total)
                last_log = time.monotonic()
        logger.info("built the %s index of %d vectors", self.factory, len(index))
        return index

    def _training_sample(self) -> np.ndarray:
        pages, taken = [], 0
        for _keys, vectors in self.catalog.vector_pages():
            pages.append(vectors)
            taken += len(vectors)
            if taken >= MAX_TRAINING_VECTORS:
                break
        return np.concatenate(pages)

    # -- changes (on the engine's single applier thread, in commit order) ----------------

    def apply(
        self,
        version: int,
        changes: Sequence[Change],
        model_id: str | None,
        dim: int | None,
        reserve: int = 0,
        vectors: np.ndarray | None = None,
    ) -> None:
        """Apply this process's own committed batch, which took the catalog to `version`.

        `reserve`: room to make in the index first, in one step, for these vectors
        and those of the batches that follow in the same upsert. `vectors`: the
        changes' vectors (those not None, in order) as one matrix, when the
        caller holds them so.
        """
        if version != self.version + 1:
            # Another writer committed in between: read everything since, ours included.
            self.catch_up()
            return
        codes = self.filters.encode([product for _, product, _ in changes])
        stacked = _stacked(changes, vectors)
        with self.lock.write():
            self._set_model(model_id, dim)
            if reserve and self.index is not None:
                self.index.reserve(reserve)
            self._put(changes, codes, stacked)
            self.version = version
        self._train_if_ready()

    def remove(self, version: int, keys: np.ndarray) -> None:
        """Apply this process's own committed deletion (none: `version` is the current one)."""
        if len(keys) == 0:
            return
        if version != self.version + 1:
            self.catch_up()
            return
        with self.lock.write():
            self._drop(keys)
            self.version = version

    def catch_up(self) -> CaughtUp:
        """Apply every catalog change after `version`, from the change log.

        Product rows are read as they are now: one changed again after the state
        was read comes in early and again next time, which is harmless. A row of
        another model than the state's was written after it (the catalog takes a
        new model only once emptied) and waits for the next catch-up, so the
        index never mixes models or dimensions.
        """
        state = self.catalog.state()
        since = self.version
        if state.version == since:
            return CaughtUp(since, since)
        if since < state.pruned_version:
            return self._reload(since, state.pruned_version)
        deleted = self.catalog.deleted_since(since)
        pruned = self.catalog.state().pruned_version
        if since < pruned:  # pruned while the log was read: it may lack deletions
            return self._reload(since, pruned)
        changed = [
            change
            for change in self.catalog.products(include_vectors=True, since_version=since)
            if change[1].model_id == state.model_id and change[2].size == state.dim
        ]
        codes = self.filters.encode([product for _, product, _ in changed])
        stacked = _stacked(changed)
        with self.lock.write():
            # Deletions first: an emptied catalog's new model then gets a fresh index.
            self._drop(deleted)
            self._set_model(state.model_id, state.dim)
            self._put(changed, codes, stacked)
            self.version = state.version
        logger.info(
            "caught up from catalog version %d to %d: %d products changed, %d deleted",
            since,
            state.version,
            len(changed),
            len(deleted),
        )
        self._train_if_ready()
        return CaughtUp(since, state.version, len(changed), len(deleted))

    def _reload(self, since: int, pruned: int) -> CaughtUp:
        """Read every product and build a new index, then swap both in at once."""
        logger.warning(
            "the index is at catalog version %d, behind the deletions log kept (pruned "
            "through version %d): rebuilding it from the catalog",
            since,
            pruned,
        )
        state = self.catalog.state()
        records, filters = self._read_records()
        index = self._build(state, records)
        with self.lock.write():
            self.records = records
            self.keys = {product.id: key for key, product in records.items()}
            self.filters = filters
            self.index = index
            self.model_id, self.dim = state.model_id, state.dim
            self.version = state.version
        self.snapshot_loaded = None
        self._train_if_ready()
        return CaughtUp(since, state.version, len(records), rebuilt=True)

    def _new_index(self, dim: int) -> VectorIndex:
        return VectorIndex(dim, self.factory, self.params, self.scan_threads, self.device)

    def _set_model(self, model_id: str | None, dim: int | None) -> None:
        """The catalog's model; a new one brings a new, empty index (write lock held).

        The catalog takes a new model only while it is empty, so nothing is lost.
        """
        fresh = self.index is None or (model_id != self.model_id and len(self.index) == 0)
        if dim is not None and (fresh or self.index.dim != dim):
            self.index = self._new_index(dim)
        self.model_id, self.dim = model_id, dim

    def _put(
        self,
        changes: Sequence[Change],
        codes: dict[str, np.ndarray],
        vectors: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """Record changed products, their filter `codes` and their `_stacked` vectors
        (write lock held)."""
        if not changes:
            return
        moved = [
            previous
            for key, product, _vector in changes
            if (previous := self.keys.get(product.id)) is not None and previous != key
        ]
        if moved:
            # The same id under an older key: that row is gone from the catalog.
            self._drop(np.array(moved, dtype=np.int64))
        keys = np.fromiter((key for key, _, _ in changes), np.int64, len(changes))
        products = [product for _, product, _ in changes]
        for key, product in zip(keys.tolist(), products, strict=True):
            self.records[key] = product
            self.keys[product.id] = key
        self.filters.put(keys, codes)
        if self.index is not None and self.index.is_trained and vectors is not None:
            self.index.put(*vectors)

    def _drop(self, keys: np.ndarray) -> None:
        """Forget products by key (write lock held); unknown keys are ignored."""
        if len(keys) == 0:
            return
        keys = np.asarray(keys, dtype=np.int64)
        for key in keys.tolist():
            product = self.records.pop(key, None)
            if product is not None and self.keys.get(product.id) == key:
                del self.keys[product.id]
        self.filters.remove(keys)
        if self.index is not None:
            self.index.remove(keys)

    def _train_if_ready(self) -> None:
        index = self.index
        if index is None or index.is_trained:
            return
        if len(self.records) < training_need(self.factory):
            return
        built = self._build(self.catalog.state())
        with self.lock.write():
            self.index = built


def _stacked(
    changes: Sequence[Change], matrix: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The keys and vectors of the changes that carry one (None: none do), the
    vectors stacked into one matrix unless given as one (`matrix`)."""
    with_vectors = [(key, vector) for key, _, vector in changes if vector is not None]
    if not with_vectors:
        return None
    keys = np.fromiter((key for key, _ in with_vectors), np.int64, len(with_vectors))
    if matrix is None:
        matrix = np.stack([vector for _, vector in with_vectors])
    elif len(matrix) != len(keys):
        raise ValueError(f"{len(matrix)} vectors given for {len(keys)} changed vectors")
    return keys, matrix
