"""A retry of the same payment is never charged again (docs/protocol.md §13): through a
real Envoy, sidecar and Redis, on both transports (X402_TRANSPORT=http)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any
from urllib.parse import urlsplit

import httpx

from sidecar.core import protocol
from sidecar.core.identity import Identity
from sidecar.core.retries import DEFAULT_REDELIVERY_LIMIT, PAYMENT_IDENTIFIER
from sidecar.ledger import scripts
from sidecar.ledger.accounts import Ledger
from sidecar.server.authz.check import CheckService
from sidecar.server.config import Settings
from sidecar.tools.stack import Stack
from tests.support.inprocess import cancel_while_redis_stalls, check, check_request
from tests.support.payers import b64json, direct_terms, funded_payer, pay_direct

ATLAS = "/api/v1/agent/pay-api/atlas"  # 0.25 USDF, charged on check
PRICE = 250_000


async def balance(ledger: Ledger, wallet: Identity) -> int:
    return (await ledger.account(wallet.public_key)).balances["USDF"]


async def reasons(stack: Stack, wallet: Identity, count: int) -> list[str]:
    """The reasons of the payer's first `count` decision lines (written after answering)."""
    for _ in range(200):
        lines = [d for d in stack.decisions() if d.get("payer") == wallet.public_key]
        if len(lines) >= count:
            return [line["reason"] for line in lines]
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} decision lines")


def receipt_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return dict(b64json(response.headers["payment-response"]))


def identified(stack: Stack, wallet: Identity, payment_id: Any, path: str = ATLAS) -> str:
    """A fresh direct proof in the x402 v2 envelope, naming `payment_id`."""
    proof = protocol.sign_proof(direct_terms(stack, f"GET {path}", "0.25"), wallet)
    envelope = {
        "x402Version": 2,
        "accepted": {"scheme": protocol.SCHEME},
        "payload": proof,
        "extensions": {PAYMENT_IDENTIFIER: {"info": {"required": False, "id": payment_id}}},
    }
    return protocol.encode_header(envelope)


