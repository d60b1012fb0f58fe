"""The page's ASGI app: routes (thin handlers over the search client and the thumbnail store),
security headers, and the one place errors become HTTP replies."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpm.v1 import search_pb2
from vpm_common.errors import VpmError
from vpm_common.search_client import SearchClient
from web import api
from web.errors import from_rpc, http_status
from web.settings import WebSettings
from web.thumbnails import ThumbnailStore
from web.uploads import UploadLimits, read_upload

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# No inline script or style anywhere; pictures may come from a catalog's own image_url
# addresses, and an uploaded photo is previewed from a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' https: http: data: blob:; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"),
)


@dataclass
class Page:
    """What the handlers use: the search client (made on the serving loop) and the store."""

    settings: WebSettings
    thumbnails: ThumbnailStore | None
    client: SearchClient | None = None

    @property
    def search(self) -> SearchClient:
        assert self.client is not None, "the app's lifespan opens the client"
        return self.client

    @property
    def limits(self) -> UploadLimits:
        return UploadLimits(self.settings.max_upload_bytes, self.settings.max_upload_pixels)


def create_app(settings: WebSettings) -> Starlette:
    """The app for `settings`; its lifespan opens the channel to the search service."""
    thumbnails = (
        ThumbnailStore(settings.images, settings.thumbnail_size, settings.thumbnail_cache_bytes)
        if settings.images is not None
        else None
    )
    page = Page(settings, thumbnails)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        page.client = SearchClient(
            settings.search, settings.timeout_s, settings.security(), error=from_rpc
        )
        try:
            yield
        finally:
            await page.client.close()

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok")

    async def status(_request: Request) -> Response:
        return JSONResponse(api.status_json(await page.search.stats()))

    async def facets(request: Request) -> Response:
        fields = request.query_params.getlist("field")
        query = search_pb2.GetFacetsRequest(
            fields=fields, filters=api.filters(request.query_params)
        )
        return JSONResponse(api.facets_json(await page.search.facets(query)))

    async def search(request: Request) -> Response:
        params, image = dict(request.query_params), None
        if request.method == "POST":
            fields, image = await read_upload(request, page.limits)
            params.update(fields)
        query = api.search_request(params, image)
        started = time.perf_counter()
        reply = await page.search.search(query)
        took_ms = 1000 * (time.perf_counter() - started)
        return JSONResponse(api.results_json(reply, query, took_ms, thumbnails is not None))

    async def product(request: Request) -> Response:
        found = await page.search.product(request.path_params["product_id"])
        return JSONResponse(api.product_json(found, thumbnails is not None))

    async def thumbnail(request: Request) -> Response:
        if thumbnails is None:
            raise HTTPException(404, "this page serves no image folder (--images)")
        version = thumbnails.version(request.path_params["name"])
        headers = {
            "etag": version.etag,
            "last-modified": version.last_modified,
            "cache-control": "public, max-age=3600",
        }
        if _not_modified(request, version.etag, version.last_modified):
            return Response(status_code=304, headers=headers)
        data = await thumbnails.thumbnail(version)
        return Response(data, media_type="image/jpeg", headers=headers)

    routes = [
        Route("/", index),
        Route("/healthz", health),
        Route("/api/status", status),
        Route("/api/facets", facets),
        Route("/api/search", search, methods=["GET", "POST"]),
        Route("/api/products/{product_id:path}", product),
        Route("/thumbnails/{name:path}", thumbnail),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            VpmError: _domain_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    app.add_middleware(SecurityHeaders)
    return app


def _not_modified(request: Request, etag: str, last_modified: str) -> bool:
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        return etag in [tag.strip() for tag in if_none_match.split(",")] or if_none_match == "*"
    return request.headers.get("if-modified-since") == last_modified


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _domain_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, VpmError)
    return _error(http_status(error), error.status, error.message)


async def _http_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(error.status_code, "HTTP_ERROR")
    return _error(error.status_code, code, str(error.detail))


async def _unexpected_error(_request: Request, error: Exception) -> Response:
    ref = uuid.uuid4().hex[:8]
    logger.error("request failed (ref %s)", ref, exc_info=error)
    return _error(500, "INTERNAL", f"internal error (ref {ref})")


class SecurityHeaders:
    """Adds the security headers to every reply, and forbids caching of the API's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api_reply = scope["path"].startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    headers[name] = value
                if api_reply:
                    headers["cache-control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
