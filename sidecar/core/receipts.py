"""The receipt format, in one place (PROTOCOL.md §4).

A charge that the ledger records is a receipt-stream entry: the facts below, stored by
the debit (or channel close) script, which adds `receipt_id` and `balance`. The receipt
the agent gets is the body derived from such an entry and signed by the gateway. The
response path and settlement (which re-derives every receipt to batch it) both call
`body`, so the two are the same bytes by construction; Ed25519 signatures are
deterministic, so re-signing gives the same signature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sidecar.core.errors import MalformedReceipt
from sidecar.core.identity import Identity, b64url, verify, verify_key
from sidecar.core.money import Asset
from sidecar.core.protocol import RECEIPT_DOMAIN, VERSION, Proof, canonical_json, sign_receipt
from sidecar.core.vouchers import SCHEME as CHANNEL_SCHEME
from sidecar.core.vouchers import Voucher

CHANNEL_CLOSE = "channel"  # the `kind` of a channel close's stream entry
CHANNEL_OPEN = "channel_open"  # the `kind` of a self-serve open's receipt

# The fields every receipt has, whatever its variant (the bodies below), and their types.
_COMMON: dict[str, type] = {
    "receipt_id": str, "success": bool, "payer": str, "payee": str, "asset": str,
    "amount": str, "issued_at": int, "kid": str, "signature": str,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Receipt:
    """A signed receipt (PROTOCOL.md §4) as it crosses module boundaries: its common fields
    typed, `body` every signed field but `kid` (a variant's extras included, read-only).
    `to_wire()` is the dict that was signed plus the signature, so its canonical JSON is
    the bytes of the receipt header and of a batch's leaf."""

    receipt_id: str
    success: bool
    payer: str
    payee: str
    asset: str
    amount: str  # decimal, as on the wire
    issued_at: int
    kid: str
    signature: str
    body: Mapping[str, Any] = field(repr=False)

    @classmethod
    def sign(cls, fields: Mapping[str, Any], gateway: Identity) -> Receipt:
        """The receipt of an unsigned body (one of the functions below), signed."""
        return cls.from_wire(sign_receipt(fields, gateway))

    @classmethod
    def from_wire(cls, obj: Any) -> Receipt:
        """MalformedReceipt when `obj` is not an object with every common field typed."""
        if not isinstance(obj, Mapping):
            raise MalformedReceipt("a receipt is a JSON object")
        for name, kind in _COMMON.items():
            value = obj.get(name)
            if type(value) is not kind:
                raise MalformedReceipt(f"the receipt has no valid {name!r}")
        body = MappingProxyType({k: v for k, v in obj.items() if k not in ("kid", "signature")})
        return cls(
            obj["receipt_id"], obj["success"], obj["payer"], obj["payee"], obj["asset"],
            obj["amount"], obj["issued_at"], obj["kid"], obj["signature"], body,
        )  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        return {**self.body, "kid": self.kid, "signature": self.signature}

    @property
    def signed_message(self) -> bytes:
        return RECEIPT_DOMAIN + canonical_json({**self.body, "kid": self.kid})

    def verify(self, public_keys: Mapping[str, str]) -> bool:
        """Offline check with the gateway keys of discovery ({kid: base64url public key})."""
        if self.kid not in public_keys:
            return False
        try:
            key = verify_key(public_keys[self.kid])
        except ValueError:
            return False
        return verify(key, self.signed_message, self.signature)


def debit_record(
    proof: Proof, asset: Asset, amount: int, route: str, payee: str, issued_at: int
) -> dict[str, str | int]:
    """What the debit script stores for one paid proof (it adds receipt_id and balance)."""
    return {
        "nonce": proof.nonce,
        "invoice_id": proof.invoice_id or "",
        "resource": proof.resource,
        "asset": asset.code,
        "amount": amount,
        "route": route,
        "issued_at": issued_at,
        "payee": payee,
    }


def body(payer: str, entry: Mapping[str, Any], asset: Asset) -> dict[str, Any]:
    """The unsigned receipt of one receipt-stream entry (a debit or a channel close).
    Values may be the stream's strings or the caller's ints; KeyError or ValueError when
    the entry lacks a field or holds a malformed one."""
    if entry.get("kind") == CHANNEL_CLOSE:
        return _close_body(payer, entry, asset)
    receipt = {
        "version": VERSION,
        "success": True,
        "receipt_id": entry["receipt_id"],
        "invoice_id": entry["invoice_id"],
        "nonce": entry["nonce"],
        "payer": payer,
        "payee": entry["payee"],
        "resource": entry["resource"],
        "asset": asset.code,
        "amount": asset.to_decimal(int(entry["amount"])),
        "balance": asset.to_decimal(int(entry["balance"])),
        "issued_at": int(entry["issued_at"]),
    }
    if "held" in entry:  # a captured hold (charge: on_success): what was held, what used
        receipt["held"] = asset.to_decimal(int(entry["held"]))
        if entry.get("units", "") != "":
            receipt["units"] = int(entry["units"])
    return receipt


def hold_extra(held: int, units: int | None) -> dict[str, str]:
    """The facts a hold's capture adds to its receipt-stream entry (see `body`)."""
    extra = {"held": str(held)}
    if units is not None:
        extra["units"] = str(units)
    return extra


def release_body(
    payer: str, hold_id: str, record: Mapping[str, Any], asset: Asset, released: int,
    balance: int, status: int, issued_at: int,
) -> dict[str, Any]:  # fmt: skip
    """The unsigned receipt of a released hold: nothing was charged (`success` false,
    `amount` 0), the hold went back, the proof may be retried. Not a stream entry."""
    return {
        "version": VERSION,
        "success": False,
        "receipt_id": hold_id,
        "invoice_id": record.get("invoice_id", ""),
        "nonce": record.get("nonce", ""),
        "payer": payer,
        "payee": record.get("payee", ""),
        "resource": record.get("resource", ""),
        "asset": asset.code,
        "amount": "0",
        "released": asset.to_decimal(released),
        "balance": asset.to_decimal(balance),
        "status": status,
        "issued_at": issued_at,
    }


def _close_body(payer: str, entry: Mapping[str, Any], asset: Asset) -> dict[str, Any]:
    """A channel close carries the payer's final voucher, so an auditor can check that the
    payer itself signed for the amount settled."""
    receipt: dict[str, Any] = {
        "version": VERSION,
        "success": True,
        "receipt_id": entry["receipt_id"],
        "scheme": CHANNEL_SCHEME,
        "channel_id": entry["channel_id"],
        "payer": payer,
        "payee": entry["payee"],
        "asset": asset.code,
        "amount": asset.to_decimal(int(entry["amount"])),
        "deposit": asset.to_decimal(int(entry["deposit"])),
        "refund": asset.to_decimal(int(entry["refund"])),
        "sequence": int(entry["sequence"]),
        "balance": asset.to_decimal(int(entry["balance"])),
        "issued_at": int(entry["issued_at"]),
    }
    if entry["voucher"]:
        receipt["voucher"] = json.loads(entry["voucher"])
    return receipt


def voucher_body(
    voucher: Voucher,
    asset: Asset,
    cumulative: int,
    increment: int,
    remaining: int,
    receipt_id: str,
    payee: str,
    issued_at: int,
) -> dict[str, Any]:
    """The unsigned receipt of one accepted voucher; not a stream entry (a channel keeps
    only its latest voucher, and its close is the entry that settlement batches)."""
    return {
        "version": VERSION,
        "success": True,
        "receipt_id": receipt_id,
        "scheme": CHANNEL_SCHEME,
        "channel_id": voucher.channel_id,
        "sequence": voucher.sequence,
        "cumulative": asset.to_decimal(cumulative),
        "payer": voucher.payer,
        "payee": payee,
        "resource": voucher.resource,
        "asset": asset.code,
        "amount": asset.to_decimal(increment),
        "balance": asset.to_decimal(remaining),  # left in the channel
        "issued_at": issued_at,
    }


def exact_body(
    payer: str,
    resource: str,
    asset: Asset,
    amount: int,
    settled: Mapping[str, str],
    receipt_id: str,
    payee: str,
    issued_at: int,
) -> dict[str, Any]:
    """The unsigned receipt of one `exact` payment. It carries the official x402
    SettleResponse fields (`success`, `transaction`, `network`, `payer`), so official
    clients read it as their PAYMENT-RESPONSE; the settlement is the chain's transaction,
    not a ledger entry. `settled`: transaction, network, token, nonce (the authorization)."""
    return {
        "version": VERSION,
        "success": True,
        "receipt_id": receipt_id,
        "scheme": "exact",
        "payer": payer,
        "payee": payee,
        "resource": resource,
        "asset": asset.code,
        "amount": asset.to_decimal(amount),
        "transaction": settled["transaction"],
        "network": settled["network"],
        "token": settled["token"],
        "nonce": settled["nonce"],
        "issued_at": issued_at,
    }


def exact_release_body(
    payer: str, resource: str, asset: Asset, released: int, network: str, token: str,
    nonce: str, receipt_id: str, payee: str, status: int, issued_at: int,
) -> dict[str, Any]:  # fmt: skip
    """The unsigned receipt of an `exact` authorization verified at the check and never
    settled, because the service failed: nothing moved on chain (`success` false, `amount`
    0, no `transaction`); the same authorization may be sent again until it expires."""
    return {
        "version": VERSION,
        "success": False,
        "receipt_id": receipt_id,
        "scheme": "exact",
        "payer": payer,
        "payee": payee,
        "resource": resource,
        "asset": asset.code,
        "amount": "0",
        "released": asset.to_decimal(released),
        "transaction": "",
        "network": network,
        "token": token,
        "nonce": nonce,
        "status": status,
        "issued_at": issued_at,
    }


def topup_receipt_id(source: str) -> str:
    """A top-up's receipt id, one per authorization (`source`): an agent that sends the
    same authorization again (its answer lost) is answered with the same receipt."""
    return "rcpt_" + b64url(hashlib.sha256(f"topup:{source}".encode()).digest()[:16])


def topup_body(
    payer: str,
    authorizer: str,
    asset: Asset,
    credited: int,
    balance: int,
    settled: Mapping[str, str],
    receipt_id: str,
    payee: str,
    issued_at: int,
) -> dict[str, Any]:
    """The unsigned credit receipt of a top-up: `payer` is the Ed25519 key credited,
    `authorizer` the address that paid on chain; also the top-up's PAYMENT-RESPONSE."""
    return {
        "version": VERSION,
        "success": True,
        "receipt_id": receipt_id,
        "kind": "topup",
        "scheme": "exact",
        "payer": payer,
        "payee": payee,
        "asset": asset.code,
        "amount": asset.to_decimal(credited),
        "balance": asset.to_decimal(balance),
        "authorizer": authorizer,
        "transaction": settled["transaction"],
        "network": settled["network"],
        "token": settled["token"],
        "nonce": settled["nonce"],
        "issued_at": issued_at,
    }


def channel_open_body(
    payer: str,
    channel_id: str,
    asset: Asset,
    deposit: int,
    balance: int,
    expires_at: int,
    receipt_id: str,
    payee: str,
    issued_at: int,
) -> dict[str, Any]:
    """The unsigned receipt of a self-serve channel open: `amount` is the deposit locked,
    `balance` the payer's prepaid balance left. Not a stream entry (nothing is charged: the
    channel's close is what settlement batches)."""
    return {
        "version": VERSION,
        "success": True,
        "receipt_id": receipt_id,
        "kind": CHANNEL_OPEN,
        "scheme": CHANNEL_SCHEME,
        "channel_id": channel_id,
        "payer": payer,
        "payee": payee,
        "asset": asset.code,
        "amount": asset.to_decimal(deposit),
        "deposit": asset.to_decimal(deposit),
        "balance": asset.to_decimal(balance),
        "expires_at": expires_at,
        "issued_at": issued_at,
    }
