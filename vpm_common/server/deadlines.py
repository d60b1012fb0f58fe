"""The deadline of the call being served, for the calls it makes in turn (a context variable).

A search whose caller allows 2 s must not give its encoder call 30 s: the
encoder would queue the work instead of shedding it, and answer after the
caller has gone. The servicer records its caller's deadline here; clients
deeper down cap their own timeouts with it. Tasks started while serving the
call inherit it, as asyncio copies context variables into new tasks.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

_DEADLINE: ContextVar[float | None] = ContextVar("vpm_call_deadline", default=None)


@contextlib.contextmanager
def caller_deadline(context: Any) -> Iterator[None]:
    """While serving `context` (a grpc ServicerContext), remember when its caller gives up."""
    remaining = context.time_remaining()
    token = _DEADLINE.set(None if remaining is None else time.monotonic() + remaining)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def capped(timeout_s: float | None) -> float | None:
    """`timeout_s`, shortened to what is left of the caller's deadline, if there is one."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout_s
    left = max(0.0, deadline - time.monotonic())
    return left if timeout_s is None else min(timeout_s, left)


def shared_context() -> contextvars.Context:
    """The current context without the caller's deadline, for work done for several callers
    (one encoding that identical queries wait for): one caller's deadline must not cut
    short the answer the others wait for. Each caller still leaves at its own deadline."""
    context = contextvars.copy_context()
    context.run(_DEADLINE.set, None)
    return context
