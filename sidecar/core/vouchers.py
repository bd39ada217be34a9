"""Channel vouchers, pure: "channel C owes the payee a cumulative X, sequence n", signed
by the payer — their shape, parsing, signing and every check that needs no ledger.
The ledger's side (deposits, accepting, closing) is sidecar.ledger.channels."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import protocol
from sidecar.core.decision import Gateway, Request, payer_key
from sidecar.core.errors import (
    AmountError,
    InvalidSignature,
    InvoiceMismatch,
    MalformedPayment,
    PaymentError,
    UnsupportedScheme,
)
from sidecar.core.identity import Identity, verify
from sidecar.core.money import MAX_BALANCE
from sidecar.core.pricing import Price

SCHEME = "channel-ed25519"
VOUCHER_DOMAIN = b"fth-x402/2.0 voucher\n"
VOUCHER_FIELDS: dict[str, type] = {
    "version": str,
    "scheme": str,
    "channel_id": str,
    "asset": str,
    "cumulative": str,
    "sequence": int,
    "resource": str,
    "payee": str,
    "payer": str,
    "signature": str,
}
CHANNEL_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")


@dataclass(frozen=True, slots=True)
class Voucher:
    channel_id: str
    asset: str
    cumulative: str  # decimal string, as signed
    sequence: int
    resource: str
    payee: str
    payer: str
    signature: str
    signed_message: bytes
    fields: Mapping[str, Any]  # the object as received: kept as the channel's evidence


def new_channel_id() -> str:
    return "ch_" + secrets.token_urlsafe(16)


def voucher_from(obj: Mapping[str, Any]) -> Voucher:
    """A decoded payment object (protocol.decode_payment) → Voucher, or a typed 400."""
    if obj.get("scheme") != SCHEME:
        raise UnsupportedScheme(f"scheme must be {SCHEME!r}")
    protocol.check_fields(obj, VOUCHER_FIELDS)
    if obj["sequence"] < 1:
        raise MalformedPayment("voucher sequence must be a positive integer")
    if not CHANNEL_ID.fullmatch(obj["channel_id"]):
        raise MalformedPayment("channel_id must be 8-64 characters of A-Z a-z 0-9 _ -")
    unsigned = {k: v for k, v in obj.items() if k != "signature"}
    return Voucher(
        channel_id=obj["channel_id"],
        asset=obj["asset"],
        cumulative=obj["cumulative"],
        sequence=obj["sequence"],
        resource=obj["resource"],
        payee=obj["payee"],
        payer=obj["payer"],
        signature=obj["signature"],
        signed_message=VOUCHER_DOMAIN + protocol.canonical_json(unsigned),
        fields=obj,
    )


def sign_voucher(terms: Mapping[str, Any], wallet: Identity) -> dict[str, Any]:
    """Client side: sign `terms` (channel_id, asset, cumulative, sequence, resource,
    payee); version, scheme and payer are filled in."""
    fields: dict[str, Any] = {
        "version": protocol.VERSION,
        "scheme": SCHEME,
        **{k: terms[k] for k in VOUCHER_FIELDS if k in terms},
        "payer": wallet.public_key,
    }
    fields.pop("signature", None)
    fields["signature"] = wallet.sign(VOUCHER_DOMAIN + protocol.canonical_json(fields))
    return fields


def verify_signature(voucher: Mapping[str, Any]) -> bool:
    """The payer's signature on a voucher object (offline: evidence bundles)."""
    try:
        parsed = voucher_from(voucher)
        key = payer_key(parsed.payer)
    except (PaymentError, ValueError):
        return False
    return verify(key, parsed.signed_message, parsed.signature)


def verify_voucher(voucher: Voucher, request: Request, price: Price, gateway: Gateway) -> int:
    """Every check that needs no ledger, cheapest first; the cumulative amount (atomic)."""
    if voucher.resource != request.resource:
        raise InvoiceMismatch(f"voucher is for {voucher.resource!r}, not {request.resource!r}")
    if voucher.asset != price.asset.code:
        raise InvoiceMismatch(f"this route is priced in {price.asset.code}, not {voucher.asset}")
    if voucher.payee not in gateway.payees:
        raise InvoiceMismatch(
            f"voucher is for payee {voucher.payee!r}, this gateway is {gateway.payee!r}"
        )
    try:
        cumulative = price.asset.to_atomic(voucher.cumulative)
    except AmountError as exc:
        raise MalformedPayment(f"voucher cumulative: {exc}") from None
    if cumulative > MAX_BALANCE:
        raise MalformedPayment("voucher cumulative is beyond any deposit")
    try:
        key = payer_key(voucher.payer)
    except ValueError:
        raise MalformedPayment("payer is not a base64url Ed25519 public key") from None
    if not verify(key, voucher.signed_message, voucher.signature):
        raise InvalidSignature("the voucher signature does not verify for this payer")
    return cumulative
