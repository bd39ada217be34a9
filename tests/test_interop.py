"""Interop with the x402 standard's own clients: the official Python clients (httpx and
requests) and TypeScript clients (`@x402/fetch`, `@x402/axios`, with `@x402/evm` and viem,
run by node) pay `exact` through real Envoy, the sidecar and the project's facilitator on
anvil, unmodified, and decode `PAYMENT-RESPONSE` with their own decoders: the price in
atomic units and the token's address. A failed settlement gives each of them `success:
false` and a reason. The answers validate against both SDKs' schemas. Nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_utils.crypto import keccak
from x402 import x402ClientSync
from x402.client_base import SpendControlAsset, SpendControls
from x402.http.clients import x402_requests, x402HttpxClient
from x402.http.utils import decode_payment_response_header
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.schemas import PaymentRequired, SettleResponse

from sidecar.core.identity import Identity
from sidecar.tools.chain import AnvilChain, DevAccount
from sidecar.tools.onchain import FacilitatorProcess, exact_settings, official_client
from sidecar.tools.stack import Stack
from tests.support.exact import NODE_MODULES, b64json, balances, run_node_client

PAID, REPORT, TOPUP = "/api/paid", "/api/v1/report", "/x402/topup"
PRICE = 10_000  # 0.01 USDF = 0.01 USDC
ROUTES: dict[str, dict[str, Any]] = {
    "paid": {"method": "GET", "path": PAID, "price": "0.01"},
    "report": {"method": "GET", "path": REPORT, "price": "0.01", "charge": "on_success"},
}
CLIENTS = ("httpx", "requests", "fetch", "axios")
BLACKLIST = "0x" + keccak(text="blacklist(address)")[:4].hex()  # FiatToken's


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    settings = exact_settings(chain, facilitator, topup_min="1", topup_max="50")
    with Stack(ROUTES, settings=settings) as running:
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        yield client


def wallet(chain: AnvilChain) -> DevAccount:
    """A fresh payer with 1 USDC: EIP-3009 needs no gas of it."""
    account = Account.create()
    chain.mint(account.address, 1_000_000)
    return DevAccount(account.address, "0x" + bytes(account.key).hex())


async def pay(client: str, chain: AnvilChain, payer: DevAccount, url: str) -> dict[str, Any]:
    """One paid GET by an official client: status, the PAYMENT-RESPONSE decoded by the
    client's own decoder (as a dict, camelCase), the raw header, the body."""
    if client == "httpx":
        async with x402HttpxClient(official_client(chain, payer, PRICE), timeout=60) as paid:
            response = await paid.get(url)
        return _answer(response.status_code, response.headers, response.text)
    if client == "requests":
        return await asyncio.to_thread(_pay_with_requests, chain, payer, url)
    return await _pay_with_node(client, chain, payer, url)


def _answer(status: int, headers: Any, body: str) -> dict[str, Any]:
    header = headers.get("payment-response")
    settled = decode_payment_response_header(header) if header else None
    return {
        "status": status,
        "header": header,
        "settled": settled.model_dump(by_alias=True, exclude_none=True) if settled else None,
        "receipt": headers.get("x-payment-response"),
        "body": body,
    }


def _pay_with_requests(chain: AnvilChain, payer: DevAccount, url: str) -> dict[str, Any]:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(payer.key)), chain.network)
    allowed = SpendControlAsset(
        network=chain.network, asset=chain.token, max_amount_per_payment=str(PRICE)
    )
    client.set_spend_controls(SpendControls(allowed_assets=[allowed]))
    with x402_requests(client) as session:
        response = session.get(url, timeout=60)
    return _answer(response.status_code, response.headers, response.text)


async def _pay_with_node(
    client: str, chain: AnvilChain, payer: DevAccount, url: str
) -> dict[str, Any]:
    job = {
        "client": client, "url": url, "method": "GET", "privateKey": payer.key,
        "network": chain.network, "token": chain.token, "cap": str(PRICE),
    }  # fmt: skip
    return await run_node_client(job)


