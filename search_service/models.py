"""The search domain's plain data: products, queries, matches and summaries (no gRPC, no SQL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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

MAX_ID_LENGTH = 256  # product ids and model ids alike
MAX_TOP_K = 1000
DEFAULT_TOP_K = 10
MAX_RESULT_WINDOW = 10_000  # offset + top_k


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# which made building one ~1.1 us slower (measured), paid once per product of every bulk
# upsert. Treat it as immutable all the same: change one with dataclasses.replace.
@dataclass(slots=True)
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
class VectorBatch:
    """Products to add or replace with their vectors as the rows of one matrix, in order.

    Each product names the model of its row (empty: the encoders'). The rows need
    not be unit vectors: they are checked and normalized as a matrix where they
    enter.
    """

    products: Sequence[Product]
    vectors: np.ndarray
    # How many products the whole upsert carries, when its caller said (0: unknown).
    stream_products: int = 0


# What an upsert takes: products one by one, or many at once with a matrix.
UpsertEntry = UpsertItem | VectorBatch


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
    random_weights: bool = False


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
class FilterRecall:
    """Recall@k of filtered searches at one filter selectivity, and which way they go.

    `allowed` keys pass a random filter of `selectivity`; `approximate_recall` and
    the two costs (median milliseconds per query) were measured with both the
    approximate index and the exact scan of those keys; `exact` tells which the
    service chose: the scan when the index misses the target or costs more.
    """

    selectivity: float
    allowed: int
    approximate_recall: float
    approximate_ms: float
    exact_ms: float
    exact: bool


@dataclass(frozen=True, slots=True)
class IndexTuning:
    """What the recall measurement of an approximate index found and chose (see tuning).

    `status`: "off" (no --target-recall), "exact" (a Flat index: nothing to measure),
    "pending" (not measured yet), "measured". `value` of `parameter` (efSearch,
    nprobe; empty for an index without one) is the smallest that reached
    `target_recall`; when none did (`reached` false), the one with the best
    recall. `measured_recall` is recall@k at `value` over `sample_size`
    catalog vectors used as queries, each left out of its own results.
    Filtered sets of at most `exact_filter_limit` keys are scored exactly.
    """

    status: str = "off"
    target_recall: float = 0.0
    measured_recall: float = 0.0
    parameter: str = ""
    value: int = 0
    reached: bool = False
    k: int = 0
    sample_size: int = 0
    measured_at_version: int = 0
    measured_at: float = 0.0  # Unix time
    seconds: float = 0.0  # what the measurement took
    exact_filter_limit: int = 0
    filters: tuple[FilterRecall, ...] = ()


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
    index_tuning: IndexTuning = field(default_factory=IndexTuning)


# Facets: the filterable fields a search page offers, in this order, when none are asked for:
# the metadata columns but the name, which is one value a product.
FACET_FIELDS = tuple(name for name in METADATA_FIELDS if name != "name")
DEFAULT_FACET_VALUES = 100
MAX_FACET_VALUES = 1000


@dataclass(frozen=True, slots=True)
class FacetQuery:
    """Which fields to count values of (empty: FACET_FIELDS), over the products the filters
    match, keeping the `max_values` most frequent values of each (0: the default)."""

    fields: tuple[str, ...] = ()
    filters: Mapping[str, str] = field(default_factory=dict)
    max_values: int = 0


@dataclass(frozen=True, slots=True)
class FacetValue:
    value: str
    count: int


@dataclass(frozen=True, slots=True)
class Facet:
    """One field's values, most products first; `other` counts products of values left out."""

    field: str
    values: list[FacetValue]
    other: int = 0


@dataclass(frozen=True, slots=True)
class FacetResult:
    facets: list[Facet]
    products: int
    catalog_version: int
