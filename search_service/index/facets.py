"""Facets: the values a catalog holds for some fields, with how many products hold each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from search_service.index.filters import ALIASES, ATTRIBUTE_PREFIX, FILTER_KEYS
from search_service.models import (
    DEFAULT_FACET_VALUES,
    FACET_FIELDS,
    MAX_FACET_VALUES,
    Facet,
    FacetValue,
    Product,
)
from vpm_common.errors import InvalidArgument

# Every product has its own id and (nearly always) its own name: no use as facets.
_NOT_FACETS = ("id", "name")


def facet_fields(fields: Sequence[str]) -> list[str]:
    """The fields to count, spelled as filters take them; InvalidArgument naming a bad one."""
    if not fields:
        return list(FACET_FIELDS)
    chosen = []
    for key in fields:
        name = ALIASES.get(key, key)
        if name.startswith(ATTRIBUTE_PREFIX):
            if name == ATTRIBUTE_PREFIX:
                raise InvalidArgument(f"fields: {key!r} needs an attribute name after the dot")
        elif name not in FILTER_KEYS or name in _NOT_FACETS:
            usable = ", ".join(f for f in FILTER_KEYS if f not in _NOT_FACETS)
            raise InvalidArgument(
                f"fields: {key!r} is not a facet; use one of {usable}, or attributes.<name>"
            )
        if name not in chosen:
            chosen.append(name)
    return chosen


def max_values_of(max_values: int) -> int:
    """The request's max_values (0 means the default); InvalidArgument when out of range."""
    chosen = max_values or DEFAULT_FACET_VALUES
    if not 1 <= chosen <= MAX_FACET_VALUES:
        raise InvalidArgument(
            f"max_values: must be between 1 and {MAX_FACET_VALUES} "
            f"(0 means {DEFAULT_FACET_VALUES}), got {max_values}"
        )
    return chosen


def count_facets(products: Iterable[Product], fields: list[str], max_values: int) -> list[Facet]:
    """Each field's non-empty values among `products`, most frequent first, then by value."""
    counters = {name: Counter() for name in fields}
    for product in products:
        for name, counter in counters.items():
            value = _value(product, name)
            if value:
                counter[value] += 1
    facets = []
    for name, counter in counters.items():
        ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
        kept = ranked[:max_values]
        other = sum(count for _value, count in ranked[max_values:])
        facets.append(Facet(name, [FacetValue(v, c) for v, c in kept], other))
    return facets


def _value(product: Product, name: str) -> str:
    if name.startswith(ATTRIBUTE_PREFIX):
        return product.attributes.get(name[len(ATTRIBUTE_PREFIX) :], "")
    if name == "year":
        return str(product.year) if product.year else ""
    return getattr(product, name)
