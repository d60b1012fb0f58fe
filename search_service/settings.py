"""Search service settings: flags over VPM_SEARCH_* variables (the catalog: VPM_CATALOG_URL)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from search_service.index.gpu import DEVICES, factory_problem
from vpm_common.guard_settings import ServerGuards
from vpm_common.security import (
    ClientSecurity,
    check_tls_settings,
    check_token_settings,
)
from vpm_common.settings import check, setting

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# host:port, [v6]:port, or any gRPC name-resolver URI such as dns:///name:port.
_TARGET = re.compile(r"^([a-z][a-z0-9+.-]*:.+|\[[0-9a-fA-F:.]+\]:\d+|[^\s:/\[\]]+:\d+)$")


@dataclass(frozen=True)
class SearchSettings(ServerGuards):
    host: str = setting("[::]", "address to listen on")
    port: int = setting(50052, "gRPC port (0 picks a free one)")
    catalog_url: str = setting(
        "sqlite:///data/catalog.db",
        "SQLAlchemy URL of the catalog, e.g. postgresql+psycopg://user:pw@host/db; "
        "a relative SQLite path is relative to the working directory",
        env="VPM_CATALOG_URL",
    )
    data_dir: Path = setting(Path("data"), "folder for index snapshots")
    index_factory: str = setting(
        "Flat",
        "vector index: Flat (exact inner product) or a FAISS factory string such as "
        "HNSW32 or IVF4096,PQ64 (approximate; IVF and PQ train once the catalog is large enough)",
    )
    index_params: str = setting(
        "",
        "FAISS parameters for approximate indexes, e.g. efSearch=256 or nprobe=64: set on the "
        "loaded snapshot (no rebuild); --target-recall chooses efSearch or nprobe. HNSW's "
        "efConstruction is built into the graph: another value than the snapshot's rebuilds it",
    )
    target_recall: float = setting(
        0.0,
        "recall@10 an approximate index is held to, e.g. 0.95: its search parameter "
        "(efSearch, nprobe) and which filters are scanned exactly are chosen by measuring it "
        "on the catalog's own vectors, once built and whenever a tenth of it has changed "
        "(0: off; Flat is exact)",
    )
    index_device: str = setting(
        "cpu",
        "where the vector index searches: cpu; cuda, a GPU (Flat, IVF<n>,Flat or "
        "IVF<n>,PQ<m>; needs the GPU build of FAISS, the search-gpu extra); auto, cuda "
        "when a GPU and that build are there, else cpu",
        choices=DEVICES,
    )
    encoder: tuple[str, ...] = setting(
        (),
        "encoder targets: host:port,host:port or dns:///name:port (round-robin); "
        "empty: image and text queries answer UNAVAILABLE",
    )
    encoder_timeout_s: float = setting(30.0, "deadline of each encoder call, in seconds")
    encoder_tls: bool = setting(
        False,
        "reach the encoders over TLS (implied by --encoder-tls-ca and --encoder-tls-cert); "
        "without --encoder-tls-ca the system's roots verify them",
    )
    encoder_tls_ca: Path | None = setting(None, "PEM CA that signed the encoders' certificates")
    encoder_tls_cert: Path | None = setting(
        None, "PEM client certificate shown to encoders that ask for one (mutual TLS)"
    )
    encoder_tls_key: Path | None = setting(None, "PEM private key of --encoder-tls-cert")
    encoder_auth_token: str = setting(
        "", "bearer token sent to the encoders; set the variable: a flag shows in the process list"
    )
    encoder_auth_token_file: Path | None = setting(
        None, "file holding the bearer token sent to the encoders"
    )
    batch_size: int = setting(5000, "products committed per catalog transaction")
    sqlite_synchronous: str = setting(
        "FULL",
        "SQLite durability: FULL, an acknowledged write survives power loss (an upsert's "
        "batches are synced before it returns); NORMAL, only process crashes; "
        "ignored for other databases",
        choices=("FULL", "NORMAL"),
    )
    snapshot_interval_s: float = setting(
        300.0, "seconds between index snapshots while the catalog changes (0: only at shutdown)"
    )
    catch_up_interval_s: float = setting(
        1.0,
        "seconds between reads of the catalog's change log, which bring in what other "
        "processes sharing the catalog wrote (0: only at start)",
    )
    deletions_retention_days: float = setting(
        7.0,
        "days the catalog keeps its log of deleted products; a process or snapshot further "
        "behind rebuilds its index from the catalog (0: keep the log forever)",
    )
    catalog_pool_size: int = setting(
        8,
        "connections kept open to a PostgreSQL catalog, and as many more under bursts; "
        "ignored for SQLite",
    )
    query_cache_size: int = setting(
        10_000, "image and text query embeddings kept, least recently used out first (0: off)"
    )
    query_cache_max_bytes: int = setting(
        64 * 1024 * 1024, "estimated bytes the query embedding cache may hold"
    )
    search_threads: int = setting(
        8,
        "worker threads that run searches; those of an index that answers in under 0.5 ms "
        "(HNSW, a small Flat) run on the event loop instead",
    )
    scan_threads: int = setting(
        min(2, os.cpu_count() or 1),
        "threads one exact (Flat) search scans with: the float16 copy is split in as many shards",
    )
    metrics_port: int = setting(9152, "Prometheus metrics HTTP port (0 disables)")
    max_message_bytes: int = setting(64 * 1024 * 1024, "largest gRPC message, in bytes")
    grace_s: float = setting(10.0, "seconds running calls get to finish at shutdown")
    log_level: str = setting("INFO", "log level", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", f"must be 0 to 65535, got {self.port}")
        check(
            0 <= self.metrics_port <= 65535,
            "metrics_port",
            f"must be 0 to 65535, got {self.metrics_port}",
        )
        check(bool(self.catalog_url.strip()), "catalog_url", "must not be empty")
        check(bool(self.index_factory.strip()), "index_factory", "must not be empty")
        check(
            0 <= self.target_recall <= 1,
            "target_recall",
            f"must be 0 (off) to 1, got {self.target_recall}",
        )
        problem = factory_problem(self.index_factory) if self.index_device == "cuda" else None
        check(problem is None, "index_device", f"cuda: {problem}")
        for target in self.encoder:
            check(
                bool(_TARGET.match(target)),
                "encoder",
                f"{target!r} is not host:port or a gRPC target such as dns:///name:port",
            )
        check(self.encoder_timeout_s > 0, "encoder_timeout_s", "must be positive")
        check_tls_settings(
            self, "encoder_tls_cert", "encoder_tls_key", "encoder_tls_ca", server=False
        )
        check_token_settings(self, "encoder_auth_token", "encoder_auth_token_file", server=False)
        check(
            1 <= self.batch_size <= 100_000,
            "batch_size",
            f"must be 1 to 100000, got {self.batch_size}",
        )
        check(self.snapshot_interval_s >= 0, "snapshot_interval_s", "must not be negative")
        check(self.catch_up_interval_s >= 0, "catch_up_interval_s", "must not be negative")
        check(
            self.deletions_retention_days >= 0,
            "deletions_retention_days",
            "must not be negative",
        )
        check(1 <= self.catalog_pool_size <= 1000, "catalog_pool_size", "must be 1 to 1000")
        check(self.query_cache_size >= 0, "query_cache_size", "must not be negative")
        check(self.query_cache_max_bytes >= 0, "query_cache_max_bytes", "must not be negative")
        check(self.search_threads >= 1, "search_threads", "must be at least 1")
        check(1 <= self.scan_threads <= 64, "scan_threads", "must be 1 to 64")
        check(self.max_message_bytes >= 1024, "max_message_bytes", "must be at least 1024")
        check(self.grace_s >= 0, "grace_s", "must not be negative")
        self.check_guards()

    def encoder_security(self) -> ClientSecurity:
        """How this service reaches its encoders (reads the files: call once, at start)."""
        return ClientSecurity.load(
            tls=self.encoder_tls,
            ca=self.encoder_tls_ca,
            cert=self.encoder_tls_cert,
            key=self.encoder_tls_key,
            token=self.encoder_auth_token,
            token_file=self.encoder_auth_token_file,
        )
