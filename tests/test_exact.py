"""The x402 `exact` scheme through the real stack: anvil + Circle's FiatTokenV2_2, the
official facilitator (`x402 facilitator serve`), real Envoy, the sidecar and Redis; paid
by the unmodified official x402 Python client. Nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from x402.extensions.bazaar import validate_discovery_extension
from x402.extensions.bazaar.types import parse_discovery_extension
from x402.extensions.payment_identifier import PAYMENT_IDENTIFIER
from x402.http.clients import x402HttpxClient
from x402.http.utils import decode_payment_response_header
from x402.schemas import PaymentPayload, PaymentRequired

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.tools.chain import AnvilChain
from sidecar.tools.onchain import (
    FacilitatorProcess,
    exact_settings,
    facilitator_account,
    official_client,
    operator,
    payers,
)
from sidecar.tools.stack import Stack
from tests.support.exact import b64json, balances, sign_exact
from tests.support.payers import pay_direct

PAID = "/api/paid"
PRICE = 10_000  # 0.01 USDF = 0.01 USDC
ROUTES = {
    "paid": {
        "method": "GET",
        "path": PAID,
        "price": "0.01",
        "description": "paid",
        # discoverable: the 402 declares the bazaar extension (server/listing.py)
        "input_schema": {"properties": {"q": {"type": "string"}}},
        "output_example": {"payer": "0x…"},
    }
}
X402_CORE = Path(
    os.environ.get("X402_CORE")
    or Path(__file__).resolve().parents[1] / ".tools/node_modules/@x402/core"
)


@pytest.fixture(scope="module")
def stack(chain: AnvilChain, facilitator: FacilitatorProcess) -> Iterator[Stack]:
    with Stack(ROUTES, settings=exact_settings(chain, facilitator)) as running:
        yield running


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
        yield client


async def signed_envelope(
    chain: AnvilChain, http: httpx.AsyncClient, payer_index: int = 0
) -> tuple[str, PaymentPayload]:
    """What the official client sends for this route's 402: the PAYMENT-SIGNATURE value."""
    return await sign_exact(chain, http, PAID, payers(chain)[payer_index], PRICE)


# -- the challenge -----------------------------------------------------------------------


