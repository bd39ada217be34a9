"""Route pricing: the route table, templated paths and Envoy's per-route annotations."""

from __future__ import annotations

import pytest

from sidecar.core.errors import BadRequest, ConfigError, UnknownRoute
from sidecar.core.money import Asset
from sidecar.core.pricing import Price, Route, RouteTable, validate_path

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


def test_equivalent_spellings_reach_the_route() -> None:
    for method, path in [
        ("GET", "/api/v1/agent/pay-api/atlas/"),  # one trailing slash
        ("HEAD", "/api/v1/agent/pay-api/atlas"),  # HEAD runs the GET handler
        ("HEAD", "/api/v1/trade/verify/T-1/"),
        ("POST", "/a/1/b/2/"),
        ("GET", "/api/v1/trade/verify/T-1;x=1/"),  # the parameter is `T-1;x=1`: priced
    ]:
        price = TABLE.price_for(method, path, {})
        assert price is not None and price.amount > 0, (method, path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/agent/pay-api/atlas;jsessionid=0"),
        ("GET", "/api/v1/agent/pay-api/ATLAS"),
        ("GET", "/API/v1/agent/pay-api/atlas"),
        ("GET", "/api/v1/agent/pay-api/atlas.json"),
        ("GET", "/api/v1/agent/pay-api/atlas\\"),
        ("GET", "/api/v1/agent/pay-api/atlas/."),
        ("GET", "/api/v1/agent/pay-api/x\\..\\atlas"),
        ("GET", "/api/v1/agent/pay-api/%61tlas"),
        ("GET", "/api/v1/trade/verify;x=1/T-1"),
        ("POST", "/A/1/B/2"),
        ("HEAD", "/api/v1/agent/pay-api/atlas.xml"),
        ("PUT", "/api/v1/ANY"),
    ],
)
def test_odd_spellings_of_a_priced_path_are_refused(method: str, path: str) -> None:
    with pytest.raises(BadRequest):
        TABLE.price_for(method, path, {})


@pytest.mark.parametrize("method", ["get", "Get", "pOST", "", "G ET", "GET\r\n"])
def test_non_canonical_methods_are_refused(method: str) -> None:
    with pytest.raises(BadRequest):
        TABLE.price_for(method, "/api/v1/agent/pay-api/atlas", {})
    with pytest.raises(BadRequest):  # free routes too: the service may upper-case it
        TABLE.price_for(method, "/free", {"x402.price": "0.01"})


def test_other_methods_and_unrelated_paths_stay_free() -> None:
    assert TABLE.price_for("POST", "/api/v1/agent/pay-api/atlas/", {}) is None
    assert TABLE.price_for("GET", "/static/app.js", {}) is None
    assert TABLE.price_for("M-SEARCH", "/", {}) is None


def test_a_zero_price_is_a_free_listed_route() -> None:
    table = RouteTable(
        [route("eval", "GET", "/eval", 0), route("paid", "GET", "/paid", 5)],
        {"USDF": USDF},
        "USDF",
        unlisted="deny",
    )
    assert table.price_for("GET", "/eval", {}) is None  # listed, free, no 402 for 0
    for unlisted in ("/other", "/eval.json"):  # an odd spelling of a free path is unlisted
        with pytest.raises(UnknownRoute):
            table.price_for("GET", unlisted, {})
    with pytest.raises(BadRequest):  # refused before unlisted: the reason says why
        table.price_for("GET", "/PAID", {})


def test_case_insensitive_tables_price_any_case() -> None:
    table = RouteTable(
        [route("atlas", "GET", "/api/Atlas", 5), route("t", "GET", "/t/{id}", 1)],
        {"USDF": USDF},
        "USDF",
        case_sensitive=False,
    )
    for path in ("/api/Atlas", "/API/ATLAS", "/api/atlas/", "/T/x"):
        price = table.price_for("GET", path, {})
        assert price is not None and price.amount > 0, path


def test_unlisted_must_be_pass_or_deny() -> None:
    with pytest.raises(ConfigError, match="unlisted"):
        RouteTable([], {"USDF": USDF}, "USDF", unlisted="allow")
