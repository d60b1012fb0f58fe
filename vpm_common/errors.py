"""Domain errors that know nothing of gRPC; the RPC boundary turns each into its status code.

Domain objects (the encoder engine, the catalog, the index) raise these with a
message fit for a client: it names the offending field and never carries a
stack trace, a file path or SQL.
"""

from __future__ import annotations

# The canonical gRPC status code numbers (google.rpc.Code), for per-item errors.
STATUS_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


class VpmError(Exception):
    """Base of the errors a client may see; `status` is the gRPC status code name."""

    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> int:
        return STATUS_CODES[self.status]


class InvalidArgument(VpmError):
    status = "INVALID_ARGUMENT"


class NotFound(VpmError):
    status = "NOT_FOUND"


class FailedPrecondition(VpmError):
    status = "FAILED_PRECONDITION"


class ResourceExhausted(VpmError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(VpmError):
    status = "UNAVAILABLE"


class DeadlineExceeded(VpmError):
    status = "DEADLINE_EXCEEDED"


class Cancelled(VpmError):
    status = "CANCELLED"
