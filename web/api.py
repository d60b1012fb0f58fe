"""The JSON API's shapes: query parameters to requests, replies to JSON (no HTTP, no gRPC calls)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from vpm.v1 import search_pb2
from vpm_common.errors import InvalidArgument

DEFAULT_TOP_K = 24
MAX_TOP_K = 100
FILTER_PREFIX = "filter."
# The attribute the indexer records each image's path in (indexer.sources.IMAGE_PATH_ATTRIBUTE),
# and the one a catalog may give a picture's address in.
IMAGE_PATH = "image_path"
IMAGE_URL = "image_url"
METADATA = ("gender", "master_category", "sub_category", "article_type", "base_colour",
            "season", "year", "usage", "category")  # fmt: skip
# Encoders name random weights in their model id ("<model>/random-seed<n>", encoder_service.model):
# what tells a search's vectors apart when no encoder is asked (a product-id query, the catalog's
# model); GetStats says it of each encoder (EncoderStatus.random_weights).
RANDOM_WEIGHTS_MARK = "/random-seed"


def search_request(params: Mapping[str, str], image: bytes | None) -> search_pb2.SearchRequest:
    """A SearchRequest from the page's parameters: exactly one of image, text and id; top_k,
    offset, min_score, and filter.<key>=value."""
    text, product_id = params.get("text", "").strip(), params.get("id", "").strip()
    given = [
        kind for kind, value in (("image", image), ("text", text), ("id", product_id)) if value
    ]
    if len(given) != 1:
        raise InvalidArgument("query: give exactly one of a photo, a text or a product id")
    request = search_pb2.SearchRequest(
        top_k=_integer(params, "top_k", DEFAULT_TOP_K, 1, MAX_TOP_K),
        offset=_integer(params, "offset", 0, 0, 10_000 - MAX_TOP_K),
        filters=filters(params),
    )
    if image:
        request.image = image
    elif text:
        request.text = text
    else:
        request.product_id = product_id
    min_score = params.get("min_score", "").strip()
    if min_score:
        try:
            value = float(min_score)
        except ValueError:
            value = math.nan
        if not -1 <= value <= 1:
            raise InvalidArgument(f"min_score: expected a number from -1 to 1, got {min_score!r}")
        request.min_score = value
    return request


def filters(params: Mapping[str, str]) -> dict[str, str]:
    """filter.<key>=value parameters (empty values mean no filter)."""
    return {
        key[len(FILTER_PREFIX) :]: value
        for key, value in params.items()
        if key.startswith(FILTER_PREFIX) and value
    }


def _integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = params.get(name, "").strip()
    if not text:
        return default
    # ASCII digits only: str.isdigit() also holds for "²", which int() refuses.
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise InvalidArgument(f"{name}: expected a whole number from {low} to {high}, got {text!r}")
    return int(text)


def product_json(product: search_pb2.Product, thumbnails: bool) -> dict[str, Any]:
    """A product as the page shows it, with the address of its picture (None: none)."""
    found = {"id": product.id, "name": product.name}
    found.update({name: getattr(product, name) for name in METADATA})
    found["attributes"] = dict(product.attributes)
    found["thumbnail"] = picture_url(product, thumbnails)
    return found


def picture_url(product: search_pb2.Product, thumbnails: bool) -> str | None:
    """The product's image_url (the browser loads it), else its thumbnail here, else None."""
    url = product.attributes.get(IMAGE_URL, "")
    if url.startswith(("https://", "http://")):
        return url
    path = product.attributes.get(IMAGE_PATH, "")
    if path and thumbnails:
        return "/thumbnails/" + quote(path)
    return None


def results_json(
    reply: search_pb2.SearchResponse,
    request: search_pb2.SearchRequest,
    took_ms: float,
    thumbnails: bool,
) -> dict[str, Any]:
    matches = []
    for match in reply.matches:
        shown = product_json(match.product, thumbnails)
        shown["score"] = round(match.score, 4)
        matches.append(shown)
    return {
        "matches": matches,
        "top_k": request.top_k,
        "offset": request.offset,
        # A full page may have a next one; a short one is the last.
        "more": len(matches) == request.top_k,
        "model_id": reply.model_id,
        "random_weights": random_weights(reply.model_id),
        "took_ms": round(took_ms, 1),
    }


def facets_json(reply: search_pb2.Facets) -> dict[str, Any]:
    return {
        "products": reply.products,
        "facets": [
            {
                "field": facet.field,
                "values": [{"value": v.value, "count": v.count} for v in facet.values],
                "other": facet.other,
            }
            for facet in reply.facets
        ],
    }


def status_json(stats: search_pb2.Stats) -> dict[str, Any]:
    """What the page says about the catalog and the encoders (their addresses stay here)."""
    models = sorted({e.model_id for e in stats.encoders if e.model_id})
    return {
        "products": stats.products,
        "index_type": stats.index_type,
        "catalog_version": stats.catalog_version,
        "model_id": stats.model_id,
        "encoders": {
            "total": len(stats.encoders),
            "serving": sum(e.state == "SERVING" for e in stats.encoders),
            "models": models,
        },
        "random_weights": random_weights(stats.model_id)
        or any(e.random_weights for e in stats.encoders),
    }


def random_weights(model_id: str) -> bool:
    return RANDOM_WEIGHTS_MARK in model_id
