"""`x402 offers`: the preview of each priced route's 402, built by the check's own code, for
a config on Base Sepolia; and the 402's extensions, checked with the official x402 models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from x402.extensions.bazaar import validate_discovery_extension
from x402.extensions.bazaar.types import parse_discovery_extension
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER
from x402.mechanisms.evm.default_assets import DEFAULT_ASSETS
from x402.schemas import PaymentRequired

from sidecar.core import decision, protocol
from sidecar.core.decision import Request
from sidecar.core.errors import ConfigError
from sidecar.core.identity import Identity, write_secret
from sidecar.core.pricing import UNNAMED_ROUTE
from sidecar.server.config import Settings
from sidecar.tools.cli import main
from sidecar.tools.offers import preview

OPERATOR = "0x90F79bf6EB2c4f870365E785982E1f101E93b906"
BASE_SEPOLIA = "eip155:84532"
ROUTES: dict[str, Any] = {
    "forecast": {
        "method": "GET",
        "path": "/api/forecast",
        "price": "0.01",
        "description": "Tomorrow's weather",
        "input_schema": {"properties": {"city": {"type": "string"}}, "required": ["city"]},
        "input_example": {"city": "Lisbon"},
        "output_example": {"city": "Lisbon", "celsius": 21},
        "output_schema": {"properties": {"celsius": {"type": "number"}}},
    },
    "upload": {
        "method": "POST",
        "path": "/api/upload",
        "price": "0.5",
        "input_schema": {"properties": {"text": {"type": "string"}}},
        "payment_identifier": "required",
    },
    "plain": {"method": "GET", "path": "/api/plain", "price": "0.02"},
    "free": {"method": "GET", "path": "/api/free", "price": "0"},
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    Identity.generate().save(tmp_path / "signing.key")
    write_secret(tmp_path / "invoice.secret", "0123456789abcdef0123456789abcdef\n")
    raw = {
        "signing_key_file": str(tmp_path / "signing.key"),
        "invoice_secret_file": str(tmp_path / "invoice.secret"),
        "routes": ROUTES,
        "onchain": {"USDF": {"network": "base-sepolia"}},
        "pay_to": OPERATOR,
        "facilitator_url": "https://x402.org/facilitator",
        "public_url": "https://api.example.com",
    }
    path = tmp_path / "x402.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_offers_shows_usdc_on_base_sepolia_as_the_official_package_lists_it(
    config: Path,
) -> None:
    official = DEFAULT_ASSETS[BASE_SEPOLIA][0]
    result = CliRunner().invoke(main, ["offers", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert [r["route"] for r in found["routes"]] == ["forecast", "upload", "plain"]  # priced
    assert found["onchain"] == [
        {
            "asset": "USDF",
            "network": BASE_SEPOLIA,
            "token": official["asset"],
            "decimals": official["decimals"],
            "name": official["name"],
            "version": official["version"],
        }
    ]
    assert official["decimals"] == 6
    forecast = found["routes"][0]
    prepaid, offer = forecast["accepts"]
    assert prepaid["scheme"] == "prepaid-ed25519"
    assert offer == {
        "scheme": "exact",
        "network": BASE_SEPOLIA,
        "amount": "10000",
        "asset": official["asset"],
        "payTo": OPERATOR,
        "maxTimeoutSeconds": 300,
        "extra": {
            "name": official["name"],
            "version": official["version"],
            "paymentFlow": "upfront",  # charged on check: settled before the service runs
        },
    }
    human = CliRunner().invoke(main, ["offers", "--config", str(config)])
    assert human.exit_code == 0, human.output
    assert official["asset"] in human.output and "decimals 6" in human.output
    assert f'"name": "{official["name"]}", "version": "{official["version"]}"' in human.output


def test_the_preview_is_the_402_the_check_sends(config: Path) -> None:
    """Same accepts and extensions as a denial of the route: only the invoice's nonce and
    MAC id differ between two 402s (its expiry too, so the moment is fixed here)."""
    settings = Settings.load(config, env={})
    found = preview(settings, now=1_800_000_000)
    gateway, routes = settings.gateway(), settings.route_table()
    price = routes.lookup("GET", "/api/forecast")
    assert price is not None
    request = Request("GET", "/api/forecast", "api.example.com", "https")
    denial = decision.deny(decision.unpaid(request, price), request, price, gateway, 1_800_000_000)
    required = protocol.decode_header(dict(denial.headers)["payment-required"])
    assert unique(found["routes"][0]["accepts"]) == unique(required["accepts"])
    assert found["routes"][0]["extensions"] == required["extensions"]
    assert required["resource"]["url"] == "https://api.example.com/api/forecast"


def unique(accepts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The offers without what each invoice draws afresh."""
    fresh = ("nonce", "invoice_id")
    return [
        {**o, "extra": {k: v for k, v in o["extra"].items() if k not in fresh}} for o in accepts
    ]


