"""Checks of what enters the service: search options, and upsert items (ids, vectors, images)."""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import re
from collections.abc import Sequence

import numpy as np

from search_service.index.filters import Term, parse_filters
from search_service.models import (
    DEFAULT_TOP_K,
    MAX_ID_LENGTH,
    MAX_RESULT_WINDOW,
    MAX_TOP_K,
    METADATA_FIELDS,
    ItemFailure,
    Product,
    SearchQuery,
    UpsertItem,
    UpsertSummary,
)
from search_service.vectors import unit_rows, unit_vectors
from vpm_common.errors import InvalidArgument

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def query_options(query: SearchQuery) -> tuple[int, list[Term]]:
    """top_k (0 means the default) and the parsed filters; InvalidArgument naming the field."""
    top_k = query.top_k or DEFAULT_TOP_K
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(
            f"top_k: must be between 1 and {MAX_TOP_K} (0 means {DEFAULT_TOP_K}), got {top_k}"
        )
    if query.offset < 0:
        raise InvalidArgument(f"offset: must not be negative, got {query.offset}")
    if query.offset + top_k > MAX_RESULT_WINDOW:
        raise InvalidArgument(
            f"offset: offset + top_k must be at most {MAX_RESULT_WINDOW}, "
            f"got {query.offset + top_k}"
        )
    if query.min_score is not None and not -1.0 <= query.min_score <= 1.0:
        # A score is a cosine: above 1 nothing would ever match, below -1 the filter is void.
        raise InvalidArgument(
            f"min_score: must be a number from -1 to 1 (a cosine), got {query.min_score}"
        )
    return top_k, parse_filters(query.filters)


def checked_items(items: list[UpsertItem], summary: UpsertSummary) -> list[UpsertItem]:
    """Items that pass the checks, vectors normalized and image hashes set; failures recorded.
    An item with neither vector nor image passes as it is: whether its product is stored,
    for its vector to be kept, is the commit's to say (Catalog.upsert)."""
    kept: list[UpsertItem] = []
    with_vectors: list[int] = []
    for item in items:
        try:
            item = _check_item(item)
        except InvalidArgument as err:
            summary.failures.append(ItemFailure(item.product.id, err.code, err.message))
            continue
        if item.vector is not None:
            with_vectors.append(len(kept))
        kept.append(item)
    vectors = unit_vectors([kept[i].vector for i in with_vectors], "vector")
    failed = set()
    for i, vector in zip(with_vectors, vectors, strict=True):
        if isinstance(vector, InvalidArgument):
            summary.failures.append(ItemFailure(kept[i].product.id, vector.code, vector.message))
            failed.add(i)
        else:
            kept[i] = UpsertItem(kept[i].product, vector)
    return [item for i, item in enumerate(kept) if i not in failed]


def row_matrix(vectors: np.ndarray | Sequence[Sequence[float]], rows: int) -> np.ndarray:
    """`vectors` as a float32 matrix of `rows` rows; InvalidArgument when it is not one."""
    matrix = np.asarray(vectors, dtype=np.float32)
    if rows == 0 and matrix.size == 0:
        return matrix.reshape(0, 0)
    if matrix.ndim != 2 or len(matrix) != rows:
        raise InvalidArgument(
            f"vectors: expected a matrix with one row per product ({rows} rows), "
            f"got an array of shape {matrix.shape}"
        )
    return matrix


def checked_rows(
    products: Sequence[Product], matrix: np.ndarray, summary: UpsertSummary
) -> tuple[list[Product], np.ndarray]:
    """The products that pass the checks and their vectors normalized, one row each.

    The bulk form of `checked_items` for products with vectors, given as a
    `row_matrix`; failures are recorded in `summary`, a product's own error
    before its vector's. Model ids are the caller's to fill (see the engine).
    """
    unit, errors = unit_rows(matrix, "vector")
    kept: list[Product] = []
    rows: list[int] = []
    for row, product in enumerate(products):
        try:
            _check_id(product)
            _check_text(product)
            _check_image_hash(product)
        except InvalidArgument as err:
            errors[row] = err
        if row in errors:
            summary.failures.append(ItemFailure(product.id, errors[row].code, errors[row].message))
        else:
            kept.append(product)
            rows.append(row)
    return kept, unit if len(rows) == len(unit) else unit[rows]


def _check_item(item: UpsertItem) -> UpsertItem:
    _check_id(item.product)
    _check_text(item.product)
    has_vector = item.vector is not None and len(item.vector) > 0
    if has_vector and item.image is not None:
        raise InvalidArgument("vector, image: set one of them, not both")
    if item.image is None:  # with a vector, or neither: metadata only (see Catalog.upsert)
        _check_image_hash(item.product)
        return item if has_vector else UpsertItem(item.product)
    if not item.image:
        raise InvalidArgument("image: must not be empty")
    digest = hashlib.sha256(item.image).hexdigest()
    return UpsertItem(dataclasses.replace(item.product, image_sha256=digest), image=item.image)


def _check_id(product: Product) -> None:
    """The product's id, and its model's: the catalog's columns hold MAX_ID_LENGTH characters
    (PostgreSQL refused a whole batch for one longer model id; SQLite took it)."""
    if not 1 <= len(product.id) <= MAX_ID_LENGTH:
        raise InvalidArgument(f"id: must be 1 to {MAX_ID_LENGTH} characters, got {len(product.id)}")
    if len(product.model_id) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"model_id: must be at most {MAX_ID_LENGTH} characters, got {len(product.model_id)}"
        )


# A product's text fields (image_sha256 is checked as hex). PostgreSQL stores no NUL
# character in text and refused the whole batch for one, where SQLite took it: refused
# alone here, whatever the catalog, so that both behave alike.
TEXT_FIELDS = ("id", *(name for name in METADATA_FIELDS if name != "year"), "model_id")


_text_fields = operator.attrgetter(*TEXT_FIELDS)


def _check_text(product: Product) -> None:
    # One scan of the fields joined, field by field only to name the one at fault: this runs
    # for every product of a bulk upsert.
    if "\0" in "".join(_text_fields(product)):
        name = next(name for name in TEXT_FIELDS if "\0" in getattr(product, name))
        raise InvalidArgument(f"{name}: must not contain NUL characters (U+0000)")
    for key, value in product.attributes.items():
        if "\0" in key or "\0" in value:
            raise InvalidArgument(f"attributes[{key!r}]: must not contain NUL characters (U+0000)")


def _check_image_hash(product: Product) -> None:
    """A hash sent with a vector (no image) must at least have the form of one."""
    if product.image_sha256 and not SHA256_HEX.fullmatch(product.image_sha256):
        raise InvalidArgument("image_sha256: must be 64 lower-case hex digits")
