"""Server interceptors that guard every call: bearer tokens (TokenAuth) and a cap (CallLimit).

Both act before the request is parsed, and a refusal is a status with a short
message. Also here: what a token may look like, and token files.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from vpm_common.server.rpc import handler_kind

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_CHECK = HEALTH_PREFIX + "Check"
MIN_TOKEN_LENGTH = 16
# RFC 6750's b64token: what may follow "Bearer " in an HTTP/2 header.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_problem(token: str) -> str | None:
    """Why `token` cannot be a bearer token, without quoting it; None when it can."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"a token needs at least {MIN_TOKEN_LENGTH} characters (make one: {MAKE_TOKEN})"
    if not _TOKEN.match(token):
        return "a token may hold letters, digits and -._~+/ (then '=' padding) only"
    return None


def read_token_file(path: Path) -> tuple[str, ...]:
    """The tokens of a file: one per line; blank lines and lines starting with # are skipped.

    ValueError (naming the line, never the token) for a token that cannot be one.
    """
    tokens = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        problem = token_problem(line)
        if problem is not None:
            raise ValueError(f"line {number}: {problem}")
        tokens.append(line)
    return tuple(tokens)


class TokenSet:
    """The tokens a server accepts: the inline one, and those of a file read again when it changes.

    Tokens are kept as SHA-256 digests and compared with hmac.compare_digest against
    every one of them, so the time taken says nothing of how much of a guess matched
    (nor, digests being of one length, of a token's length). A file that changes into
    one with no valid token is ignored with an error in the log: the last good set stays.
    """

    def __init__(self, token: str = "", path: Path | None = None, recheck_s: float = 5.0) -> None:
        self._inline = [_digest(token)] if token else []
        self._path = path
        self._recheck_s = recheck_s
        self._checked = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: list[bytes] = []
        if path is not None:
            self._reload(force=True)

    def __contains__(self, presented: str) -> bool:
        if self._path is not None and time.monotonic() - self._checked >= self._recheck_s:
            self._reload()
        digest = _digest(presented)
        matched = False
        for known in (*self._inline, *self._from_file):
            matched |= hmac.compare_digest(known, digest)
        return matched

    def _reload(self, force: bool = False) -> None:
        self._checked = time.monotonic()
        try:
            info = self._path.stat()
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
            if stamp == self._stamp and not force:
                return
            tokens = read_token_file(self._path)
            if not tokens:
                raise ValueError("no token in it")
        except (OSError, ValueError) as error:
            if force:
                raise
            logger.error(
                "token file %s not reloaded, keeping the tokens read before: %s", self._path, error
            )
            return
        if self._stamp is not None:
            logger.info("token file %s reloaded: %d tokens", self._path, len(tokens))
        self._stamp = stamp
        self._from_file = [_digest(token) for token in tokens]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenAuth(aio.ServerInterceptor):
    """Every call but grpc.health.v1's needs `authorization: Bearer <token>` with a known token.

    A missing or unknown token is UNAUTHENTICATED (the caller did not prove who it
    is; PERMISSION_DENIED would mean it did and may not): the message says which of
    the two, nothing more. Health stays open so that probes need no secret;
    reflection is closed like any service, since it describes every method.
    The request is not parsed for a refused call.
    """

    def __init__(self, tokens: TokenSet, open_prefixes: Sequence[str] = (HEALTH_PREFIX,)) -> None:
        self._tokens = tokens
        self._open = tuple(open_prefixes)
        self._refused = 0
        self._logged = 0.0

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        problem = self._problem(details.invocation_metadata or ())
        if problem is None:
            return handler
        return refusing(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            problem,
            lambda peer: self._note_refusal(details.method, peer),
        )

    def _problem(self, metadata: Sequence[tuple[str, Any]]) -> str | None:
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "authentication required: send 'authorization: Bearer <token>'"
        scheme, _, token = str(values[0]).partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self._tokens:
            return "invalid bearer token"
        return None

    def _note_refusal(self, method: str, peer: str) -> None:
        # One line per 10 s at most: a client hammering with bad tokens must not flood the log.
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= 10.0:
            logger.warning(
                "refused %d call(s) without a valid token; latest %s from %s",
                self._refused,
                method,
                peer,
            )
            self._refused, self._logged = 0, now


class CallLimit(aio.ServerInterceptor):
    """At most `max_calls` calls in flight server-wide; past that, RESOURCE_EXHAUSTED at once.

    grpc.aio.server(maximum_concurrent_rpcs=) would count health checks too, and a
    busy server would then fail its liveness probe and be restarted: here
    Health/Check is never refused. (Health/Watch streams do count.)
    """

    def __init__(self, max_calls: int, exempt: Sequence[str] = (HEALTH_CHECK,)) -> None:
        self.max_calls = max_calls
        self.active = 0
        self._exempt = frozenset(exempt)

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method in self._exempt:
            return handler
        kind = handler_kind(handler)
        behavior = getattr(handler, kind)
        wrap = self._streaming if handler.response_streaming else self._unary
        return handler._replace(**{kind: wrap(behavior)})

    async def _admit(self, context: aio.ServicerContext) -> None:
        if self.active >= self.max_calls:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is at its limit of {self.max_calls} calls in flight; retry shortly",
            )
        self.active += 1

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def limited(request: Any, context: aio.ServicerContext) -> Any:
            await self._admit(context)
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return limited

    def _streaming(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def limited(request: Any, context: aio.ServicerContext) -> Any:
            await self._admit(context)
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        yield reply
                else:  # a coroutine that writes its replies with context.write
                    await result
            finally:
                self.active -= 1

        return limited


def refusing(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    message: str,
    on_refusal: Callable[[str], None] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code` without parsing the request;
    `on_refusal` hears the peer's address."""

    async def refuse(request: Any, context: aio.ServicerContext) -> None:
        if on_refusal is not None:
            on_refusal(context.peer())
        await context.abort(code, message)

    return handler._replace(request_deserializer=_ignore, **{handler_kind(handler): refuse})


def _ignore(data: bytes) -> None:
    return None