async def test_a_resent_proof_is_redelivered_with_the_same_receipt(
    client: httpx.AsyncClient, stack: Stack, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    headers = pay_direct(stack, wallet, f"GET {ATLAS}", "0.25")
    first = await client.get(ATLAS, headers=headers)
    again = await client.get(ATLAS, headers=headers)

    assert again.headers["payment-response"] == first.headers["payment-response"]
    assert again.json()["receipt_id"] == first.json()["receipt_id"]  # x-x402-receipt-id
    assert receipt_of(again)["balance"] == "0.75"
    assert await balance(ledger, wallet) == 1_000_000 - PRICE
    assert await reasons(stack, wallet, 2) == ["paid", "redelivered"]


async def test_one_proof_sent_a_hundred_times_is_served_at_most_the_limit(
    client: httpx.AsyncClient, stack: Stack, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    headers = pay_direct(stack, wallet, f"GET {ATLAS}", "0.25")
    answers = [await client.get(ATLAS, headers=headers) for _ in range(100)]

    statuses = [answer.status_code for answer in answers]
    assert statuses == [200] * (1 + DEFAULT_REDELIVERY_LIMIT) + [402] * (
        99 - DEFAULT_REDELIVERY_LIMIT
    )
    receipt_id = receipt_of(answers[0])["receipt_id"]
    assert {answer.json()["receipt_id"] for answer in answers} == {receipt_id}
    assert {answer.json().get("error") for answer in answers[4:]} == {"nonce_reused"}
    assert await balance(ledger, wallet) == 1_000_000 - PRICE


async def test_the_same_payment_for_another_request_is_a_conflict(
    client: httpx.AsyncClient, stack: Stack, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    headers = pay_direct(stack, wallet, f"GET {ATLAS}", "0.25")
    first = await client.get(ATLAS, headers=headers, params={"q": "one"})
    seen = len(stack.upstream_requests())

    other = await client.get(ATLAS, headers=headers, params={"q": "two"})

    assert other.status_code == 409
    body = other.json()
    assert body["error"] == "payment_identifier_conflict"
    assert body["receipt_id"] == receipt_of(first)["receipt_id"]
    assert "payment-response" not in other.headers
    assert len(stack.upstream_requests()) == seen  # nothing served
    assert await balance(ledger, wallet) == 1_000_000 - PRICE  # nothing charged


async def test_a_payment_identifier_names_the_payment_across_proofs(
    client: httpx.AsyncClient, stack: Stack, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    payment_id = f"pay_{secrets.token_hex(16)}"
    first = await client.get(
        ATLAS, headers={"PAYMENT-SIGNATURE": identified(stack, wallet, payment_id)}
    )
    # A freshly signed proof (another nonce) for the same payment: served, not charged.
    again = await client.get(
        ATLAS, headers={"PAYMENT-SIGNATURE": identified(stack, wallet, payment_id)}
    )
    assert receipt_of(again) == receipt_of(first)
    conflict = await client.get(
        ATLAS,
        params={"q": "x"},
        headers={"PAYMENT-SIGNATURE": identified(stack, wallet, payment_id)},
    )
    assert (conflict.status_code, conflict.json()["error"]) == (409, "payment_identifier_conflict")
    assert await balance(ledger, wallet) == 1_000_000 - PRICE


async def test_a_malformed_payment_identifier_is_refused(
    client: httpx.AsyncClient, stack: Stack, ledger: Ledger
) -> None:
    wallet = await funded_payer(ledger, 1_000_000)
    for bad in ("short", "x" * 129, "pay_" + "!" * 20, 12345678901234567):
        answer = await client.get(
            ATLAS, headers={"PAYMENT-SIGNATURE": identified(stack, wallet, bad)}
        )
        assert (answer.status_code, answer.json()["error"]) == (400, "invalid_payment_identifier")
    assert await balance(ledger, wallet) == 1_000_000


async def test_a_connection_closed_after_sending_is_retried_uncharged(
    client: httpx.AsyncClient, stack: Stack, ledger: Ledger
) -> None:
    """The agent hangs up after sending, before any answer (it is lost): on an on_check
    route the charge stands, and the retry of the same proof passes with the same receipt
    id, charged nothing."""
    wallet = await funded_payer(ledger, 1_000_000)
    headers = pay_direct(stack, wallet, f"GET {ATLAS}", "0.25")
    url = urlsplit(stack.url)
    assert url.hostname is not None and url.port is not None
    _reader, writer = await asyncio.open_connection(url.hostname, url.port)
    proof = headers["X-Payment"]
    writer.write(f"GET {ATLAS}?sleep=1 HTTP/1.1\r\nHost: x\r\nX-Payment: {proof}\r\n\r\n".encode())
    await writer.drain()
    for _ in range(200):  # the check charged; the service still dawdles
        if await balance(ledger, wallet) < 1_000_000:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the check never charged")
    writer.close()  # gone before the answer
    await writer.wait_closed()

    again = await client.get(ATLAS, params={"sleep": "1"}, headers=headers)

    receipt = receipt_of(again)
    assert again.json()["receipt_id"] == receipt["receipt_id"]
    assert await balance(ledger, wallet) == 1_000_000 - PRICE
    assert await reasons(stack, wallet, 2) == ["paid", "redelivered"]


async def test_a_charge_envoy_gave_up_on_is_redelivered_to_the_retry(
    stack: Stack, ledger: Ledger
) -> None:
    """The real servicer in process; Redis stalls (DEBUG SLEEP) while the debit is in it and
    the check is cancelled as Envoy's ext_authz deadline would: the charge lands after the
    agent got its 503. The retry of the same proof gets that charge's receipt, uncharged."""
    settings = Settings.load(stack.config_path)
    servicer = CheckService(
        settings.route_table(), settings.gateway(), Ledger.from_url(stack.redis_url, timeout=5)
    )
    wallet = await funded_payer(ledger, 1_000_000)
    proof = pay_direct(stack, wallet, f"GET {ATLAS}", "0.25")["X-Payment"]
    request = check_request("GET", ATLAS, {"x-payment": proof})
    await cancel_while_redis_stalls(servicer, ledger, scripts.DEBIT, request)
    [entry] = await ledger.receipts(wallet.public_key)  # charged after Envoy gave up

    retried = await check(servicer, check_request("GET", ATLAS, {"x-payment": proof}))

    assert retried.reason == "allow"
    receipt = b64json(retried.headers["payment-response"])
    assert receipt["receipt_id"] == entry["receipt_id"]
    assert await balance(ledger, wallet) == 1_000_000 - PRICE
    assert len(await ledger.receipts(wallet.public_key)) == 1
    await servicer.ledger.close()
