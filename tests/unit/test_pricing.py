"""Route pricing: the route table, templated paths and Envoy's per-route annotations."""

from __future__ import annotations

import pytest

from sidecar.errors import ConfigError
from sidecar.money import Asset
from sidecar.pricing import Price, Route, RouteTable, validate_path

USDF, EURF = Asset("USDF", 6), Asset("EURF", 2)


def route(name: str, method: str, path: str, amount: int) -> Route:
    return Route(name, method, path, Price(name, amount, USDF))


TABLE = RouteTable(
    [
        route("atlas", "GET", "/api/v1/agent/pay-api/atlas", 250_000),
        route("verify", "GET", "/api/v1/trade/verify/{trade_id}", 10_000),
        route("any", "*", "/api/v1/any", 1),
        route("deep", "POST", "/a/{x}/b/{y}", 7),
    ],
    {"USDF": USDF, "EURF": EURF},
    "USDF",
)


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/api/v1/agent/pay-api/atlas", "atlas"),
        ("GET", "/api/v1/trade/verify/T-1", "verify"),
        ("DELETE", "/api/v1/any", "any"),
        ("POST", "/a/1/b/2", "deep"),
    ],
)
def test_lookup_finds_the_route(method: str, path: str, name: str) -> None:
    price = TABLE.lookup(method, path)
    assert price is not None and price.route == name


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/agent/pay-api/atlas"),  # other method
        ("GET", "/api/v1/trade/verify/"),  # empty parameter
        ("GET", "/api/v1/trade/verify/a/b"),  # a parameter is one segment
        ("GET", "/api/v1/agent/pay-api/atlas/"),
        ("GET", "/api/v1/agent/pay-api/atlasx"),
        ("POST", "/a/1/b"),
    ],
)
def test_unlisted_requests_are_free(method: str, path: str) -> None:
    assert TABLE.lookup(method, path) is None


def test_annotations_override_the_table() -> None:
    price = TABLE.price_for(
        "GET",
        "/api/v1/agent/pay-api/atlas",
        {"x402.price": "0.5", "x402.route": "promo", "x402.asset": "EURF"},
    )
    assert price == Price("promo", 50, EURF, "")


def test_annotation_without_name_is_named_by_resource_and_zero_is_free() -> None:
    price = TABLE.price_for("GET", "/x", {"x402.price": "0.01"})
    assert price is not None and price.route == "GET /x" and price.asset == USDF
    assert TABLE.price_for("GET", "/api/v1/agent/pay-api/atlas", {"x402.price": "0"}) is None


@pytest.mark.parametrize(
    "annotations",
    [
        {"x402.price": "-1"},
        {"x402.price": "0.001", "x402.asset": "EURF"},
        {"x402.price": "1", "x402.asset": "BTC"},
        {"x402.price": "one"},
    ],
)
def test_bad_annotations_are_config_errors(annotations: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        TABLE.price_for("GET", "/x", annotations)


@pytest.mark.parametrize("path", ["api", "/a?b=1", "/a/{x", "/a/pre{x}", "/a/{1x}", ""])
def test_invalid_patterns(path: str) -> None:
    with pytest.raises(ValueError):
        validate_path(path)


def test_regex_characters_in_paths_are_literal() -> None:
    table = RouteTable([route("dot", "GET", "/v1.0/{id}", 1)], {"USDF": USDF}, "USDF")
    assert table.lookup("GET", "/v1.0/7") is not None
    assert table.lookup("GET", "/v1x0/7") is None
