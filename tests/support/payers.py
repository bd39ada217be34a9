"""Agent wallets in the tests: funded in the ledger, paying through a real stack."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx

from sidecar.core import protocol, vouchers
from sidecar.core.identity import Identity
from sidecar.core.money import to_atomic
from sidecar.ledger import keyspace
from sidecar.ledger.accounts import Ledger
from sidecar.tools.stack import Stack
from tests.support.routes import VERIFY, VERIFY_PRICE
from tests.support.streams import raw


async def funded_payer(ledger: Ledger, amount: int, asset: str = "USDF") -> Identity:
    """A fresh registered agent wallet holding `amount` atomic units."""
    wallet = Identity.generate()
    await ledger.register(wallet.public_key)
    if amount:
        await ledger.credit(wallet.public_key, asset, amount, f"setup-{wallet.public_key}")
    return wallet


async def conserved(ledger: Ledger, payer: str) -> dict[str, int]:
    """credited = balance + channeled (open deposits) + debited, in atomic units."""
    fields = await raw(ledger).hgetall(keyspace.account(payer))
    amounts = {
        name: int(fields.get(f"{name}:USDF", "0"))
        for name in ("credited", "balance", "channeled", "debited")
    }
    assert amounts["credited"] == amounts["balance"] + amounts["channeled"] + amounts["debited"]
    return amounts


async def funded_payer_at(redis_url: str, amount: int, asset: str = "USDF") -> Identity:
    """funded_payer through a ledger client of its own (for a Redis no fixture holds)."""
    ledger = Ledger.from_url(redis_url)
    try:
        return await funded_payer(ledger, amount, asset)
    finally:
        await ledger.close()


def pay_invoice(challenge: httpx.Response, wallet: Identity, **tamper: Any) -> dict[str, str]:
    """Sign the invoice of a 402 (optionally with fields changed first) → request headers."""
    terms = {**challenge.json()["x402"], **tamper}
    return {"X-Payment": protocol.encode_header(protocol.sign_proof(terms, wallet))}


def direct_terms(
    stack: Stack, resource: str, amount: str, ttl: int = 60, **fields: Any
) -> dict[str, Any]:
    """Terms of a direct (no challenge) payment to `stack`, with `fields` changed."""
    payee, expires_at = stack.gateway_identity.kid, int(time.time()) + ttl
    return {**protocol.direct_terms(resource, "USDF", amount, payee, expires_at), **fields}


def pay_direct(
    stack: Stack, wallet: Identity, resource: str, amount: str, **fields: Any
) -> dict[str, str]:
    proof = protocol.sign_proof(direct_terms(stack, resource, amount, **fields), wallet)
    return {"X-Payment": protocol.encode_header(proof)}


def voucher_header(stack: Stack, wallet: Identity, **terms: Any) -> dict[str, str]:
    """A channel voucher for `stack`'s gateway, signed by `wallet`."""
    fields = {"asset": "USDF", "payee": stack.gateway_identity.kid, **terms}
    return {"X-Payment": protocol.encode_header(vouchers.sign_voucher(fields, wallet))}


def b64json(value: str) -> Any:
    """A base64 JSON header (a receipt) → its object."""
    return json.loads(base64.b64decode(value))


async def paid_requests(
    client: httpx.AsyncClient, stack: Stack, wallet: Identity, count: int
) -> list[dict[str, Any]]:
    """`count` direct payments of 0.01; the receipts the agent got, in the ledger's order."""
    receipts = []
    for start in range(0, count, 50):
        batch = range(start, min(start + 50, count))
        responses = await asyncio.gather(
            *(
                client.get(
                    VERIFY.format(n=n),
                    headers=pay_direct(stack, wallet, f"GET {VERIFY.format(n=n)}", "0.01"),
                )
                for n in batch
            )
        )
        for response in responses:
            assert response.status_code == 200, response.text
            receipts.append(b64json(response.headers["x-payment-response"]))
    # Sent concurrently, debited in some order: the balance left says which (the ledger's).
    receipts.sort(key=lambda receipt: -to_atomic(receipt["balance"], 6))
    return receipts


async def payers_with_receipts(
    ledger: Ledger, client: httpx.AsyncClient, stack: Stack, counts: list[int]
) -> list[tuple[Identity, list[dict[str, Any]]]]:
    """One funded payer per count, each having paid that many requests."""
    made = []
    for count in counts:
        wallet = await funded_payer(ledger, VERIFY_PRICE * count)
        made.append((wallet, await paid_requests(client, stack, wallet, count)))
    return made