def node_schema(schema: str, value: Any) -> dict[str, Any]:
    """@x402/core's zod `schema` on `value`, run by node."""
    script = (
        "const s = require('@x402/core/schemas');"
        "const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        f"const r = s.{schema}.safeParse(input);"
        "console.log(JSON.stringify({ok: r.success, error: r.success ? null : r.error.issues}));"
    )
    run = subprocess.run(
        ["node", "-e", script],
        input=json.dumps(value),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


# -- paying ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_official_client_pays_exact_and_reads_the_settlement(
    client: str, stack: Stack, chain: AnvilChain
) -> None:
    payer = wallet(chain)
    before = balances(chain, payer.address)
    answer = await pay(client, chain, payer, stack.url + PAID)

    assert answer["status"] == 200, answer["body"]
    assert json.loads(answer["body"])["payer"] == payer.address  # what the service was told
    settled = answer["settled"]
    assert settled["success"] is True and settled["amount"] == str(PRICE)  # atomic units
    assert (settled["network"], settled["payer"]) == (chain.network, payer.address)
    raw = b64json(answer["header"])
    assert raw["asset"] == chain.token  # the token's address
    if client in ("fetch", "axios"):  # the TypeScript decoders keep every field
        assert settled["asset"] == chain.token
    SettleResponse.model_validate(raw)
    tx = chain.w3.eth.get_transaction_receipt(settled["transaction"])
    assert tx["status"] == 1
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    receipt = b64json(answer["receipt"])  # the gateway's own, apart
    assert (receipt["amount"], receipt["asset"], receipt["transaction"]) == (
        "0.01",
        "USDF",
        settled["transaction"],
    )


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_failed_settlement_gives_the_client_success_false_and_a_reason(
    client: str, stack: Stack, chain: AnvilChain
) -> None:
    """Verified at the check of a `charge: on_success` route; the token's blacklister bars
    the payer while the service works: the settle fails, the response is withheld, and the
    client reads the standard's failed settlement."""
    payer = wallet(chain)
    before = balances(chain, payer.address)
    paying = asyncio.create_task(pay(client, chain, payer, f"{stack.url}{REPORT}?sleep=2"))
    await asyncio.to_thread(
        stack.wait_decisions,
        lambda e: e.get("reason") == "held" and e.get("payer") == payer.address.lower(),
        1,
        60.0,
    )
    data = BLACKLIST + payer.address.removeprefix("0x").lower().rjust(64, "0")
    await asyncio.to_thread(
        chain.w3.eth.send_transaction,
        {"from": chain.issuer.address, "to": chain.token, "data": data},  # type: ignore[typeddict-item]
    )
    answer = await paying

    assert answer["status"] == 402, answer["body"]
    assert json.loads(answer["body"])["error"] == "settlement_failed"
    settled = answer["settled"]
    assert settled["success"] is False and settled["errorReason"]
    assert (settled["transaction"], settled["network"]) == ("", chain.network)
    assert settled["payer"] == payer.address and "amount" not in settled
    assert answer["receipt"] is None  # nothing was charged: no receipt of ours
    assert balances(chain, payer.address) == before


# -- the schemas of both SDKs ---------------------------------------------------------------


async def test_every_402_validates_against_both_sdks(http: httpx.AsyncClient) -> None:
    """A route's 402 (upfront and authorization flows) and the top-up's, through the
    Python model and @x402/core's zod schema."""
    topup = await http.post(TOPUP, params={"payer": Identity.generate().public_key, "amount": "1"})
    answers = [await http.get(PAID), await http.get(REPORT), topup]
    for response in answers:
        assert response.status_code == 402, response.text
        required = b64json(response.headers["payment-required"])
        PaymentRequired.model_validate(required)
        assert node_schema("PaymentRequiredV2Schema", required) == {"ok": True, "error": None}
    flows = [
        [
            offer["extra"].get("paymentFlow")
            for offer in b64json(a.headers["payment-required"])["accepts"]
            if offer["scheme"] == "exact"
        ]
        for a in answers
    ]
    # Settled before the service runs (or the credit): upfront; after it: authorization.
    assert flows == [["upfront"], [None], ["upfront"]]


def conformance(mode: str, *targets: str) -> list[dict[str, Any]]:
    """PyPI x402-conformance's `x402conf MODE --fail-on-error TARGET…`: its results."""
    run = subprocess.run(
        [sys.executable, "-m", "x402conf", mode, "--fail-on-error", *targets],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results: list[dict[str, Any]] = json.loads(run.stdout)["results"]
    assert [r["target"] for r in results] == list(targets)
    return results


def test_x402_conformance_passes_its_resource_checks(stack: Stack) -> None:
    """`x402conf resource`: P1-P7 over one unpaid GET of each priced route."""
    results = conformance("resource", stack.url + PAID, stack.url + REPORT)
    checks = [check for r in results for check in r["checks"]]
    assert len(checks) >= 14  # P1-P7 for each
    assert [c for c in checks if not c["pass"]] == []


def test_x402_conformance_passes_its_facilitator_checks(facilitator: FacilitatorProcess) -> None:
    """`x402conf live`: S0-S4 over the project facilitator's GET /supported."""
    [result] = conformance("live", facilitator.url)
    assert result["checks"] and [c for c in result["checks"] if not c["pass"]] == []


# -- browsers --------------------------------------------------------------------------------


async def test_a_browser_may_send_what_the_official_typescript_clients_send(
    http: httpx.AsyncClient,
) -> None:
    """@x402/fetch and @x402/axios add `Access-Control-Expose-Headers` to their paid retry,
    so a browser's preflight asks for it beside PAYMENT-SIGNATURE; the gateway's answers
    expose every x402 header."""
    origin = "https://agent.example"
    asked = "access-control-expose-headers,payment-signature"
    preflight = await http.options(
        PAID,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": asked,
        },
    )
    assert preflight.status_code == 200
    allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert set(asked.split(",")) <= allowed
    challenge = await http.get(PAID, headers={"Origin": origin})
    exposed = {h.strip() for h in challenge.headers["access-control-expose-headers"].split(",")}
    assert {"payment-required", "payment-response", "x-payment-response"} <= exposed
