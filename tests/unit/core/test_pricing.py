"""Route pricing: the route table, templated paths and Envoy's per-route annotations."""

from __future__ import annotations

import pytest

from sidecar.core.errors import BadRequest, ConfigError, UnknownRoute
from sidecar.core.money import Asset
from sidecar.core.pricing import (
    UNNAMED_ROUTE,
    Price,
    Route,
    RouteTable,
    fill_params,
    path_regex,
    refuse_ambiguity,
    validate_path,
)

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


def test_annotation_without_name_has_one_name_whatever_the_path_and_zero_is_free() -> None:
    # A prefix route sees every path a client sends: none of them may become a route name
    # (a metric label, a cache key).
    names = set()
    for path in ("/x", "/x/" + "a" * 5000, "/x/another"):
        price = TABLE.price_for("GET", path, {"x402.price": "0.01"})
        assert price is not None and price.asset == USDF
        names.add(price.route)
    assert names == {UNNAMED_ROUTE}
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


@pytest.mark.parametrize(
    "path",
    [
        "api",
        "/a?b=1",
        "/a/{x",
        "/a/pre{x}",
        "/a/{1x}",
        "",
        "/a*b",  # a * inside a segment
        "/a/*b",
        "/a/***",
        "/a/**/b",  # ** only as the last segment
        "/a//b",  # Envoy merges slashes: never matches
        "/a/../b",
        "/a/./b",
        "/a/{x}/{x}",
        "/a#b",
        "/a b",
    ],
)
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


WILD = RouteTable(
    [
        route("forecast", "GET", "/v1/forecast/*", 3),
        route("files", "GET", "/files/**", 4),
        route("sample", "GET", "/v1/forecast/sample", 0),
    ],
    {"USDF": USDF},
    "USDF",
)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/v1/forecast/rome", "forecast"),
        ("/v1/forecast/rome/", "forecast"),  # one trailing slash dropped
        ("/v1/forecast/sample", "sample"),  # a literal path wins over a pattern
        ("/files/a", "files"),
        ("/files/a/b/c.txt", "files"),
        ("/files/a/", "files"),
    ],
)
def test_wildcards_match_their_segments(path: str, name: str) -> None:
    price = WILD.lookup("GET", path)
    assert price is not None and price.route == name


@pytest.mark.parametrize(
    "path", ["/v1/forecast", "/v1/forecast/", "/v1/forecast/rome/today", "/files", "/files/"]
)
def test_wildcards_match_nothing_else(path: str) -> None:
    """`*` is exactly one segment; `**` one or more, never zero: the prefix is its own
    route (docs/configuration.md)."""
    assert WILD.lookup("GET", path) is None


def test_wildcard_regexes_and_sample_paths() -> None:
    assert path_regex("/v1.0/*/{id}/**") == r"/v1\.0/[^/]+/[^/]+/[^/].*"
    assert fill_params("/a/*/{b}/**", lambda: "x") == "/a/x/x/x"


def test_odd_spellings_under_a_wildcard_are_refused() -> None:
    with pytest.raises(BadRequest):
        WILD.price_for("GET", "/V1/Forecast/rome", {})
    with pytest.raises(BadRequest):
        WILD.price_for("GET", "/files;x/a", {})


@pytest.mark.parametrize(
    ("routes", "reason"),
    [
        ([route("a", "GET", "/x/*", 1), route("b", "GET", "/x/{id}", 0)], "the same route"),
        ([route("a", "GET", "/x", 1), route("b", "GET", "/x", 1)], "the same route"),
        ([route("a", "GET", "/x/*", 1), route("b", "*", "/x/y", 2)], "both priced"),
        ([route("a", "GET", "/x/**", 1), route("b", "GET", "/x/*/z", 2)], "both priced"),
        ([route("a", "GET", "/**", 1), route("b", "GET", "/x", 2)], "both priced"),
        ([route("a", "GET", "/x/*", 1), route("b", "GET", "/*/y", 0)], "the free pattern"),
    ],
)
def test_ambiguous_tables_are_refused(routes: list[Route], reason: str) -> None:
    with pytest.raises(ConfigError, match=f"routes.a, routes.b: {reason}"):
        refuse_ambiguity(routes)


@pytest.mark.parametrize(
    "routes",
    [
        [route("a", "GET", "/x/*", 1), route("b", "POST", "/x/*", 1)],  # other methods
        [route("a", "GET", "/x/*", 1), route("b", "GET", "/x/y", 0)],  # free literal wins
        [route("a", "GET", "/x/**", 1), route("b", "GET", "/x", 2)],  # ** is never zero
        [route("a", "GET", "/x/*", 1), route("b", "GET", "/x/*/", 2)],  # trailing slash
        [route("a", "GET", "/x/*", 0), route("b", "GET", "/*/y", 0)],  # both free
        [route("a", "GET", "/x/a", 1), route("b", "HEAD", "/x/a", 2)],
    ],
)
def test_unambiguous_tables_are_accepted(routes: list[Route]) -> None:
    refuse_ambiguity(routes)


def test_overlaps_follow_the_path_case() -> None:
    routes = [route("a", "GET", "/X/*", 1), route("b", "GET", "/x/y", 2)]
    refuse_ambiguity(routes)
    with pytest.raises(ConfigError, match="both priced"):
        refuse_ambiguity(routes, case_sensitive=False)
