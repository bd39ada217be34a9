"""A payment's identity, and the request it paid for: how a retry of the same payment is
known (docs/protocol.md §13). Pure.

Every payment has an identity: the x402 `payment-identifier` extension's id when the client
sends one (the PaymentPayload's `extensions["payment-identifier"]["info"]["id"]`, as the
official `x402.extensions.payment_identifier` reads it), otherwise its proof's nonce
(prepaid) or its voucher's channel and sequence (channel). The ledger records the first
outcome under it, in the same script as the charge, with a fingerprint of the request it
paid for; a retry with the same identity and fingerprint is redelivered (never charged
again), one with another fingerprint is a conflict.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.errors import InvalidPaymentIdentifier

PAYMENT_IDENTIFIER = "payment-identifier"  # the extension's key (x402 PAYMENT_IDENTIFIER)
ID_MIN_CHARS, ID_MAX_CHARS = 16, 128  # x402's PAYMENT_ID_MIN_LENGTH, PAYMENT_ID_MAX_LENGTH
_ID_PATTERN = re.compile(r"[a-zA-Z0-9_-]+")  # x402's PAYMENT_ID_PATTERN
DEFAULT_REDELIVERY_LIMIT = 3


@dataclass(frozen=True, slots=True)
class Retry:
    """How the ledger knows this payment again: its identity (unique per payer) and the
    fingerprint of the request it pays for."""

    identity: str
    fingerprint: str


def identifier(envelope: Mapping[str, Any]) -> str | None:
    """The payment-identifier id an x402 v2 PaymentPayload carries, or None; raises
    InvalidPaymentIdentifier when the extension is there but not its format."""
    extensions = envelope.get("extensions")
    if extensions is None:
        return None
    if not isinstance(extensions, dict):
        raise InvalidPaymentIdentifier("the payment's extensions must be a JSON object")
    extension = extensions.get(PAYMENT_IDENTIFIER)
    if extension is None:
        return None
    info = extension.get("info") if isinstance(extension, dict) else None
    if not isinstance(info, dict):
        raise InvalidPaymentIdentifier("payment-identifier must be an object with an `info`")
    found = info.get("id")
    if found is None:
        return None
    if not (
        isinstance(found, str)
        and ID_MIN_CHARS <= len(found) <= ID_MAX_CHARS
        and _ID_PATTERN.fullmatch(found)
    ):
        raise InvalidPaymentIdentifier(
            f"payment-identifier id must be {ID_MIN_CHARS}-{ID_MAX_CHARS} characters of "
            "letters, digits, '-' and '_'"
        )
    return found


def fingerprint(*parts: str | int) -> str:
    """What a payment covered, hashed: method, path, query, amount, payee, route, … One
    line per part, so no two different requests share it."""
    text = "\n".join(str(part) for part in parts)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def identity(payment_id: str | None, own: str) -> str:
    """The ledger's name for a payment: the client's payment id, else the scheme's `own`
    (a proof's nonce, a voucher's channel and sequence); never the one for the other."""
    return f"id:{payment_id}" if payment_id is not None else f"own:{own}"
