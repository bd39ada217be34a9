"""Self-serve channel requests, pure: an agent asks the gateway to open a channel from its
own prepaid balance, or to close one, with an object signed by its Ed25519 key in a domain
of its own (`fth-x402/2.0 channel-open\\n`), so a request can never pass for a proof, a
voucher or a receipt, nor the reverse. Replay-safe: a nonce (spent by the ledger in the
same script that moves the money) and an expiry. The ledger's side is
sidecar.ledger.channels; the side port's, sidecar.server.self_channels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core import protocol
from sidecar.core.decision import Gateway, payer_key
from sidecar.core.errors import (
    InvalidSignature,
    InvoiceExpired,
    InvoiceMismatch,
    MalformedPayment,
    UnsupportedVersion,
)
from sidecar.core.identity import Identity, verify
from sidecar.core.vouchers import CHANNEL_ID

DOMAIN = b"fth-x402/2.0 channel-open\n"
HEADER = "x-channel-request"  # base64 of the signed object (the side port reads no body)
OPEN, CLOSE = "open", "close"
_COMMON: dict[str, type] = {
    "version": str,
    "action": str,
    "channel_id": str,
    "payee": str,
    "payer": str,
    "nonce": str,
    "expires_at": int,
    "signature": str,
}
FIELDS: dict[str, dict[str, type]] = {
    OPEN: {**_COMMON, "asset": str, "deposit": str, "ttl_seconds": int},
    CLOSE: _COMMON,
}


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """A signed open or close request, parsed (not yet verified)."""

    action: str
    channel_id: str
    payee: str
    payer: str
    nonce: str
    expires_at: int
    signature: str
    signed_message: bytes
    asset: str = ""  # open only
    deposit: str = ""  # open only: a decimal string in `asset`, as signed
    ttl_seconds: int = 0  # open only: the channel's lifetime


def request_from(obj: Any) -> ChannelRequest:
    """A decoded request object → ChannelRequest, or a typed 400 (malformed_payment,
    unsupported_version)."""
    if not isinstance(obj, Mapping):
        raise MalformedPayment("a channel request is a JSON object")
    if obj.get("version") != protocol.VERSION:
        raise UnsupportedVersion(f"version must be {protocol.VERSION!r}")
    action = obj.get("action")
    if action not in FIELDS:
        raise MalformedPayment("action must be 'open' or 'close'")
    protocol.check_fields(obj, FIELDS[action])
    if not CHANNEL_ID.fullmatch(obj["channel_id"]):
        raise MalformedPayment("channel_id must be 8-64 characters of A-Z a-z 0-9 _ -")
    if len(obj["nonce"]) < protocol.MIN_NONCE_CHARS:
        raise MalformedPayment(f"nonce must be at least {protocol.MIN_NONCE_CHARS} characters")
    if action == OPEN and obj["ttl_seconds"] < 1:
        raise MalformedPayment("ttl_seconds must be a positive integer")
    unsigned = {k: v for k, v in obj.items() if k != "signature"}
    return ChannelRequest(
        action=action,
        channel_id=obj["channel_id"],
        payee=obj["payee"],
        payer=obj["payer"],
        nonce=obj["nonce"],
        expires_at=obj["expires_at"],
        signature=obj["signature"],
        signed_message=DOMAIN + protocol.canonical_json(unsigned),
        asset=obj.get("asset", ""),
        deposit=obj.get("deposit", ""),
        ttl_seconds=obj.get("ttl_seconds", 0),
    )


def sign_request(terms: Mapping[str, Any], wallet: Identity) -> dict[str, Any]:
    """Client side: sign `terms` (action, channel_id, payee, nonce, expires_at; for an
    open also asset, deposit, ttl_seconds); version and payer are filled in."""
    action = terms["action"]
    fields: dict[str, Any] = {
        "version": protocol.VERSION,
        **{k: terms[k] for k in FIELDS[action] if k in terms},
        "payer": wallet.public_key,
    }
    fields.pop("signature", None)
    fields["signature"] = wallet.sign(DOMAIN + protocol.canonical_json(fields))
    return fields


def verify_request(request: ChannelRequest, gateway: Gateway, now: int) -> None:
    """Every check that needs no ledger, cheapest first: the payee is this gateway, the
    request has not expired nor lives longer than the direct-proof window, the signature."""
    if request.payee not in gateway.payees:
        raise InvoiceMismatch(
            f"request is for payee {request.payee!r}, this gateway is {gateway.payee!r}"
        )
    if request.expires_at < now:
        raise InvoiceExpired("the channel request has expired")
    if request.expires_at > now + gateway.max_direct_ttl:
        raise InvoiceExpired(
            f"expires_at is more than {gateway.max_direct_ttl} seconds ahead",
            max_ttl_seconds=gateway.max_direct_ttl,
        )
    try:
        key = payer_key(request.payer)
    except ValueError:
        raise MalformedPayment("payer is not a base64url Ed25519 public key") from None
    if not verify(key, request.signed_message, request.signature):
        raise InvalidSignature("the request's signature does not verify for this payer")
