"""`x402 facilitator serve`'s pieces that need no chain (the facilitator: tests/test_chain.py)."""

from __future__ import annotations

from typing import Any

import pytest
from x402.extensions.bazaar.facilitator_client import _parse_list_response

from sidecar.server import listing
from sidecar.tools import verifying
from sidecar.tools.catalog import BadQuery, Catalog
from sidecar.tools.facilitator import rpc_secrets, scrub
from sidecar.tools.verifying import Simulated


def test_messages_never_carry_the_rpc_urls_key() -> None:
    url = "https://base-mainnet.example/v2/k3yK3yK3y?token=s3cr3t"
    error = (
        f"HTTPSConnectionPool(host='base-mainnet.example'): url: /v2/k3yK3yK3y?token=s3cr3t ({url})"
    )
    cleaned = scrub(error, rpc_secrets(url))
    assert "k3yK3yK3y" not in cleaned and "s3cr3t" not in cleaned
    assert "base-mainnet.example" in cleaned  # the host says which provider failed


# -- the bazaar catalog (GET /discovery/resources) -------------------------------------------


def envelope(url: str, extensions: dict[str, Any]) -> dict[str, Any]:
    """What an official client sends: the 402's resource and extensions, copied."""
    return {
        "x402Version": 2,
        "resource": {
            "url": url,
            "description": "Tomorrow's weather",
            "mimeType": "application/json",
        },
        "accepted": OFFER,
        "payload": {},
        "extensions": extensions,
    }


OFFER: dict[str, Any] = {
    "scheme": "exact",
    "network": "eip155:84532",
    "amount": "10000",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "payTo": "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    "maxTimeoutSeconds": 300,
    "extra": {"name": "USDC", "version": "2"},
}


def declared(method: str = "GET") -> dict[str, Any]:
    """The gateway's own declaration of a discoverable route (server/listing.py)."""
    spec = {"input_schema": {"properties": {"city": {"type": "string"}}}}
    return dict(listing.declarations([("forecast", method, spec)])[("forecast", method)])


def test_a_settled_discoverable_resource_is_listed_in_the_official_shape() -> None:
    catalog = Catalog()
    catalog.record(envelope("https://api.example.com/forecast?city=x", declared()), OFFER)
    catalog.record(envelope("https://api.example.com/plain", {}), OFFER)  # not discoverable
    page = catalog.page({})
    assert page["pagination"] == {"limit": 100, "offset": 0, "total": 1}
    [item] = page["items"]
    parsed = _parse_list_response(page).items[0]  # the official client's reader
    assert parsed.resource == "https://api.example.com/forecast"  # query stripped
    assert (parsed.type, parsed.x402_version, parsed.accepts) == ("http", 2, [OFFER])
    assert parsed.description == "Tomorrow's weather"
    assert item["extensions"]["bazaar"]["info"]["input"]["method"] == "GET"
    assert item["lastUpdated"].endswith("Z")


def test_the_catalog_filters_and_pages_as_the_official_client_asks() -> None:
    catalog = Catalog(max_items=2)
    for path in ("/a", "/b", "/c"):  # the oldest goes past max_items
        catalog.record(envelope(f"https://api.example.com{path}", declared("POST")), OFFER)
    urls = [item["resource"] for item in catalog.page({})["items"]]
    assert urls == ["https://api.example.com/b", "https://api.example.com/c"]
    assert (
        catalog.page({"network": "eip155:84532", "payTo": OFFER["payTo"].lower()})["pagination"][
            "total"
        ]
        == 2
    )
    assert catalog.page({"network": "eip155:8453"})["items"] == []
    assert catalog.page({"extensions": "bazaar", "type": "http"})["pagination"]["total"] == 2
    assert catalog.page({"type": "mcp"})["items"] == []
    assert [i["resource"] for i in catalog.page({"limit": "1", "offset": "1"})["items"]] == [
        urls[1]
    ]
    with pytest.raises(BadQuery):
        catalog.page({"limit": "-1"})


# -- a /verify's simulation, standing for the settle that follows (tools/verifying.py) --------


def verified_body(nonce: str, amount: str = "1000") -> dict[str, Any]:
    return {
        "x402Version": 2,
        "paymentPayload": {"payload": {"authorization": {"nonce": nonce}}},
        "paymentRequirements": {"scheme": "exact", "amount": amount},
    }


def test_a_verified_payload_skips_one_simulation_at_most() -> None:
    simulated = Simulated()
    body = verified_body("0x01")
    assert simulated.take(body) is False  # never verified here: its settle simulates
    simulated.remember(body)
    assert simulated.take(body) is True
    assert simulated.take(body) is False  # settled again: simulated, refused before sending


def test_the_simulation_stands_for_the_same_payload_and_requirements_only() -> None:
    simulated = Simulated()
    simulated.remember(verified_body("0x01"))
    assert simulated.take(verified_body("0x02")) is False
    assert simulated.take(verified_body("0x01", amount="2000")) is False
    # Key order does not make another payload.
    reordered = dict(reversed(list(verified_body("0x01").items())))
    assert simulated.take(reordered) is True


def test_a_simulation_goes_stale() -> None:
    simulated = Simulated(fresh=0.0)
    body = verified_body("0x01")
    simulated.remember(body)
    assert simulated.take(body) is False


def test_what_is_remembered_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verifying, "MAX_REMEMBERED", 3)
    simulated = Simulated()
    for i in range(5):
        simulated.remember(verified_body(f"0x{i:02x}"))
    assert len(simulated.until) == 3  # the later ones simulate at their settle, as before
    assert simulated.take(verified_body("0x04")) is False
