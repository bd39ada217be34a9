"""`prepaid-ed25519`: a signed proof debits the payer's prepaid balance in one ledger
script; on a route charged on success, the proof's amount is held at the check instead and
captured (all or the units served) or released at the response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.core import decision, phases, protocol, receipts, retries
from sidecar.core.decision import Gateway, Request
from sidecar.core.errors import PaymentError
from sidecar.core.money import Asset
from sidecar.core.pricing import Price
from sidecar.core.protocol import Proof
from sidecar.core.retries import Retry
from sidecar.ledger.accounts import Ledger, Redelivered
from sidecar.ledger.holds import CAPTURED, NO_HOLD, HoldClosed, Holds
from sidecar.server import replays
from sidecar.server.envoy.contract import HELD, HOLD, PAYER
from sidecar.server.schemes.base import (
    Charged,
    Closing,
    Held,
    HoldingScheme,
    Payment,
)

# What a debit's outcome keeps beside its receipt id: a redelivery re-signs the same receipt.
_KEPT = ("balance", "issued_at", "nonce", "invoice_id")
# What a captured hold's outcome keeps beside its receipt's fields (ledger/lua/hold_close).
_NOT_RECEIPT = ("fp", "redelivered", replays.RESPONSE)


class Prepaid(HoldingScheme[Proof]):
    name = protocol.SCHEME
    reason = "paid"

    def __init__(self, gateway: Gateway, ledger: Ledger) -> None:
        self.gateway, self.ledger, self.holds = gateway, ledger, Holds(ledger)

    def verify(
        self, payment: Mapping[str, Any], request: Request, price: Price, now: int
    ) -> Payment[Proof]:
        proof = decision.verify_payment(
            request, price, self.gateway, now, protocol.Proof.from_wire(payment)
        )
        covered = retries.fingerprint(
            request.method,
            request.path,
            request.query,
            price.amount,
            proof.payee,
            price.route,
            request.body_digest,
        )
        retry = Retry(retries.identity(None, proof.nonce), covered)
        return Payment(proof.payer, proof, proof.invoice_id, proof.nonce, retry=retry)

    async def charge(
        self, payment: Payment[Proof], price: Price, now: int, within: float | None
    ) -> Charged:
        proof = payment.terms
        asset, receipt_id = price.asset, protocol.new_receipt_id()
        # Paid to the payee the proof names (the current key, or a previous one after a
        # rotation): that key signs the receipt, here and when settlement re-signs it.
        record = receipts.debit_record(proof, asset, price.amount, price.route, proof.payee, now)
        debited = await self.ledger.debit(
            proof.payer,
            proof.nonce,
            asset.code,
            price.amount,
            proof.expires_at,
            receipt_id,
            record,
            within,
            payment.retry,
            self.gateway.redelivery_limit,
        )
        if isinstance(debited, Redelivered):  # the first charge's receipt, signed again
            record |= {k: debited.outcome[k] for k in _KEPT}
            entry = {**record, "receipt_id": debited.outcome["receipt_id"]}
        else:
            entry = {**record, "receipt_id": receipt_id, "balance": debited}
        receipt = receipts.body(proof.payer, entry, asset)
        signed, header = protocol.signed_receipt(receipt, self.gateway.signer(proof.payee))
        if isinstance(debited, Redelivered):
            return Charged(signed, 0, receipt["balance"], header, redelivered=True)
        return Charged(signed, price.amount, receipt["balance"], header)

    async def hold(
        self, payment: Payment[Proof], price: Price, phase: phases.ResponsePhase, now: int,
        within: float | None,
    ) -> Held | Charged:  # fmt: skip
        proof = payment.terms
        hold_id = protocol.new_receipt_id()
        record = receipts.debit_record(
            proof, price.asset, price.amount, price.route, proof.payee, now
        )
        placed = await self.holds.place(
            proof.payer,
            proof.nonce,
            price.asset.code,
            price.amount,
            proof.expires_at,
            hold_id,
            phase.hold_seconds,
            record,
            within,
            payment.retry,
            self.gateway.redelivery_limit,
        )
        if isinstance(placed, Redelivered):  # captured before: its receipt, signed again
            entry = {k: v for k, v in placed.outcome.items() if k not in _NOT_RECEIPT}
            receipt = receipts.body(proof.payer, entry, price.asset)
            signer = self.gateway.signer(str(receipt["payee"]))
            signed, header = protocol.signed_receipt(receipt, signer)
            kept = replays.recorded(placed.outcome)
            return Charged(signed, 0, receipt["balance"], header, None, True, kept)
        return Held(hold_id, price.amount, price.asset.to_decimal(placed))

    async def abandon(self, held: Held, payment: Payment[Proof]) -> PaymentError | None:
        return None  # the hold expires and the ledger gives it back; the proof stays spent

    async def capture(
        self, meta: Mapping[str, str], asset: Asset, capture: phases.Capture, now: int,
        within: float | None,
    ) -> Closing:  # fmt: skip
        payer, hold_id, held = meta[PAYER], meta[HOLD], int(meta[HELD])
        extra = receipts.hold_extra(held, capture.units)
        closed = await self.holds.capture(
            payer, hold_id, capture.amount, now, extra, within,
            capture.response, self.gateway.replay_per_payer,
        )  # fmt: skip
        if closed.outcome != CAPTURED:
            return Closing(closed, None, None)
        receipt = self._captured(payer, hold_id, closed, asset, now, capture.units)
        return Closing(closed, receipt, asset.to_decimal(closed.balance))

    async def release(
        self, meta: Mapping[str, str], asset: Asset, status: int, now: int
    ) -> Closing:
        payer, hold_id = meta[PAYER], meta[HOLD]
        closed = await self.holds.release(payer, hold_id)
        if closed.outcome == NO_HOLD:
            return Closing(closed, None, None)
        body = receipts.release_body(
            payer, hold_id, closed.record, asset, closed.held, closed.balance, status, now
        )
        receipt = protocol.sign_receipt(body, self.gateway.signer(str(body["payee"])))
        return Closing(closed, receipt, asset.to_decimal(closed.balance))

    def _captured(
        self,
        payer: str,
        hold_id: str,
        closed: HoldClosed,
        asset: Asset,
        now: int,
        units: int | None,
    ) -> dict[str, Any]:
        """The signed receipt of a capture: the receipt-stream entry the script wrote."""
        entry: dict[str, Any] = {
            **closed.record,
            "receipt_id": hold_id,
            "amount": closed.amount,
            "balance": closed.balance,
            "issued_at": now,
            **receipts.hold_extra(closed.held, units),
        }
        signer = self.gateway.signer(str(entry.get("payee", "")))
        return protocol.sign_receipt(receipts.body(payer, entry, asset), signer)