def test_the_402_extensions_validate_against_the_official_models(config: Path) -> None:
    found = {r["route"]: r for r in preview(Settings.load(config, env={}))["routes"]}
    for route in found.values():
        model = PaymentRequired.model_validate(
            {"x402Version": 2, "resource": {"url": "https://x"}, **route}
        )
        assert model.extensions == route["extensions"]
    forecast = found["forecast"]["extensions"]
    assert set(forecast) == {"bazaar", PAYMENT_IDENTIFIER}
    bazaar = parse_discovery_extension(forecast["bazaar"])
    assert validate_discovery_extension(bazaar).valid
    assert forecast["bazaar"]["info"]["input"] == {
        "type": "http",
        "method": "GET",
        "queryParams": {"city": "Lisbon"},
    }
    assert forecast["bazaar"]["info"]["output"]["example"]["celsius"] == 21
    assert forecast[PAYMENT_IDENTIFIER]["info"] == {"required": False}
    upload = found["upload"]["extensions"]
    assert upload["bazaar"]["info"]["input"]["method"] == "POST"
    assert upload["bazaar"]["info"]["input"]["bodyType"] == "json"
    assert validate_discovery_extension(parse_discovery_extension(upload["bazaar"])).valid
    assert upload[PAYMENT_IDENTIFIER]["info"] == {"required": True}
    assert set(found["plain"]["extensions"]) == {PAYMENT_IDENTIFIER}  # not discoverable


def test_a_route_priced_only_by_envoy_declares_payment_identifier(config: Path) -> None:
    """An Envoy annotation prices a route the table does not list (pricing.UNNAMED_ROUTE):
    its 402 still declares payment-identifier, optional; no bazaar (nothing describes it)."""
    gateway = Settings.load(config, env={}).gateway()
    declared = gateway.extensions_for(UNNAMED_ROUTE, "GET")
    assert declared is not None and set(declared) == {PAYMENT_IDENTIFIER}
    assert declared[PAYMENT_IDENTIFIER]["info"] == {"required": False}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_schema": "text"}, r"routes\.plain\.input_schema: a mapping"),
        ({"output_schema": {"type": "object"}}, r"routes\.plain\.output_example: required"),
        ({"body_type": "json"}, r"routes\.plain\.body_type"),
        ({"discoverable": "yes"}, r"routes\.plain\.discoverable"),
        ({"discoverable": False, "input_example": {}}, r"routes\.plain\.input_example"),
        ({"payment_identifier": "always"}, r"routes\.plain\.payment_identifier"),
        (
            {
                "input_schema": {"properties": {"n": {"type": "integer"}}},
                "input_example": {"n": "x"},
            },
            r"routes\.plain: the bazaar declaration does not validate",
        ),
    ],
)
def test_bad_discovery_keys_name_the_route(change: dict[str, Any], message: str) -> None:
    routes = {"plain": {**ROUTES["plain"], **change}}
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping({"routes": routes}, {})
