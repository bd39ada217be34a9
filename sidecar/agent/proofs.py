"""The prepaid proof an agent sends: the invoice a 402 carries, the terms of a direct
payment, the signed `X-Payment` header, and the check of the receipt that answers it.
X402Auth, ChannelAuth and the load generator (`x402 load`) build their proofs here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from sidecar.agent.wallet import scaled
from sidecar.core import protocol
from sidecar.core.errors import AmountError, InvalidChallenge, PaymentError
from sidecar.core.identity import Identity
from sidecar.core.protocol import SCHEME, VERSION

PROOF_HEADER = "X-Payment"
# An invoice carries what a proof echoes back, without the payer's name and signature.
INVOICE_FIELDS = {
    name: kind for name, kind in protocol.PROOF_FIELDS.items() if name not in ("payer", "signature")
}


def direct_terms(
    method: str, path: str, asset: str, amount: str, payee: str, expires_at: int
) -> dict[str, Any]:
    """The terms of a direct payment of `METHOD path` from the price list (no 402 first)."""
    return protocol.direct_terms(f"{method} {path}", asset, amount, payee, expires_at)


def proof_header(terms: Mapping[str, Any], signer: Identity) -> tuple[dict[str, Any], str]:
    """The proof of `terms` signed by `signer`, and its X-Payment header value."""
    proof = protocol.sign_proof(terms, signer)
    return proof, protocol.encode_header(proof)


def parse_invoice(response: httpx.Response) -> dict[str, Any] | None:
    """The invoice of a 402 (JSON body, else the PAYMENT-REQUIRED header); None if absent."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    return invoice_in(body, response.headers.get("payment-required"))


def invoice_in(body: Any, header: str | None) -> dict[str, Any] | None:
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
    return checked_invoice(invoice, "the 402's invoice")


def checked_invoice(invoice: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The invoice fields a proof echoes back, each of its type and of our version and
    scheme; InvalidChallenge names `what` (where the invoice came from) otherwise."""
    for name, kind in INVOICE_FIELDS.items():
        if type(invoice.get(name)) is not kind:
            raise InvalidChallenge(f"{what} has no valid {name!r}")
    if invoice["version"] != VERSION or invoice["scheme"] != SCHEME:
        raise InvalidChallenge(
            f"cannot pay a {invoice['version']}/{invoice['scheme']} invoice "
            f"(this client speaks {VERSION}/{SCHEME})"
        )
    return {name: invoice[name] for name in INVOICE_FIELDS}


def check_receipt(
    fields: Mapping[str, Any], proof: Mapping[str, Any], keys: Mapping[str, str] | None
) -> str | None:
    """Why this receipt is not a valid receipt for `proof`, or None if it is one."""
    if keys is None:
        return "no gateway keys to verify it (the gateway has no /.well-known/x402)"
    if not protocol.verify_receipt(fields, keys):
        return "the signature does not verify against the gateway's published keys"
    for name in ("payer", "payee", "nonce", "resource", "asset"):
        if fields.get(name) != proof.get(name):
            return f"its {name} is not the one paid"
    try:
        paid = scaled(str(proof.get("amount")))
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