async def test_the_402_offers_prepaid_and_exact(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    response = await http.get(PAID)
    assert response.status_code == 402
    required = b64json(response.headers["payment-required"])
    prepaid, offer = required["accepts"]
    assert prepaid["scheme"] == "prepaid-ed25519"
    assert prepaid["network"] == "fth:ledger"  # CAIP-2 shaped
    assert offer == {
        "scheme": "exact",
        "network": f"eip155:{chain.chain_id}",
        "amount": str(PRICE),
        "asset": chain.token,
        "payTo": operator(chain).address,
        "maxTimeoutSeconds": 120,
        "extra": {"name": "USD Coin", "version": "2", "paymentFlow": "upfront"},
    }
    x402 = response.json()["x402"]
    assert x402["scheme"] == "prepaid-ed25519"  # the invoice agents of the SDK pay
    assert (x402["price_usd"], x402["token"], x402["chain"]) == ("0.01", chain.token, chain.network)
    assert x402["facilitator"].startswith("http://127.0.0.1:")
    assert x402["payment_target"] == operator(chain).address
    assert "price_usd" not in prepaid["extra"]  # the prepaid invoice is unchanged


async def test_the_402_validates_against_the_official_python_model(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get(PAID)
    required = PaymentRequired.model_validate(b64json(response.headers["payment-required"]))
    assert [a.scheme for a in required.accepts] == ["prepaid-ed25519", "exact"]
    assert required.x402_version == 2 and required.resource is not None
    # The extensions, in the official shape: bazaar (valid against its own schema, with
    # the route's method) and payment-identifier, not required.
    assert required.extensions is not None
    assert set(required.extensions) == {"bazaar", PAYMENT_IDENTIFIER}
    bazaar = parse_discovery_extension(required.extensions["bazaar"])
    assert validate_discovery_extension(bazaar).valid
    assert required.extensions["bazaar"]["info"]["input"]["method"] == "GET"
    assert required.extensions[PAYMENT_IDENTIFIER]["info"] == {"required": False}
    # and discovery lists the same declaration with the route
    listed = (await http.get("/.well-known/x402")).json()["routes"]
    assert [r["extensions"] for r in listed] == [required.extensions]


async def test_the_402_validates_against_the_official_typescript_schema(
    http: httpx.AsyncClient,
) -> None:
    """@x402/core's zod PaymentRequiredSchema, run by node: it refused `fth-ledger`."""
    schemas = X402_CORE / "dist/cjs/schemas/index.js"
    assert schemas.is_file(), f"{schemas} missing: run `make tools`"
    response = await http.get(PAID)
    decoded = b64json(response.headers["payment-required"])
    script = (
        f"const s = require({json.dumps(str(schemas))});"
        "const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "const r = s.PaymentRequiredSchema.safeParse(input);"
        "console.log(JSON.stringify({ok: r.success, v2: s.isPaymentRequiredV2(input),"
        " error: r.success ? null : r.error.issues}));"
    )
    run = node(script, decoded)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"ok": True, "v2": True, "error": None}
    # The old network fails the same schema: what the CAIP-2 shape fixed.
    old = {**decoded, "accepts": [{**decoded["accepts"][0], "network": "fth-ledger"}]}
    run = node(script, old)
    assert json.loads(run.stdout)["ok"] is False


def node(script: str, data: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", "-e", script], input=json.dumps(data), capture_output=True, text=True, timeout=60
    )


# -- paying with exact -------------------------------------------------------------------


async def test_the_official_client_pays_with_exact_and_accepts_the_receipt(
    stack: Stack, chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    payer = payers(chain)[0]
    before = balances(chain, payer.address)
    async with x402HttpxClient(official_client(chain, payer, PRICE), timeout=60) as client:
        response = await client.get(stack.url + PAID)
    assert response.status_code == 200, response.text
    assert response.json()["payer"] == payer.address  # what the service was told

    settled = decode_payment_response_header(response.headers["payment-response"])
    assert settled.success is True
    assert settled.network == chain.network and settled.payer == payer.address
    assert settled.amount == str(PRICE)  # atomic units of the token
    assert b64json(response.headers["payment-response"])["asset"] == chain.token
    tx = chain.w3.eth.get_transaction_receipt(settled.transaction)  # type: ignore[arg-type]
    assert tx["status"] == 1
    after = balances(chain, payer.address)
    assert after == (before[0] - PRICE, before[1] + PRICE)

    receipt = b64json(response.headers["x-payment-response"])  # ours, kept apart
    keys = {stack.gateway_identity.kid: stack.gateway_identity.public_key}
    assert protocol.verify_receipt(receipt, keys)
    assert (receipt["scheme"], receipt["amount"], receipt["asset"]) == ("exact", "0.01", "USDF")
    assert receipt["transaction"] == settled.transaction
    assert receipt["resource"] == f"GET {PAID}"
    line = stack.wait_decisions(lambda d: d.get("receipt_id") == receipt["receipt_id"])[0]
    assert (line["decision"], line["reason"], line["payer"]) == (
        "allow",
        "exact",
        payer.address.lower(),
    )
    assert "signature" not in json.dumps(line)

    # The facilitator catalogued the route it settled, from the bazaar extension the
    # client copied out of the 402 (GET /discovery/resources, the official shape).
    async with httpx.AsyncClient(base_url=facilitator.url, timeout=10) as catalog:
        listed = (await catalog.get("/discovery/resources", params={"type": "http"})).json()
    found = [item for item in listed["items"] if item["resource"] == stack.url + PAID]
    assert len(found) == 1, listed
    assert found[0]["accepts"][0]["payTo"] == operator(chain).address
    assert found[0]["extensions"]["bazaar"]["info"]["input"]["method"] == "GET"


async def test_twenty_copies_of_one_authorization_are_served_and_settled_once(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain
) -> None:
    header, _ = await signed_envelope(chain, http, payer_index=1)
    payer = payers(chain)[1]
    before = balances(chain, payer.address)
    gas_nonce = chain.transaction_count(facilitator_account(chain).address)

    answers = await asyncio.gather(
        *(http.get(PAID, headers={"PAYMENT-SIGNATURE": header}) for _ in range(20))
    )
    # One settles; a copy checked while it is in flight is refused, and one checked after
    # it was recorded (a loaded machine spreads the twenty) is its redelivery: the same
    # receipt, nothing settled again (protocol.md §13).
    served = [a for a in answers if a.status_code == 200]
    assert served, [a.text for a in answers]
    assert len({a.headers["payment-response"] for a in served}) == 1  # one receipt
    refused = [a for a in answers if a.status_code == 402]
    assert len(served) + len(refused) == 20
    assert {a.json()["error"] for a in refused} == {"nonce_reused"}
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)
    assert chain.transaction_count(facilitator_account(chain).address) == gas_nonce + 1
    # And later: a retry is redelivered with the same receipt up to the limit, then
    # refused; nothing settles again.
    paid, redelivered = served[0], len(served) - 1
    assert redelivered <= DEFAULT_REDELIVERY_LIMIT
    for _ in range(DEFAULT_REDELIVERY_LIMIT - redelivered):
        again = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
        assert again.headers["payment-response"] == paid.headers["payment-response"]
    again = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert (again.status_code, again.json()["error"]) == (402, "nonce_reused")
    assert "payment-required" in again.headers  # a fresh challenge
    assert chain.transaction_count(facilitator_account(chain).address) == gas_nonce + 1


def with_id(header: str, payment_id: str) -> dict[str, str]:
    """The official client's PAYMENT-SIGNATURE with a payment-identifier id (the extension
    rides beside the signed authorization)."""
    envelope = b64json(header)
    envelope["extensions"] = {PAYMENT_IDENTIFIER: {"info": {"required": False, "id": payment_id}}}
    return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(envelope).encode()).decode()}


