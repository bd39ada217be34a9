"""The official x402 Python client pays our prepaid-ed25519 scheme through the plugin, against
the real product on loopback (Redis, the sidecar, Envoy, upstream)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from x402 import x402Client, x402ClientSync
from x402.client_base import SpendControlAsset, SpendControls
from x402.http.clients import PaymentError, x402HttpxClient
from x402.http.clients.requests import x402_requests

from sidecar.agent.wallet import Wallet
from sidecar.agent.x402_plugin import PREPAID_NETWORK, PrepaidEd25519
from sidecar.core import protocol
from sidecar.core.errors import MaxAmountExceeded
from sidecar.tools.stack import Stack

ATLAS = "/api/v1/agent/pay-api/atlas"
ROUTES: dict[str, dict[str, Any]] = {
    "atlas": {"method": "GET", "path": ATLAS, "price": "0.25"},
    "deep": {"method": "POST", "path": "/api/v1/agent/pay-api/atlas/deep", "price": "5"},
}


@pytest.fixture(scope="module")
def gw() -> Iterator[Stack]:
    with Stack(ROUTES) as running:
        yield running


def gateway_keys(stack: Stack) -> dict[str, str]:
    document = httpx.get(f"{stack.url}/.well-known/x402").json()
    return {key["kid"]: key["public_key"] for key in document["keys"]}


def official(wallet: Wallet) -> x402Client:
    """An agent on the official client adds one line to pay our gateway."""
    client = x402Client()
    client.register(PREPAID_NETWORK, PrepaidEd25519(wallet))
    return client


async def test_the_official_client_pays_a_prepaid_route_with_one_registration(
    gw: Stack,
) -> None:
    wallet = Wallet.generate(budget="1")
    await gw.fund(wallet.public_key, "10")
    async with x402HttpxClient(official(wallet), base_url=gw.url, timeout=10) as http:
        response = await http.get(ATLAS, params={"q": "official"})
    assert response.status_code == 200, response.text
    assert response.json()["payer"] == wallet.public_key  # what the service was told

    receipt = protocol.decode_header(response.headers["payment-response"])
    assert protocol.verify_receipt(receipt, gateway_keys(gw))
    assert receipt["success"] is True
    assert (receipt["payer"], receipt["resource"]) == (wallet.public_key, f"GET {ATLAS}")
    assert (receipt["amount"], receipt["asset"], receipt["balance"]) == ("0.25", "USDF", "9.75")
    assert await gw.balance(wallet.public_key) == 10_000_000 - 250_000
    assert (wallet.spent(), wallet.remaining()) == ("0.25", "0.75")
    # The challenge, then one paid retry: the proof went in the official v2 envelope.
    lines = gw.wait_decisions(lambda d: d.get("payer") == wallet.public_key)
    assert [d["reason"] for d in lines] == ["paid"]
    assert lines[0]["invoice_id"] == receipt["invoice_id"]


def test_the_sync_official_client_on_requests_pays_too(gw: Stack) -> None:
    wallet = Wallet.generate()
    asyncio.run(gw.fund(wallet.public_key, "1"))
    client = x402ClientSync()
    client.register(PREPAID_NETWORK, PrepaidEd25519(wallet))
    with x402_requests(client) as session:
        response = session.get(f"{gw.url}{ATLAS}", timeout=10)
    assert response.status_code == 200, response.text
    receipt = protocol.decode_header(response.headers["payment-response"])
    assert protocol.verify_receipt(receipt, gateway_keys(gw))
    assert asyncio.run(gw.balance(wallet.public_key)) == 750_000
    assert wallet.spent() == "0.25"


async def test_a_refused_proof_is_returned_and_gives_the_budget_back(gw: Stack) -> None:
    wallet = Wallet.generate(budget="1")  # never registered: unknown_payer
    async with x402HttpxClient(official(wallet), base_url=gw.url, timeout=10) as http:
        response = await http.get(ATLAS)
    assert (response.status_code, response.json()["error"]) == (402, "unknown_payer")
    assert (wallet.spent(), wallet.remaining()) == ("0", "1")
    lines = gw.wait_decisions(lambda d: d.get("payer") == wallet.public_key)
    assert [d["reason"] for d in lines] == ["unknown_payer"]


async def test_a_guard_refusal_signs_nothing(gw: Stack) -> None:
    wallet = Wallet.generate(max_amount="0.10")
    await gw.fund(wallet.public_key, "10")
    async with x402HttpxClient(official(wallet), base_url=gw.url, timeout=10) as http:
        with pytest.raises(PaymentError) as refused:
            await http.get(ATLAS)
    assert isinstance(refused.value.__cause__, MaxAmountExceeded)
    assert await gw.balance(wallet.public_key) == 10_000_000
    assert wallet.spent() == "0"
    await asyncio.sleep(0.3)  # a proof would have been decided by now
    assert [d for d in gw.decisions() if d.get("payer") == wallet.public_key] == []


async def test_the_official_default_cap_applies_to_ledger_assets(gw: Stack) -> None:
    """5 USDF is above the official client's $1 default; spend_controls lift it."""
    wallet = Wallet.generate()
    await gw.fund(wallet.public_key, "10")
    client = official(wallet)
    deep = "/api/v1/agent/pay-api/atlas/deep"
    async with x402HttpxClient(client, base_url=gw.url, timeout=10) as http:
        with pytest.raises(PaymentError, match="spend_controls"):
            await http.post(deep)
        assert wallet.spent() == "0"
        cap = SpendControlAsset(
            network=PREPAID_NETWORK, asset="USDF", max_amount_per_payment="5000000"
        )
        client.set_spend_controls(SpendControls(allowed_assets=[cap]))
        response = await http.post(deep)
    assert response.status_code == 200, response.text
    assert await gw.balance(wallet.public_key) == 5_000_000
    assert wallet.spent() == "5"
