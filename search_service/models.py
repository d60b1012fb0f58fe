"""The search domain's plain data: products, queries, matches and summaries (no gRPC, no SQL)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

# The product columns besides the id, in catalog order; all strings except `year`.
METADATA_FIELDS = (
    "name",
    "gender",
    "master_category",
    "sub_category",
    "article_type",
    "base_colour",
    "season",
    "year",
    "usage",
    "category",
)

MAX_ID_LENGTH = 256
MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_RESULT_WINDOW = 10_000  # offset + top_k


@dataclass(frozen=True, slots=True)
class Product:
    """One catalog product's metadata; its vector travels beside it, never inside."""

    id: str
    name: str = ""
    gender: str = ""
    master_category: str = ""
    sub_category: str = ""
    article_type: str = ""
    base_colour: str = ""
    season: str = ""
    year: int = 0
    usage: str = ""
    category: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    image_sha256: str = ""
    model_id: str = ""


@dataclass(frozen=True, slots=True)
class UpsertItem:
    """A product to add or replace, with either its `vector` or its `image` file."""

    product: Product
    vector: np.ndarray | None = None
    image: bytes | None = None


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """Why one item of a batch was refused; `code` is a gRPC status code number."""

    id: str
    code: int
    message: str


@dataclass(slots=True)
class UpsertSummary:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    catalog_version: int = 0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def add(self, other: UpsertSummary) -> None:
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.failures.extend(other.failures)
        self.catalog_version = max(self.catalog_version, other.catalog_version)


@dataclass(frozen=True, slots=True)
class DeleteSummary:
    deleted: int
    not_found: list[str]
    catalog_version: int


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Exactly one of image, text, product_id and vector is set (checked by the engine)."""

    image: bytes | None = None
    text: str | None = None
    product_id: str | None = None
    vector: np.ndarray | None = None
    top_k: int = 0
    offset: int = 0
    min_score: float | None = None
    filters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Match:
    product: Product
    score: float


@dataclass(frozen=True, slots=True)
class SearchResult:
    matches: list[Match]
    model_id: str


@dataclass(frozen=True, slots=True)
class EncoderState:
    target: str
    state: str
    model_id: str


@dataclass(frozen=True, slots=True)
class QueryCacheStats:
    """The query embedding cache's state and counters since start (all zero when disabled)."""

    enabled: bool = False
    entries: int = 0
    max_entries: int = 0
    bytes: int = 0
    max_bytes: int = 0
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        """Share of image and text queries that cost no encoder call (0 before the first)."""
        lookups = self.hits + self.misses + self.coalesced
        return (self.hits + self.coalesced) / lookups if lookups else 0.0


@dataclass(frozen=True, slots=True)
class Stats:
    products: int
    index_type: str
    index_size: int
    catalog_url: str
    catalog_version: int
    model_id: str
    dim: int
    encoders: list[EncoderState]
    query_cache: QueryCacheStats = field(default_factory=QueryCacheStats)
