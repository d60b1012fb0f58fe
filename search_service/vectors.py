"""Vector checks where vectors enter the service: dimension, finiteness, norm; then L2-normalize."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vpm_common.errors import FailedPrecondition, InvalidArgument


def unit_vector(
    values: Sequence[float] | np.ndarray, field: str, dim: int | None = None
) -> np.ndarray:
    """`values` as an L2-normalized float32 vector; InvalidArgument naming `field` otherwise.

    A wrong dimension is INVALID_ARGUMENT here (a malformed query); upserts check
    the dimension against the catalog's model separately (`check_model`).
    """
    vector = np.asarray(values, dtype=np.float32)
    if vector.ndim != 1 or vector.size == 0:
        raise InvalidArgument(f"{field}: must be a non-empty list of numbers")
    if dim is not None and vector.size != dim:
        raise InvalidArgument(
            f"{field}: expected {dim} values (the catalog's dimension), got {vector.size}"
        )
    # float64 so that tiny or huge components neither underflow nor overflow the norm; the
    # sum of squares is finite exactly when every component is (a float32's square fits a
    # float64), so one dot product checks finiteness too. This runs once per query: a
    # profile of the Search RPC found the separate isfinite/all/norm calls in its top costs.
    wide = vector.astype(np.float64)
    squares = float(wide @ wide)
    if not math.isfinite(squares):
        where = int(np.argmin(np.isfinite(vector)))
        raise InvalidArgument(f"{field}: value {where} is not finite ({vector[where]})")
    if squares == 0.0:
        raise InvalidArgument(f"{field}: has zero norm")
    wide /= math.sqrt(squares)
    return wide.astype(np.float32)


def unit_vectors(
    rows: Sequence[Sequence[float] | np.ndarray], field: str
) -> list[np.ndarray | InvalidArgument]:
    """`unit_vector` for many vectors at once (vectorized per length): a vector or an error each."""
    arrays = [np.asarray(row, dtype=np.float32) for row in rows]
    results: list[np.ndarray | InvalidArgument | None] = [None] * len(arrays)
    by_size: dict[int, list[int]] = {}
    for i, array in enumerate(arrays):
        if array.ndim == 1 and array.size:
            by_size.setdefault(array.size, []).append(i)
    for positions in by_size.values():
        unit, errors = unit_rows(np.stack([arrays[i] for i in positions]), field)
        for row, i in enumerate(positions):
            results[i] = errors.get(row, unit[row])
    for i, result in enumerate(results):
        if result is None:
            try:
                results[i] = unit_vector(arrays[i], field)
            except InvalidArgument as err:
                results[i] = err
    return results  # type: ignore[return-value]


def unit_rows(matrix: np.ndarray, field: str) -> tuple[np.ndarray, dict[int, InvalidArgument]]:
    """The rows of a 2-D float32 `matrix` L2-normalized, and the errors of rows that cannot be.

    A failed row's values in the result are undefined. Rows whose float32 norm is
    not finite, zero, or near overflow or underflow go one by one through
    `unit_vector` (float64), which either normalizes them or names the problem.
    """
    # einsum sums the squares without np.linalg.norm's temporary copy of the matrix.
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    good = np.isfinite(norms) & (norms > 1e-18) & (norms < 1e18)
    if good.all():
        return matrix / norms[:, None], {}
    unit = np.zeros_like(matrix)
    unit[good] = matrix[good] / norms[good, None]
    errors = {}
    for row in np.flatnonzero(~good).tolist():
        try:
            unit[row] = unit_vector(matrix[row], field)
        except InvalidArgument as err:
            errors[row] = err
    return unit, errors


def check_model(
    model_id: str, size: int, catalog_model: str | None, catalog_dim: int | None
) -> None:
    """FailedPrecondition unless a vector of `model_id` and `size` may join the catalog."""
    if catalog_model is None:
        return
    if model_id != catalog_model:
        raise FailedPrecondition(
            f"model_id: {model_id!r} differs from the catalog's model {catalog_model!r}"
        )
    if size != catalog_dim:
        raise FailedPrecondition(
            f"vector: {size} values, but the catalog holds {catalog_dim}-dimensional vectors "
            f"of model {catalog_model!r}"
        )


# The catalog's storage form of a vector: little-endian float32.
STORED = np.dtype("<f4")


def to_bytes(vector: np.ndarray) -> bytes:
    """A vector in the catalog's storage form."""
    # `is` first: float32 arrays share this dtype object, and comparing dtypes
    # with == (or building one from "<f4") cost more than the copy (2 KB vectors).
    if vector.dtype is STORED or vector.dtype == STORED:
        return vector.tobytes()
    return np.asarray(vector, dtype=STORED).tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=STORED).astype(np.float32)
