"""The paid request path end to end: agent → real Envoy → sidecar → real Redis → upstream."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT
from sidecar.ledger.accounts import SUSPENDED, Ledger
from sidecar.tools.stack import Stack
from tests.support.payers import b64json, funded_payer, pay_direct, pay_invoice
from tests.support.routes import ROUTES
from tests.support.stacks import grpc_only_prices

ATLAS = "/api/v1/agent/pay-api/atlas"
ATLAS_PRICE = 250_000


async def discovery_keys(client: httpx.AsyncClient) -> dict[str, str]:
    doc = (await client.get("/.well-known/x402")).json()
    return {key["kid"]: key["public_key"] for key in doc["keys"]}


async def test_unpaid_request_gets_402_with_invoice(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    response = await client.get(ATLAS, params={"q": "ignored"})

    assert response.status_code == 402
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"] == "payment_required"
    assert body["message"] == f"GET {ATLAS} costs 0.25 USDF"
    invoice = body["x402"]
    assert invoice["version"] == "fth-x402/2.0"
    assert invoice["scheme"] == "prepaid-ed25519"
    assert (invoice["asset"], invoice["amount"], invoice["amount_atomic"]) == (
        "USDF",
        "0.25",
        "250000",
    )
    assert invoice["resource"] == f"GET {ATLAS}"  # no query string
    assert invoice["payee"] == stack.gateway_identity.kid
    assert invoice["invoice_id"].startswith("inv_") and invoice["nonce"].startswith("n_")
    assert 0 < invoice["expires_at"] - time.time() <= 300
    assert invoice["facilitator_url"].endswith("/.well-known/x402")

    required = b64json(response.headers["payment-required"])
    assert required["x402Version"] == 2
    assert required["resource"]["url"].endswith(ATLAS)
    [accept] = required["accepts"]
    assert accept["amount"] == "250000"
    assert accept["payTo"] == invoice["payee"]
    assert accept["extra"] == invoice


async def test_signed_retry_is_served_with_a_verifiable_receipt(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    challenge = await client.get(ATLAS)

    paid = await client.get(ATLAS, headers=pay_invoice(challenge, wallet))

    assert paid.status_code == 200
    upstream_saw = paid.json()
    assert upstream_saw["service"] == "demo-upstream"
    assert upstream_saw["payer"] == wallet.public_key
    assert upstream_saw["amount"] == "0.25"
    assert upstream_saw["proof_header_seen"] is False  # the proof never reaches the service
    receipt = b64json(paid.headers["x-payment-response"])
    assert b64json(paid.headers["payment-response"]) == receipt
    assert upstream_saw["receipt_id"] == receipt["receipt_id"]
    assert protocol.verify_receipt(receipt, await discovery_keys(client))
    assert receipt["success"] is True
    assert (receipt["amount"], receipt["balance"], receipt["payer"]) == (
        "0.25",
        "0.75",
        wallet.public_key,
    )
    assert receipt["invoice_id"] == challenge.json()["x402"]["invoice_id"]
    account = await ledger.account(wallet.public_key)
    assert account.balances["USDF"] == 1_000_000 - ATLAS_PRICE
    assert account.debited["USDF"] == ATLAS_PRICE
    [stored] = await ledger.receipts(wallet.public_key)
    assert stored["receipt_id"] == receipt["receipt_id"]
    assert stored["amount"] == str(ATLAS_PRICE)


async def test_a_tampered_receipt_does_not_verify(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    challenge = await client.get(ATLAS)
    paid = await client.get(ATLAS, headers=pay_invoice(challenge, wallet))
    receipt = b64json(paid.headers["x-payment-response"])

    assert not protocol.verify_receipt({**receipt, "balance": "100"}, await discovery_keys(client))


async def test_direct_payment_needs_no_challenge(
    client: httpx.AsyncClient, ledger: Ledger, stack: Stack
) -> None:
    wallet = await funded_payer(ledger, 20_000)

    paid = await client.get(
        "/api/v1/trade/verify/T-42",
        headers=pay_direct(stack, wallet, "GET /api/v1/trade/verify/T-42", "0.01"),
    )

    assert paid.status_code == 200
    receipt = b64json(paid.headers["x-payment-response"])
    assert receipt["invoice_id"] == "" and receipt["balance"] == "0.01"


@pytest.mark.parametrize(
    ("method", "path", "price"),
    [
        ("GET", "/api/v1/market/signal", "0.0005"),  # sidecar route table, unannotated in Envoy
        pytest.param(
            "POST", "/api/v1/annotated", "0.02", marks=grpc_only_prices
        ),  # Envoy annotation only
    ],
)
async def test_both_price_sources_charge(
    client: httpx.AsyncClient, ledger: Ledger, method: str, path: str, price: str
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    challenge = await client.request(method, path)
    assert challenge.status_code == 402
    assert challenge.json()["x402"]["amount"] == price

    paid = await client.request(method, path, headers=pay_invoice(challenge, wallet))

    assert paid.status_code == 200
    assert b64json(paid.headers["x-payment-response"])["amount"] == price


async def test_free_route_passes_without_touching_payment(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/health", headers={"X-Payment": "junk"})
    assert response.status_code == 200
    assert response.json()["proof_header_seen"] is False


async def test_discovery_lists_prices_and_keys(client: httpx.AsyncClient, stack: Stack) -> None:
    doc = (await client.get("/.well-known/x402")).json()
    assert doc["payee"] == stack.gateway_identity.kid
    assert doc["keys"] == [
        {
            "kid": stack.gateway_identity.kid,
            "alg": "Ed25519",
            "public_key": stack.gateway_identity.public_key,
            "status": "current",
        }
    ]
    assert doc["assets"] == [{"asset": "USDF", "decimals": 6}]
    assert {(r["method"], r["path"], r["price"]) for r in doc["routes"]} == {
        (spec["method"], spec["path"], spec["price"]) for spec in ROUTES.values()
    }
    assert doc["max_direct_ttl_seconds"] == 300


# -- every reason of PROTOCOL.md §5, produced by a real request ----------------------------


async def expect(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == reason
    assert body["message"]
    if status == 402:
        assert body["x402"]["invoice_id"]  # a fresh invoice, to simply pay again
        assert "payment-required" in response.headers
    return body


async def test_replay_is_redelivered_then_refused(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    headers = pay_invoice(await client.get(ATLAS), wallet)
    paid = await client.get(ATLAS, headers=headers)
    assert paid.status_code == 200

    for _ in range(DEFAULT_REDELIVERY_LIMIT):  # a lost answer's retry: the same receipt
        again = await client.get(ATLAS, headers=headers)
        assert again.headers["payment-response"] == paid.headers["payment-response"]
    await expect(await client.get(ATLAS, headers=headers), 402, "nonce_reused")
    assert (await ledger.account(wallet.public_key)).balances["USDF"] == 750_000


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ({"amount": "0.01"}, "invoice_mismatch"),  # tampered amount
        ({"resource": "GET /api/v1/trade/verify/T-1"}, "invoice_mismatch"),  # another route
        ({"payee": "gw_someoneelse000"}, "invoice_mismatch"),  # another gateway
        ({"asset": "USDC"}, "invoice_mismatch"),
        ({"invoice_id": "inv_AAAAAAAAAAAAAAAAAAAAAA"}, "invalid_invoice"),  # forged invoice
        ({"expires_at": 1_700_000_000}, "invoice_expired"),
    ],
)
async def test_altered_proofs_are_refused(
    client: httpx.AsyncClient, ledger: Ledger, tamper: dict[str, Any], reason: str
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    challenge = await client.get(ATLAS)

    await expect(
        await client.get(ATLAS, headers=pay_invoice(challenge, wallet, **tamper)), 402, reason
    )
    assert (await ledger.account(wallet.public_key)).balances["USDF"] == 1_000_000


async def test_direct_proof_too_far_ahead_is_expired(
    client: httpx.AsyncClient, ledger: Ledger, stack: Stack
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    headers = pay_direct(stack, wallet, f"GET {ATLAS}", "0.25", ttl=3600)
    await expect(await client.get(ATLAS, headers=headers), 402, "invoice_expired")


async def test_bad_signature_is_refused(client: httpx.AsyncClient, ledger: Ledger) -> None:
    wallet, thief = await funded_payer(ledger, 1_000_000), Identity.generate()
    proof = protocol.sign_proof((await client.get(ATLAS)).json()["x402"], thief)
    proof["payer"] = wallet.public_key  # signed by someone else on the payer's behalf

    response = await client.get(ATLAS, headers={"X-Payment": protocol.encode_header(proof)})

    await expect(response, 402, "invalid_signature")
    assert (await ledger.account(wallet.public_key)).balances["USDF"] == 1_000_000


async def test_unknown_payer(client: httpx.AsyncClient) -> None:
    stranger = Identity.generate()
    headers = pay_invoice(await client.get(ATLAS), stranger)
    await expect(await client.get(ATLAS, headers=headers), 402, "unknown_payer")


async def test_suspended_payer(client: httpx.AsyncClient, ledger: Ledger) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    await ledger.set_status(wallet.public_key, SUSPENDED)
    headers = pay_invoice(await client.get(ATLAS), wallet)
    await expect(await client.get(ATLAS, headers=headers), 403, "payer_suspended")


async def test_insufficient_funds_says_the_balance(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 100_000)
    headers = pay_invoice(await client.get(ATLAS), wallet)

    body = await expect(await client.get(ATLAS, headers=headers), 402, "insufficient_funds")

    assert body["balance"] == "0.1"


@pytest.mark.parametrize(
    ("header", "status", "reason"),
    [
        ("not base64 at all!", 400, "malformed_payment"),
        (base64.b64encode(b"{not json").decode(), 400, "malformed_payment"),
        (base64.b64encode(b'["a list"]').decode(), 400, "malformed_payment"),
        ("A" * 5000, 400, "malformed_payment"),  # larger than max_proof_bytes
        (protocol.encode_header({"version": "fth-x402/1.0"}), 400, "unsupported_version"),
        (
            protocol.encode_header({"version": "fth-x402/2.0", "scheme": "card"}),
            400,
            "unsupported_scheme",
        ),
        (
            protocol.encode_header({"version": "fth-x402/2.0", "scheme": "prepaid-ed25519"}),
            400,
            "malformed_payment",
        ),
    ],
)
async def test_malformed_headers(
    client: httpx.AsyncClient, header: str, status: int, reason: str
) -> None:
    await expect(await client.get(ATLAS, headers={"X-Payment": header}), status, reason)


async def test_payment_signature_header_and_v2_envelope(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    challenge = await client.get(ATLAS)
    payload = protocol.sign_proof(challenge.json()["x402"], wallet)
    envelope = {
        "x402Version": 2,
        "accepted": b64json(challenge.headers["payment-required"])["accepts"][0],
        "payload": payload,
    }

    paid = await client.get(ATLAS, headers={"PAYMENT-SIGNATURE": protocol.encode_header(envelope)})

    assert paid.status_code == 200


# -- concurrency -------------------------------------------------------------------------


async def test_concurrent_payments_never_overspend(
    client: httpx.AsyncClient, ledger: Ledger, stack: Stack
) -> None:
    price, path = 10_000, "/api/v1/trade/verify/T-9"
    wallet = await funded_payer(ledger, 50 * price)
    proofs = [pay_direct(stack, wallet, f"GET {path}", "0.01") for _ in range(200)]

    responses = await asyncio.gather(*(client.get(path, headers=h) for h in proofs))

    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 50
    assert statuses.count(402) == 150
    assert {r.json()["error"] for r in responses if r.status_code == 402} == {"insufficient_funds"}
    account = await ledger.account(wallet.public_key)
    assert account.balances["USDF"] == 0
    assert account.debited["USDF"] == 50 * price
    receipts = await ledger.receipts(wallet.public_key, count=1000)
    assert len(receipts) == 50
    assert len({r["receipt_id"] for r in receipts}) == 50
    assert sorted(int(r["balance"]) for r in receipts) == [i * price for i in range(50)]


# -- the decision log --------------------------------------------------------------------


async def test_one_decision_line_per_check_and_no_secrets(
    client: httpx.AsyncClient, ledger: Ledger, stack: Stack
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    # A client's own x-request-id is replaced; Envoy returns the one it assigned.
    challenge = await client.get(ATLAS, headers={"x-request-id": "req-challenge"})
    headers = pay_invoice(challenge, wallet)
    paid = await client.get(ATLAS, headers={**headers, "x-request-id": "req-paid"})
    await asyncio.sleep(0.2)  # the sidecar writes its line after answering

    lines = {line["request_id"]: line for line in stack.decisions()}
    assert "req-challenge" not in lines and "req-paid" not in lines
    denied = lines[challenge.headers["x-request-id"]]
    allowed = lines[paid.headers["x-request-id"]]
    fields = {
        "decision",
        "status",
        "reason",
        "request_id",
        "method",
        "path",
        "route",
        "price",
        "asset",
        "payer",
        "invoice_id",
        "receipt_id",
        "balance",
        "latency_ms",
        "timestamp",
    }
    assert fields <= denied.keys() and fields <= allowed.keys()
    assert (denied["decision"], denied["status"], denied["reason"]) == (
        "deny",
        402,
        "payment_required",
    )
    assert (allowed["decision"], allowed["status"], allowed["reason"]) == ("allow", 200, "paid")
    assert (allowed["route"], allowed["price"], allowed["asset"]) == ("atlas", "0.25", "USDF")
    assert allowed["payer"] == wallet.public_key
    assert allowed["invoice_id"] == challenge.json()["x402"]["invoice_id"]
    assert allowed["receipt_id"].startswith("rcpt_") and allowed["balance"] == "0.75"
    assert isinstance(allowed["latency_ms"], float)
    log = stack.processes["sidecar"].log()
    proof = json.loads(base64.b64decode(headers["X-Payment"]))
    assert proof["signature"] not in log
    assert headers["X-Payment"] not in log
    assert wallet.seed_text not in log and stack.gateway_identity.seed_text not in log


# -- probes ------------------------------------------------------------------------------


async def test_health_probes(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.sideport_url) as side:
        assert (await side.get("/healthz")).status_code == 200
        assert (await side.get("/readyz")).json() == {"status": "ready"}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['grpc']}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- the ledger down: fail closed ---------------------------------------------------------


async def test_ledger_down_fails_closed_and_free_routes_still_work() -> None:
    with Stack(ROUTES) as stack:
        ledger = Ledger.from_url(stack.redis_url)
        wallet = await funded_payer(ledger, 1_000_000)
        await ledger.close()
        async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
            headers = pay_invoice(await client.get(ATLAS), wallet)
            stack.processes["redis"].kill()

            paid = await client.get(ATLAS, headers=headers)
            body = await expect(paid, 503, "ledger_unavailable")
            assert paid.headers["retry-after"] == "1"
            assert "x402" not in body
            # Challenges are stateless, so agents still learn the price.
            assert (await client.get(ATLAS)).status_code == 402
            assert (await client.get("/api/v1/health")).status_code == 200
            assert (await client.get("/.well-known/x402")).status_code == 200
            ready = await client.get(f"{stack.sideport_url}/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"status": "ledger_unavailable"}

            stack.start_redis()  # an empty Redis: the sidecar reloads its scripts by itself
            fresh = Ledger.from_url(stack.redis_url)
            wallet = await funded_payer(fresh, 1_000_000)
            await fresh.close()
            paid = await client.get(ATLAS, headers=pay_invoice(await client.get(ATLAS), wallet))
            assert paid.status_code == 200
