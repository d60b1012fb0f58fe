"""The Search reply built from cached serialized products equals one built field by field."""

from __future__ import annotations

from search_service.models import Match, Product, SearchResult
from search_service.rpc import convert
from vpm.v1 import search_pb2


def field_by_field(result: SearchResult) -> search_pb2.SearchResponse:
    """The reply as protobuf's own constructors build it, every field named here."""
    return search_pb2.SearchResponse(
        matches=[
            search_pb2.Match(
                product=search_pb2.Product(
                    id=m.product.id,
                    name=m.product.name,
                    gender=m.product.gender,
                    master_category=m.product.master_category,
                    sub_category=m.product.sub_category,
                    article_type=m.product.article_type,
                    base_colour=m.product.base_colour,
                    season=m.product.season,
                    year=m.product.year,
                    usage=m.product.usage,
                    category=m.product.category,
                    attributes=dict(m.product.attributes),
                    image_sha256=m.product.image_sha256,
                    model_id=m.product.model_id,
                ),
                score=m.score,
            )
            for m in result.matches
        ],
        model_id=result.model_id,
    )


def product(number: int, name: str = "") -> Product:
    return Product(
        id=f"p{number}",
        name=name or f"Product {number}",
        gender="Women",
        master_category="Apparel",
        sub_category="Topwear",
        article_type="Tshirts",
        base_colour="Blue",
        season="Fall",
        year=2012,
        usage="Casual",
        category="shirts/t",
        attributes={"size": "M", "fit": "slim"},
        image_sha256="ab" * 32,
        model_id="model-a",
    )


def test_search_response_carries_every_field_of_every_match_in_order() -> None:
    products = [product(n) for n in range(12)]
    result = SearchResult([Match(p, 1.0 - n / 16) for n, p in enumerate(products)], "model-a")
    for _ in range(2):  # built, then answered from the cache
        assert convert.search_response(result) == field_by_field(result)
    assert convert.search_response(SearchResult([], "")) == search_pb2.SearchResponse()


def test_a_replaced_record_is_answered_with_its_new_metadata() -> None:
    old = product(1)
    convert.search_response(SearchResult([Match(old, 0.5)], "m"))
    new = product(1, name="Renamed")
    reply = convert.search_response(SearchResult([Match(new, 0.5)], "m"))
    assert reply.matches[0].product.name == "Renamed"


def test_the_cache_stays_bounded(monkeypatch) -> None:
    monkeypatch.setattr(convert, "PRODUCT_CACHE_ENTRIES", 4)
    products = [product(n) for n in range(10)]
    result = SearchResult([Match(p, 0.1) for p in products], "m")
    assert convert.search_response(result) == field_by_field(result)
    assert len(convert._serialized) <= 4
