"""The hold step of `charge: on_success` routes, one object per scheme that supports it.

At check time a scheme's `hold` places the hold (ledger/holds.py) instead of charging; the
ext_authz servicer answers allow with the hold's facts as dynamic metadata, which Envoy's
ext_proc filter forwards to the response phase (server/processor.py). There the same
scheme's `capture` or `release` closes it, and the signed receipt states what was charged.
A scheme without a hold step (channel vouchers) is charged on check on such a route. A new
scheme (x402 `exact`: verify at check, settle after success) plugs in here by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.core import holds, protocol, receipts
from sidecar.core.decision import Gateway
from sidecar.core.errors import PaymentError
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.ledger.accounts import Ledger
from sidecar.ledger.holds import Closed, Holds
from sidecar.server.logs import get_logger
from sidecar.server.schemes import Payment

# Keys of the ext_authz dynamic metadata that carry a hold to the response phase.
HOLD, HOLD_SCHEME, PAYER, ASSET, HELD, ROUTE, REQUEST_ID = (
    "hold",
    "hold_scheme",
    "payer",
    "asset",
    "held",
    "route",
    "request_id",
)


@dataclass(frozen=True, slots=True)
class Held:
    hold_id: str  # also the receipt id of its capture
    amount: int  # atomic units held
    balance: str  # what the payer has left to spend, as a wire decimal


class HoldingScheme(Protocol):
    name: str

    async def hold(
        self,
        payment: Payment,
        price: Price,
        phase: holds.ResponsePhase,
        now: int,
        late: Callable[[Held | PaymentError], None] | None,
        within: float | None,
    ) -> Held: ...

    async def capture(
        self,
        payer: str,
        hold_id: str,
        amount: int,
        held: int,
        units: int | None,
        now: int,
        within: float | None,
    ) -> Closed: ...

    async def release(self, payer: str, hold_id: str) -> Closed: ...


class ProofHolds:
    """`prepaid-ed25519` on a route with a response phase: the proof's amount is held."""

    name = protocol.SCHEME

    def __init__(self, gateway: Gateway, ledger: Ledger) -> None:
        self.gateway, self.holds = gateway, Holds(ledger)

    async def hold(
        self,
        payment: Payment,
        price: Price,
        phase: holds.ResponsePhase,
        now: int,
        late: Callable[[Held | PaymentError], None] | None,
        within: float | None,
    ) -> Held:
        proof: protocol.Proof = payment.terms
        hold_id = protocol.new_receipt_id()
        record = receipts.debit_record(
            proof, price.asset, price.amount, price.route, self.gateway.payee, now
        )

        def held(balance: int) -> Held:
            return Held(hold_id, price.amount, price.asset.to_decimal(balance))

        listener = None
        if late is not None:
            report = late

            def listener(outcome: int | PaymentError) -> None:
                report(outcome if isinstance(outcome, PaymentError) else held(outcome))

        balance = await self.holds.place(
            proof.payer,
            proof.nonce,
            price.asset.code,
            price.amount,
            proof.expires_at,
            hold_id,
            phase.hold_seconds,
            record,
            listener,
            within,
        )
        return held(balance)

    async def capture(
        self,
        payer: str,
        hold_id: str,
        amount: int,
        held: int,
        units: int | None,
        now: int,
        within: float | None,
    ) -> Closed:
        extra = receipts.hold_extra(held, units)
        return await self.holds.capture(payer, hold_id, amount, now, extra, within)

    async def release(self, payer: str, hold_id: str) -> Closed:
        return await self.holds.release(payer, hold_id)


def registry(gateway: Gateway, ledger: Ledger) -> dict[str, HoldingScheme]:
    schemes: list[HoldingScheme] = [ProofHolds(gateway, ledger)]
    return {scheme.name: scheme for scheme in schemes}


def metadata(
    held: Held, payment: Payment, scheme: str, price: Price, request_id: str | None
) -> dict[str, str]:
    """What the response phase needs, as ext_authz dynamic metadata (strings)."""
    assert price.phase is not None
    return {
        HOLD: held.hold_id,
        HOLD_SCHEME: scheme,
        PAYER: payment.payer,
        ASSET: price.asset.code,
        HELD: str(held.amount),
        ROUTE: price.route,
        REQUEST_ID: request_id or "",
        # the access log's fields, as for a charge: the amount is the hold until captured
        "amount": price.display,
        "receipt_id": held.hold_id,
        **holds.phase_annotations(price.phase, price.asset),
    }


def capture_receipt(
    gateway: Gateway, payer: str, hold_id: str, closed: Closed, asset: Asset, now: int,
    units: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The signed receipt of a capture: the receipt-stream entry the script wrote."""
    entry: dict[str, Any] = {
        **closed.record,
        "receipt_id": hold_id,
        "amount": closed.amount,
        "balance": closed.balance,
        "issued_at": now,
        **receipts.hold_extra(closed.held, units),
    }
    return protocol.sign_receipt(receipts.body(payer, entry, asset), gateway.identity)


def release_receipt(
    gateway: Gateway, payer: str, hold_id: str, closed: Closed, asset: Asset, status: int,
    now: int, record: Mapping[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    body = receipts.release_body(
        payer, hold_id, record or closed.record, asset, closed.held, closed.balance, status, now
    )
    return protocol.sign_receipt(body, gateway.identity)


async def sweep_forever(ledger: Ledger, seconds: float) -> None:
    """Worker 0: release every payer's expired holds each `seconds` (the hold scripts also
    sweep a payer's own before placing one). Cancelled at shutdown."""
    sweeper = Holds(ledger)
    log = get_logger("sidecar.holds")
    while True:
        await asyncio.sleep(seconds)
        try:
            released = await sweeper.sweep_all()
        except Exception as exc:  # the ledger down: the next pass tries again
            log.warning("holds.sweep_failed", error=exc.__class__.__name__)
            continue
        if released:
            log.info("holds.released_expired", holds=released)
