"""The prepaid proof an agent sends: the invoice a 402 carries, the terms of a direct
payment, the signed `X-Payment` header, and the check of the receipt that answers it.
X402Auth, ChannelAuth and the load generator (`x402 load`) build their proofs here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from sidecar.agent.receipts import verified
from sidecar.agent.wallet import scaled
from sidecar.core import protocol
from sidecar.core.errors import AmountError, InvalidChallenge, PaymentError
from sidecar.core.identity import Identity
from sidecar.core.protocol import SCHEME, Invoice, Proof

PROOF_HEADER = "X-Payment"


def direct_terms(
    method: str, path: str, asset: str, amount: str, payee: str, expires_at: int
) -> Invoice:
    """The terms of a direct payment of `METHOD path` from the price list (no 402 first)."""
    return Invoice.direct(f"{method} {path}", asset, amount, payee, expires_at)


def proof_header(terms: Invoice, signer: Identity) -> tuple[Proof, str]:
    """The proof of `terms` signed by `signer`, and its X-Payment header value."""
    proof = Proof.sign(terms, signer)
    return proof, protocol.encode_header(proof.to_wire())


def parse_invoice(response: httpx.Response) -> Invoice | None:
    """The invoice of a 402 (JSON body, else the PAYMENT-REQUIRED header); None if absent."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    return invoice_in(body, response.headers.get("payment-required"))


def invoice_in(body: Any, header: str | None) -> Invoice | None:
    """The invoice of a 402's parsed JSON body, else of its PAYMENT-REQUIRED header."""
    invoice = body.get("x402") if isinstance(body, dict) else None
    if not isinstance(invoice, dict) and header:
        try:
            required = protocol.decode_header(header)
        except PaymentError:
            raise InvalidChallenge("the PAYMENT-REQUIRED header is not base64 JSON") from None
        accepts = required.get("accepts") if isinstance(required, dict) else None
        for option in accepts if isinstance(accepts, list) else []:
            if isinstance(option, dict) and option.get("scheme") == SCHEME:
                invoice = option.get("extra")
                break
    if not isinstance(invoice, dict):
        return None
    return Invoice.from_wire(invoice, "the 402's invoice")


def check_receipt(
    fields: Mapping[str, Any], proof: Proof, keys: Mapping[str, str] | None
) -> str | None:
    """Why this receipt is not a valid receipt for `proof`, or None if it is one."""
    if keys is None:
        return "no gateway keys to verify it (the gateway has no /.well-known/x402)"
    if not verified(fields, keys):
        return "the signature does not verify against the gateway's published keys"
    for name in ("payer", "payee", "nonce", "resource", "asset"):
        if fields.get(name) != getattr(proof, name):
            return f"its {name} is not the one paid"
    try:
        paid = scaled(proof.amount)
        amount = scaled(str(fields.get("amount")))
        # a hold: what was held is what was paid, and at most that was captured
        held = fields.get("held") if fields.get("success") is True else fields.get("released")
        held_amount = None if held is None else scaled(str(held))
    except AmountError:
        return "its amount is not the amount paid"
    if fields.get("success") is not True:
        if fields.get("success") is False and held_amount == paid and amount == 0:
            return None  # the service failed: the hold was released, nothing charged
        return "it does not say success"
    if held_amount is None and amount != paid:
        return "its amount is not the amount paid"
    if held_amount is not None and not (held_amount == paid and 0 <= amount <= paid):
        return "its captured amount is not within the amount held"
    return None