async def test_a_payment_identifier_pays_once_on_chain_across_authorizations(
    http: httpx.AsyncClient, chain: AnvilChain
) -> None:
    payer = payers(chain)[2]
    before = balances(chain, payer.address)
    payment_id = f"pay_{os.urandom(16).hex()}"
    first_header, _ = await signed_envelope(chain, http, payer_index=2)
    first = await http.get(PAID, headers=with_id(first_header, payment_id))
    assert first.status_code == 200, first.text
    gas_nonce = chain.transaction_count(facilitator_account(chain).address)

    # A second authorization (another nonce) for the same payment: served, never settled.
    second_header, _ = await signed_envelope(chain, http, payer_index=2)
    second = await http.get(PAID, headers=with_id(second_header, payment_id))
    assert second.status_code == 200, second.text
    assert second.headers["payment-response"] == first.headers["payment-response"]
    # The same id for another request (a query): a conflict, nothing settled.
    other = await http.get(
        PAID,
        params={"q": "1"},
        headers=with_id(second_header, payment_id),
    )
    assert (other.status_code, other.json()["error"]) == (409, "payment_identifier_conflict")
    assert chain.transaction_count(facilitator_account(chain).address) == gas_nonce
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


async def test_an_offer_mismatch_is_refused_before_the_facilitator(
    http: httpx.AsyncClient, chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    _, payload = await signed_envelope(chain, http, payer_index=2)
    envelope = payload.model_dump(by_alias=True)
    envelope["accepted"] = {**envelope["accepted"], "amount": "1"}
    header = base64.b64encode(json.dumps(envelope).encode()).decode()
    before = (facilitator.workdir / "facilitator.log").read_text()
    response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert (response.status_code, response.json()["error"]) == (402, "invoice_mismatch")
    assert "payment-required" in response.headers
    assert (facilitator.workdir / "facilitator.log").read_text() == before


async def test_an_invalid_authorization_is_402_with_the_facilitators_reason(
    http: httpx.AsyncClient, chain: AnvilChain
) -> None:
    _, payload = await signed_envelope(chain, http, payer_index=2)
    payer = payers(chain)[2]
    envelope = payload.model_dump(by_alias=True)
    signature = envelope["payload"]["signature"]
    flipped = signature[:10] + ("0" if signature[10] != "0" else "1") + signature[11:]
    envelope["payload"] = {**envelope["payload"], "signature": flipped}
    header = base64.b64encode(json.dumps(envelope).encode()).decode()
    before = balances(chain, payer.address)
    response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    body = response.json()
    assert (response.status_code, body["error"]) == (402, "invalid_payment"), body
    assert body["facilitator_reason"]  # the official scheme's own reason
    assert "payment-required" in response.headers and body["x402"]["invoice_id"]
    assert balances(chain, payer.address) == before


async def test_prepaid_still_pays_beside_exact(http: httpx.AsyncClient, stack: Stack) -> None:
    wallet = Identity.generate()
    await stack.fund(wallet.public_key, "1")
    response = await http.get(PAID, headers=pay_direct(stack, wallet, f"GET {PAID}", "0.01"))
    assert response.status_code == 200
    assert await stack.balance(wallet.public_key) == 1_000_000 - PRICE


async def test_timings_exact_versus_prepaid(
    stack: Stack, chain: AnvilChain, http: httpx.AsyncClient
) -> None:
    """Not a benchmark, nothing asserted on the numbers: p50 in this run, for the record."""
    wallet = Identity.generate()
    await stack.fund(wallet.public_key, "1")
    prepaid_ms, exact_ms = [], []
    for _ in range(15):
        headers = pay_direct(stack, wallet, f"GET {PAID}", "0.01")
        start = time.perf_counter()
        assert (await http.get(PAID, headers=headers)).status_code == 200
        prepaid_ms.append((time.perf_counter() - start) * 1000)
        header, _ = await signed_envelope(chain, http, payer_index=3)
        start = time.perf_counter()
        assert (await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})).status_code == 200
        exact_ms.append((time.perf_counter() - start) * 1000)
    print(
        "\np50 over 15 paid requests through Envoy: "
        f"prepaid {statistics.median(prepaid_ms):.1f} ms, "
        f"exact (verify + settle on anvil) {statistics.median(exact_ms):.1f} ms"
    )


