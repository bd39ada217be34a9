"""The paywall's settings and pages, without servers: which requests are a browser's, what
each route's page is, and that the official bundle is built once and shared."""

from __future__ import annotations

import json
import re

import pytest

from sidecar.core import decision
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import ConfigError
from sidecar.core.exact import ExactTerms, OnchainAsset
from sidecar.core.identity import Identity
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.server.paywall import HTML, Paywall, wants_html
from sidecar.server.paywall_settings import PaywallSettings

USDF, CRED = Asset("USDF", 6), Asset("CRED", 6)
TOKEN = "0x" + "ab" * 20
GATEWAY = Gateway(
    identity=Identity.generate(),
    invoice_secret=b"s" * 32,
    exact=ExactTerms(
        assets={"USDF": OnchainAsset("USDF", "eip155:31337", TOKEN, "USD Coin", "2", 6)},
        pay_to="0x" + "cd" * 20,
        facilitator_url="http://facilitator.example",
    ),
)
FORECAST = Price("forecast", 10_000, USDF, "A forecast")
OTHER = Price("other", 20_000, USDF)
PREPAID = Price("credits", 50_000, CRED)


def unpaid(price: Price, path: str = "/api/x", host: str = "gw.example") -> decision.Denial:
    request = Request("GET", path, host=host)
    return decision.deny(decision.unpaid(request, price), request, price, GATEWAY, 1_700_000_000)


def page(paywall: Paywall, price: Price, path: str = "/api/x", host: str = "gw.example") -> str:
    answer = paywall.answer(unpaid(price, path, host), Request("GET", path, host=host), price)
    assert answer is not None
    return answer.body.decode()


@pytest.mark.parametrize(
    ("accept", "browser"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
        (" Text/HTML", True),
        ("*/*", False),  # curl, and a page's own fetch()
        ("application/json", False),
        ("application/json, text/html", False),  # prefers JSON
        ("", False),
        (None, False),
    ],
)
def test_a_browser_is_a_request_whose_accept_prefers_html(
    accept: str | None, browser: bool
) -> None:
    assert wants_html(accept) is browser


def test_the_settings_take_a_switch_or_a_mapping_and_each_routes_switch() -> None:
    assert PaywallSettings.from_config(None, {}).enabled is True
    assert PaywallSettings.from_config(False, {}).anywhere is False
    routes = {"a": {"paywall": True}, "b": {"paywall": False}, "c": {}}
    settings = PaywallSettings.from_config({"enabled": False, "app_name": "Atlas"}, routes)
    assert (settings.on_for("a"), settings.on_for("b"), settings.on_for("c")) == (
        True,
        False,
        False,
    )
    assert settings.anywhere and settings.app_name == "Atlas"


@pytest.mark.parametrize(
    ("raw", "routes", "key"),
    [
        ("yes", {}, "config paywall:"),
        ({"colour": "red"}, {}, "unknown key 'colour'"),
        ({"enabled": "on"}, {}, "paywall.enabled"),
        ({"app_name": "x" * 201}, {}, "paywall.app_name"),
        ({"app_logo": "javascript:alert(1)"}, {}, "paywall.app_logo"),
        (None, {"r": {"paywall": "off"}}, "routes.r.paywall"),
    ],
)
def test_bad_settings_are_a_config_error_naming_the_key(
    raw: object, routes: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        PaywallSettings.from_config(raw, routes)


def test_the_official_page_keeps_the_402_headers_and_carries_the_exact_offer() -> None:
    paywall = Paywall(PaywallSettings(app_name="Atlas"), GATEWAY)
    denial = unpaid(FORECAST)
    answer = paywall.answer(denial, Request("GET", "/api/x", host="gw.example"), FORECAST)
    assert answer is not None and answer.status == 402 and answer.reason == "payment_required"
    headers = dict(answer.headers)
    assert headers["content-type"] == HTML and headers["cache-control"] == "no-store"
    assert headers["payment-required"] == dict(denial.headers)["payment-required"]
    config = json.loads(re.search(r"window\.x402 = (\{.*?\});", answer.body.decode()).group(1))  # type: ignore[union-attr]
    required = config["paymentRequired"]
    assert [offer["scheme"] for offer in required["accepts"]] == ["exact"]  # the page pays it
    assert required["accepts"][0]["asset"] == TOKEN
    assert required["resource"]["url"] == "http://gw.example/api/x"
    assert (config["appName"], config["currentUrl"], config["amount"]) == ("Atlas", "", 0.01)


def test_the_page_is_built_once_per_route_and_the_bundle_shared() -> None:
    paywall = Paywall(PaywallSettings(), GATEWAY)
    first = paywall.page(Request("GET", "/api/x"), FORECAST)
    assert paywall.page(Request("GET", "/api/y"), FORECAST) is first  # kept, not rebuilt
    other = paywall.page(Request("GET", "/api/z"), OTHER)
    assert other is not first
    assert other[0] is first[0] and other[-1] is first[-1]  # one copy of the bundle
    assert sum(len(piece) for piece in first[1:-1] if piece) < 4096  # the route's own part
    # Each request's URL goes in its place, escaped for a <script>.
    plain = page(paywall, FORECAST, "/api/x", "gw.example")
    evil = page(paywall, FORECAST, "/api/x", "evil.example</script><script>")
    assert evil.count("</script>") == plain.count("</script>")
    assert "evil.example\\u003C/script\\u003E\\u003Cscript\\u003E/api/x" in evil


def test_a_prepaid_only_route_gets_a_page_on_agent_wallets_without_a_wallet_button() -> None:
    paywall = Paywall(PaywallSettings(app_name="<Atlas>"), GATEWAY)
    body = page(paywall, PREPAID)
    assert "agent wallet" in body and "0.05 CRED" in body and "x402 pay" in body
    assert "<script" not in body and "<button" not in body
    assert "&lt;Atlas&gt;" in body and "<Atlas>" not in body


def test_a_route_with_the_paywall_off_keeps_the_json() -> None:
    paywall = Paywall(PaywallSettings(routes={"forecast": False}), GATEWAY)
    request = Request("GET", "/api/x", host="gw.example")
    assert paywall.answer(unpaid(FORECAST), request, FORECAST) is None


def test_an_official_page_of_another_shape_is_kept_whole_around_the_url() -> None:
    """Should the package's page ever not be its template plus the configuration, the page
    still goes out whole, with each request's URL in its place."""
    from sidecar.server import paywall as module

    marker = json.dumps("x402-sidecar-paywall-resource-url")
    pieces = module._framed(f"<html>{marker}</html>")
    assert pieces == (b"<html>", None, b"</html>")
