"""GetFacets: the values the catalog holds, with counts, checked against counts made here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import grpc
import pytest

from search_service.engine import SearchEngine
from search_service.models import FACET_FIELDS, FacetQuery, Product
from tests.search.conftest import RunningSearch, random_catalog
from vpm.v1 import search_pb2

DIM = 16


def oracle(products: list[Product], field: str) -> list[tuple[str, int]]:
    """Counts made without the service's code: most first, then by value; empty ones left out."""
    if field.startswith("attributes."):
        values = [p.attributes.get(field.split(".", 1)[1], "") for p in products]
    elif field == "year":
        values = [str(p.year) if p.year else "" for p in products]
    else:
        values = [getattr(p, field) for p in products]
    counts = Counter(value for value in values if value)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def as_pairs(facet: search_pb2.Facet) -> list[tuple[str, int]]:
    return [(v.value, v.count) for v in facet.values]


@pytest.fixture
def running(
    open_engine: Callable[..., SearchEngine], sqlite_url: str, start_search: Callable
) -> RunningSearch:
    engine = open_engine(sqlite_url)
    products, vectors = random_catalog(500, DIM, seed=7)
    # Some unknown values, which are not facet values: empty colour, year 0.
    for i in range(0, 500, 50):
        products[i] = Product(products[i].id, name="bare", model_id="test-model")
    engine.upsert_products(products, vectors)
    served = start_search(engine)
    served.products, served.vectors = products, vectors
    return served


def test_default_fields_count_every_product(running: RunningSearch) -> None:
    reply = running.stub.GetFacets(search_pb2.GetFacetsRequest(), timeout=10)
    assert [facet.field for facet in reply.facets] == list(FACET_FIELDS)
    assert reply.products == 500 and reply.catalog_version >= 1
    for facet in reply.facets:
        assert as_pairs(facet) == oracle(running.products, facet.field), facet.field
        assert facet.other == 0


def test_filters_narrow_the_products_counted(running: RunningSearch) -> None:
    request = search_pb2.GetFacetsRequest(
        fields=["base_colour", "attributes.fit", "year"],
        filters={"gender": "Women", "masterCategory": "Footwear"},
    )
    reply = running.stub.GetFacets(request, timeout=10)
    matching = [p for p in running.products
                if p.gender == "Women" and p.master_category == "Footwear"]  # fmt: skip
    assert matching and reply.products == len(matching)
    for facet in reply.facets:
        assert as_pairs(facet) == oracle(matching, facet.field), facet.field


def test_max_values_keeps_the_most_frequent_and_counts_the_rest(running: RunningSearch) -> None:
    request = search_pb2.GetFacetsRequest(fields=["article_type"], max_values=3)
    (facet,) = running.stub.GetFacets(request, timeout=10).facets
    expected = oracle(running.products, "article_type")
    assert as_pairs(facet) == expected[:3]
    assert facet.other == sum(count for _value, count in expected[3:]) > 0


def test_counts_follow_deletes(running: RunningSearch) -> None:
    gone = [p.id for p in running.products if p.base_colour == "Red"][:7]
    running.stub.DeleteProducts(search_pb2.DeleteProductsRequest(ids=gone), timeout=10)
    left = [p for p in running.products if p.id not in gone]
    request = search_pb2.GetFacetsRequest(fields=["base_colour"])
    (facet,) = running.stub.GetFacets(request, timeout=10).facets
    assert as_pairs(facet) == oracle(left, "base_colour")


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"fields": ["colour"]}, "fields: 'colour' is not a facet"),
        ({"fields": ["id"]}, "fields: 'id' is not a facet"),
        ({"fields": ["attributes."]}, "needs an attribute name"),
        ({"filters": {"colour": "Red"}}, "filters: unknown key 'colour'"),
        ({"max_values": 1001}, "max_values: must be between 1 and 1000"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    running: RunningSearch, request_fields: dict, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        running.stub.GetFacets(search_pb2.GetFacetsRequest(**request_fields), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()


def test_the_engine_answers_without_a_server(
    open_engine: Callable[..., SearchEngine], sqlite_url: str
) -> None:
    engine = open_engine(sqlite_url)
    empty = engine.facets(FacetQuery())
    assert empty.products == 0 and all(not facet.values for facet in empty.facets)
    products, vectors = random_catalog(60, DIM, seed=1)
    engine.upsert_products(products, vectors)
    result = engine.facets(FacetQuery(fields=("subCategory", "gender")))
    assert [(v.value, v.count) for v in result.facets[1].values] == oracle(products, "gender")
    assert result.facets[0].field == "sub_category"
