"""Receipts as an agent sees them: read off a response, checked, attached to it.

One reader for every way this SDK pays (X402Auth's proofs and `exact`, ChannelAuth's
vouchers): each payment kind says what makes a receipt its own (a `check`), this module
does the rest the same way for all: the header, base64 JSON, `Receipt` in
`response.extensions["x402_receipt"]`, and a bad receipt raised (strict) or warned about.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar.core import protocol
from sidecar.core.errors import InvalidReceipt, MalformedReceipt, PaymentError, ReceiptWarning
from sidecar.core.receipts import Receipt as Signed

RECEIPT_EXTENSION = "x402_receipt"
NOT_JSON = "the payment receipt header is not base64 JSON"


@dataclass(frozen=True)
class Receipt:
    """The gateway's signed receipt for one payment, as the client checked it."""

    receipt_id: str
    payer: str
    payee: str
    resource: str
    asset: str
    amount: str
    balance: str  # the payer's ledger balance after this payment
    nonce: str
    invoice_id: str  # "" for a direct payment
    issued_at: int
    kid: str
    verified: bool  # signature valid for the gateway's key *and* it is for this payment
    fields: Mapping[str, Any] = field(repr=False)
    # A route charged on success: `amount` is what was captured of the `held` amount (a
    # metered route: `units` of it); `success` False: the service failed, nothing was
    # charged (`released`), and the same payment may be retried.
    success: bool = True
    held: str = ""
    units: int | None = None
    problem: str = ""  # why it is not verified ("" when it is)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], verified: bool, problem: str = "") -> Receipt:
        def text(name: str) -> str:
            value = fields.get(name, "")
            return value if isinstance(value, str) else str(value)

        issued = fields.get("issued_at")
        return cls(
            receipt_id=text("receipt_id"),
            payer=text("payer"),
            payee=text("payee"),
            resource=text("resource"),
            asset=text("asset"),
            amount=text("amount"),
            balance=text("balance"),
            nonce=text("nonce"),
            invoice_id=text("invoice_id"),
            issued_at=issued if type(issued) is int else 0,
            kid=text("kid"),
            verified=verified,
            fields=dict(fields),
            success=fields.get("success") is True,
            held=text("held") or text("released"),
            units=fields["units"] if type(fields.get("units")) is int else None,
            problem=problem,
        )


def receipt_of(response: Any) -> Receipt | None:
    """The verified receipt of an httpx or requests response paid through this SDK."""
    extensions = getattr(response, "extensions", None)
    if isinstance(extensions, Mapping) and RECEIPT_EXTENSION in extensions:
        receipt = extensions[RECEIPT_EXTENSION]
        return receipt if isinstance(receipt, Receipt) else None
    receipt = getattr(response, RECEIPT_EXTENSION, None)
    if isinstance(receipt, Receipt):
        return receipt
    # requests follows redirects itself: a paid 3xx's receipt is on its history's response
    for hop in reversed(getattr(response, "history", None) or []):
        receipt = getattr(hop, RECEIPT_EXTENSION, None)
        if isinstance(receipt, Receipt):
            return receipt
    return None


def receipt_header(response: httpx.Response) -> str | None:
    """The gateway's signed receipt: always in X-Payment-Response (PAYMENT-RESPONSE is the
    standard's SettleResponse on an `exact` payment, and alone on a failed settlement)."""
    value: str | None = response.headers.get(protocol.X_RECEIPT)
    return value


def refusal(response: httpx.Response) -> str | None:
    """The gateway's reason when it refused a payment (nothing was charged), else None."""
    if response.status_code < 400 or receipt_header(response) is not None:
        return None
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    reason = body.get("error") if isinstance(body, dict) else None
    # Envoy adds the receipt to every allowed response, so a denial without one is unpaid.
    return reason if isinstance(reason, str) else f"http_{response.status_code}"


def receipt_fields(header: str) -> dict[str, Any] | None:
    """A receipt header's fields, or None when it is not base64 JSON of an object."""
    try:
        fields = protocol.decode_header(header)
    except PaymentError:
        return None
    return fields if isinstance(fields, dict) else None


def verified(fields: Mapping[str, Any], keys: Mapping[str, str]) -> bool:
    """Whether `fields` are a receipt signed by one of the gateway's `keys`."""
    try:
        return Signed.from_wire(fields).verify(keys)
    except MalformedReceipt:
        return False


def attach(response: httpx.Response, fields: Mapping[str, Any], problem: str | None) -> Receipt:
    """Put the Receipt on the response; `problem` says why the fields are not this
    payment's receipt (None: they are, it is verified)."""
    receipt = Receipt.from_fields(fields, verified=problem is None, problem=problem or "")
    response.extensions = {**response.extensions, RECEIPT_EXTENSION: receipt}
    return receipt


def report(receipt: Receipt, problem: str | None, strict: bool, response: httpx.Response) -> None:
    """Say what is wrong with an attached receipt, if anything (see `bad_receipt`)."""
    if problem is not None:
        message = f"receipt {receipt.receipt_id or '?'}: {problem}"
        bad_receipt(message, strict, response, receipt, problem)


# Frames of these packages are the SDK's and its HTTP stack's, not the caller's.
_NOT_THE_CALLER = ("/sidecar/agent/", "/httpx/", "/httpcore/", "/requests/", "/urllib3/",
                   "/anyio/", "/asyncio/", "/contextlib.py")  # fmt: skip


def _caller_level() -> int:
    """The `stacklevel` of the first frame outside the SDK and the HTTP libraries: a
    warning points at the caller's line (`client.get(...)`), not at this package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and any(part in frame.f_code.co_filename for part in _NOT_THE_CALLER):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def bad_receipt(
    message: str,
    strict: bool,
    response: httpx.Response | None = None,
    receipt: Receipt | None = None,
    reason: str = "",
) -> None:
    """A receipt that does not prove the payment, once the payment was made: with strict,
    InvalidReceipt carrying the response and the Receipt (None when there was none); else
    a ReceiptWarning at the caller's line (the response is still returned)."""
    if strict:
        raise InvalidReceipt(message, response, receipt, reason or message)
    warnings.warn(message, ReceiptWarning, stacklevel=_caller_level())
