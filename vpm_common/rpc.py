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

from vpm_common.errors import VpmError

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
