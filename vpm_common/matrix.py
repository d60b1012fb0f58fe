"""Packing vectors into a vpm.v1.VectorMatrix and back: one copy each way, no per-float Python.

The byte layout is documented in protos/vpm/v1/vectors.proto, so that clients in
other languages decode it without this module; this is the Python side of it.
"""

from __future__ import annotations

import numpy as np

from vpm.v1 import vectors_pb2
from vpm_common.errors import InvalidArgument

# Little-endian on the wire whatever this machine's byte order.
WIRE_DTYPES = {
    vectors_pb2.FLOAT32: np.dtype("<f4"),
    vectors_pb2.FLOAT16: np.dtype("<f2"),
}


def pack(matrix: np.ndarray, dtype: int = vectors_pb2.FLOAT32) -> vectors_pb2.VectorMatrix:
    """A (rows, dim) matrix as a VectorMatrix of `dtype` (vectors_pb2.FLOAT32 or FLOAT16)."""
    wire = WIRE_DTYPES.get(dtype)
    if wire is None:
        raise InvalidArgument(f"dtype: unknown vector dtype {dtype}")
    if matrix.ndim != 2:
        raise ValueError(f"a vector matrix has two dimensions, not {matrix.ndim}")
    rows, dim = matrix.shape
    data = np.ascontiguousarray(matrix, dtype=wire).tobytes()
    return vectors_pb2.VectorMatrix(rows=rows, dim=dim, dtype=dtype, data=data)


def unpack(message: vectors_pb2.VectorMatrix, field: str = "vectors") -> np.ndarray:
    """The float32 (rows, dim) matrix a VectorMatrix carries (read-only: it may be a view of
    the message's bytes); InvalidArgument naming `field` when its sizes do not add up.
    Values are not checked here (see the callers' checks)."""
    wire = WIRE_DTYPES.get(message.dtype)
    if wire is None:
        raise InvalidArgument(f"{field}.dtype: unknown vector dtype {message.dtype}")
    rows, dim = message.rows, message.dim
    if rows < 0 or dim < 0 or (rows and not dim):
        raise InvalidArgument(f"{field}: rows and dim must be positive, got {rows} x {dim}")
    data = message.data  # each read of a bytes field makes a new Python object: read it once
    expected = rows * dim * wire.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data: {rows} x {dim} {wire.name} values take {expected} bytes, "
            f"got {len(data)}"
        )
    matrix = np.frombuffer(data, dtype=wire).reshape(rows, dim)
    # float32 on a little-endian machine is a read-only view of the message's bytes:
    # callers that normalize make their own copy; float16 becomes a float32 copy here.
    return matrix.astype(np.float32, copy=False)
