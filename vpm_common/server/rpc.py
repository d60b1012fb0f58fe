"""The gRPC boundary: domain errors become status codes, anything else INTERNAL with a reference.

Servicer methods are wrapped with `rpc_boundary`, so nothing escapes as
UNKNOWN and no stack trace or internal path reaches a client: unexpected
exceptions are logged here with a short reference the client also gets.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc import aio

from vpm_common.errors import InvalidArgument, VpmError

logger = logging.getLogger(__name__)


def status_code(error: VpmError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


async def _abort_for(error: BaseException, context: aio.ServicerContext, name: str) -> None:
    if isinstance(error, VpmError):
        await context.abort(status_code(error), error.message)
    ref = uuid.uuid4().hex[:8]
    logger.error("%s failed (ref %s)", name, ref, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")


def rpc_boundary(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an async servicer method (coroutine or async generator) with the error mapping."""
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: aio.ServicerContext) -> Any:
            try:
                async for reply in method(self, request, context):
                    yield reply
            except aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - the boundary maps every error
                await _abort_for(error, context, name)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - the boundary maps every error
            await _abort_for(error, context, name)

    return unary_wrapper


class _Malformed:
    """Stands in for a request that failed to parse, so the handler can refuse it properly."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


class DecodeGuard(aio.ServerInterceptor):
    """Requests that are not valid protobuf get INVALID_ARGUMENT, not UNKNOWN with a stack trace.

    gRPC reports a failing request deserializer as UNKNOWN, quoting the
    exception. This interceptor makes the deserializer return a marker
    instead, and the handler answer INVALID_ARGUMENT for it, saying which
    message of the call was malformed and why (e.g. a string field holding
    bytes that are not UTF-8).
    """

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def guarded_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # noqa: BLE001 - DecodeError and friends
                return _Malformed(str(error).split(": ", 1)[-1] or type(error).__name__)

        kind = handler_kind(handler)
        behavior = getattr(handler, kind)
        guarded = (_guard_stream_requests if handler.request_streaming else _guard_unary_request)(
            behavior, handler.response_streaming
        )
        return handler._replace(request_deserializer=guarded_parse, **{kind: guarded})


def handler_kind(handler: Any) -> str:
    """Which of a method handler's four behaviours it has (its field name)."""
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]


def _refusal(what: str, malformed: _Malformed) -> str:
    return f"{what} is not a valid message: {malformed.reason}"


def _guard_unary_request(
    behavior: Callable[..., Any], response_streaming: bool
) -> Callable[..., Any]:
    if response_streaming:

        async def unary_stream(request: Any, context: aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, _refusal("the request", request)
                )
            async for reply in _replies(behavior(request, context)):
                yield reply

        return unary_stream

    async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal("the request", request))
        return await behavior(request, context)

    return unary_unary


class _MalformedInStream(InvalidArgument):
    """Raised inside a request stream; rpc_boundary maps it like any InvalidArgument."""


async def _checked(requests: Any) -> Any:
    index = 0
    async for request in requests:
        if isinstance(request, _Malformed):
            raise _MalformedInStream(_refusal(f"message {index} of the stream", request))
        index += 1
        yield request


async def _replies(result: Any) -> Any:
    """Replies of a response-streaming behavior: an async generator, or a coroutine that writes."""
    if inspect.isasyncgen(result):
        async for reply in result:
            yield reply
    else:
        await result


def _guard_stream_requests(
    behavior: Callable[..., Any], response_streaming: bool
) -> Callable[..., Any]:
    if response_streaming:

        async def stream_stream(requests: Any, context: aio.ServicerContext) -> Any:
            try:
                async for reply in _replies(behavior(_checked(requests), context)):
                    yield reply
            except _MalformedInStream as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

        return stream_stream

    async def stream_unary(requests: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(_checked(requests), context)
        except _MalformedInStream as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    return stream_unary
