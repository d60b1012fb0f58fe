"""The page's boundary: search service statuses become domain errors, domain errors HTTP statuses.

The gRPC status of a failed call is turned into the vpm_common error of the
same name once (`from_rpc`), and every handler's error into a JSON reply with
an HTTP status once (`http_status`), so the page shows one message format.
"""

from __future__ import annotations

import logging

import grpc

from vpm_common.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    VpmError,
)

logger = logging.getLogger(__name__)

_ERRORS = {
    error.status: error
    for error in (Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                  ResourceExhausted, Unavailable)
}  # fmt: skip
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 503,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# How gRPC itself words a connection that failed, as opposed to a status the service sent.
_TRANSPORT = ("failed to connect", "connection refused", "connection reset", "socket closed",
              "dns resolution failed", "broken pipe", "goaway", "handshake")  # fmt: skip
SEARCH_DOWN = (
    "The search service does not answer: it may be starting, restarting or down. "
    "Try again in a moment."
)


class UploadTooLarge(InvalidArgument):
    """A query photo over the size or pixel limits (HTTP 413)."""


class NotAllowed(VpmError):
    """The search service refused the page itself (its token or certificate)."""


def from_rpc(error: grpc.RpcError) -> VpmError:
    """The domain error for a failed call to the search service, its message fit for a page."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and any(t in details.lower() for t in _TRANSPORT):
        return Unavailable(SEARCH_DOWN)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("The search service took too long to answer. Try again.")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        logger.error("the search service refused this page: %s: %s", code.name, details)
        return NotAllowed("The search service refused this page; its operator must check the "
                          "page's token or certificate (see the page's log).")  # fmt: skip
    known = _ERRORS.get(code.name)
    if known is None:
        logger.error("search service call failed: %s: %s", code.name, details)
        return VpmError(f"The search service failed ({code.name}); see its log.")
    return known(details)


def http_status(error: VpmError) -> int:
    if isinstance(error, UploadTooLarge):
        return 413
    return _HTTP_STATUS.get(error.status, 500)