# -- faults --------------------------------------------------------------------------------


async def test_a_dead_facilitator_is_503_for_exact_only_and_recovers(
    http: httpx.AsyncClient, stack: Stack, chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    header, _ = await signed_envelope(chain, http, payer_index=4)
    payer = payers(chain)[4]
    before = balances(chain, payer.address)
    facilitator.kill()
    try:
        response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
        assert (response.status_code, response.json()["error"]) == (503, "facilitator_unavailable")
        assert response.headers["retry-after"] == "1"
        wallet = Identity.generate()
        await stack.fund(wallet.public_key, "1")
        prepaid = await http.get(PAID, headers=pay_direct(stack, wallet, f"GET {PAID}", "0.01"))
        assert prepaid.status_code == 200
        assert balances(chain, payer.address) == before  # a 503 never charges
    finally:
        facilitator.start()
    # The very authorization refused with 503 pays now: nothing had reserved it for good.
    response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
    assert response.status_code == 200, response.text
    assert balances(chain, payer.address) == (before[0] - PRICE, before[1] + PRICE)


# -- browsers ------------------------------------------------------------------------------

ORIGIN = "https://agent.example"


async def test_a_browser_may_send_the_payment_header_preflight(http: httpx.AsyncClient) -> None:
    response = await http.options(
        PAID,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "payment-signature",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "payment-signature" in response.headers["access-control-allow-headers"]
    assert "GET" in response.headers["access-control-allow-methods"]


async def test_a_browser_can_read_the_challenge_and_the_service_decides_on_its_answer(
    http: httpx.AsyncClient, chain: AnvilChain
) -> None:
    """The 402 is the gateway's (CORS for any origin by default, no credentials); the paid
    answer is the service's, with the service's own CORS (the demo service has none)."""
    challenge = await http.get(PAID, headers={"Origin": ORIGIN})
    assert challenge.status_code == 402
    assert challenge.headers["access-control-allow-origin"] == "*"
    assert "payment-required" in challenge.headers["access-control-expose-headers"]
    header, _ = await signed_envelope(chain, http, payer_index=5)
    paid = await http.get(PAID, headers={"Origin": ORIGIN, "PAYMENT-SIGNATURE": header})
    assert paid.status_code == 200, paid.text
    assert "access-control-allow-origin" not in paid.headers
    assert "payment-response" in paid.headers


async def test_a_slow_facilitator_is_503_and_charges_nothing(
    chain: AnvilChain, facilitator: FacilitatorProcess
) -> None:
    """/verify not answered within facilitator_verify_timeout_ms (1 ms here): 503, nothing
    settled, prepaid unaffected."""
    settings = exact_settings(chain, facilitator, facilitator_verify_timeout_ms=1)
    with Stack(ROUTES, settings=settings) as slow:
        async with httpx.AsyncClient(base_url=slow.url, timeout=60) as http:
            header, _ = await signed_envelope(chain, http, payer_index=5)
            payer = payers(chain)[5]
            before = balances(chain, payer.address)
            response = await http.get(PAID, headers={"PAYMENT-SIGNATURE": header})
            assert (response.status_code, response.json()["error"]) == (
                503,
                "facilitator_unavailable",
            )
            wallet = Identity.generate()
            await slow.fund(wallet.public_key, "1")
            prepaid = await http.get(PAID, headers=pay_direct(slow, wallet, f"GET {PAID}", "0.01"))
            assert prepaid.status_code == 200
        assert balances(chain, payer.address) == before
